"""Run directories that are local paths or object-store URIs (``gs://bucket/run``, ``s3://...``).

Everything a run writes goes through :func:`path` (an ``etils.epath.Path``), so the same code
serves a laptop directory and a bucket shared by a TPU pod's workers. Orbax writes checkpoints
to both natively. For ``gs://`` the machine needs ``pip install 'peftjax[gcs]'`` (gcsfs for
epath, google-cloud-storage for orbax); ``tpu/setup.sh`` installs it.

Two differences between a disk and a bucket matter here:

* Renames. A local file is written to a temporary name and renamed into place, so a crash never
  leaves half a file. An object store has no rename, but an object appears only when its upload
  completes, so writing it directly gives the same guarantee.
* Appends. Objects cannot be appended to, so the append-only logs of a run (``metrics.jsonl``,
  TensorBoard event files) are kept in a local :class:`Staging` directory and uploaded whole at
  each :meth:`Staging.sync` (evaluation, checkpoint, end of run).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any

from etils import epath

_REMOTE_SCHEMES = ('gs://', 's3://', 'az://', 'hf://')


def is_remote(p: str | os.PathLike) -> bool:
  """Whether ``p`` is an object-store URI rather than a local path.

  >>> is_remote('gs://bucket/run'), is_remote('/tmp/run')
  (True, False)
  """
  return str(p).startswith(_REMOTE_SCHEMES)


def path(p: str | os.PathLike) -> epath.Path:
  """``p`` as an ``epath.Path``: local paths expanded and made absolute, URIs kept as they are.

  >>> str(path('gs://bucket/run') / 'summary.json')
  'gs://bucket/run/summary.json'
  """
  if is_remote(p):
    return epath.Path(str(p))
  return epath.Path(pathlib.Path(p).expanduser().absolute())


def write_bytes_atomic(p: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` so that readers see the previous file (or none) or all of it, never part.

  Local: a temporary file in the same directory, fsync, then a rename. Object store: one upload
  (objects become visible only when complete).

  >>> write_bytes_atomic('/tmp/x/summary.json', b'{}')  # doctest: +SKIP
  """
  target = path(p)
  if is_remote(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  local = pathlib.Path(target)
  local.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f'.{local.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp makes the file 0600; give it the mode an ordinary write would (0666 & ~umask),
    # so results and adapters stay readable by the rest of a team.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, local)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, replace: bool = False):
  """Yields an empty local directory beside ``out``; on success it becomes ``out`` in one rename.

  A failure removes it, so ``out`` is complete or absent (with ``replace``, an existing ``out``
  is swapped out only after the new one is whole, and restored if the swap fails).

  >>> with atomic_dir('/tmp/int8_model') as tmp:   # doctest: +SKIP
  ...   (tmp / 'manifest.json').write_text('{}')
  """
  out = pathlib.Path(out).absolute()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.tmp'))
  try:
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700, like mkstemp's 0600, would leak out
    yield tmp
    if replace and out.exists():
      old = out.with_name(f'.{out.name}.old-{uuid.uuid4().hex[:8]}')
      os.rename(out, old)
      try:
        os.rename(tmp, out)
      except BaseException:
        os.rename(old, out)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def write_json_atomic(p: str | os.PathLike, obj: Any) -> None:
  """Writes JSON atomically (see :func:`write_bytes_atomic`)."""
  write_bytes_atomic(p, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_bytes(p: str | os.PathLike) -> bytes:
  """The bytes of a local file or an object."""
  return path(p).read_bytes()


def probe_writable(directory: str | os.PathLike) -> None:
  """Raises ``OSError`` unless a file can be created in ``directory``.

  A local directory that does not exist yet is probed at its nearest existing ancestor, so
  nothing is created; a bucket prefix is probed by writing and deleting one small object.
  """
  d = path(directory)
  if is_remote(d):
    probe = d / f'.peftjax-write-probe-{uuid.uuid4().hex}'
    probe.write_bytes(b'')
    probe.unlink()
    return
  local = pathlib.Path(d)
  while not local.exists():
    local = local.parent
  if not local.is_dir():
    raise NotADirectoryError(f'{local} is not a directory')
  fd, tmp = tempfile.mkstemp(dir=local, prefix='.peftjax-write-probe-')
  os.close(fd)
  os.unlink(tmp)


class Staging:
  """Append-only run logs: written in place locally, staged and uploaded for a bucket.

  ``local`` is the directory to write into (the run directory itself when it is local). For a
  bucket it is a temporary directory, seeded with the files named in ``resume`` (so appending
  continues a resumed run's log); :meth:`sync` uploads what changed.

  >>> stage = Staging('gs://bucket/run', resume=('metrics.jsonl',))  # doctest: +SKIP
  >>> open(stage.local / 'metrics.jsonl', 'a').write('{}\\n'); stage.sync()  # doctest: +SKIP
  """

  def __init__(self, directory: str | os.PathLike, *, resume: tuple[str, ...] = ()):
    self.remote = path(directory) if is_remote(directory) else None
    if self.remote is None:
      self.local = pathlib.Path(path(directory))
      self.local.mkdir(parents=True, exist_ok=True)
      return
    self.local = pathlib.Path(tempfile.mkdtemp(prefix='peftjax-stage-'))
    for name in resume:
      if (self.remote / name).exists():
        (self.local / name).write_bytes((self.remote / name).read_bytes())
    self._uploaded: dict[str, int] = {}

  def sync(self) -> None:
    """Uploads every staged file that changed since the last sync (no-op when local)."""
    if self.remote is None:
      return
    for f in sorted(self.local.rglob('*')):
      if not f.is_file():
        continue
      rel = f.relative_to(self.local).as_posix()
      size = f.stat().st_size
      if self._uploaded.get(rel) == size:
        continue
      write_bytes_atomic(self.remote / rel, f.read_bytes())
      self._uploaded[rel] = size

  def close(self) -> None:
    """Final sync; removes the local staging directory of a bucket run."""
    if self.remote is None:
      return
    self.sync()
    shutil.rmtree(self.local, ignore_errors=True)
