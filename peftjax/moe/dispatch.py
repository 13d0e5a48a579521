"""Dispatch tokens to experts, run the experts as one batched matmul, combine their outputs.

Three implementations of the same layer function:

* :func:`sorted_moe` (the default): the slot table from a sort-based routing (see
  ``routing.py``) drives a *gather* of the tokens into per-expert capacity buffers
  ``(E, G·C, D)``, the experts run as one batched matmul, and a scatter-add returns each slot's
  weighted output to its token. Work is proportional to ``tokens × k × capacity_factor``; nothing
  of size ``tokens × experts × capacity`` is ever formed. With ``ep_axis`` the buffers cross the
  devices of the expert mesh axis with ``all_to_all`` (see ``parallel.py``).
* :func:`onehot_moe` (the GShard reference): dense dispatch and combine tensors
  ``(G, S, E, C)`` contracted with einsums; work ``O(tokens × E × C × D)``.
* :func:`ragged_moe` (dropless, for TPU/GPU): assignments sorted by expert run through
  ``jax.lax.ragged_dot``. XLA on CPU computes ``ragged_dot`` densely (slow), so it is selectable
  (``moe.dispatch='ragged'``) but not the default here.

Expert parameters are ``{'intermediate': (kernel (E, D, F), bias (E, F)), 'output': (kernel
(E, F, D), bias (E, D))}``. ``lora`` optionally adds a per-expert low-rank update to each kernel,
``x·W_e + s·(x·A_e)·B_e`` with ``A`` (E, in, r) and ``B`` (E, r, out), computed implicitly (the
E×in×out update is never formed).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from peftjax.moe import routing

EXPERT_KERNELS = ('intermediate', 'output')


def _expert_dense(x, kernel, bias, lora, scale):
  """``x`` (E, N, in) -> (E, N, out) through each expert's own kernel (+ its LoRA update)."""
  y = jnp.einsum('eni,eio->eno', x, kernel.astype(x.dtype))
  if lora is not None:
    xa = jnp.einsum('eni,eir->enr', x, lora[0].astype(x.dtype)) * jnp.asarray(scale, x.dtype)
    y = y + jnp.einsum('enr,ero->eno', xa, lora[1].astype(x.dtype))
  return y + bias.astype(x.dtype)[:, None, :]


def expert_mlp(x, params: dict, activation: Callable, lora: dict | None = None,
               lora_scale: float = 1.0):
  """The experts' FFN on their buffers: ``act(x·W1_e + b1_e)·W2_e + b2_e`` for each expert."""
  lora = lora or {}
  (w1, b1), (w2, b2) = params['intermediate'], params['output']
  h = activation(_expert_dense(x, w1, b1, lora.get('intermediate'), lora_scale))
  return _expert_dense(h, w2, b2, lora.get('output'), lora_scale)


def sorted_moe(x, slot_token, slot_weight, params: dict, activation: Callable, *,
               lora: dict | None = None, lora_scale: float = 1.0, ep_axis: str | None = None):
  """Gather -> batched expert matmuls -> scatter-add, driven by a slot table.

  ``x`` (G, S, D); ``slot_token`` / ``slot_weight`` (G, E, C) (``S`` marks an empty slot). With
  ``ep_axis`` (inside ``shard_map``), the expert parameters hold this device's ``E / n`` experts
  and the buffers are exchanged over that axis with ``all_to_all``.

  >>> y = sorted_moe(x, tok, w, params, jax.nn.gelu)  # doctest: +SKIP
  """
  g, s, d = x.shape
  e, c = slot_token.shape[1:]
  x_flat = jnp.concatenate([x.reshape(g * s, d), jnp.zeros((1, d), x.dtype)])
  src = jnp.where(slot_token < s, jnp.arange(g, dtype=jnp.int32)[:, None, None] * s + slot_token,
                  g * s)
  src = jnp.swapaxes(src, 0, 1).reshape(e, g * c)  # (E, G·C) rows of x_flat
  buf = jnp.take(x_flat, src, axis=0)  # (E, G·C, D)
  if ep_axis is not None:
    # Each device keeps its E/n experts' slots from every device: (E/n, n·G·C, D).
    buf = jax.lax.all_to_all(buf, ep_axis, split_axis=0, concat_axis=1, tiled=True)
  out = expert_mlp(buf, params, activation, lora, lora_scale)
  if ep_axis is not None:
    out = jax.lax.all_to_all(out, ep_axis, split_axis=1, concat_axis=0, tiled=True)
  w = jnp.swapaxes(slot_weight, 0, 1).reshape(e, g * c)
  out = out * w[..., None].astype(out.dtype)
  y = jnp.zeros((g * s + 1, d), out.dtype).at[src.reshape(-1)].add(out.reshape(-1, d))
  return y[:-1].reshape(g, s, d)


