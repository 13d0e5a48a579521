"""Import of Hugging Face PEFT LoRA adapters for BERT models (the format: :mod:`.peft_lora`).

:func:`load_peft_adapter` reads ``adapter_config.json`` + ``adapter_model.safetensors`` (and our
:data:`~peftjax.hf.peft_lora.HEAD_NAME`, when present) into a LoRA tree, its head and what the
head needs (``info['pooling']``). Everything is checked against the model's config first; every
refusal is one line naming the file, the key or field, the bad value and what is valid.

>>> lora, head, info = load_peft_adapter('/tmp/adapter', bert_cfg, pooling='cls_pooler')  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from peftjax import tree as tree_lib
from peftjax.hf.peft_lora import _MODIFIED_BASE_INITS
from peftjax.hf.peft_lora import _VARIANT_FIELDS
from peftjax.hf.peft_lora import _scale
from peftjax.hf.peft_lora import CONFIG_NAME
from peftjax.hf.peft_lora import HEAD_NAME
from peftjax.hf.peft_lora import PREFIX
from peftjax.hf.peft_lora import TASK_TYPES
from peftjax.hf.peft_lora import VALID_KEYS
from peftjax.hf.peft_lora import WEIGHTS_NAME
from peftjax.hf.peft_lora import PeftFormatError
from peftjax.hf.peft_lora import our_module
from peftjax.hf.peft_lora import pattern_key
from peftjax.models.bert import POOLINGS
from peftjax.models.bert import BertConfig


def _read_config(adapter_dir: pathlib.Path, *, task_types=TASK_TYPES,
                 task_words: str = '(sequence classification, or a bare encoder)') -> dict:
  """``adapter_config.json``, checked: a plain LoRA (no DoRA, biases, modified-base inits or
  other variants), a positive ``r``, a numeric ``lora_alpha``, a ``task_type`` of
  ``task_types`` (or none)."""
  if not adapter_dir.is_dir():
    state = 'is a file' if adapter_dir.exists() else 'does not exist'
    raise PeftFormatError(f'adapter directory {str(adapter_dir)!r} {state}; valid: a Hugging '
                          f'Face PEFT adapter directory ({CONFIG_NAME} + {WEIGHTS_NAME})')
  path = adapter_dir / CONFIG_NAME
  if not path.is_file():
    raise PeftFormatError(f'adapter directory {str(adapter_dir)!r} has no {CONFIG_NAME} '
                          '(expected a Hugging Face PEFT adapter directory)')
  try:
    config = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise PeftFormatError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(config, dict):
    raise PeftFormatError(f'{path} holds a JSON {type(config).__name__}; valid: a JSON object')
  if config.get('peft_type') != 'LORA':
    raise PeftFormatError(f"{path}: peft_type={config.get('peft_type')!r}; only 'LORA' is "
                          'supported')
  task = config.get('task_type')
  if task is not None and task not in task_types:
    raise PeftFormatError(f'{path}: task_type={task!r}; supported: {", ".join(task_types)} '
                          f'{task_words}')
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
  # LoRA variants whose forward is not W + s*B@A on an unmodified base.
  checks += [(f, config.get(f), 'false/null (a LoRA variant whose forward is not the plain '
              'W + scaling * B @ A)') for f in _VARIANT_FIELDS]
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
    raise PeftFormatError(f'cannot read {path}: {" ".join(str(e).split())} (a corrupt or '
                          'truncated file)') from None


def _read_head_file(adapter_dir: pathlib.Path, hidden: int):
  """``(head, pooling, class_names)`` from :data:`HEAD_NAME`, or ``(None, None, None)``."""
  path = adapter_dir / HEAD_NAME
  if not path.is_file():
    return None, None, None
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(str(path), 'np') as f:
      meta = f.metadata() or {}
      t = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except  (corrupt or truncated file)
    raise PeftFormatError(f'cannot read {path}: {" ".join(str(e).split())}') from None
  pooling = meta.get('pooling')
  if pooling not in POOLINGS or pooling == 'cls_pooler':
    raise PeftFormatError(f"{path}: pooling={pooling!r}; valid: 'mean', 'cls'")
  w, b = t.get('classifier.weight'), t.get('classifier.bias')
  if w is None or b is None or w.ndim != 2 or w.shape[1] != hidden or b.shape != w.shape[:1]:
    raise PeftFormatError(f"{path}: needs 'classifier.weight' (C, {hidden}) and "
                          f"'classifier.bias' (C,); found {sorted((k, v.shape) for k, v in t.items())}")
  try:
    names = json.loads(meta['class_names']) if 'class_names' in meta else None
  except ValueError:
    names = None
  return {'kernel': np.ascontiguousarray(w.T), 'bias': b}, pooling, names


def _expected_in_out(cfg: BertConfig, path: str) -> tuple[int, int]:
  """(in_features, out_features) in torch terms (num_embeddings, dim for embeddings)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  if path == 'pooler':
    return d, d
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


