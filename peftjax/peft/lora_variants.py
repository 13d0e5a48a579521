"""LoRA variants that change how the low-rank update is initialised or applied.

* **PiSSA** (Meng et al., 2024), ``peft.method='pissa'``: A and B start from the top-r singular
  directions of ``W`` and the frozen base keeps only the residual ``W_res = W - s·A·B``, so the
  model is unchanged at init but training moves the *principal* subspace of each weight.
* **DoRA** (Liu et al., 2024), ``peft.method='dora'``: the adapted weight is split into a
  trainable magnitude and a LoRA-updated direction, ``W' = m ⊙ (W + s·A·B) / ||W + s·A·B||_c``.

Both reuse :mod:`peftjax.peft.lora` (sites, A/B layout, implicit delta, merge) and share its
config fields (``rank``, ``alpha``, ``rslora``, ``dropout``, ``targets``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft import layers
from peftjax.peft import lora as lora_lib
from peftjax.peft.base import layer_scope
from peftjax.peft.base import register

# The norm defines the model's output, so its contractions run at full float32 precision even
# where the default matmul precision is bfloat16 (TPU); they are small next to the forward pass.
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# PiSSA
# ----------------------------------------------------------------------------------------------

def pissa_factors(w, site: lora_lib.Site, rank: int, scale: float):
  """``(A, B)`` with ``scale·A·B`` = the rank-``rank`` SVD truncation of ``w``.

  ``w`` is viewed as a (d_in, d_out) matrix ``U S V^T``; ``A = U_r sqrt(S_r) / sqrt(s)`` and
  ``B = sqrt(S_r) V_r^T / sqrt(s)`` so the LoRA scale ``s`` (alpha / r) cancels: the update
  starts at the principal part whatever alpha is, and A and B have equal singular values.

  A stacked layer's weight (``site.lead``, e.g. ``nn.scan``'s layer axis) gets one
  decomposition per layer.

  >>> a, b = pissa_factors(kernel, site, rank=8, scale=2.0)  # doctest: +SKIP
  """
  if site.lead:
    one = dataclasses.replace(site, lead=())
    n = int(np.prod(site.lead))
    stack = jnp.asarray(w).reshape(n, *site.in_shape, *site.out_shape)
    a, b = jax.vmap(lambda m: pissa_factors(m, one, rank, scale))(stack)
    return a.reshape(*site.lead, *a.shape[1:]), b.reshape(*site.lead, *b.shape[1:])
  mat = jnp.asarray(w, jnp.float32).reshape(site.d_in, site.d_out)
  u, sv, vt = jnp.linalg.svd(mat, full_matrices=False)
  root = jnp.sqrt(sv[:rank] / scale)
  a = u[:, :rank] * root[None, :]
  b = root[:, None] * vt[:rank]
  return a.reshape(*site.in_shape, rank), b.reshape(rank, *site.out_shape)


@register('pissa')
class PiSSA(lora_lib.LoRA):
  """PiSSA: LoRA initialised on each weight's principal singular subspace.

  Training is LoRA's (implicit, ``y = x·W_res + s·(x·A)·B``); only init and the frozen base
  differ. :meth:`prepare_base` must be applied to the base (the trainer does it once after
  ``init``); ``merge`` then gives back ``W_res + s·A·B``, which is ``W`` itself at init.

  >>> method = PiSSA(config.peft)                            # doctest: +SKIP
  >>> pissa = method.init(rng, model, params, inputs)        # doctest: +SKIP
  >>> residual = method.prepare_base(params, pissa)          # doctest: +SKIP
  >>> logits = peft.apply(model, method, residual, pissa, inputs)  # == model(params) at init
  """

  def init_factors(self, rng, sites, base_params) -> dict:
    # LoRA's init validates the rank at each site (abstractly: its random A is discarded).
    jax.eval_shape(lambda: super(PiSSA, self).init_factors(rng, sites, base_params))
    flat = tree_lib.flatten(base_params)
    out = {}
    for site in sites:
      a, b = pissa_factors(flat[site.weight_path], site, self.cfg.lora.rank, self.scale)
      out[f'{site.path}/lora_a'], out[f'{site.path}/lora_b'] = a, b
    return tree_lib.unflatten(out)

  def prepare_base(self, base_params, peft_params, *, module=None, inputs=None) -> dict:
    """The frozen residual ``W_res = W - s·A·B`` at every site (other leaves unchanged)."""
    del module, inputs
    return self.unmerge(base_params, peft_params)


# ----------------------------------------------------------------------------------------------
# DoRA
# ----------------------------------------------------------------------------------------------

def _batch_dot(x, y, n_batch: int):
  """``sum_i x[i..., o...] y[i..., o...]`` over the leading (non-batch) axes -> (o...)."""
  n_con = x.ndim - n_batch
  con = tuple(range(n_con))
  bat = tuple(range(n_con, x.ndim))
  return jax.lax.dot_general(x, y, ((con, con), (bat, bat)), precision=_HIGHEST)


def column_norm(site: lora_lib.Site, w, a, b, scale):
  """``||W + s·A·B||`` per output feature (shape ``site.out_shape``), without forming ``W + s·A·B``.

  Column j of the squared norm expands as
  ``||W_j||² + 2s·(WᵀA B)_jj + s²·(Bᵀ (AᵀA) B)_jj``, so only (d_out × r), (r × r) and
  (r × d_out) intermediates exist: no (d_in × d_out) array is made in the forward or backward
  pass, and the memory is LoRA's. The FLOPs of ``WᵀA`` (d_in·d_out·r) equal those of forming
  ``A·B``.
  """
  n_in, n_out = len(site.in_shape), len(site.out_shape)
  w, a, b = (jnp.asarray(t, jnp.float32) for t in (w, a, b))
  w_sq = _batch_dot(w, w, n_out)                                            # (o...)
  in_axes = tuple(range(n_in))
  wt_a = jax.lax.dot_general(w, a, ((in_axes, in_axes), ((), ())), precision=_HIGHEST)  # (o..., r)
  bt = jnp.moveaxis(b, 0, -1)                                               # (o..., r)
  cross = jnp.sum(wt_a * bt, axis=-1)
  gram = jax.lax.dot_general(a, a, ((in_axes, in_axes), ((), ())), precision=_HIGHEST)  # (r, r)
  gb = jax.lax.dot_general(gram, b, (((1,), (0,)), ((), ())), precision=_HIGHEST)  # (r, o...)
  b_sq = jnp.sum(b * gb, axis=0)
  # Rounding can take an exactly-zero column a hair below zero; clamp before the sqrt.
  return jnp.sqrt(jnp.maximum(w_sq + 2.0 * scale * cross + scale ** 2 * b_sq, 0.0))


def _explicit_column_norm(site: lora_lib.Site, w):
  """``||w||`` per output feature of a formed weight (merge and init), per stacked layer:
  shape ``(*lead, *out)``."""
  n = len(site.lead)
  return jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(w, jnp.float32)),
                          axis=tuple(range(n, n + len(site.in_shape)))))


def dora_scope(dora_params, scale: float, *, dropout: float = 0.0, rng=None,
               deterministic: bool = True):
  """Context under which every site computes ``y = (m / ||W+sAB||_c) ⊙ (x·W + s·(x·A)·B) + bias``.

  The layer's own call gives ``x·W + bias``; the base kernel and bias are read from the bound
  module (``context.module.variables``), so ``Method.intercept`` needs only the DoRA tree. The
  norm is ``stop_gradient``-ed, as in the paper's §4.3 and HF PEFT: it is treated as a constant
  in the backward pass, which saves memory and (per the paper) barely changes accuracy.
  Dropout, if set, applies to the LoRA branch input only (as in :func:`lora.lora_scope`).
  """
  flat = tree_lib.flatten(dora_params)

  def wrap(path, module, call, x):
    a, b, m = lora_lib.call_leaves(module, path, ('lora_a', 'lora_b', 'magnitude'), flat)
    site = lora_lib.call_site(path, module, x, a, b)
    y = call(x)
    weights = nn.meta.unbox(layers.params(module))
    norm = jax.lax.stop_gradient(column_norm(site, weights['kernel'], a, b, scale))
    x = lora_lib.branch_dropout(x, dropout, rng, path, deterministic, module)
    delta = lora_lib._lora_delta(site, x, a, b, scale, y.dtype)
    ratio = (m / norm).astype(y.dtype)  # (o...): broadcasts over y's trailing feature axes
    bias = weights.get('bias')
    if bias is None:
      return ratio * (y + delta)
    bias = bias.astype(y.dtype)
    return ratio * (y - bias + delta) + bias  # the magnitude scales x·W, not the bias

  return layer_scope(('dense',), lora_lib.factor_paths(dora_params), wrap)


@register('dora')
class DoRA(lora_lib.LoRA):
  """DoRA: ``W' = m ⊙ (W + s·A·B) / ||W + s·A·B||_c`` on Dense / DenseGeneral kernels.

  Parameters per site: LoRA's ``lora_a``, ``lora_b`` plus ``magnitude`` (shape = the kernel's
  output shape), initialised to ``||W||_c`` so the model is unchanged at init. ``||·||_c`` is
  the norm over the kernel's input axes, one per output feature.

  Cost: the forward adds ``WᵀA`` (d_out × r) per site and step for the norm — it is computed
  from the factors (:func:`column_norm`), so unlike a direct implementation no d_in × d_out
  matrix is formed; with the norm under ``stop_gradient`` no d_in × d_out gradient is formed
  either. :meth:`merge` forms ``W'`` explicitly (export/serving).

  >>> method = DoRA(config.peft)                             # doctest: +SKIP
  >>> dora = method.init(rng, model, params, inputs)         # doctest: +SKIP
  >>> logits = peft.apply(model, method, params, dora, inputs)     # doctest: +SKIP
  >>> merged = method.merge(params, dora)  # model(merged) == logits
  """

  def init_factors(self, rng, sites, base_params) -> dict:
    embeds = [s.weight_path for s in sites if s.kind != 'dense']
    if embeds:
      raise ConfigError(
          f'peft.lora.targets={self.cfg.lora.targets!r} matches {embeds[:3]}; DoRA adapts dense '
          'kernels only, not embeddings or convolutions (use peft.method=lora for those)')
    flat = tree_lib.flatten(super().init_factors(rng, sites, base_params))
    base = tree_lib.flatten(base_params)
    for s in sites:
      flat[f'{s.path}/magnitude'] = _explicit_column_norm(s, base[s.weight_path])
    return tree_lib.unflatten(flat)

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    return dora_scope(peft_params, self.scale, dropout=self.cfg.lora.dropout, rng=rng,
                      deterministic=deterministic)

  def merge(self, base_params, peft_params) -> dict:
    """``W <- m ⊙ (W + s·A·B) / ||W + s·A·B||_c``; the merged model equals the implicit one."""
    sites = self.sites(base_params, peft_params)
    updated = lora_lib.fold(base_params, sites, peft_params, self.scale, +1.0)
    flat, lp = tree_lib.flatten(updated), tree_lib.flatten(peft_params)
    for s in sites:
      v = flat[s.weight_path]
      ratio = lp[f'{s.path}/magnitude'] / _explicit_column_norm(s, v)  # (*lead, *out)
      n = len(s.lead)  # broadcast over each layer's input axes
      ratio = ratio.reshape(*ratio.shape[:n], *(1,) * len(s.in_shape), *ratio.shape[n:])
      w = jnp.asarray(v, jnp.float32) * ratio
      flat[s.weight_path] = w.astype(v.dtype)
    return tree_lib.unflatten(flat)

  def unmerge(self, merged_params, peft_params) -> dict:
    # W' keeps only the direction of W + s·A·B; its norm, hence W, cannot be recovered.
    raise NotImplementedError('DoRA merge is not invertible: keep the unmerged base params')

  def logical_specs(self, base_specs, peft_params) -> Any:
    """LoRA's specs, plus ``magnitude`` sharded like the kernel's output axes."""
    out = tree_lib.flatten(super().logical_specs(base_specs, peft_params))
    specs = tree_lib.flatten(base_specs)
    lp = tree_lib.flatten(peft_params)
    for path in lora_lib.factor_paths(peft_params):
      n = lp[f'{path}/magnitude'].ndim  # the kernel's stack axes, then its output axes
      w = specs.get(f'{path}/kernel')
      if w is None:
        out[f'{path}/magnitude'] = P(*(None,) * n)
        continue
      a, b = lp[f'{path}/lora_a'], lp[f'{path}/lora_b']
      k = a.ndim + b.ndim - 2 - len(w)
      out[f'{path}/magnitude'] = P(*tuple(w)[:k], *tuple(w)[len(w) - (n - k):])
    return tree_lib.unflatten(out)
