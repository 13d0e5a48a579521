"""LoRA adapters in the Hugging Face PEFT format, for BERT-family models: export and import.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. What
this module reads and writes (checked against huggingface/peft: ``utils/save_and_load.py``
``get_peft_model_state_dict``, ``tuners/lora/layer.py``, ``tuners/lora/config.py``,
``tuners/lora/model.py``, ``utils/other.py``):

* Keys are the module names of the PEFT-wrapped model with the adapter name removed:
  ``base_model.model.<module>.lora_A.weight`` ``(r, in_features)`` and ``.lora_B.weight``
  ``(out_features, r)`` for ``nn.Linear``; ``base_model.model.<module>.lora_embedding_A``
  ``(r, num_embeddings)`` and ``.lora_embedding_B`` ``(embedding_dim, r)`` for ``nn.Embedding``
  (plain parameters, no ``.weight``). ``<module>`` is ``bert.encoder.layer.0.attention.self.query``
  for ``BertForSequenceClassification`` (task ``SEQ_CLS``), ``encoder.layer.0...`` for a bare
  ``BertModel``. ``modules_to_save`` (the ``classifier`` of ``SEQ_CLS``; a trained ``pooler``)
  is stored under the module's own name: ``base_model.model.classifier.weight`` ``(C, D)`` and
  ``.bias``, ``base_model.model.bert.pooler.dense.weight`` / ``.bias``.
* ``target_modules='all-linear'`` adapts every linear layer but the classifier, BERT's pooler
  (``bert.pooler.dense``) included; PEFT saves it as ``['dense', 'key', 'query', 'value']``.
* The update is ``W + scaling * B @ A`` (torch layout), ``scaling = lora_alpha / r``, or
  ``lora_alpha / sqrt(r)`` with ``use_rslora``; an embedding looks up rows of ``A.T`` and
  multiplies by ``B.T``, i.e. the same update on the ``(num_embeddings, dim)`` table.
* ``rank_pattern`` / ``alpha_pattern`` give per-module ``r`` / ``lora_alpha``: a key applies to a
  module name when ``re.match(rf'(.*\\.)?({key})$', name)`` (first key in order wins; the two
  patterns are looked up separately).

Our LoRA tree (``peftjax.peft.lora``) mirrors the base tree and has ONE scale ``s``:
``A = lora_A.T`` (reshaped to the kernel's input axes), ``B = lora_B.T`` (reshaped to its output
axes). A module whose PEFT scale ``s_m`` differs from the global ``s`` (rank/alpha patterns) is
imported with ``B * s_m / s``, so the single-scale forward reproduces PEFT's exactly. Sites may
have different ranks (a rank_pattern): ``lora_scope`` and ``LoRA.merge`` take each site's rank
from its tensors, so such a tree computes correctly; only ``LoRA.init`` uses one rank.

Supported sites: query/key/value, attention output, intermediate and output dense layers of
every encoder layer, the word/position/token-type embeddings, and the pooler (our ``pooler``
layer, present with ``model.pooling='cls_pooler'``). Not supported (clear
:class:`PeftFormatError`): DoRA, LoRA biases (``bias != 'none'``, ``lora_bias``), adapters relative
to a modified base (unconverted PiSSA/OLoRA/CorDA/LoftQ), layer replication, trainable tokens,
aLoRA, ``.bin`` files, task types other than ``SEQ_CLS`` / ``FEATURE_EXTRACTION``.
``fan_in_fan_out=True`` is accepted: PEFT itself resets it to False for ``nn.Linear`` and
ignores it for ``nn.Embedding``, and the A/B shapes do not depend on it.

Heads and pooling. A ``SEQ_CLS`` head (``modules_to_save`` classifier) reads
``tanh(pooler.dense(h[CLS]))``, as ``BertForSequenceClassification`` computes it: it is served
exactly with ``model.pooling='cls_pooler'`` and refused with any other pooling. Our heads that
pool otherwise (``'mean'``, ``'cls'``) have no PEFT form: :func:`save_peft_adapter` writes them
as a ``FEATURE_EXTRACTION`` adapter (exact for ``transformers.BertModel``) plus
:data:`HEAD_NAME`, a small safetensors file with the head and its pooling, which PEFT ignores
and :func:`load_peft_adapter` reads. A LoRA on the pooler matters only to a model that uses the
pooler; with another pooling it is left out (``info['unused']``), unless a head needs it.

>>> save_peft_adapter('/tmp/adapter', lora, rank=8, alpha=16.0, head=head)  # doctest: +SKIP
>>> lora, head, info = load_peft_adapter('/tmp/adapter', bert_cfg)  # doctest: +SKIP
>>> info['targets']  # doctest: +SKIP
'^(?:encoder/layer_0/attention/query/kernel|...)$'
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np

from peftjax import tree as tree_lib
from peftjax.errors import UserInputError
from peftjax.hf.bert_export import _safetensors_bytes
from peftjax.hf.bert_export import write_dir_atomic
from peftjax.models.bert import POOLINGS

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
HEAD_NAME = 'peftjax_head.safetensors'  # a head PEFT has no form for (pooling other than HF's)
PREFIX = 'base_model.model.'
TASK_TYPES = ('SEQ_CLS', 'FEATURE_EXTRACTION')

# Our module path <-> HF module name (without the 'bert.' of BertForSequenceClassification).
_ATTN = {'query': 'attention.self.query', 'key': 'attention.self.key',
         'value': 'attention.self.value', 'out': 'attention.output.dense'}
_OUR_SITE = re.compile(
    r'^(?:encoder/(?:layer_(?P<layer>\d+)/(?:attention/(?P<attn>query|key|value|out)|'
    r'(?P<ffn>intermediate|output))|embeddings/(?P<emb>word|position|token_type)_embeddings)|'
    r'(?P<pooler>pooler))$')
_HF_SITE = re.compile(
    r'^(?:encoder\.layer\.(?P<layer>\d+)\.(?:attention\.self\.(?P<qkv>query|key|value)|'
    r'(?P<out>attention\.output\.dense)|(?P<ffn>intermediate|output)\.dense)|'
    r'embeddings\.(?P<emb>word|position|token_type)_embeddings|(?P<pooler>pooler\.dense))$')
VALID_KEYS = (
    PREFIX + '[bert.]encoder.layer.{i}.attention.self.{query,key,value}.lora_{A,B}.weight',
    PREFIX + '[bert.]encoder.layer.{i}.attention.output.dense.lora_{A,B}.weight',
    PREFIX + '[bert.]encoder.layer.{i}.{intermediate,output}.dense.lora_{A,B}.weight',
    PREFIX + '[bert.]embeddings.{word,position,token_type}_embeddings.lora_embedding_{A,B}',
    PREFIX + '[bert.]pooler.dense.lora_{A,B}.weight',
    PREFIX + 'classifier.{weight,bias}',
    PREFIX + 'bert.pooler.dense.{weight,bias}',
)
# Linear layers per encoder layer; with the pooler, what PEFT's 'all-linear' adapts in BERT.
_DENSE_KINDS = ('attention.output.dense', 'intermediate.dense', 'output.dense', 'pooler.dense')
# Adapters whose factors are relative to a modified base weight unless converted on save.
_MODIFIED_BASE_INITS = ('pissa', 'olora', 'corda', 'loftq', 'lora_ga')
_VARIANT_FIELDS = ('use_qalora', 'use_bdlora', 'kasa_config', 'monteclora_config',
                   'velora_config', 'arrow_config', 'lora_ga_config')


class PeftFormatError(UserInputError):
  """A PEFT adapter that cannot be read or written; the message names the file, key or field."""


# ----------------------------------------------------------------------------- names


def hf_module(path: str) -> tuple[str, str]:
  """Our LoRA module path -> ``(HF module name without 'bert.', kind)``, kind 'linear'/'embed'.

  >>> hf_module('encoder/layer_0/attention/out')
  ('encoder.layer.0.attention.output.dense', 'linear')
  """
  m = _OUR_SITE.match(path)
  if not m:
    raise PeftFormatError(
        f'LoRA site {path!r} has no HF PEFT equivalent; supported: encoder/layer_<i>/attention/'
        '{query,key,value,out}, encoder/layer_<i>/{intermediate,output}, '
        'encoder/embeddings/{word,position,token_type}_embeddings, pooler')
  if m['pooler']:
    return 'pooler.dense', 'linear'
  if m['emb']:
    return f"embeddings.{m['emb']}_embeddings", 'embed'
  i = int(m['layer'])
  if m['attn']:
    return f"encoder.layer.{i}.{_ATTN[m['attn']]}", 'linear'
  return f"encoder.layer.{i}.{m['ffn']}.dense", 'linear'


def our_module(name: str) -> tuple[str, str, int | None]:
  """HF module name (without ``base_model.model.``/``bert.``) -> ``(our path, kind, layer)``;
  ``None`` for a name that is not a supported site.

  >>> our_module('encoder.layer.1.attention.self.value')
  ('encoder/layer_1/attention/value', 'linear', 1)
  """
  m = _HF_SITE.match(name)
  if not m:
    return None
  if m['pooler']:
    return 'pooler', 'linear', None
  if m['emb']:
    return f"encoder/embeddings/{m['emb']}_embeddings", 'embed', None
  i = int(m['layer'])
  if m['qkv']:
    return f"encoder/layer_{i}/attention/{m['qkv']}", 'linear', i
  if m['out']:
    return f'encoder/layer_{i}/attention/out', 'linear', i
  return f"encoder/layer_{i}/{m['ffn']}", 'linear', i


def _target_name(name: str) -> str:
  """The suffix of a module name that PEFT's ``target_modules`` list uses for its kind."""
  for suffix in _DENSE_KINDS:
    if name.endswith(suffix):
      return suffix
  return name.rsplit('.', 1)[-1]


