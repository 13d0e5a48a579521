"""Resumable train-state checkpoints (orbax), in a local directory or a bucket, that are checked
before they are trusted.

The train state is ``{'step', 'params' (trainable partition only), 'opt_state', 'rng'}``; the
data position is a pure function of the step (see ``Data.train_batches``), so restoring the
latest checkpoint and continuing gives bit-identical parameters to an uninterrupted run.

What can go wrong with a checkpoint, and what happens:

* **A save that does not finish** (the process is killed, the disk fills). Orbax writes each
  step to ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so the previous
  checkpoints stay intact; a failed write raises :class:`CheckpointError` in one line (a full
  disk is recognised in what TensorStore raises: a ``ValueError`` ``RESOURCE_EXHAUSTED ... No
  space left on device``, not an ``OSError``) and its partial directory is removed.
* **A damaged checkpoint** (a file deleted, truncated or overwritten after it was written).
  After each save, process 0 writes ``<step>/peftjax_manifest.json`` (atomically): the size
  and sha256 of every file of the step (sizes only in a bucket, where reading the files back
  would mean downloading them). :func:`survey` checks the newest steps against their manifests
  and that orbax can read the step's tree metadata (``_METADATA``); a restore that raises is the
  other signal (the only one for a step without a manifest). The training loop moves a damaged
  step aside to ``<step>.damaged-<UTC time>`` (never deletes it; orbax ignores that name), says
  so in one line and resumes from the newest intact step; when none is intact it stops with one
  line naming each step and what is damaged.
* **Checkpoints of another config** (another method, rank, targets, model...). The rule: a
  checkpoint is resumed when its saved tree (every leaf's path, shape and dtype, read from the
  checkpoint's metadata) equals this run's abstract train state; it is refused otherwise. So
  config fields that do not change the train state's structure (``train.steps`` to train longer,
  logging and evaluation cadence, learning rate, data limits) keep resuming (with a note naming
  what changed), and the ones that do (``peft.method``, ``peft.lora.rank``, ``peft.lora.targets``,
  ``model.*``, ``optim.grad_accum_steps``...) are refused before anything is written, in one
  line that names the config fields that differ between ``<workdir>/config.json`` (written when
  a run starts: :func:`write_config`) and this run, e.g. ``peft.lora.rank: 8 (checkpoints) vs 16
  (this run)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from peftjax import storage
from peftjax.errors import UserInputError

MANIFEST = 'peftjax_manifest.json'
CONFIG = 'config.json'
DAMAGED = '.damaged-'
TMP_SUFFIX = '.orbax-checkpoint-tmp'
# Config fields a resumed run may change without changing its train state; listed last (after
# the fields that do change it) when a mismatch names what differs.
CONTINUATION_FIELDS = (
    'train.steps', 'train.log_every', 'train.eval_every', 'train.eval_before',
    'train.eval_batch_size', 'train.checkpoint_every', 'train.keep_checkpoints',
    'train.progress', 'train.save_adapter', 'train.save_adapter_opt_state',
    'data.max_eval_examples', 'data.eval_split', 'data.test_split')


class CheckpointError(UserInputError):
  """A checkpoint that cannot be used or written; the message names the step, what is wrong
  and what to do."""


# ---------------------------------------------------------------------------- file manifests


def _step_dir(directory, step: int):
  return storage.path(directory) / str(step)


def _files(step_dir) -> dict[str, Any]:
  """``{relative path: path}`` of every file of a step (its manifest excluded)."""
  out = {}

  def walk(d, prefix):
    for p in sorted(d.iterdir(), key=lambda q: q.name):
      rel = f'{prefix}{p.name}'
      if p.is_dir():
        walk(p, f'{rel}/')
      elif rel != MANIFEST:
        out[rel] = p
  walk(step_dir, '')
  return out


def _digest(p) -> tuple[int, str, bool]:
  """``(size, sha256 hex, whether every byte is zero)`` of a file, read in chunks."""
  h, size, zero = hashlib.sha256(), 0, True
  with p.open('rb') as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
      size += len(chunk)
      zero = zero and not chunk.strip(b'\0')
  return size, h.hexdigest(), zero


def _size(p) -> int:
  st = p.stat()
  return int(getattr(st, 'length', None) or getattr(st, 'st_size', 0) or 0)


def write_manifest(step_dir) -> None:
  """Records the size (and, on a local disk, the sha256) of every file of a finished step."""
  step_dir = storage.path(step_dir)
  hashes = not storage.is_remote(step_dir)
  files = {}
  for rel, p in _files(step_dir).items():
    if hashes:
      size, sha, _ = _digest(p)
      files[rel] = {'bytes': size, 'sha256': sha}
    else:
      files[rel] = {'bytes': _size(p)}
  storage.write_json_atomic(step_dir / MANIFEST, {'format': 1, 'files': files})


def check_files(step_dir) -> str | None:
  """What is damaged in a step's files, or None when they match its manifest (or it has none:
  a step saved before manifests existed, or whose manifest write did not happen)."""
  step_dir = storage.path(step_dir)
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return None
  try:
    files = json.loads(manifest.read_text())['files']
  except (ValueError, KeyError, TypeError, OSError) as e:
    return f'its {MANIFEST} is unreadable ({type(e).__name__})'
  for rel, want in files.items():
    p = step_dir / rel
    if not p.exists():
      return f'{rel} is missing'
    if 'sha256' not in want:
      size = _size(p)
      if size != want['bytes']:
        return f'{rel} has {size:,d} bytes; {want["bytes"]:,d} bytes were saved'
      continue
    size, sha, zero = _digest(p)
    if size < want['bytes']:
      return f'{rel} is truncated ({size:,d} of {want["bytes"]:,d} bytes)'
    if size != want['bytes']:
      return f'{rel} has {size:,d} bytes; {want["bytes"]:,d} bytes were saved'
    if sha != want['sha256']:
      what = 'zeroed' if zero else 'overwritten'
      return f'{rel} is {what} (its sha256 differs from the one recorded at save time)'
  return None


# ---------------------------------------------------------------------------- tree signatures


def _key(k) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'params/peft/.../lora_a': (shape, dtype)}`` of a tree of arrays or their metadata.

  Containers are named alike whatever their kind (a namedtuple field, a dict key and a list
  index all become one path component), as orbax stores them."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, 'shape', None)
    if shape is None:
      continue  # not an array (e.g. orbax's placeholder for an empty optimizer state)
    dtype = getattr(leaf, 'dtype', None)
    out['/'.join(_key(k) for k in path)] = (tuple(shape), str(dtype) if dtype else '?')
  return out


def signature_diff(saved: dict, wanted: dict, limit: int = 2) -> list[str]:
  """The first differences between a checkpoint's signature and this run's state."""
  diffs = []
  # The parameters first: their paths say most (the optimizer state mirrors them).
  for p in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith('params/'), p)):
    if p not in wanted:
      diffs.append(f'{p} only in the checkpoints')
    elif p not in saved:
      diffs.append(f'{p} only in this run')
    elif saved[p] != wanted[p]:
      (s1, d1), (s2, d2) = saved[p], wanted[p]
      diffs.append(f'{p}: shape {s1} {d1} vs {s2} {d2}' if d1 != d2 else
                   f'{p}: shape {s1} vs {s2}')
  extra = len(diffs) - limit
  return diffs[:limit] + ([f'{extra} more'] if extra > 0 else [])


# ---------------------------------------------------------------------------- run configs


def write_config(workdir, config) -> None:
  """Stores the run's config as ``<workdir>/config.json`` (atomically), as a run starts."""
  storage.write_json_atomic(storage.path(workdir) / CONFIG, _plain(config.to_dict()))


