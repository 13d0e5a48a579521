"""A library from adapter files: the base rebuilt from the first manifest, every adapter verified.

>>> lib, class_names, manifest = library_from_files({'a': 'run_a/adapter.safetensors'})  # doctest: +SKIP
"""
from __future__ import annotations

import ml_collections

from peftjax import delta
from peftjax import models
from peftjax.serving.adapter import AdapterError
from peftjax.serving.library import AdapterLibrary


def library_from_files(adapters: dict[str, str], *, base: str = '', max_rank: int = 0):
  """``(AdapterLibrary, class names per adapter, first manifest)`` for ``name -> path``.

  The base is rebuilt from the first manifest's model config; every adapter is verified against
  it (hash, shapes) as it is loaded.
  """
  from peftjax import train  # pylint: disable=g-import-not-at-top  (train imports serving's peers)
  manifests = {n: delta.read_manifest(p) for n, p in adapters.items()}
  first_name, first = next(iter(manifests.items()))
  model_cfg = first['base'].get('model_config')
  classes = first.get('class_names')
  if not model_cfg or not classes:
    raise AdapterError(f'adapter {first_name!r}: its manifest has no base.model_config or '
                       'class_names (written by an older peftjax); re-save it with train.save_adapter')
  model_cfg = ml_collections.ConfigDict(model_cfg)
  if base:
    model_cfg.pretrained = base
  built = models.build(model_cfg, num_classes=len(classes),
                       pretrained_dir=train.resolve_pretrained(model_cfg))
  ranks = [int(m['peft_config'].get('rank', 1)) for m in manifests.values()
           if 'lora' in m['method']]
  lib = AdapterLibrary(built.module, built.params, input_keys=built.input_keys,
                       max_rank=max_rank or max(ranks, default=1), base_source=built.source)
  for name, path in adapters.items():
    lib.load(name, path)
  names = {n: m.get('class_names') or [str(i) for i in range(len(classes))]
           for n, m in manifests.items()}
  return lib, names, first