def _unknown_key(weights_path: pathlib.Path, key: str) -> PeftFormatError:
  """The error for a key that is no BERT LoRA site: another architecture, or an unsupported
  module."""
  name = key[len(PREFIX):] if key.startswith(PREFIX) else key
  first = name.split('.', 1)[0]
  if first not in ('bert', 'encoder', 'embeddings', 'pooler', 'classifier') and \
      re.search(r'\.(layers?|h|blocks?)\.\d+\.', name):
    return PeftFormatError(
        f'{weights_path}: key {key!r} is under {first!r}: an adapter for another architecture '
        "(this model is BERT: keys under 'bert.' or none); valid keys: " + ', '.join(VALID_KEYS))
  return PeftFormatError(f'{weights_path}: unknown key {key!r}; valid keys: '
                         + ', '.join(VALID_KEYS))


def _pooling_words(pooling: str) -> str:
  return {'cls_pooler': "BERT's tanh pooler on [CLS] (BertForSequenceClassification; "
                        "model.pooling='cls_pooler')",
          'mean': "the mean over tokens (model.pooling='mean')",
          'cls': "the [CLS] state without the pooler (model.pooling='cls')"}[pooling]


def load_peft_adapter(adapter_dir: str | os.PathLike, bert_cfg: BertConfig, *,
                      pooling: str | None = None) -> tuple[dict, dict | None, dict[str, Any]]:
  """Reads a PEFT LoRA adapter for a BERT model: ``(lora_tree, head_or_None, info)``.

  ``lora_tree`` mirrors our base tree (``encoder/layer_0/attention/query/{lora_a, lora_b}``,
  ``pooler/{lora_a, lora_b}``); ``head`` is ``{'kernel': (D, C), 'bias': (C,)}``, from
  ``modules_to_save`` (a ``BertForSequenceClassification`` head: it reads
  ``tanh(pooler.dense(h[CLS]))``) or from :data:`HEAD_NAME` (our head of another pooling);
  ``None`` if the adapter has none.

  ``pooling`` is the pooling of the model the adapter will run in. Given, the adapter must fit
  it exactly: a head that needs another pooling is refused (one line naming both); a LoRA on the
  pooler is left out when the model does not use the pooler and no head needs it.

  ``info`` holds ``rank``, ``alpha``, ``rslora`` (for ``peft.*``), ``targets`` (a regex over our
  weight paths matching exactly the imported sites, for ``peft.lora.targets``), ``ranks`` (per
  site), ``scales`` (PEFT's per-site scaling), ``pooling`` (what the head needs:
  ``'cls_pooler'``, ``'mean'``, ``'cls'``, or ``None`` for any), ``pooler`` (trained pooler
  weights from ``modules_to_save``, or ``None``), ``class_names`` (or ``None``), ``unused``
  (sites left out), ``task_type``, ``base_model_name_or_path`` and ``dropout``.

  >>> lora, head, info = load_peft_adapter('/tmp/adapter', cfg, pooling='cls_pooler')  # doctest: +SKIP
  >>> method = peft.build(ConfigDict(dict(method='lora', head='', lora=dict(
  ...     rank=info['rank'], alpha=info['alpha'], rslora=info['rslora'], targets=info['targets'],
  ...     dropout=0.0))))  # doctest: +SKIP
  """
  if pooling is not None and pooling not in POOLINGS:
    raise PeftFormatError(f'pooling={pooling!r}; valid: {", ".join(POOLINGS)}')
  adapter_dir = pathlib.Path(adapter_dir)
  config = _read_config(adapter_dir)
  raw = _read_tensors(adapter_dir)
  weights_path = adapter_dir / WEIGHTS_NAME
  d = bert_cfg.hidden_size
  side_head, side_pooling, class_names = _read_head_file(adapter_dir, d)
  r, alpha = config['r'], config.get('lora_alpha', 8)
  rslora = bool(config.get('use_rslora', False))
  rank_pattern = config.get('rank_pattern') or {}
  alpha_pattern = config.get('alpha_pattern') or {}
  global_scale = _scale(alpha, r, rslora)

  key_re = re.compile(r'^base_model\.model\.(?P<name>.+)\.'
                      r'(?P<which>lora_[AB]\.weight|lora_embedding_[AB])$')
  pooler_keys = {PREFIX + p + 'pooler.dense.' + w: w for p in ('bert.', '') for w in
                 ('weight', 'bias')}
  factors: dict[str, dict] = {}  # our module path -> {'name', 'kind', 'A', 'B', keys}
  head_raw: dict[str, np.ndarray] = {}
  pooler_raw: dict[str, np.ndarray] = {}
  for key, value in raw.items():
    if key in (PREFIX + 'classifier.weight', PREFIX + 'classifier.bias'):
      head_raw[key.rsplit('.', 1)[-1]] = np.asarray(value, np.float32)
      continue
    if key in pooler_keys:
      pooler_raw[pooler_keys[key]] = np.asarray(value, np.float32)
      continue
    m = key_re.match(key)
    module = None
    if m:
      name = m['name']
      bare = name[len('bert.'):] if name.startswith('bert.') else name
      module = our_module(bare)
    if module is None:
      raise _unknown_key(weights_path, key)
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

  # ---- the head, and the pooling it needs
  head, pooler, needs = None, None, None
  if head_raw:
    if set(head_raw) != {'weight', 'bias'}:
      raise PeftFormatError(f'{weights_path}: classifier needs both weight and bias; found '
                            f'{sorted(head_raw)}')
    w, bias = head_raw['weight'], head_raw['bias']
    if w.ndim != 2 or w.shape[1] != d or bias.shape != w.shape[:1]:
      raise PeftFormatError(f"{weights_path}: key {PREFIX + 'classifier.weight'!r} has shape "
                            f'{w.shape} (bias {bias.shape}), expected (C, {d}) and (C,): an '
                            f'adapter for a model of another hidden size (this one: {d})')
    head, needs = {'kernel': np.ascontiguousarray(w.T), 'bias': bias}, 'cls_pooler'
  if side_head is not None:
    if head is not None:
      raise PeftFormatError(f'{adapter_dir}: both {WEIGHTS_NAME} (classifier) and {HEAD_NAME} '
                            'hold a head; valid: one of them')
    head, needs = side_head, side_pooling
  if pooler_raw:
    if set(pooler_raw) != {'weight', 'bias'}:
      raise PeftFormatError(f'{weights_path}: pooler.dense needs both weight and bias; found '
                            f'{sorted(pooler_raw)}')
    w, bias = pooler_raw['weight'], pooler_raw['bias']
    if w.shape != (d, d) or bias.shape != (d,):
      raise PeftFormatError(f'{weights_path}: pooler.dense.weight {w.shape} / bias {bias.shape}; '
                            f'expected ({d}, {d}) and ({d},)')
    if needs not in (None, 'cls_pooler'):
      raise PeftFormatError(f'{adapter_dir}: a trained pooler with a {needs!r} head; valid: one '
                            'or the other')
    pooler, needs = {'kernel': np.ascontiguousarray(w.T), 'bias': bias}, 'cls_pooler'
  task = config.get('task_type')
  if task == 'SEQ_CLS' and head is None:
    raise PeftFormatError(
        f"{adapter_dir / CONFIG_NAME}: task_type='SEQ_CLS' but {WEIGHTS_NAME} has no classifier "
        "(modules_to_save): the head it was used with was not saved, so its logits cannot be "
        "reproduced; valid: an adapter saved with modules_to_save=['classifier'], or a "
        "FEATURE_EXTRACTION adapter")
  if pooling is not None and needs is not None and needs != pooling:
    old = (' (an adapter exported by an older peftjax from a mean/cls run: export it again '
           'from its adapter.safetensors)') if needs == 'cls_pooler' and head_raw else ''
    raise PeftFormatError(
        f'{adapter_dir}: its head reads {_pooling_words(needs)}, but this model pools with '
        f'model.pooling={pooling!r}; valid: model.pooling={needs!r}{old}')
  unused = []
  if 'pooler' in factors and pooling is not None and pooling != 'cls_pooler':
    unused.append(factors.pop('pooler')['name'])  # the pooler's output is never read

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
        raise PeftFormatError(
            f'{weights_path}: key {key!r} has shape {tuple(got)}, expected {want} (r={r_m} from '
            f'{CONFIG_NAME}, sizes from the model: hidden_size={d}, intermediate_size='
            f'{bert_cfg.intermediate_size}, vocab_size={bert_cfg.vocab_size})')
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
    raise PeftFormatError(f'{weights_path} holds no LoRA factors that this model uses (keys: '
                          f'{sorted(raw)[:5]})')

  weight_paths = [f"{p}/{'embedding' if factors[p]['kind'] == 'embed' else 'kernel'}"
                  for p in sorted(factors)]
  info = {
      'rank': r, 'alpha': alpha, 'rslora': rslora,
      'targets': '^(?:' + '|'.join(re.escape(p) for p in weight_paths) + ')$',
      'ranks': ranks, 'scales': scales,
      'pooling': needs, 'pooler': pooler, 'class_names': class_names, 'unused': unused,
      'task_type': task,
      'base_model_name_or_path': config.get('base_model_name_or_path'),
      'dropout': float(config.get('lora_dropout', 0.0) or 0.0),
  }
  return tree_lib.unflatten(flat), head, info