def _target_modules(names) -> list[str]:
  """PEFT's ``target_modules`` for the adapted module ``names``: one suffix per kind, and
  ``'dense'`` for all four dense kinds (as PEFT saves an ``'all-linear'`` adapter)."""
  kinds = {_target_name(n) for n in names}
  if set(_DENSE_KINDS) <= kinds:
    kinds = (kinds - set(_DENSE_KINDS)) | {'dense'}
  return sorted(kinds)


def pattern_key(patterns: dict, name: str) -> str | None:
  """The first key of a PEFT ``rank_pattern``/``alpha_pattern`` that applies to ``name``.

  >>> pattern_key({'query': 2}, 'bert.encoder.layer.0.attention.self.query')
  'query'
  """
  for key in patterns:
    if re.match(rf'(.*\.)?({key})$', name):
      return key
  return None


def _scale(alpha: float, r: int, rslora: bool) -> float:
  return float(alpha) / (math.sqrt(r) if rslora else float(r))


# ----------------------------------------------------------------------------- export


def _portable_name(name: str) -> str | None:
  """``base_model_name_or_path`` without this machine's paths: a hub id stays, a local directory
  becomes its hub id when known (the bundled MiniLM's, one an export recorded), else its name."""
  if not name:
    return None
  name = str(name)
  if os.path.isabs(os.path.expanduser(name)) or os.path.exists(name):
    from peftjax.models.hf_bert import hub_id  # pylint: disable=g-import-not-at-top
    return hub_id(name)
  return name


