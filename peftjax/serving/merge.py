"""Weighted merges of adapters into a new adapter (as Hugging Face PEFT's ``add_weighted_adapter``).

For LoRA, the merged update of a layer is ``ΔW = Σ_i w_i·s_i·A_i·B_i``:

* ``'cat'`` represents it exactly, by concatenating the factors along the rank axis
  (``A = [A_1 … A_n]``, ``B = [w_1 s_1 B_1; …; w_n s_n B_n]``, scale 1): the rank is the sum of
  the ranks;
* ``'svd'`` forms ``ΔW`` and keeps its best rank-``rank`` approximation (``A = U√S``,
  ``B = √S Vᵀ``): a fixed rank at a measured approximation error.

IA3 vectors, and trained base leaves (task heads, BitFit biases), merge linearly:
``Σ_i w_i·v_i``. With weights summing to 1 this is the average of the adapters' parameters
(a "model soup"); for heads of different tasks it is only meaningful as an interpolation.

>>> merged = weighted([a, b], [0.5, 0.5], combination='cat', names=['a', 'b'])  # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np

from peftjax.serving.adapter import Adapter
from peftjax.serving.adapter import AdapterError

COMBINATIONS = ('cat', 'svd', 'linear')


def _lora(adapters, weights, combination: str, rank: int | None) -> dict:
  out = {}
  paths = sorted({p for ad in adapters for p in ad.lora})
  for path in paths:
    terms = [(w, ad.scale, *ad.lora[path]) for ad, w in zip(adapters, weights) if path in ad.lora]
    if combination == 'cat':
      a = np.concatenate([t[2] for t in terms], axis=-1)
      b = np.concatenate([np.float32(w * s) * b for w, s, _, b in terms], axis=0)
    else:  # svd of the dense update, in (d_in, d_out) form
      a0, b0 = terms[0][2], terms[0][3]
      in_shape, out_shape = a0.shape[:-1], b0.shape[1:]
      d_in, d_out = int(np.prod(in_shape)), int(np.prod(out_shape))
      dw = sum(np.float64(w * s) * (a.reshape(d_in, -1).astype(np.float64)
                                    @ b.reshape(-1, d_out).astype(np.float64))
               for w, s, a, b in terms)
      r = rank or max(ad.rank for ad in adapters)
      r = min(r, d_in, d_out)
      u, sv, vt = np.linalg.svd(dw, full_matrices=False)
      root = np.sqrt(sv[:r])
      a = (u[:, :r] * root).reshape(*in_shape, r).astype(np.float32)
      b = (root[:, None] * vt[:r]).reshape(r, *out_shape).astype(np.float32)
    out[path] = (a, b)
  return out


def _linear(dicts: list[dict], weights, identity: float) -> dict:
  """``Σ w_i v_i`` per key; a key some adapter lacks counts as ``identity`` for it."""
  keys = sorted({k for d in dicts for k in d})
  out = {}
  for k in keys:
    shape = next(d[k].shape for d in dicts if k in d)
    out[k] = sum(np.float32(w) * d.get(k, np.full(shape, identity, np.float32))
                 for d, w in zip(dicts, weights)).astype(np.float32)
  return out


def weighted(adapters: list[Adapter], weights: list[float], *, combination: str = 'cat',
             rank: int | None = None, names: list[str] | None = None) -> Adapter:
  """One adapter from several of the same method, weighted (see the module docstring).

  ``combination`` applies to LoRA factors (``'cat'`` exact, ``'svd'`` truncated to ``rank``);
  ``'linear'`` is for adapters without LoRA (IA3, BitFit, heads), which always merge linearly.
  """
  if not adapters or len(adapters) != len(weights):
    raise AdapterError(f'a merge needs adapters and one weight each; got {len(adapters)} '
                       f'adapters and {len(weights)} weights')
  if combination not in COMBINATIONS:
    raise AdapterError(f'combination={combination!r} is invalid; valid: {COMBINATIONS}')
  methods = sorted({ad.method for ad in adapters})
  if len(methods) > 1:
    raise AdapterError(f'cannot merge adapters of different methods {methods}; merge each '
                       'method separately')
  method = methods[0]
  has_lora = any(ad.lora for ad in adapters)
  if has_lora and combination == 'linear':
    raise AdapterError("combination='linear' is for IA3/BitFit/heads; LoRA factors merge with "
                       "'cat' (exact) or 'svd' (truncated to rank)")
  if rank is not None and (combination != 'svd' or rank < 1):
    raise AdapterError(f"rank={rank} only applies to combination='svd' and must be >= 1")
  base_keys = {frozenset(ad.base) for ad in adapters}
  if len(base_keys) > 1:
    raise AdapterError('cannot merge adapters that train different base leaves (heads, '
                       'biases); their sets differ')
  lora = _lora(adapters, weights, combination, rank) if has_lora else {}
  r = max((a.shape[-1] for a, _ in lora.values()), default=0)
  names = names or [ad.source or f'adapter_{i}' for i, ad in enumerate(adapters)]
  cfg = dict(adapters[0].peft_config)
  if has_lora:
    # scale alpha/rank = 1: folded into B
    cfg['lora'] = {**cfg.get('lora', {}), 'rank': r, 'alpha': float(r), 'rslora': False}
  return Adapter(
      method=method, peft_config=cfg, scale=1.0, lora=lora,
      ia3_out=_linear([ad.ia3_out for ad in adapters], weights, 1.0),
      ia3_in=_linear([ad.ia3_in for ad in adapters], weights, 1.0),
      base=_linear([ad.base for ad in adapters], weights, 0.0),
      manifest={'merged_from': [
          {'name': n, 'weight': float(w), 'source': ad.source,
           'params_sha256': (ad.manifest or {}).get('params', {}).get('sha256')}
          for n, w, ad in zip(names, weights, adapters)], 'combination': combination})
