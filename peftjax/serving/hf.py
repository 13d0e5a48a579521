"""A library adapter to and from Hugging Face formats (see :mod:`peftjax.hf`).

* :func:`export_merged` — the adapter folded into the base, as an HF BERT directory
  (``config.json`` + ``model.safetensors`` + the tokenizer): a plain model for any BERT runtime,
  and a ``BertForSequenceClassification`` when the model pools with ``'cls_pooler'``.
* :func:`export_peft` — a LoRA adapter (and its head) as an HF PEFT adapter directory
  (``adapter_config.json`` + ``adapter_model.safetensors``).
* :func:`load_peft` — an HF PEFT LoRA adapter into a library, servable with the others; it must
  fit the library's pooling exactly.
* :func:`library_from_peft` — a library built for one HF PEFT adapter: the pooling its head
  needs (``'cls_pooler'`` for a ``BertForSequenceClassification`` head) is selected.
* :func:`lm_adapter_from_peft` / :func:`lm_step_from_peft` — an HF PEFT LoRA adapter of a
  ``LlamaForCausalLM`` (:mod:`peftjax.hf.peft_llama`) as our trainable partition and ``peft``
  config (what :meth:`AdapterLibrary.add_trained` takes; :func:`load_peft` adds it to a library
  of a :class:`~peftjax.models.llama.LlamaForCausalLM`), or as a generation step function.

Exports never name a path of this machine: the base is named by its hub id when known
(``sentence-transformers/all-MiniLM-L6-v2`` for the bundled MiniLM), else by its directory name.

>>> export_merged(lib, 'sentiment', '/tmp/sentiment_merged')  # doctest: +SKIP
>>> load_peft(lib, 'from_hub', '/path/to/peft_adapter')        # doctest: +SKIP
>>> lib, names, info = library_from_peft('/path/to/peft_adapter')  # doctest: +SKIP
"""
from __future__ import annotations

import pathlib

import ml_collections

from peftjax import tree as tree_lib
from peftjax.hf import export_bert
from peftjax.hf import load_peft_adapter
from peftjax.hf import save_peft_adapter
from peftjax.hf.peft_lora import PeftFormatError
from peftjax.hf.peft_llama_import import load_peft_llama
from peftjax.hf.peft_llama_import import peft_config as lm_peft_config
from peftjax.hf.peft_llama_import import with_tables
from peftjax.models.bert import BertClassifier
from peftjax.models.hf_bert import CheckpointError
from peftjax.models.hf_bert import check_model_dir
from peftjax.models.hf_bert import hub_id
from peftjax.models.hf_bert import load_pooler
from peftjax.models.hf_bert import read_config
from peftjax.serving.adapter import AdapterError

HEAD_LEAVES = ('classifier/kernel', 'classifier/bias')
POOLER_LEAVES = ('pooler/kernel', 'pooler/bias')


def _bert(lib) -> BertClassifier:
  if not isinstance(lib.module, BertClassifier):
    raise AdapterError(f'Hugging Face export/import supports BERT classifiers; this library '
                       f'holds a {type(lib.module).__name__}')
  return lib.module


def _base_dir(lib) -> pathlib.Path | None:
  """The library's HF base directory, or None for a random base."""
  src = lib.base_source
  return pathlib.Path(src) if src and src != 'random' and pathlib.Path(src).is_dir() else None


def base_name(lib) -> str:
  """A portable name of the library's base: its hub id when known, else the directory's name."""
  base = _base_dir(lib)
  return hub_id(base) if base is not None else (lib.base_source or '')


def export_merged(lib, name: str, out_dir: str | pathlib.Path, *, overwrite: bool = False):
  """Writes adapter ``name`` merged into the base as an HF BERT directory, with the tokenizer
  the model was trained with; returns its path."""
  module = _bert(lib)
  ad = lib[name]
  params = lib.merged_params(name)
  base = _base_dir(lib)
  if 'pooler' not in params and base is not None:
    try:  # the base's own pooler (unused by this head), so that HF's BertModel loads complete
      params['pooler'] = load_pooler(base, module.cfg)
    except CheckpointError:
      pass
  return export_bert(out_dir, module.cfg, params, pooling=module.pooling,
                     class_names=(ad.manifest or {}).get('class_names'),
                     source=base_name(lib), base_model=base_name(lib), tokenizer_dir=base,
                     overwrite=overwrite)