def saved_config(workdir) -> dict | None:
  """The config stored with the checkpoints: ``config.json``, else a finished run's summary;
  in today's sections also when an earlier version wrote it (:func:`peftjax.validate.upgrade`)."""
  from peftjax import validate  # pylint: disable=g-import-not-at-top
  wd = storage.path(workdir)
  for name, pick in ((CONFIG, lambda d: d), ('summary.json', lambda d: d.get('config'))):
    p = wd / name
    try:
      if p.exists():
        got = pick(json.loads(p.read_text()))
        if isinstance(got, dict):
          return validate.upgrade(got)
    except (ValueError, OSError):
      continue
  return None


def _plain(x):
  return json.loads(json.dumps(x, default=str))


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_diff(saved: dict | None, current) -> list[tuple[str, Any, Any]]:
  """``[(field, value in the checkpoints' config, value in this one)]``; the fields that can
  change the train state first (see ``CONTINUATION_FIELDS``)."""
  if saved is None:
    return []
  a = _flat(_plain(saved))
  b = _flat(_plain(current.to_dict() if hasattr(current, 'to_dict') else current))
  missing = object()
  diffs = [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
           if a.get(k, missing) != b.get(k, missing)]
  diffs = [(k, '(unset)' if x is missing else x, '(unset)' if y is missing else y)
           for k, x, y in diffs]
  return sorted(diffs, key=lambda d: d[0] in CONTINUATION_FIELDS)


