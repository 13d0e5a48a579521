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
  ``BertModel``. ``modules_to_save`` (the ``classifier`` of ``SEQ_CLS``) is stored under the
  module's own name: ``base_model.model.classifier.weight`` ``(C, D)`` and ``.bias``.
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
every encoder layer, and the word/position/token-type embeddings. Not supported (clear
:class:`PeftFormatError`): DoRA, LoRA biases (``bias != 'none'``, ``lora_bias``), adapters relative
to a modified base (unconverted PiSSA/OLoRA/CorDA/LoftQ), layer replication, trainable tokens,
aLoRA, ``.bin`` files. ``fan_in_fan_out=True`` is accepted: PEFT itself resets it to False for
``nn.Linear`` and ignores it for ``nn.Embedding``, and the A/B shapes do not depend on it.

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
from peftjax.models.bert import BertConfig

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'

# Our module path <-> HF module name (without the 'bert.' of BertForSequenceClassification).
_ATTN = {'query': 'attention.self.query', 'key': 'attention.self.key',
         'value': 'attention.self.value', 'out': 'attention.output.dense'}
_OUR_SITE = re.compile(
    r'^encoder/(?:layer_(?P<layer>\d+)/(?:attention/(?P<attn>query|key|value|out)|'
    r'(?P<ffn>intermediate|output))|embeddings/(?P<emb>word|position|token_type)_embeddings)$')
_HF_SITE = re.compile(
    r'^(?:encoder\.layer\.(?P<layer>\d+)\.(?:attention\.self\.(?P<qkv>query|key|value)|'
    r'(?P<out>attention\.output\.dense)|(?P<ffn>intermediate|output)\.dense)|'
    r'embeddings\.(?P<emb>word|position|token_type)_embeddings)$')
VALID_KEYS = (
    PREFIX + '[bert.]encoder.layer.{i}.attention.self.{query,key,value}.lora_{A,B}.weight',
    PREFIX + '[bert.]encoder.layer.{i}.attention.output.dense.lora_{A,B}.weight',
    PREFIX + '[bert.]encoder.layer.{i}.{intermediate,output}.dense.lora_{A,B}.weight',
    PREFIX + '[bert.]embeddings.{word,position,token_type}_embeddings.lora_embedding_{A,B}',
    PREFIX + 'classifier.{weight,bias}',
)
# Adapters whose factors are relative to a modified base weight unless converted on save.
_MODIFIED_BASE_INITS = ('pissa', 'olora', 'corda', 'loftq')


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
        'encoder/embeddings/{word,position,token_type}_embeddings')
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
  for suffix in ('attention.output.dense', 'intermediate.dense', 'output.dense'):
    if name.endswith(suffix):
      return suffix
  return name.rsplit('.', 1)[-1]


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