def export_peft(lib, name: str, out_dir: str | pathlib.Path, *, overwrite: bool = False):
  """Writes LoRA adapter ``name`` (and its head) in the HF PEFT format; returns its path.

  With ``'cls_pooler'`` the head is PEFT's own ``SEQ_CLS`` classifier (exact in
  ``BertForSequenceClassification``); a head of another pooling goes to
  :data:`peftjax.hf.peft_lora.HEAD_NAME` beside a ``FEATURE_EXTRACTION`` adapter.
  """
  module = _bert(lib)
  ad = lib[name]
  if ad.method != 'lora':
    raise AdapterError(f'adapter {name!r} is {ad.method!r}; the PEFT export writes LoRA '
                       "adapters (export_merged writes any method)")
  extra = sorted(set(ad.base) - set(HEAD_LEAVES) - set(POOLER_LEAVES))
  if extra:
    raise AdapterError(f'adapter {name!r} also trains base leaves {extra[:3]}, which the PEFT '
                       'LoRA format cannot hold; use export_merged')
  _check_peft_base(lib, module)
  lora = {}
  for p, (a, b) in ad.lora.items():
    lora[f'{p}/lora_a'], lora[f'{p}/lora_b'] = a, b
  pick = lambda leaves: ({'kernel': ad.base[leaves[0]], 'bias': ad.base[leaves[1]]}
                         if all(k in ad.base for k in leaves) else None)
  cfg = ad.peft_config['lora']
  return save_peft_adapter(out_dir, tree_lib.unflatten(lora), rank=int(cfg['rank']),
                           alpha=float(cfg['alpha']), rslora=bool(cfg.get('rslora', False)),
                           head=pick(HEAD_LEAVES), pooler=pick(POOLER_LEAVES),
                           pooling=module.pooling,
                           class_names=(ad.manifest or {}).get('class_names'),
                           base_model_name_or_path=base_name(lib), overwrite=overwrite)


def _check_peft_base(lib, module: BertClassifier) -> None:
  """A PEFT adapter applies to its base checkpoint as published: refuse a model that is not it
  (a random init, or fewer layers / smaller FFNs than the checkpoint)."""
  _refuse_other_base(_base_dir(lib), lib.base_source, module.cfg.__dict__)