def format_diff(diffs, *, this: str = 'this run', limit: int = 3) -> str:
  """``peft.lora.rank: 8 (checkpoints) vs 16 (this run), ...``."""
  shown = [f'{k}: {_short_value(x)} (checkpoints) vs {_short_value(y)} ({this})'
           for k, x, y in diffs[:limit]]
  if len(diffs) > limit:
    shown.append(f'{len(diffs) - limit} more')
  return ', '.join(shown)


def _short_value(v) -> str:
  s = repr(tuple(v) if isinstance(v, list) else v)
  return s if len(s) <= 60 else s[:57] + '...'


# ---------------------------------------------------------------------------- survey


@dataclasses.dataclass
class Survey:
  """The steps of a checkpoint directory, checked from the newest down to the first intact one.

  ``good`` is the newest step that passed (None: none did, or there are none); ``damaged`` the
  newer steps that did not, ``[(step, what is damaged)]``; ``saved`` the good step's signature.
  """
  directory: Any
  steps: list[int]
  good: int | None = None
  damaged: list[tuple[int, str]] = dataclasses.field(default_factory=list)
  saved: dict | None = None

  def damage(self) -> str:
    return '; '.join(f'step {s}: {why}' for s, why in self.damaged)


def _read_manager(directory):
  # Not orbax's read_only mode, which logs two warnings; with create=False and no cleanup the
  # manager writes nothing either.
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers=ocp.StandardCheckpointHandler())


def survey(directory, *, max_steps: int | None = None) -> Survey:
  """Checks the steps in ``directory`` newest first until one is intact; writes nothing.

  Intact: its files match its manifest and orbax reads its tree metadata. Only what is needed
  is checked (older steps are not read once an intact one is found)."""
  directory = storage.path(directory)
  if not directory.is_dir():
    return Survey(directory, [])
  mngr = _read_manager(directory)
  try:
    steps = sorted(mngr.all_steps(), reverse=True)
    out = Survey(directory, steps)
    for step in steps[:max_steps]:
      why = check_files(_step_dir(directory, step))
      if why is None:
        try:
          with quiet_orbax():
            meta = mngr.item_metadata(step)
          if meta is None or getattr(meta, 'tree', None) is None:
            raise ValueError('orbax found no tree metadata')
          out.saved = signature(meta.tree)
        except Exception as e:  # pylint: disable=broad-except
          why = f'its tree metadata (default/_METADATA) is unreadable: {short_error(e)}'
      if why is None:
        out.good = step
        return out
      out.damaged.append((step, why))
    return out
  finally:
    mngr.close()


