"""A library from adapter files: the base rebuilt from the first manifest, every adapter verified.

:func:`read_manifests` and :func:`base_dir` read only file headers and JSON, so a tool can check
its inputs with them before any model is built; :func:`library_from_files` builds the library.

>>> lib, class_names, manifest = library_from_files({'a': 'run_a/adapter.safetensors'})  # doctest: +SKIP
"""
from __future__ import annotations

import json
import pathlib

import ml_collections

from peftjax import delta
from peftjax import models
from peftjax.serving.adapter import AdapterError


def read_manifests(adapters: dict[str, str]) -> dict[str, dict]:
  """``name -> manifest`` of every adapter file, in order; the first must be able to rebuild the
  base (its model config and class names). Reads the headers only, never the tensors."""
  manifests = {n: delta.read_manifest(p) for n, p in adapters.items()}
  first_name, first = next(iter(manifests.items()))
  if not first['base'].get('model_config') or not first.get('class_names'):
    raise AdapterError(f'adapter {first_name!r}: its manifest has no base.model_config or '
                       'class_names (written by an older peftjax); re-save it with train.save_adapter')
  return manifests


def base_dir(model_cfg: dict, base: str = '') -> pathlib.Path | None:
  """The HF directory the base is loaded from (``base`` if given, else the manifest's model
  config: its ``pretrained`` directory or the bundled MiniLM), or None for a random init.

  A ``base`` that is not a BERT directory (config, weights and tokenizer) is refused naming
  ``--base``.
  """
  if base:
    from peftjax.models.hf_bert import check_model_dir  # pylint: disable=g-import-not-at-top
    check_model_dir(base, field='--base')  # a directory with config, weights and tokenizer
    return pathlib.Path(base).expanduser()
  from peftjax.tasks.classification import resolve_pretrained  # pylint: disable=g-import-not-at-top
  found = resolve_pretrained(ml_collections.ConfigDict(dict(model_cfg)))
  return pathlib.Path(found) if found else None


def max_positions(directory: pathlib.Path | None) -> int | None:
  """``max_position_embeddings`` of an HF directory's ``config.json`` (None if it has none)."""
  if directory is None or not (directory / 'config.json').is_file():
    return None
  try:
    value = json.loads((directory / 'config.json').read_text()).get('max_position_embeddings')
  except (OSError, ValueError):
    return None
  return int(value) if isinstance(value, int) else None


def library_from_files(adapters: dict[str, str], *, base: str = '', max_rank: int = 0,
                       manifests: dict[str, dict] | None = None):
  """``(AdapterLibrary, class names per adapter, first manifest)`` for ``name -> path``.

  The base is rebuilt from the first manifest's model config; every adapter is verified against
  it (hash, shapes) as it is loaded. ``manifests`` are those of :func:`read_manifests`, when the
  caller has read them already.
  """
  from peftjax.serving.library import AdapterLibrary  # pylint: disable=g-import-not-at-top
  manifests = manifests or read_manifests(adapters)
  first = next(iter(manifests.values()))
  classes = first['class_names']
  model_cfg = ml_collections.ConfigDict(first['base']['model_config'])
  pretrained = base_dir(model_cfg, base)
  if base:
    model_cfg.pretrained = base
  built = models.build(model_cfg, num_classes=len(classes),
                       pretrained_dir=str(pretrained) if pretrained else None)
  # Manifests come upgraded to the sectioned peft config (delta.read_manifest).
  ranks = [int(m['peft_config'].get('lora', {}).get('rank', 1)) for m in manifests.values()
           if 'lora' in m['method']]
  lib = AdapterLibrary(built.module, built.params, input_keys=built.input_keys,
                       max_rank=max_rank or max(ranks, default=1), base_source=built.source)
  for name, path in adapters.items():
    lib.load(name, path)
  names = {n: m.get('class_names') or [str(i) for i in range(len(classes))]
           for n, m in manifests.items()}
  return lib, names, first