def _refuse_other_base(base: pathlib.Path | None, source: str, model: dict) -> None:
  if base is None:
    raise AdapterError(f'the base is {source or "unknown"!r}, not a Hugging Face checkpoint a '
                       'PEFT adapter could name; use --format=merged')
  ckpt = read_config(base).__dict__
  fields = ('num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'vocab_size')
  diff = [f'{f}={model[f]} (checkpoint: {ckpt[f]})' for f in fields
          if model.get(f) is not None and model[f] != ckpt[f]]
  if diff or model.get('moe_layers'):
    what = ', '.join(diff) if diff else f"moe_layers={model['moe_layers']}"
    raise AdapterError(f'the model is not its base checkpoint {hub_id(base)!r} as published '
                       f'({what}; e.g. model.num_layers keeps only the first layers): a PEFT '
                       'adapter applies to the whole checkpoint and would give other logits '
                       'there; use --format=merged (an exact HF BERT directory of this model)')


def check_peft_export(adapter: str | pathlib.Path, *, base: str = '') -> None:
  """The checks of :func:`export_peft` that a delta checkpoint's manifest answers, made before
  its base is built (a LoRA method, a base checkpoint at full depth)."""
  from peftjax import delta  # pylint: disable=g-import-not-at-top
  from peftjax.data import minilm_dir  # pylint: disable=g-import-not-at-top
  manifest = delta.read_manifest(adapter)
  if manifest.get('method') != 'lora':
    raise AdapterError(f"adapter {str(adapter)!r} is {manifest.get('method')!r}; the PEFT "
                       'export writes LoRA adapters (--format=merged writes any method)')
  model = (manifest.get('base') or {}).get('model_config') or {}
  if model.get('name', 'bert') != 'bert':
    return  # refused later, naming the model
  src = base or model.get('pretrained') or ''
  if src == 'random':
    _refuse_other_base(None, 'random', {})
  base_dir = pathlib.Path(src) if src else minilm_dir()
  if base_dir.is_dir() and (base_dir / 'config.json').is_file():
    _refuse_other_base(base_dir, src, {'num_layers': model.get('num_layers') or None})


def load_peft(lib, name: str, adapter_dir: str | pathlib.Path):
  """Adds an HF PEFT LoRA adapter directory to ``lib`` as ``name``; returns its Adapter.

  PEFT files carry no hash of their base: the shapes are checked against this library's base,
  and ``base_model_name_or_path`` is kept in the adapter's manifest (loading never depends on
  it). The adapter must be servable exactly: its head must read what the library's model
  pools (a ``BertForSequenceClassification`` head needs ``model.pooling='cls_pooler'``), and an
  adapter without a head is refused (the library's own head is not what it was used with).
  A library of a causal LM takes a ``CAUSAL_LM`` adapter (:func:`lm_adapter_from_peft`).
  """
  from peftjax.models.llama import LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  if isinstance(lib.module, LlamaForCausalLM):
    trainable, cfg, info = lm_adapter_from_peft(adapter_dir, lib.module.cfg)
    ad = lib.add_trained(name, trainable, 'lora', cfg)
    ad.source = str(adapter_dir)
    ad.manifest = {'base': {'source': info.get('base_model_name_or_path') or ''},
                   'format': 'hf-peft'}
    return ad
  module = _bert(lib)
  lora, head, info = load_peft_adapter(adapter_dir, module.cfg, pooling=module.pooling)
  if head is None:
    raise PeftFormatError(
        f'{adapter_dir}: the adapter has no classifier head (task_type='
        f"{info['task_type']!r}), and this library serves classifiers; valid: a SEQ_CLS adapter "
        "saved with modules_to_save=['classifier']")
  base = {'classifier': head}
  if info['pooler'] is not None:
    base['pooler'] = info['pooler']
  trainable = {'base': base, 'peft': lora}
  cfg = {'method': 'lora', 'lora': {'rank': info['rank'], 'alpha': info['alpha'],
                                    'rslora': info['rslora'], 'targets': info['targets']}}
  ad = lib.add_trained(name, trainable, 'lora', cfg)
  ad.source = str(adapter_dir)
  ad.manifest = {'base': {'source': info.get('base_model_name_or_path') or ''},
                 'class_names': info['class_names'], 'format': 'hf-peft'}
  return ad


def library_from_peft(adapter_dir: str | pathlib.Path, *, base: str = '', max_rank: int = 0,
                      name: str = 'adapter'):
  """``(AdapterLibrary, class names, info)`` serving the HF PEFT adapter ``adapter_dir`` as
  ``name``, over ``base`` (an HF BERT directory; default: the bundled MiniLM, whatever the
  adapter's ``base_model_name_or_path`` says). The model's pooling is the one the adapter's
  head needs; everything is checked before the base is built.

  >>> lib, names, info = library_from_peft('/path/to/peft_adapter', base='/path/to/bert')  # doctest: +SKIP
  """
  from peftjax import models  # pylint: disable=g-import-not-at-top
  from peftjax.data import minilm_dir  # pylint: disable=g-import-not-at-top
  from peftjax.serving.library import AdapterLibrary  # pylint: disable=g-import-not-at-top
  base_dir = pathlib.Path(base) if base else minilm_dir()
  check_model_dir(base_dir, field='--base')
  cfg = read_config(base_dir)
  _, head, info = load_peft_adapter(adapter_dir, cfg)
  if head is None:
    raise PeftFormatError(
        f'{adapter_dir}: the adapter has no classifier head (task_type='
        f"{info['task_type']!r}); valid: a SEQ_CLS adapter saved with "
        "modules_to_save=['classifier'] (a bare encoder adapter has no logits to serve)")
  pooling = info['pooling']
  check_model_dir(base_dir, field='--base', pooling=pooling)
  model_cfg = ml_collections.ConfigDict(dict(
      name='bert', pretrained=str(base_dir), num_layers=0, pooling=pooling, dropout_rate=0.0,
      grad_barrier=True, remat='none'))
  classes = head['kernel'].shape[1]
  built = models.build(model_cfg, num_classes=classes, pretrained_dir=str(base_dir))
  lib = AdapterLibrary(built.module, built.params, input_keys=built.input_keys,
                       max_rank=max_rank or max(info['ranks'].values()),
                       base_source=built.source)
  load_peft(lib, name, adapter_dir)
  names = info['class_names'] or [f'LABEL_{i}' for i in range(classes)]
  return lib, names, info


def lm_adapter_from_peft(adapter_dir: str | pathlib.Path, cfg):
  """``(trainable, peft_config, info)`` of an HF PEFT LoRA adapter of a ``LlamaForCausalLM``
  for our :class:`~peftjax.models.llama.LlamaForCausalLM` of ``cfg``: ``trainable`` is
  ``{'base': the embedding tables the file replaces (usually none), 'peft': the LoRA tree}``,
  ``peft_config`` the ``peft`` section whose method runs it (``peft.build``), ``info`` what
  :func:`peftjax.hf.peft_llama_import.load_peft_llama` says. Checked against ``cfg`` only:
  PEFT files carry no hash of their base.

  >>> trainable, peft_cfg, info = lm_adapter_from_peft('/tmp/lm_peft', cfg)  # doctest: +SKIP
  """
  trainable, info = load_peft_llama(adapter_dir, cfg)
  return trainable, lm_peft_config(info), info


def lm_step_from_peft(module, base_params: dict, adapter_dir: str | pathlib.Path):
  """``(step, info)``: the generation step function (:func:`peftjax.generation.method_step`)
  of ``module`` (a :class:`~peftjax.models.llama.LlamaForCausalLM`) with ``base_params`` and
  the HF PEFT LoRA adapter ``adapter_dir`` applied, for :func:`peftjax.generation.generate`.

  >>> step, info = lm_step_from_peft(model, params, '/tmp/lm_peft')  # doctest: +SKIP
  >>> out = generation.generate(step, make_cache, ids, lengths)  # doctest: +SKIP
  """
  from peftjax import generation  # pylint: disable=g-import-not-at-top
  from peftjax import peft  # pylint: disable=g-import-not-at-top
  trainable, cfg, info = lm_adapter_from_peft(adapter_dir, module.cfg)
  method = peft.build(ml_collections.ConfigDict(cfg))
  params = with_tables(base_params, trainable['base'])
  return generation.method_step(module, method, params, trainable['peft']), info
