"""A library adapter to and from Hugging Face formats (see :mod:`peftjax.hf`).

* :func:`export_merged` — the adapter folded into the base, as an HF BERT directory
  (``config.json`` + ``model.safetensors``): a plain model for any BERT runtime.
* :func:`export_peft` — a LoRA adapter (and its head) as an HF PEFT adapter directory
  (``adapter_config.json`` + ``adapter_model.safetensors``).
* :func:`load_peft` — an HF PEFT LoRA adapter into a library, servable with the others.

>>> export_merged(lib, 'sentiment', '/tmp/sentiment_merged')  # doctest: +SKIP
>>> load_peft(lib, 'from_hub', '/path/to/peft_adapter')        # doctest: +SKIP
"""
from __future__ import annotations

import pathlib

from peftjax import tree as tree_lib
from peftjax.hf import export_bert
from peftjax.hf import load_peft_adapter
from peftjax.hf import save_peft_adapter
from peftjax.models.bert import BertClassifier
from peftjax.serving.adapter import AdapterError


def _bert(lib) -> BertClassifier:
  if not isinstance(lib.module, BertClassifier):
    raise AdapterError(f'Hugging Face export/import supports BERT classifiers; this library '
                       f'holds a {type(lib.module).__name__}')
  return lib.module


def export_merged(lib, name: str, out_dir: str | pathlib.Path, *, overwrite: bool = False):
  """Writes adapter ``name`` merged into the base as an HF BERT directory; returns its path."""
  module = _bert(lib)
  ad = lib[name]
  params = lib.merged_params(name)
  return export_bert(out_dir, module.cfg, params, pooling=module.pooling,
                     class_names=(ad.manifest or {}).get('class_names'),
                     source=ad.source or lib.base_source, overwrite=overwrite)


def export_peft(lib, name: str, out_dir: str | pathlib.Path, *, overwrite: bool = False):
  """Writes LoRA adapter ``name`` (and its head) in the HF PEFT format; returns its path."""
  _bert(lib)
  ad = lib[name]
  if ad.method != 'lora':
    raise AdapterError(f'adapter {name!r} is {ad.method!r}; the PEFT export writes LoRA '
                       "adapters (export_merged writes any method)")
  extra = sorted(set(ad.base) - {'classifier/kernel', 'classifier/bias'})
  if extra:
    raise AdapterError(f'adapter {name!r} also trains base leaves {extra[:3]}, which the PEFT '
                       'LoRA format cannot hold; use export_merged')
  lora = {}
  for p, (a, b) in ad.lora.items():
    lora[f'{p}/lora_a'], lora[f'{p}/lora_b'] = a, b
  head = None
  if ad.base:
    head = {'kernel': ad.base['classifier/kernel'], 'bias': ad.base['classifier/bias']}
  cfg = ad.peft_config
  return save_peft_adapter(out_dir, tree_lib.unflatten(lora), rank=int(cfg['rank']),
                           alpha=float(cfg['alpha']), rslora=bool(cfg.get('rslora', False)),
                           head=head, base_model_name_or_path=lib.base_source,
                           overwrite=overwrite)


def load_peft(lib, name: str, adapter_dir: str | pathlib.Path):
  """Adds an HF PEFT LoRA adapter directory to ``lib`` as ``name``; returns its Adapter.

  PEFT files carry no hash of their base: the shapes are checked against this library's base,
  and ``base_model_name_or_path`` is kept in the adapter's manifest.
  """
  module = _bert(lib)
  lora, head, info = load_peft_adapter(adapter_dir, module.cfg)
  trainable = {'base': {'classifier': head} if head is not None else {}, 'peft': lora}
  cfg = {'method': 'lora', 'rank': info['rank'], 'alpha': info['alpha'],
         'rslora': info['rslora'], 'targets': info['targets']}
  ad = lib.add_trained(name, trainable, 'lora', cfg)
  ad.source = str(adapter_dir)
  ad.manifest = {'base': {'source': info.get('base_model_name_or_path', '')},
                 'format': 'hf-peft'}
  return ad
