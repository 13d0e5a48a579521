"""Import of Hugging Face PEFT LoRA adapters for Llama-type causal LMs (format:
:mod:`peftjax.hf.peft_llama`).

:func:`load_peft_llama` reads ``adapter_config.json`` + ``adapter_model.safetensors`` of an
adapter trained on a ``LlamaForCausalLM`` (Llama, SmolLM, Mistral, Qwen2: the same module names)
into our LoRA tree for :class:`~peftjax.models.llama.LlamaForCausalLM`, stacked back onto the
layer axis of a scanned model. Everything is checked against the model's config before
anything is returned; each refusal is one line naming the file, the key or field, the bad
value and what is valid.

>>> trainable, info = load_peft_llama('/path/to/adapter', cfg)  # doctest: +SKIP
>>> method = lora_method(info)  # doctest: +SKIP
>>> logits = peft.apply(module, method, params, trainable['peft'], inputs)  # doctest: +SKIP
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import numpy as np

from peftjax import tree as tree_lib
from peftjax.hf.peft_import import _read_config
from peftjax.hf.peft_import import _read_tensors
from peftjax.hf.peft_lora import CONFIG_NAME
from peftjax.hf.peft_lora import PREFIX
from peftjax.hf.peft_lora import WEIGHTS_NAME
from peftjax.hf.peft_lora import PeftFormatError
from peftjax.hf.peft_lora import _scale
from peftjax.hf.peft_lora import pattern_key
from peftjax.hf.peft_llama import EMBED
from peftjax.hf.peft_llama import HEAD
from peftjax.hf.peft_llama import HF_SITE
from peftjax.hf.peft_llama import TASK_TYPES
from peftjax.hf.peft_llama import TO_HF
from peftjax.hf.peft_llama import TO_OURS
from peftjax.hf.peft_llama import VALID_KEYS
from peftjax.hf.peft_llama import torch_dims

_FACTOR_KEY = re.compile(r'^base_model\.model\.(?P<name>.+)\.'
                         r'(?P<which>lora_[AB]\.weight|lora_embedding_[AB])$')
# Whole tables PEFT loads into the model: save_embedding_layers ('.base_layer.weight' of a
# LoRA-wrapped module, '.weight' of a plain one) and modules_to_save ('.weight').
_TABLE_KEYS = {f'{PREFIX}{m}{s}.weight': m for m in (EMBED, HEAD) for s in ('.base_layer', '')}
_SAVABLE = ('embed_tokens', 'lm_head', EMBED)  # modules_to_save entries that are tables
_TIE_HINT = ('our tied model has one table for both, so it cannot hold two; valid: an adapter '
             'saved with ensure_weight_tying=true, the same update on both, or an untied model')


def _unknown_key(weights_path: pathlib.Path, key: str) -> PeftFormatError:
  name = key[len(PREFIX):] if key.startswith(PREFIX) else key
  first = name.split('.', 1)[0]
  if first not in ('model', 'lm_head') and re.search(r'\.(layers?|h|blocks?)\.\d+\.', name):
    return PeftFormatError(
        f"{weights_path}: key {key!r} is under {first!r}: an adapter for another architecture "
        "(this model is a LlamaForCausalLM: keys under 'base_model.model.model.' or "
        "'base_model.model.lm_head'); valid keys: " + ', '.join(VALID_KEYS))
  return PeftFormatError(f'{weights_path}: unknown key {key!r}; valid keys: '
                         + ', '.join(VALID_KEYS))


def _check_modules_to_save(config: dict, path: pathlib.Path) -> None:
  to_save = config.get('modules_to_save') or []
  if isinstance(to_save, str):
    to_save = [to_save]
  other = [m for m in to_save if m not in _SAVABLE]
  if other:
    raise PeftFormatError(f'{path}: modules_to_save={to_save!r}: {other[0]!r} is a fully trained '
                          'module a LoRA tree cannot hold; supported: embed_tokens, lm_head '
                          '(their tables)')


def _parse_keys(raw: dict, weights_path: pathlib.Path, cfg):
  """``(factors {HF name: {'A': (key, array), 'B': ...}}, tables {HF name: [(key, array)]})``."""
  factors: dict[str, dict] = {}
  tables: dict[str, list] = {}
  for key, value in sorted(raw.items()):
    if key in _TABLE_KEYS:
      table = np.asarray(value, np.float32)
      want = (cfg.vocab_size, cfg.hidden_size)
      if table.shape != want:
        raise PeftFormatError(f'{weights_path}: key {key!r} has shape {table.shape}, expected '
                              f'{want} (vocab_size, hidden_size of this model; a resized '
                              'vocabulary is not supported)')
      tables.setdefault(_TABLE_KEYS[key], []).append((key, table))
      continue
    m = _FACTOR_KEY.match(key)
    site = HF_SITE.match(m['name']) if m else None
    if site is None:
      raise _unknown_key(weights_path, key)
    name = m['name']
    if site['layer'] is not None and int(site['layer']) >= cfg.num_layers:
      raise PeftFormatError(f'{weights_path}: key {key!r} is for layer {site["layer"]}, but the '
                            f'model has {cfg.num_layers} layers (valid: 0..{cfg.num_layers - 1})')
    embed_key = m['which'].startswith('lora_embedding')
    if embed_key != (name == EMBED):
      want = 'lora_embedding_{A,B}' if name == EMBED else 'lora_{A,B}.weight'
      raise PeftFormatError(f'{weights_path}: key {key!r}: {name} takes {want}')
    which = 'A' if m['which'].endswith(('A.weight', 'A')) else 'B'
    factors.setdefault(name, {})[which] = (key, np.asarray(value))
  return factors, tables


def _ours(config: dict, factors: dict, weights_path: pathlib.Path, cfg) -> dict:
  """HF name -> ``(A (in, r), B (r, out), r, scale)`` in our layout, the module's PEFT scale
  folded into B relative to the global one; shapes checked."""
  r, alpha = config['r'], config.get('lora_alpha', 8)
  rslora = bool(config.get('use_rslora', False))
  rank_pattern = config.get('rank_pattern') or {}
  alpha_pattern = config.get('alpha_pattern') or {}
  global_scale = _scale(alpha, r, rslora)
  out = {}
  for name, e in sorted(factors.items()):
    missing = [w for w in 'AB' if w not in e]
    if missing:
      have = e['A' if 'A' in e else 'B'][0]
      raise PeftFormatError(f'{weights_path}: {have!r} has no lora_{missing[0]} partner')
    (ka, a), (kb, b) = e['A'], e['B']
    rk, ak = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
    r_m = rank_pattern[rk] if rk is not None else r
    alpha_m = alpha_pattern[ak] if ak is not None else alpha
    if isinstance(r_m, bool) or not isinstance(r_m, int) or r_m <= 0:
      raise PeftFormatError(f'{weights_path.parent / CONFIG_NAME}: rank_pattern[{rk!r}]={r_m!r}; '
                            'valid: a positive integer')
    if isinstance(alpha_m, bool) or not isinstance(alpha_m, (int, float)):
      raise PeftFormatError(f'{weights_path.parent / CONFIG_NAME}: alpha_pattern[{ak!r}]='
                            f'{alpha_m!r}; valid: a number')
    d_in, d_out = torch_dims(cfg, name)
    for key, got, want in ((ka, a.shape, (r_m, d_in)), (kb, b.shape, (d_out, r_m))):
      if tuple(got) != want:
        raise PeftFormatError(
            f'{weights_path}: key {key!r} has shape {tuple(got)}, expected {want} (r={r_m} from '
            f'{CONFIG_NAME}, sizes from the model: hidden_size={cfg.hidden_size}, '
            f'intermediate_size={cfg.intermediate_size}, heads {cfg.num_heads} x '
            f'{cfg.head_dim}, kv heads {cfg.num_kv_heads}, vocab_size={cfg.vocab_size})')
    s_m = _scale(alpha_m, r_m, rslora)
    a_ours = np.ascontiguousarray(np.asarray(a, np.float32).T)
    b_ours = np.asarray(b, np.float32).T
    factor = s_m / global_scale
    if abs(factor - 1.0) > 1e-12:  # this module's own scale, folded into B
      b_ours = b_ours * np.float32(factor)
    out[name] = a_ours, np.ascontiguousarray(b_ours), r_m, s_m
  return out


def _same_update(x, y) -> bool:
  """Whether two low-rank updates ``A1 @ B1`` and ``A2 @ B2`` are equal (float32 noise
  aside), through r x r products: ``||X - Y||^2 = |X|^2 - 2 <X, Y> + |Y|^2``."""
  (a1, b1), (a2, b2) = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in (x, y)]
  xx = np.sum((a1.T @ a1) * (b1 @ b1.T))
  yy = np.sum((a2.T @ a2) * (b2 @ b2.T))
  xy = np.sum((a1.T @ a2) * (b1 @ b2.T))
  return max(xx - 2 * xy + yy, 0.0) <= 1e-10 * max(xx + yy, 1e-30)


def _one_table(found: list, where: pathlib.Path, why: str):
  """The one table of ``[(key, table)]`` (``None`` for none); tables that differ are refused."""
  if not found:
    return None
  key0, table = found[0]
  for key, t in found[1:]:
    if not np.array_equal(t, table):
      raise PeftFormatError(f'{where}: tables {key0!r} and {key!r} differ {why}')
  return table


def _tie(ours: dict, tables: dict, config: dict, adapter_dir: pathlib.Path):
  """The tied model's one embedding update and table: ``(embed (A, B, r, s) | None,
  table | None)``, from ``model.embed_tokens`` and ``lm_head`` as PEFT would run them."""
  ensure = bool(config.get('ensure_weight_tying', False))
  emb = ours.pop(EMBED, None)
  head = ours.pop(HEAD, None)
  if head is not None:  # lm_head (V, D) += B_l @ A_l: in the embedding's layout A = B_l, B = A_l
    a_l, b_l, r_l, s_l = head
    head = (np.ascontiguousarray(b_l.T), np.ascontiguousarray(a_l.T), r_l, s_l)
  where = adapter_dir / WEIGHTS_NAME
  if emb is not None and head is not None:
    if not _same_update(emb[:2], head[:2]):
      raise PeftFormatError(f'{where}: {EMBED} and {HEAD} carry different LoRA updates on a model '
                            f'with tied embeddings (PEFT adapts the two separately); {_TIE_HINT}')
  elif (emb is None) != (head is None) and not ensure:
    have, lack = (EMBED, HEAD) if emb is not None else (HEAD, EMBED)
    raise PeftFormatError(
        f'{where}: a LoRA on {have} but none on {lack}, with ensure_weight_tying not true: on a '
        f'model with tied embeddings PEFT adapts only {have} and leaves {lack} the base table; '
        + _TIE_HINT)
  update = emb if emb is not None else head
  table = _one_table([kt for m in (EMBED, HEAD) for kt in tables.get(m, [])], where,
                     'on a model with tied embeddings; ' + _TIE_HINT)
  if table is not None:
    key0 = next(k for m in (EMBED, HEAD) for k, _ in tables.get(m, []))
    if (EMBED in tables) != (HEAD in tables) and not ensure:
      have, lack = (EMBED, HEAD) if EMBED in tables else (HEAD, EMBED)
      raise PeftFormatError(
          f'{where}: key {key0!r} replaces the table of {have} but not of {lack}, with '
          f'ensure_weight_tying not true: PEFT would untie them; {_TIE_HINT}')
  return update, table


def _stack(per_layer: dict[int, tuple], num_layers: int, d_in: int, d_out: int):
  """Layers' ``(A (in, r_i), B (r_i, out))`` -> ``(L, in, R)``, ``(L, R, out)``, zero-padded to
  the largest rank (a layer without factors: zeros)."""
  rank = max(a.shape[1] for a, _ in per_layer.values())
  a_all = np.zeros((num_layers, d_in, rank), np.float32)
  b_all = np.zeros((num_layers, rank, d_out), np.float32)
  for i, (a, b) in per_layer.items():
    a_all[i, :, :a.shape[1]] = a
    b_all[i, :b.shape[0], :] = b
  return a_all, b_all, rank


def load_peft_llama(adapter_dir: str | os.PathLike, cfg) -> tuple[dict, dict[str, Any]]:
  """Reads a PEFT LoRA adapter of a ``LlamaForCausalLM``: ``(trainable, info)``.

  ``trainable`` is ``{'base': tables, 'peft': lora_tree}``: the LoRA tree for
  :class:`~peftjax.models.llama.LlamaForCausalLM` of ``cfg`` (``layers/attn/q_proj/{lora_a,
  lora_b}`` stacked over the layers when ``cfg.scan_layers``, ``layer_<i>/...`` otherwise;
  ``embed/...``, ``lm_head/...``) and the embedding tables the file replaces
  (``{'embed': {'embedding': (V, D)}}``, ``{'lm_head': {'kernel': (D, V)}}``; usually none).
  ``info`` holds ``rank``, ``alpha``, ``rslora`` (the global ones: our ``peft.lora.*``; each
  module's own scale is folded into its B), ``targets`` (a regex over our weight paths matching
  the imported sites), ``ranks`` (per site, after padding), ``scales`` (PEFT's per-module
  scaling), ``tied`` (a LoRA on the tied table), ``task_type``, ``base_model_name_or_path``
  (informational: loading never depends on it) and ``dropout``.

  >>> trainable, info = load_peft_llama('/path/to/adapter', cfg)  # doctest: +SKIP
  >>> sorted(tree.flatten(trainable['peft']))[:2]  # doctest: +SKIP
  ['layers/attn/q_proj/lora_a', 'layers/attn/q_proj/lora_b']
  """
  adapter_dir = pathlib.Path(adapter_dir)
  config = _read_config(adapter_dir, task_types=TASK_TYPES,
                        task_words='(a LlamaForCausalLM adapter; or no task_type)')
  _check_modules_to_save(config, adapter_dir / CONFIG_NAME)
  weights_path = adapter_dir / WEIGHTS_NAME
  raw = _read_tensors(adapter_dir)
  factors, tables = _parse_keys(raw, weights_path, cfg)
  ours = _ours(config, factors, weights_path, cfg)
  scales = {name: v[3] for name, v in ours.items()}
  flat: dict[str, np.ndarray] = {}
  base: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  tied = False
  if cfg.tie_embeddings:
    update, table = _tie(ours, tables, config, adapter_dir)
    if update is not None:
      flat['embed/lora_a'], flat['embed/lora_b'] = update[0], update[1]
      ranks['embed'], tied = update[2], True
    if table is not None:
      base['embed/embedding'] = table
  else:
    for name, path in ((EMBED, 'embed'), (HEAD, 'lm_head')):
      if name in ours:
        a, b, r, _ = ours.pop(name)
        flat[f'{path}/lora_a'], flat[f'{path}/lora_b'] = a, b
        ranks[path] = r
    why = '(two tables for one module; valid: one)'
    embed_table = _one_table(tables.get(EMBED, []), weights_path, why)
    head_table = _one_table(tables.get(HEAD, []), weights_path, why)
    if embed_table is not None:
      base['embed/embedding'] = embed_table
    if head_table is not None:
      base['lm_head/kernel'] = np.ascontiguousarray(head_table.T)
  by_sub: dict[str, dict[int, tuple]] = {}
  for name, (a, b, _, _) in ours.items():
    site = HF_SITE.match(name)
    by_sub.setdefault(TO_OURS[site['sub']], {})[int(site['layer'])] = (a, b)
  for sub, per_layer in sorted(by_sub.items()):
    d_in, d_out = torch_dims(cfg, f'model.layers.0.{TO_HF[sub]}')
    if cfg.scan_layers:
      a, b, rank = _stack(per_layer, cfg.num_layers, d_in, d_out)
      flat[f'layers/{sub}/lora_a'], flat[f'layers/{sub}/lora_b'] = a, b
      ranks[f'layers/{sub}'] = rank
    else:
      for i, (a, b) in sorted(per_layer.items()):
        flat[f'layer_{i}/{sub}/lora_a'], flat[f'layer_{i}/{sub}/lora_b'] = a, b
        ranks[f'layer_{i}/{sub}'] = a.shape[1]
  if not flat and not base:
    raise PeftFormatError(f'{weights_path} holds no LoRA factors (keys: {sorted(raw)[:5]})')
  weight_paths = sorted(f"{p}/{'embedding' if p == 'embed' else 'kernel'}" for p in ranks)
  info = {
      'rank': config['r'], 'alpha': config.get('lora_alpha', 8),
      'rslora': bool(config.get('use_rslora', False)),
      'targets': '^(?:' + '|'.join(re.escape(p) for p in weight_paths) + ')$',
      'ranks': ranks, 'scales': scales, 'tied': tied,
      'task_type': config.get('task_type'),
      'base_model_name_or_path': config.get('base_model_name_or_path'),
      'dropout': float(config.get('lora_dropout', 0.0) or 0.0),
  }
  return {'base': tree_lib.unflatten(base), 'peft': tree_lib.unflatten(flat)}, info


def with_tables(base_params: dict, tables: dict) -> dict:
  """``base_params`` with the embedding tables an adapter replaces (``trainable['base']``).

  >>> params = with_tables(params, trainable['base'])  # doctest: +SKIP
  """
  flat = tree_lib.flatten(base_params)
  for path, value in tree_lib.flatten(tables).items():
    if path not in flat or tuple(np.shape(flat[path])) != tuple(np.shape(value)):
      raise PeftFormatError(f'the adapter replaces {path!r} {np.shape(value)}, which the base '
                            f'has as {np.shape(flat.get(path)) if path in flat else "nothing"}')
    flat[path] = value
  return tree_lib.unflatten(flat)


def is_causal_lm_adapter(adapter_dir: str | os.PathLike) -> bool:
  """Whether ``adapter_dir`` holds a PEFT adapter whose ``adapter_config.json`` says
  ``task_type='CAUSAL_LM'`` (anything unreadable: False, for the caller's own checks to name).

  >>> is_causal_lm_adapter('/tmp/lm_peft')  # doctest: +SKIP
  True
  """
  import json  # pylint: disable=g-import-not-at-top
  try:
    config = json.loads((pathlib.Path(adapter_dir) / CONFIG_NAME).read_text())
  except (OSError, ValueError, UnicodeDecodeError):
    return False
  return isinstance(config, dict) and config.get('task_type') in TASK_TYPES


def peft_config(info: dict) -> dict:
  """The ``peft`` config section of an imported adapter (``peft.build`` makes its method).

  >>> method = peft.build(ml_collections.ConfigDict(peft_config(info)))  # doctest: +SKIP
  """
  return {'method': 'lora', 'head': '',
          'lora': {'rank': int(info['rank']), 'alpha': float(info['alpha']),
                   'rslora': bool(info['rslora']), 'targets': info['targets'],
                   'dropout': 0.0}}


def lora_method(info: dict):
  """The :class:`~peftjax.peft.lora.LoRA` method that runs an imported adapter's tree.

  >>> method = lora_method(info)  # doctest: +SKIP
  >>> logits = peft.apply(module, method, params, trainable['peft'], inputs)  # doctest: +SKIP
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from peftjax import peft  # pylint: disable=g-import-not-at-top
  return peft.build(ml_collections.ConfigDict(peft_config(info)))