def _dense_pair(value, what: str, d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``{'kernel': (D, C), 'bias': (C,)}`` -> float32 (kernel, bias), checked."""
  kernel = np.asarray(jax.device_get(value['kernel']), np.float32)
  bias = np.asarray(jax.device_get(value['bias']), np.float32)
  if kernel.ndim != 2 or bias.shape != kernel.shape[1:] or (d is not None and
                                                            kernel.shape != (d, d)):
    want = f'({d}, {d})' if d is not None else '(D, C)'
    raise PeftFormatError(f'{what} kernel {kernel.shape} / bias {bias.shape}; expected {want} '
                          'and its bias')
  return kernel, bias



def lora_config(task_type: str, base_model_name_or_path: str, *, rank: int, alpha: float,
                rslora: bool, dropout: float, target_modules, modules_to_save=None,
                rank_pattern=None, alpha_pattern=None) -> dict:
  """A PEFT ``adapter_config.json`` dict of a plain LoRA adapter (no DoRA, biases, LoftQ...):
  the fields PEFT's ``LoraConfig`` writes, shared by the BERT and the Llama exports.

  >>> lora_config('CAUSAL_LM', 'random', rank=8, alpha=16.0, rslora=False, dropout=0.0,
  ...             target_modules=['q_proj'])['r']
  8
  """
  return {
      'peft_type': 'LORA',
      'task_type': task_type,
      'base_model_name_or_path': base_model_name_or_path,
      'revision': None,
      'inference_mode': True,
      'auto_mapping': None,
      'r': int(rank),
      'lora_alpha': alpha,
      'use_rslora': bool(rslora),
      'lora_dropout': float(dropout),
      'target_modules': target_modules,
      'modules_to_save': modules_to_save,
      'rank_pattern': dict(rank_pattern or {}),
      'alpha_pattern': dict(alpha_pattern or {}),
      'bias': 'none',
      'fan_in_fan_out': False,
      'use_dora': False,
      'init_lora_weights': True,
      'layers_to_transform': None,
      'layers_pattern': None,
      'layer_replication': None,
      'loftq_config': {},
      'megatron_config': None,
      'megatron_core': 'megatron.core',
  }

def to_peft(lora_tree: dict, *, rank: int, alpha: float, rslora: bool = False, head=None,
            pooler=None, pooling: str = 'cls_pooler', base_model_name_or_path: str = '',
            dropout: float = 0.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Our LoRA tree -> ``(adapter_config, tensors)`` in the HF PEFT format.

  ``rank``/``alpha``/``rslora`` are the run's ``peft.*`` values (our scale). With a ``head``
  (``{'kernel': (D, C), 'bias': (C,)}``, the trainable classifier of the run) and
  ``pooling='cls_pooler'`` the adapter is for ``BertForSequenceClassification``
  (``task_type='SEQ_CLS'``, keys under ``bert.``, the head in ``modules_to_save``, and the
  ``pooler`` too when the run trained it); otherwise for a bare ``BertModel``
  (``'FEATURE_EXTRACTION'``), and a head that pools another way is left to
  :func:`head_file` (PEFT has no form for it). Sites whose rank differs from ``rank`` get
  ``rank_pattern``/``alpha_pattern`` entries that keep PEFT's per-module scale equal to ours.
  ``target_modules`` lists the adapted kinds by their shortest PEFT suffix (``'query'``,
  ``'intermediate.dense'``, ``'pooler.dense'``; ``'dense'`` when all four dense kinds are
  adapted, as PEFT saves ``'all-linear'``); PEFT gives a matched module that has no tensors in
  the file a zero update (B = 0 at init), so it loads to the same model.
  ``base_model_name_or_path`` is written portably (a local directory becomes its hub id or its
  name; see :func:`peftjax.models.hf_bert.hub_id`).

  >>> config, tensors = to_peft(lora, rank=4, alpha=16.0, head=head)  # doctest: +SKIP
  >>> key = 'base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight'
  >>> tensors[key].shape  # doctest: +SKIP
  (4, 384)
  """
  if int(rank) != rank or rank <= 0:
    raise PeftFormatError(f'rank={rank!r}; valid: a positive integer')
  if pooling not in POOLINGS:
    raise PeftFormatError(f'pooling={pooling!r}; valid: {", ".join(POOLINGS)}')
  scale = _scale(alpha, int(rank), rslora)
  flat = {p: np.asarray(jax.device_get(v), np.float32)
          for p, v in tree_lib.flatten(lora_tree).items()}
  sites: dict[str, dict] = {}
  for path, value in flat.items():
    module, _, leaf = path.rpartition('/')
    if leaf not in ('lora_a', 'lora_b'):
      raise PeftFormatError(f'LoRA tree leaf {path!r} is not a lora_a/lora_b factor')
    sites.setdefault(module, {})[leaf] = value
  if not sites:
    raise PeftFormatError('the LoRA tree is empty: nothing to export')
  if pooling != 'cls_pooler' and ('pooler' in sites or pooler is not None):
    raise PeftFormatError(f"a LoRA or trained weights on 'pooler' with pooling={pooling!r}: only "
                          "a model with pooling='cls_pooler' has BERT's pooler")
  seq_cls = head is not None and pooling == 'cls_pooler'
  prefix = PREFIX + ('bert.' if seq_cls else '')
  tensors: dict[str, np.ndarray] = {}
  names, rank_pattern, alpha_pattern = [], {}, {}
  for module, ab in sorted(sites.items()):
    if set(ab) != {'lora_a', 'lora_b'}:
      raise PeftFormatError(f'LoRA site {module!r} has {sorted(ab)}; expected lora_a and lora_b')
    name, kind = hf_module(module)
    a, b = ab['lora_a'], ab['lora_b']
    r = a.shape[-1]
    if b.shape[0] != r:
      raise PeftFormatError(f'LoRA site {module!r}: lora_a {a.shape} and lora_b {b.shape} '
                            'disagree on the rank (last axis of A, first of B)')
    a2, b2 = a.reshape(-1, r), b.reshape(r, -1)  # (in, r), (r, out)
    if kind == 'embed':
      tensors[f'{prefix}{name}.lora_embedding_A'] = a2.T
      tensors[f'{prefix}{name}.lora_embedding_B'] = b2.T
    else:
      tensors[f'{prefix}{name}.lora_A.weight'] = a2.T
      tensors[f'{prefix}{name}.lora_B.weight'] = b2.T
    names.append(name)
    if r != rank:  # keep PEFT's alpha_m / r_m (or / sqrt(r_m)) equal to our single scale
      rank_pattern[name] = int(r)
      alpha_pattern[name] = scale * (math.sqrt(r) if rslora else r)
  to_save = []
  if seq_cls:
    kernel, bias = _dense_pair(head, 'head')
    tensors[PREFIX + 'classifier.weight'] = kernel.T
    tensors[PREFIX + 'classifier.bias'] = bias
    to_save.append('classifier')
  if pooler is not None:
    kernel, bias = _dense_pair(pooler, 'pooler', d=next(iter(pooler.values())).shape[-1])
    tensors[f'{prefix}pooler.dense.weight'] = kernel.T
    tensors[f'{prefix}pooler.dense.bias'] = bias
    to_save.append('pooler')
  config = lora_config(
      'SEQ_CLS' if seq_cls else 'FEATURE_EXTRACTION', _portable_name(base_model_name_or_path),
      rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
      target_modules=_target_modules(names), modules_to_save=to_save or None,
      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
  return config, {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def head_file(head, *, pooling: str, class_names=None) -> bytes:
  """:data:`HEAD_NAME`'s bytes: a head that pools otherwise than ``BertForSequenceClassification``
  (``classifier.weight`` ``(C, D)``, ``classifier.bias``; the pooling and class names in the
  header). Its logits are ``pool(last_hidden_state) @ classifier.weight.T + classifier.bias``."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if pooling not in POOLINGS or pooling == 'cls_pooler':
    raise PeftFormatError(f"pooling={pooling!r} for {HEAD_NAME}; valid: 'mean', 'cls' (a "
                          "'cls_pooler' head is PEFT's own SEQ_CLS classifier)")
  kernel, bias = _dense_pair(head, 'head')
  meta = {'format': 'pt', 'pooling': pooling,
          'logits': 'pool(last_hidden_state) @ classifier.weight.T + classifier.bias'}
  if class_names is not None:
    meta['class_names'] = json.dumps([str(c) for c in class_names])
  return safetensors.numpy.save({'classifier.weight': np.ascontiguousarray(kernel.T),
                                 'classifier.bias': bias}, metadata=meta)


def save_peft_adapter(out_dir: str | os.PathLike, lora_tree: dict, *, rank: int, alpha: float,
                      rslora: bool = False, head=None, pooler=None, pooling: str = 'cls_pooler',
                      class_names=None, base_model_name_or_path: str = '',
                      dropout: float = 0.0, overwrite: bool = False) -> pathlib.Path:
  """Writes :func:`to_peft`'s result as a PEFT adapter directory (atomically); returns its path.

  With a ``head`` and a ``pooling`` other than ``'cls_pooler'``, the head goes to
  :data:`HEAD_NAME` beside the (``FEATURE_EXTRACTION``) adapter.

  >>> save_peft_adapter('/tmp/adapter', lora, rank=8, alpha=16.0)  # doctest: +SKIP
  PosixPath('/tmp/adapter')
  """
  config, tensors = to_peft(lora_tree, rank=rank, alpha=alpha, rslora=rslora, head=head,
                            pooler=pooler, pooling=pooling,
                            base_model_name_or_path=base_model_name_or_path, dropout=dropout)
  files = {CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode() + b'\n',
           WEIGHTS_NAME: _safetensors_bytes(tensors)}
  if head is not None and pooling != 'cls_pooler':
    files[HEAD_NAME] = head_file(head, pooling=pooling, class_names=class_names)
  return write_dir_atomic(out_dir, files, overwrite=overwrite)