def short_error(e: BaseException, limit: int = 160) -> str:
  """One short line of an orbax/TensorStore error (they run to pages)."""
  text = ' '.join(str(e).split()).split(' See full TensorStore details')[0]
  text = text or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _is_orbax_error_log(record) -> bool:
  return 'orbax' in record.pathname and record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_orbax():
  """Orbax logs a failed read or write from its worker threads as ERROR with a traceback,
  then raises it; the caller reports it in one line, so those logs are dropped here (kept with
  --verbose / PEFTJAX_VERBOSE=1)."""
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  if errors.verbose():
    yield
    return
  drop = lambda record: not _is_orbax_error_log(record)
  logger = logging.getLogger('absl')
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


_SILENCED = False


def _silence_failed_write_aftermath() -> None:
  """After a failed save, TensorStore completes the other pending writes on orbax's event loop,
  already closed: ``RuntimeError: Event loop is closed`` through ``sys.unraisablehook``, asyncio's
  "exception was never retrieved" and orbax's ERROR logs, until the process exits. The failure
  is reported in one line; this drops that aftermath for the rest of the process (kept with
  --verbose / PEFTJAX_VERBOSE=1)."""
  global _SILENCED
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  if _SILENCED or errors.verbose():
    return
  _SILENCED = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            'Event loop is closed' in str(unraisable.exc_value)):
      previous(unraisable)
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(
      lambda record: 'exception was never retrieved' not in record.getMessage())
  logging.getLogger('absl').addFilter(lambda record: not _is_orbax_error_log(record))


def _free_bytes(directory) -> int | None:
  """Free bytes where ``directory`` (or its nearest existing parent) lives; None when unknown
  (a bucket, or a multi-process run, where every process would have to agree)."""
  if storage.is_remote(directory) or jax.process_count() > 1:
    return None
  local = pathlib.Path(directory)
  while not local.exists() and local != local.parent:
    local = local.parent
  try:
    return shutil.disk_usage(local).free
  except OSError:
    return None


def _write_failure(e: BaseException) -> str | None:
  """What a failed checkpoint write ran into, when it is the storage (not a bug)."""
  text = str(e)
  code = getattr(e, 'errno', None)
  if code == errno.ENOSPC or 'No space left on device' in text or "os_error_code='28'" in text:
    return 'no space left on the device'
  if code == errno.EDQUOT or 'Disk quota exceeded' in text or "os_error_code='122'" in text:
    return 'disk quota exceeded'
  if code in (errno.EACCES, errno.EPERM, errno.EROFS) or 'Permission denied' in text or \
      'Read-only file system' in text:
    return 'permission denied'
  if code == errno.EIO or 'Input/output error' in text:
    return 'an input/output error'
  return None


def _utc_stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')


# ---------------------------------------------------------------------------- the manager


