"""Hugging Face state dicts <-> :class:`~peftjax.models.llama.LlamaForCausalLM` parameters.

One mapping serves every importer (GGUF, HF directories) and the HF exporter: they speak HF's
names and torch layout (``(out, in)`` weights), this module speaks the linen tree (``(in, out)``
kernels, stacked under ``layers/`` when the config scans its layers).

>>> params = params_from_hf(cfg, state)          # doctest: +SKIP
>>> state == hf_from_params(cfg, params)         # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np

from peftjax.errors import UserInputError
from peftjax.models.llama import LlamaConfig

# (linen path inside a layer, HF name inside model.layers.{i}., transpose?)
_LAYER = (
    ('attn_norm/scale', 'input_layernorm.weight', False),
    ('attn/q_proj/kernel', 'self_attn.q_proj.weight', True),
    ('attn/k_proj/kernel', 'self_attn.k_proj.weight', True),
    ('attn/v_proj/kernel', 'self_attn.v_proj.weight', True),
    ('attn/o_proj/kernel', 'self_attn.o_proj.weight', True),
    ('mlp_norm/scale', 'post_attention_layernorm.weight', False),
    ('mlp/gate_proj/kernel', 'mlp.gate_proj.weight', True),
    ('mlp/up_proj/kernel', 'mlp.up_proj.weight', True),
    ('mlp/down_proj/kernel', 'mlp.down_proj.weight', True),
)
_BIASES = (
    ('attn/q_proj/bias', 'self_attn.q_proj.bias', False),
    ('attn/k_proj/bias', 'self_attn.k_proj.bias', False),
    ('attn/v_proj/bias', 'self_attn.v_proj.bias', False),
)


class WeightsError(UserInputError):
  """A checkpoint's tensors do not fit the architecture its config describes."""


def _layer_entries(cfg: LlamaConfig):
  return _LAYER + (_BIASES if cfg.qkv_bias else ())


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple]:
  """HF name -> torch-layout shape of every tensor the architecture has."""
  d, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per = {'input_layernorm.weight': (d,), 'post_attention_layernorm.weight': (d,),
         'self_attn.q_proj.weight': (q, d), 'self_attn.k_proj.weight': (kv, d),
         'self_attn.v_proj.weight': (kv, d), 'self_attn.o_proj.weight': (d, q),
         'self_attn.q_proj.bias': (q,), 'self_attn.k_proj.bias': (kv,),
         'self_attn.v_proj.bias': (kv,),
         'mlp.gate_proj.weight': (m, d), 'mlp.up_proj.weight': (m, d),
         'mlp.down_proj.weight': (d, m)}
  out = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,)}
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = (v, d)
  for i in range(cfg.num_layers):
    for _, name, _ in _layer_entries(cfg):
      out[f'model.layers.{i}.{name}'] = per[name]
  return out


def check_state(cfg: LlamaConfig, state: dict, source: str) -> None:
  """Raises a :class:`WeightsError` naming the first missing or misshapen tensor of ``state``."""
  for name, shape in expected_shapes(cfg).items():
    if name not in state:
      raise WeightsError(f'{source}: tensor {name!r} is missing; a {cfg.num_layers}-layer '
                         f'{"tied" if cfg.tie_embeddings else "untied"} Llama needs it')
    if tuple(state[name].shape) != shape:
      raise WeightsError(f'{source}: tensor {name!r} has shape {tuple(state[name].shape)}; the '
                         f'config says {shape}')


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split('/'):
    tree = tree[p]
  return tree


def params_from_hf(cfg: LlamaConfig, state: dict, *, source: str = 'checkpoint',
                   num_layers: int | None = None) -> dict:
  """The linen parameter tree of ``state`` (HF names, torch layout, numpy float32).

  ``num_layers`` (default ``cfg.num_layers``) keeps only the first layers, for a truncated
  model; ``cfg`` must then already say that many layers.
  """
  n = cfg.num_layers if num_layers is None else num_layers
  full = LlamaConfig(**{**cfg.__dict__, 'num_layers': n})
  check_state(full, state, source)
  f32 = lambda a: np.asarray(a, np.float32)
  params: dict = {}
  _set(params, 'embed/embedding', f32(state['model.embed_tokens.weight']))
  _set(params, 'norm/scale', f32(state['model.norm.weight']))
  if not cfg.tie_embeddings:
    _set(params, 'lm_head/kernel', f32(state['lm_head.weight']).T)
  for path, name, transpose in _layer_entries(cfg):
    per = [f32(state[f'model.layers.{i}.{name}']) for i in range(n)]
    per = [a.T if transpose else a for a in per]
    if cfg.scan_layers:
      _set(params, f'layers/{path}', np.stack(per))
    else:
      for i, a in enumerate(per):
        _set(params, f'layer_{i}/{path}', a)
  return params


def hf_from_params(cfg: LlamaConfig, params: dict) -> dict:
  """HF-named torch-layout numpy arrays of a (merged, plain) parameter tree.

  >>> state = hf_from_params(cfg, merged_params)  # doctest: +SKIP
  """
  out = {'model.embed_tokens.weight': np.asarray(_get(params, 'embed/embedding')),
         'model.norm.weight': np.asarray(_get(params, 'norm/scale'))}
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = np.asarray(_get(params, 'lm_head/kernel')).T
  for path, name, transpose in _layer_entries(cfg):
    for i in range(cfg.num_layers):
      a = np.asarray(_get(params, f'layers/{path}')[i] if cfg.scan_layers else
                     _get(params, f'layer_{i}/{path}'))
      out[f'model.layers.{i}.{name}'] = a.T if transpose else a
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
