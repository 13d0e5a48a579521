"""Delta (adapter-only) checkpoints with provenance: one ``.safetensors`` file per adapter.

The file holds the trainable partition (``'base/...'`` and ``'peft/...'`` leaves, '/'-joined
paths), optionally the optimizer state (``'opt_state/<i>'`` leaves in tree order, restored
against a template by :func:`load_opt_state`) and, in the safetensors header's metadata, a JSON *manifest*: the method and its config,
the base model's identity (source, the model config that rebuilds it, and a content hash of the
frozen base weights), the data set and its class names,
evaluation metrics, the peftjax and JAX versions, the creation time, the parent adapter, and the
adapter's size against the base. Loading verifies the base hash and refuses a mismatch, naming
both hashes. Writes are atomic (temporary file + rename): a crash mid-write leaves the previous
artifact intact.

>>> save_delta('/tmp/a.safetensors', trainable, base_params=base, method='lora', peft_config=cfg.peft)  # doctest: +SKIP
>>> trainable, manifest = load_delta('/tmp/a.safetensors', base_params=base)  # doctest: +SKIP
"""
from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

import jax
import numpy as np

from peftjax import tree as tree_lib
from peftjax import storage
from peftjax.errors import UserInputError
from peftjax.peft import sections as peft_sections

FORMAT = 'peftjax-delta/1'
OPT_PREFIX = 'opt_state/'
MANIFEST_KEY = 'peftjax_manifest'
REQUIRED = ('format', 'method', 'peft_config', 'base', 'params', 'versions', 'created')


class DeltaError(UserInputError):
  """An adapter file that cannot be used: corrupt, incomplete, or for another base."""


def base_hash(base_params) -> str:
  """The base model's identity: a SHA-256 of its frozen weights' paths, shapes, dtypes, bytes."""
  return tree_lib.fingerprint(base_params)


def save_delta(path: str | pathlib.Path, trainable: dict, *, base_params: dict, method: str,
               peft_config: dict | Any, base_source: str = '', dataset: dict | None = None,
               metrics: dict | None = None, parent: str | dict | None = None,
               model_config: dict | Any = None, class_names=None, opt_state=None,
               merged_from: list | None = None) -> dict:
  """Writes the trainable partition + its manifest to ``path``; returns the manifest.

  ``base_params`` is the frozen base the adapter was trained against (hashed, not stored);
  ``parent`` the path of the adapter this one was trained from, if any (its manifest hash is
  recorded), or a dict ``{'path', 'params_sha256'}`` when that is already known; ``model_config`` the config section that rebuilds the base (``config.model``),
  ``class_names`` the labels of the head's outputs; ``opt_state`` an optimizer state to store
  with the adapter (to continue training from it); ``merged_from`` the adapters (and weights) a
  merged adapter was made of.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  flat = {p: np.require(jax.device_get(v), requirements='C') for p, v in
          tree_lib.flatten(trainable).items()}
  base_bytes = int(sum(np.asarray(v).nbytes for v in jax.tree.leaves(base_params)))
  opt_flat = {}
  if opt_state is not None:
    opt_flat = {f'{OPT_PREFIX}{i}': np.require(jax.device_get(v), requirements='C')
                for i, v in enumerate(jax.tree.leaves(opt_state))}
  adapter_bytes = int(sum(v.nbytes for v in flat.values()))
  peft_config, model_config = (c.to_dict() if hasattr(c, 'to_dict') else c
                                for c in (peft_config, model_config))
  manifest = {
      'format': FORMAT,
      'method': method,
      'peft_config': json.loads(json.dumps(peft_config, default=str)),
      'base': {'source': str(base_source), 'sha256': base_hash(base_params),
               'bytes': base_bytes,
               'model_config': json.loads(json.dumps(model_config, default=str))},
      'class_names': None if class_names is None else [str(c) for c in class_names],
      'dataset': dataset,
      'metrics': metrics,
      'params': {'count': int(sum(v.size for v in flat.values())), 'bytes': adapter_bytes,
                 'sha256': tree_lib.fingerprint(flat)},
      'adapter_to_base_bytes': adapter_bytes / max(base_bytes, 1),
      'versions': {'peftjax': _version(), 'jax': jax.__version__},
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'parent': None,
      'merged_from': merged_from,
      'opt_state': {'leaves': len(opt_flat),
                    'bytes': int(sum(v.nbytes for v in opt_flat.values()))} if opt_flat else None,
  }
  if isinstance(parent, dict):  # already known (e.g. a library adapter whose file moved)
    manifest['parent'] = {'path': str(parent['path']),
                          'params_sha256': parent.get('params_sha256')}
  elif parent is not None:
    manifest['parent'] = {'path': str(parent),
                          'params_sha256': read_manifest(parent)['params']['sha256']}
  data = safetensors.numpy.save({**flat, **opt_flat}, metadata={MANIFEST_KEY: json.dumps(manifest)})
  storage.write_bytes_atomic(path, data)
  manifest['file_bytes'] = len(data)
  return manifest


def read_manifest(path: str | pathlib.Path) -> dict:
  """The manifest of an adapter file; a :class:`DeltaError` if it is unreadable or incomplete.

  Its ``peft_config`` is in today's sections (``{'method', 'head', 'lora': {'rank', ...}, ...}``)
  also for a file written with the flat section of earlier versions (``peftjax.peft.sections``).
  """
  path = storage.path(path)
  if not path.is_file():
    raise DeltaError(f'adapter file {str(path)!r} does not exist')
  try:
    # The safetensors header: an 8-byte little-endian length, then that much JSON. Read just
    # that (a local file or an object in a bucket alike), not the tensors.
    with path.open('rb') as f:
      n = int.from_bytes(f.read(8), 'little')
      if not 0 < n < 100 << 20:
        raise ValueError(f'header length {n}')
      meta = json.loads(f.read(n)).get('__metadata__') or {}
  except Exception as e:  # truncated or not a safetensors file
    raise DeltaError(f'adapter file {str(path)!r} is corrupt or truncated: {e}') from None
  if MANIFEST_KEY not in meta:
    raise DeltaError(f'adapter file {str(path)!r} has no peftjax manifest (not a delta '
                     'checkpoint written by peftjax.delta.save_delta)')
  try:
    manifest = json.loads(meta[MANIFEST_KEY])
  except json.JSONDecodeError as e:
    raise DeltaError(f'adapter file {str(path)!r}: its manifest is not valid JSON ({e})') from None
  missing = [k for k in REQUIRED if k not in manifest]
  if missing:
    raise DeltaError(f'adapter file {str(path)!r}: manifest misses {missing}; '
                     f'required: {list(REQUIRED)}')
  if isinstance(manifest['peft_config'], dict):  # older files hold the flat peft section
    manifest['peft_config'] = peft_sections.upgrade(manifest['peft_config'])
  return manifest


def check_base(manifest: dict, base_params, path: str | pathlib.Path = '') -> None:
  """A :class:`DeltaError` naming both hashes unless ``base_params`` is the adapter's base."""
  have = base_hash(base_params)
  want = manifest['base']['sha256']
  if have != want:
    raise DeltaError(f'adapter {str(path)!r} was trained on base {want[:16]}... '
                     f"({manifest['base'].get('source') or 'unknown source'}); the given base "
                     f'is {have[:16]}...: refusing to load it on another base')