def to_peft(lora_tree: dict, *, rank: int, alpha: float, rslora: bool = False, head=None,
            base_model_name_or_path: str = '', dropout: float = 0.0
            ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Our LoRA tree -> ``(adapter_config, tensors)`` in the HF PEFT format.

  ``rank``/``alpha``/``rslora`` are the run's ``peft.*`` values (our scale). With a ``head``
  (``{'kernel': (D, C), 'bias': (C,)}``, the trainable classifier of the run) the adapter is for
  ``BertForSequenceClassification`` (``task_type='SEQ_CLS'``, keys under ``bert.``, the head in
  ``modules_to_save``); without, for a bare ``BertModel`` (``'FEATURE_EXTRACTION'``). Sites whose
  rank differs from ``rank`` get ``rank_pattern``/``alpha_pattern`` entries that keep PEFT's
  per-module scale equal to ours. ``target_modules`` lists the adapted kinds by their shortest
  PEFT suffix (``'query'``, ``'intermediate.dense'``, ...); PEFT gives a matched module that has
  no tensors in the file a zero update (B = 0 at init), so it loads to the same model.

  >>> config, tensors = to_peft(lora, rank=4, alpha=16.0, head=head)  # doctest: +SKIP
  >>> key = 'base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight'
  >>> tensors[key].shape  # doctest: +SKIP
  (4, 384)
  """
  if int(rank) != rank or rank <= 0:
    raise PeftFormatError(f'rank={rank!r}; valid: a positive integer')
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
  prefix = PREFIX + ('bert.' if head is not None else '')
  tensors: dict[str, np.ndarray] = {}
  targets, rank_pattern, alpha_pattern = set(), {}, {}
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
    targets.add(_target_name(name))
    if r != rank:  # keep PEFT's alpha_m / r_m (or / sqrt(r_m)) equal to our single scale
      rank_pattern[name] = int(r)
      alpha_pattern[name] = scale * (math.sqrt(r) if rslora else r)
  if head is not None:
    kernel = np.asarray(jax.device_get(head['kernel']), np.float32)
    bias = np.asarray(jax.device_get(head['bias']), np.float32)
    if kernel.ndim != 2 or bias.shape != kernel.shape[1:]:
      raise PeftFormatError(f"head kernel {kernel.shape} / bias {bias.shape}; expected (D, C) "
                            'and (C,)')
    tensors[PREFIX + 'classifier.weight'] = kernel.T
    tensors[PREFIX + 'classifier.bias'] = bias
  config = {
      'peft_type': 'LORA',
      'task_type': 'SEQ_CLS' if head is not None else 'FEATURE_EXTRACTION',
      'base_model_name_or_path': base_model_name_or_path or None,
      'revision': None,
      'inference_mode': True,
      'auto_mapping': None,
      'r': int(rank),
      'lora_alpha': alpha,
      'use_rslora': bool(rslora),
      'lora_dropout': float(dropout),
      'target_modules': sorted(targets),
      'modules_to_save': ['classifier'] if head is not None else None,
      'rank_pattern': rank_pattern,
      'alpha_pattern': alpha_pattern,
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
  return config, {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def save_peft_adapter(out_dir: str | os.PathLike, lora_tree: dict, *, rank: int, alpha: float,
                      rslora: bool = False, head=None, base_model_name_or_path: str = '',
                      dropout: float = 0.0, overwrite: bool = False) -> pathlib.Path:
  """Writes :func:`to_peft`'s result as a PEFT adapter directory (atomically); returns its path.

  >>> save_peft_adapter('/tmp/adapter', lora, rank=8, alpha=16.0)  # doctest: +SKIP
  PosixPath('/tmp/adapter')
  """
  config, tensors = to_peft(lora_tree, rank=rank, alpha=alpha, rslora=rslora, head=head,
                            base_model_name_or_path=base_model_name_or_path, dropout=dropout)
  files = {CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode() + b'\n',
           WEIGHTS_NAME: _safetensors_bytes(tensors)}
  return write_dir_atomic(out_dir, files, overwrite=overwrite)


# ----------------------------------------------------------------------------- import


def _read_config(adapter_dir: pathlib.Path) -> dict:
  path = adapter_dir / CONFIG_NAME
  if not path.is_file():
    raise PeftFormatError(f'adapter directory {str(adapter_dir)!r} has no {CONFIG_NAME} '
                          '(expected a Hugging Face PEFT adapter directory)')
  try:
    config = json.loads(path.read_text())
  except ValueError as e:
    raise PeftFormatError(f'{path} is not valid JSON: {e}') from None
  if config.get('peft_type') != 'LORA':
    raise PeftFormatError(f"{path}: peft_type={config.get('peft_type')!r}; only 'LORA' is "
                          'supported')
  checks = [
      ('use_dora', config.get('use_dora', False), 'false (DoRA adds a magnitude vector; '
       'import it with a DoRA-aware tool)'),
      ('bias', config.get('bias', 'none') != 'none' and config.get('bias'),
       "'none' (trained base biases are not part of a LoRA tree)"),
      ('lora_bias', config.get('lora_bias', False), 'false (lora_B has no bias in our LoRA)'),
      ('layer_replication', config.get('layer_replication'), 'null (no layer replication)'),
      ('trainable_token_indices', config.get('trainable_token_indices'), 'null'),
      ('alora_invocation_tokens', config.get('alora_invocation_tokens'),
       'null (aLoRA activates the adapter per token)'),
      ('target_parameters', config.get('target_parameters'), 'null (LoRA on raw parameters)'),
  ]
  for field, bad, valid in checks:
    if bad:
      raise PeftFormatError(f'{path}: {field}={config.get(field)!r}; supported: {valid}')
  init = str(config.get('init_lora_weights', True)).lower()
  if init.startswith(_MODIFIED_BASE_INITS):
    raise PeftFormatError(
        f"{path}: init_lora_weights={config.get('init_lora_weights')!r}: this adapter is relative "
        'to a modified base model; convert it to a plain LoRA first (PEFT: save_pretrained(..., '
        'path_initial_model_for_weight_conversion=...)), which saves init_lora_weights=true')
  r = config.get('r')
  if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
    raise PeftFormatError(f'{path}: r={r!r}; valid: a positive integer')
  alpha = config.get('lora_alpha', 8)
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    raise PeftFormatError(f'{path}: lora_alpha={alpha!r}; valid: a number')
  return config


def _read_tensors(adapter_dir: pathlib.Path) -> dict[str, np.ndarray]:
  path = adapter_dir / WEIGHTS_NAME
  if not path.is_file():
    bins = (adapter_dir / 'adapter_model.bin').is_file()
    raise PeftFormatError(
        f'adapter directory {str(adapter_dir)!r} has no {WEIGHTS_NAME}' +
        (' (it has adapter_model.bin: only safetensors is supported; re-save the adapter with '
         'safe_serialization=True)' if bins else ''))
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(str(path))
  except Exception as e:  # corrupt or truncated file
    raise PeftFormatError(f'cannot read {path}: {e}') from None


def _expected_in_out(cfg: BertConfig, path: str) -> tuple[int, int]:
  """(in_features, out_features) in torch terms (num_embeddings, dim for embeddings)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  if path.endswith('/intermediate'):
    return d, f
  if path.endswith('/output'):
    return f, d
  if path.endswith('word_embeddings'):
    return cfg.vocab_size, d
  if path.endswith('position_embeddings'):
    return cfg.max_position, d
  if path.endswith('token_type_embeddings'):
    return cfg.type_vocab_size, d
  return d, d


def _our_shapes(cfg: BertConfig, path: str) -> tuple[tuple, tuple]:
  """The (in axes, out axes) of the kernel/embedding at our module ``path``."""
  d_in, d_out = _expected_in_out(cfg, path)
  if re.search(r'attention/(query|key|value)$', path):
    return (d_in,), (cfg.num_heads, cfg.head_dim)
  if path.endswith('attention/out'):
    return (cfg.num_heads, cfg.head_dim), (d_out,)
  return (d_in,), (d_out,)


def load_peft_adapter(adapter_dir: str | os.PathLike, bert_cfg: BertConfig
                      ) -> tuple[dict, dict | None, dict[str, Any]]:
  """Reads a PEFT LoRA adapter for a BERT model: ``(lora_tree, head_or_None, info)``.

  ``lora_tree`` mirrors our base tree (``encoder/layer_0/attention/query/{lora_a, lora_b}``);
  ``head`` is ``{'kernel': (D, C), 'bias': (C,)}`` from ``modules_to_save`` (``None`` if the file
  has none; a head trained by PEFT on ``BertForSequenceClassification`` expects that model's
  tanh-pooled [CLS] state, ours pools without a tanh dense). ``info`` holds ``rank``, ``alpha``,
  ``rslora`` (for ``peft.*``), ``targets`` (a regex over our weight paths matching exactly the
  imported sites, for ``peft.targets``), ``ranks`` (per site), ``scales`` (PEFT's per-site
  scaling), ``task_type``, ``base_model_name_or_path`` and ``dropout``.

  >>> lora, head, info = load_peft_adapter('/tmp/adapter', cfg)  # doctest: +SKIP
  >>> method = peft.build(ConfigDict(dict(method='lora', rank=info['rank'], alpha=info['alpha'],
  ...     rslora=info['rslora'], targets=info['targets'], dropout=0.0)))  # doctest: +SKIP
  """
  adapter_dir = pathlib.Path(adapter_dir)
  config = _read_config(adapter_dir)
  raw = _read_tensors(adapter_dir)
  weights_path = adapter_dir / WEIGHTS_NAME
  r, alpha = config['r'], config.get('lora_alpha', 8)
  rslora = bool(config.get('use_rslora', False))
  rank_pattern = config.get('rank_pattern') or {}
  alpha_pattern = config.get('alpha_pattern') or {}
  global_scale = _scale(alpha, r, rslora)

  key_re = re.compile(r'^base_model\.model\.(?P<name>.+)\.'
                      r'(?P<which>lora_[AB]\.weight|lora_embedding_[AB])$')
  factors: dict[str, dict] = {}  # our module path -> {'name', 'kind', 'A', 'B', keys}
  head_raw: dict[str, np.ndarray] = {}
  for key, value in raw.items():
    if key in (PREFIX + 'classifier.weight', PREFIX + 'classifier.bias'):
      head_raw[key.rsplit('.', 1)[-1]] = np.asarray(value, np.float32)
      continue
    m = key_re.match(key)
    module = None
    if m:
      name = m['name']
      bare = name[len('bert.'):] if name.startswith('bert.') else name
      module = our_module(bare)
    if module is None:
      raise PeftFormatError(f'{weights_path}: unknown key {key!r}; valid keys: '
                            f'{list(VALID_KEYS)}')
    path, kind, layer = module
    embed_key = m['which'].startswith('lora_embedding')
    if embed_key != (kind == 'embed'):
      want = 'lora_embedding_{A,B}' if kind == 'embed' else 'lora_{A,B}.weight'
      raise PeftFormatError(f'{weights_path}: key {key!r}: {name} takes {want}')
    if layer is not None and layer >= bert_cfg.num_layers:
      raise PeftFormatError(f'{weights_path}: key {key!r} is for layer {layer}, but the model '
                            f'has {bert_cfg.num_layers} layers (valid: 0..'
                            f'{bert_cfg.num_layers - 1})')
    entry = factors.setdefault(path, {'name': name, 'kind': kind})
    which = 'A' if m['which'].endswith(('A.weight', 'A')) else 'B'
    if which in entry:
      raise PeftFormatError(f'{weights_path}: keys {entry[which][0]!r} and {key!r} both name '
                            f'lora_{which} of {path!r} (mixed bert./BertModel prefixes?)')
    entry[which] = (key, np.asarray(value))

  flat, ranks, scales = {}, {}, {}
  for path, e in sorted(factors.items()):
    missing = [w for w in 'AB' if w not in e]
    if missing:
      have = e['A' if 'A' in e else 'B'][0]
      raise PeftFormatError(f'{weights_path}: {have!r} has no lora_{missing[0]} partner')
    (ka, a), (kb, b) = e['A'], e['B']
    d_in, d_out = _expected_in_out(bert_cfg, path)
    name = e['name']
    rk, ak = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
    r_m = int(rank_pattern[rk]) if rk is not None else r
    alpha_m = alpha_pattern[ak] if ak is not None else alpha
    for key, got, want in ((ka, a.shape, (r_m, d_in)), (kb, b.shape, (d_out, r_m))):
      if tuple(got) != want:
        raise PeftFormatError(f'{weights_path}: key {key!r} has shape {tuple(got)}, expected '
                              f'{want} (r={r_m} from {CONFIG_NAME}, sizes from the BertConfig)')
    s_m = _scale(alpha_m, r_m, rslora)
    factor = s_m / global_scale
    in_axes, out_axes = _our_shapes(bert_cfg, path)
    a_ours = np.ascontiguousarray(a.astype(np.float32).T).reshape(*in_axes, r_m)
    b_ours = b.astype(np.float32).T
    if abs(factor - 1.0) > 1e-12:  # fold this module's own scale into B
      b_ours = b_ours * np.float32(factor)
    flat[f'{path}/lora_a'] = a_ours
    flat[f'{path}/lora_b'] = np.ascontiguousarray(b_ours).reshape(r_m, *out_axes)
    ranks[path], scales[path] = r_m, s_m
  if not flat:
    raise PeftFormatError(f'{weights_path} holds no LoRA factors (keys: {sorted(raw)[:5]})')

  head = None
  if head_raw:
    if set(head_raw) != {'weight', 'bias'}:
      raise PeftFormatError(f'{weights_path}: classifier needs both weight and bias; found '
                            f'{sorted(head_raw)}')
    w, bias = head_raw['weight'], head_raw['bias']
    if w.ndim != 2 or w.shape[1] != bert_cfg.hidden_size or bias.shape != w.shape[:1]:
      raise PeftFormatError(f"{weights_path}: key {PREFIX + 'classifier.weight'!r} has shape "
                            f'{w.shape} (bias {bias.shape}), expected (C, '
                            f'{bert_cfg.hidden_size}) and (C,)')
    head = {'kernel': np.ascontiguousarray(w.T), 'bias': bias}

  weight_paths = [f"{p}/{'embedding' if factors[p]['kind'] == 'embed' else 'kernel'}"
                  for p in sorted(factors)]
  info = {
      'rank': r, 'alpha': alpha, 'rslora': rslora,
      'targets': '^(?:' + '|'.join(re.escape(p) for p in weight_paths) + ')$',
      'ranks': ranks, 'scales': scales,
      'task_type': config.get('task_type'),
      'base_model_name_or_path': config.get('base_model_name_or_path'),
      'dropout': float(config.get('lora_dropout', 0.0) or 0.0),
  }
  return tree_lib.unflatten(flat), head, info