def onehot_moe(x, route: routing.TopK, cap: int, params: dict, activation: Callable, *,
               lora: dict | None = None, lora_scale: float = 1.0):
  """The GShard one-hot dispatch/combine einsums (reference implementation for top-k routing).

  Positions come from :func:`routing.positions_onehot`, independently of the sort.
  """
  g, s, d = x.shape
  e = route.probs.shape[-1]
  k = route.expert.shape[1] // s
  pos = routing.positions_onehot(route.expert, e)
  keep = (route.expert < e) & (pos < cap)
  # (G, A, E) x (G, A, C) -> (G, S, E, C), summed over the k choices of each token.
  onehot_e = jax.nn.one_hot(jnp.where(keep, route.expert, e), e, dtype=x.dtype)
  onehot_c = jax.nn.one_hot(jnp.where(keep, pos, cap), cap, dtype=x.dtype)
  dispatch = jnp.einsum('gae,gac->gaec', onehot_e, onehot_c).reshape(g, k, s, e, cap).sum(1)
  combine = jnp.einsum('gae,gac,ga->gaec', onehot_e, onehot_c,
                       route.weight.astype(x.dtype)).reshape(g, k, s, e, cap).sum(1)
  buf = jnp.einsum('gsec,gsd->egcd', dispatch, x).reshape(e, g * cap, d)
  out = expert_mlp(buf, params, activation, lora, lora_scale).reshape(e, g, cap, d)
  return jnp.einsum('gsec,egcd->gsd', combine, out)


def ragged_moe(x, route: routing.TopK, params: dict, activation: Callable, *,
               lora: dict | None = None, lora_scale: float = 1.0):
  """Dropless: all assignments sorted by expert, experts applied with ``jax.lax.ragged_dot``.

  Meant for TPU/GPU, where ``ragged_dot`` has grouped kernels; on CPU it is computed densely.
  Not supported under expert parallelism (``ragged_all_to_all`` is not implemented on CPU).
  """
  g, s, d = x.shape
  e = route.probs.shape[-1]
  a = route.expert.shape[1]
  expert = route.expert.reshape(-1)
  token = (jnp.arange(g, dtype=jnp.int32)[:, None] * s + jnp.arange(a, dtype=jnp.int32) % s)
  order = jnp.argsort(expert, stable=True)
  sorted_e, sorted_tok = expert[order], token.reshape(-1)[order]
  sizes = jnp.bincount(expert, length=e + 1)[:e].astype(jnp.int32)
  xs = jnp.take(x.reshape(g * s, d), sorted_tok, axis=0)
  lora = lora or {}
  safe_e = jnp.minimum(sorted_e, e - 1)  # padding rows (expert E) sit at the end, unused

  def dense(h, name):
    kernel, bias = params[name]
    y = jax.lax.ragged_dot(h, kernel.astype(h.dtype), sizes)
    if name in lora:
      a_, b_ = lora[name]
      ha = jax.lax.ragged_dot(h, a_.astype(h.dtype), sizes) * jnp.asarray(lora_scale, h.dtype)
      y = y + jax.lax.ragged_dot(ha, b_.astype(h.dtype), sizes)
    return y + bias.astype(h.dtype)[safe_e]

  out = dense(activation(dense(xs, 'intermediate')), 'output')
  w = route.weight.reshape(-1)[order].astype(out.dtype)
  # Rows past the last group (padding tokens) are not defined by ragged_dot: masked, not scaled.
  out = jnp.where((sorted_e < e)[:, None], out * w[:, None], 0)
  y = jnp.zeros((g * s, d), out.dtype).at[sorted_tok].add(out)
  return y.reshape(g, s, d)