class Checkpointer:
  """Saves every ``every`` steps into ``directory``, keeps the newest ``keep``.

  >>> ckpt = Checkpointer('/tmp/run/checkpoints', every=100, keep=2)  # doctest: +SKIP
  >>> state = ckpt.restore(step, abstract_state)                      # doctest: +SKIP
  """

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 2,
               read_only: bool = False):
    self.every = every
    self.directory = storage.path(directory)
    # A writer removes the partial directories of saves that did not finish; ``read_only``
    # (restoring a finished run) creates and removes nothing.
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Writes ``state`` as checkpoint ``step`` (if due, or ``force``) and its manifest; returns
    whether it did. A write the storage refuses (full disk, quota, permissions) raises
    :class:`CheckpointError`; the checkpoints before it stay as they were."""
    if not (force or self.due(step)) or step == self.latest_step():
      return False
    previous = self.latest_step()
    kept = (f'checkpoint step {previous} is intact; free some space (or fix the storage) and '
            'rerun the same command to resume from it' if previous is not None else
            'there is no earlier checkpoint; rerunning starts from step 0')
    # A disk that is already too full fails here, before orbax starts writing.
    need = sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves(state))
    free = _free_bytes(self.directory)
    if free is not None and free < need:
      raise CheckpointError(
          f'no space left on the device for checkpoint step {step} ({need:,d} bytes needed, '
          f'{free:,d} free in {self.directory}); nothing was written and {kept}')
    try:
      with quiet_orbax():
        saved = self._mngr.save(step, args=ocp.args.StandardSave(state), force=force)
        self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      why = _write_failure(e)
      if why is None:
        raise
      _silence_failed_write_aftermath()
      self._remove_partial(step)
      raise CheckpointError(f'{why} while writing checkpoint step {step} to {self.directory} '
                            f'({short_error(e, 120)}); the partial write was removed and {kept}'
                            ) from None
    if saved and jax.process_index() == 0:
      write_manifest(_step_dir(self.directory, step))
    return bool(saved)

  def _remove_partial(self, step: int) -> None:
    if jax.process_index() != 0:
      return
    # The failed write's threads may still be closing files in it (seen on a loaded machine:
    # a removal raced them and left the directory), so try again for up to about 2 seconds.
    for _ in range(20):
      left = list(self.directory.glob(f'{step}{TMP_SUFFIX}*'))
      if not left:
        return
      for p in left:
        with contextlib.suppress(Exception):
          p.rmtree()
      time.sleep(0.1)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Checkpoint ``step`` restored into ``abstract_state``; a failed read raises
    :class:`CheckpointError` saying what failed (the caller decides what to do with it)."""
    try:
      with quiet_orbax():
        return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (OSError, MemoryError) as e:
      if isinstance(e, FileNotFoundError):
        raise CheckpointError(f'restoring it failed: {short_error(e)}') from None
      raise  # storage trouble that is not damage: reported as it is
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'restoring it failed: {short_error(e)}') from None

  def set_aside(self, step: int) -> str:
    """Renames damaged step ``step`` to ``<step>.damaged-<UTC time>`` (orbax no longer sees it,
    the files are kept); returns the new path. One process renames; then every process calls
    :meth:`reload`."""
    target = self.directory / f'{step}{DAMAGED}{_utc_stamp()}'
    _step_dir(self.directory, step).rename(target)
    return str(target)

  def reload(self) -> None:
    """Reads the step list again (after :meth:`set_aside`)."""
    self._mngr.reload()

  def close(self):
    self._mngr.close()


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest checkpoint step in ``directory``; None if it has none (nothing is created)."""
  directory = storage.path(directory)
  if not directory.is_dir():
    return None
  mngr = _read_manager(directory)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete tree, the target of a restore."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def check_fits(survey_: Survey, abstract_state: Any, saved_cfg: dict | None, config, *,
               this: str, hint: str) -> list[tuple[str, Any, Any]]:
  """Refuses (:class:`CheckpointError`) when the good step's saved tree is not this state's
  (the rule of the module docstring), naming the differing config fields; returns the config
  differences of a checkpoint that fits (the caller notes them)."""
  diffs = config_diff(saved_cfg, config)
  if survey_.good is None or survey_.saved is None:
    return diffs
  wanted = signature(abstract_state)
  if survey_.saved == wanted:
    return diffs
  structural = [d for d in diffs if d[0] not in CONTINUATION_FIELDS] or diffs
  named = (f': {format_diff(structural, this=this)}' if structural else
           ' (no config was stored with them)')
  raise CheckpointError(
      f'the checkpoints in {survey_.directory} were written by a different config{named}; '
      f'their train state does not fit {this}\'s '
      f'({"; ".join(signature_diff(survey_.saved, wanted, limit=1))}); {hint}')