def load_delta(path: str | pathlib.Path, *, base_params: dict | None = None
               ) -> tuple[dict, dict]:
  """``(trainable tree, manifest)`` of an adapter file.

  With ``base_params``, their hash must equal the manifest's base hash (else a
  :class:`DeltaError` naming both). The parameters' own hash is checked too, so a file whose
  tensors were altered is refused.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  manifest = read_manifest(path)
  if base_params is not None:
    check_base(manifest, base_params, path)
  try:
    flat = safetensors.numpy.load(storage.read_bytes(path))
  except Exception as e:
    raise DeltaError(f'adapter file {str(path)!r} is corrupt or truncated: {e}') from None
  flat = {k: v for k, v in flat.items() if not k.startswith(OPT_PREFIX)}
  if tree_lib.fingerprint(flat) != manifest['params']['sha256']:
    raise DeltaError(f'adapter file {str(path)!r}: its tensors do not match the manifest '
                     'hash (the file was altered or damaged)')
  return tree_lib.unflatten(flat), manifest


def load_opt_state(path: str | pathlib.Path, template):
  """The optimizer state stored with an adapter, in the structure of ``template``
  (``tx.init(trainable)``); ``None`` if the file has none. A :class:`DeltaError` if the stored
  leaves do not fit the template (another optimizer or another trainable partition).
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if not read_manifest(path).get('opt_state'):
    return None
  flat = safetensors.numpy.load(storage.read_bytes(path))
  leaves, treedef = jax.tree.flatten(template)
  stored = [flat.get(f'{OPT_PREFIX}{i}') for i in range(len(leaves))]
  extra = sum(k.startswith(OPT_PREFIX) for k in flat) - len(leaves)
  bad = [i for i, (s, t) in enumerate(zip(stored, leaves))
         if s is None or s.shape != np.shape(t) or s.dtype != np.asarray(t).dtype]
  if bad or extra:
    raise DeltaError(f'adapter file {str(path)!r}: its optimizer state does not fit this '
                     f'optimizer (leaf {bad[0] if bad else len(leaves)} of {len(leaves)} differs);'
                     ' use the same optim config and trainable partition it was saved with')
  return jax.tree.unflatten(treedef, stored)


def _version() -> str:
  from peftjax import __version__  # pylint: disable=g-import-not-at-top
  return __version__
