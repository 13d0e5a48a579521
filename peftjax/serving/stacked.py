"""Many adapters as one pytree of stacked arrays, and a forward pass that picks per example.

An adapter library keeps every adapter's parameters stacked along a leading *slot* axis ``N``:

* LoRA: ``lora/<site>/a`` ``(N, *in, R)`` and ``lora/<site>/b`` ``(N, R, *out)``, every rank
  zero-padded to the library's ``R`` and the scale ``s`` folded into ``b`` (so a rank-4 adapter
  with alpha 8 and a rank-16 one with alpha 16 live in the same arrays and compute exactly
  ``s·(x·A)·B``: the padded rows and columns are zeros);
* IA3: ``ia3_out/<site>`` ``(N, *out)`` and ``ia3_in/<site>`` ``(N, *in)`` (ones where unused);
* trained base leaves (a task head, BitFit biases), as deltas from the base:
  ``kernel/<module>`` ``(N, *in, *out)`` and ``bias/<module>`` ``(N, *bias)`` (zeros where unused).

:func:`stacked_scope` runs a model with slot ``index``: a scalar (one active adapter; switching
it is a new argument value, not a new program) or a ``(B,)`` vector (each example its own
adapter). Per example, factors are *gathered* inside the jitted function (``A[index]`` is
``(B, *in, R)``) and applied as batched matmuls: no Python loop over adapters or groups, and
the cost does not grow with the number of adapters loaded.

>>> with stacked_scope(layout, stacks, jnp.array([0, 3, 3, 1])):  # doctest: +SKIP
...   logits = model.apply({'params': base}, **inputs)
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.peft.base import layer_scope
from peftjax.peft.lora import Site

WRAPPED = (nn.Dense, nn.DenseGeneral, nn.Embed, nn.LayerNorm)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static structure of a library's stacks: which layers carry which parts.

  Two libraries with equal layouts and slot counts run the same compiled program.
  """
  rank: int                      # padded LoRA rank R
  lora: tuple[Site, ...] = ()    # LoRA sites (kind 'dense' or 'embed')
  ia3_out: tuple[Site, ...] = ()
  ia3_in: tuple[Site, ...] = ()
  kernels: tuple[Site, ...] = ()  # dense layers whose kernel some adapter trains
  biases: tuple[str, ...] = ()    # module paths whose bias some adapter trains

  def paths(self) -> set[str]:
    sites = (*self.lora, *self.ia3_out, *self.ia3_in, *self.kernels)
    return {s.path for s in sites} | set(self.biases)


def empty_stacks(layout: Layout, slots: int, base_flat: dict) -> dict:
  """Stacks of ``slots`` identity adapters (LoRA zeros, IA3 ones, zero deltas)."""
  r = layout.rank
  out = {'lora': {}, 'ia3_out': {}, 'ia3_in': {}, 'kernel': {}, 'bias': {}}
  for s in layout.lora:
    out['lora'][s.path] = {'a': np.zeros((slots, *s.in_shape, r), np.float32),
                           'b': np.zeros((slots, r, *s.out_shape), np.float32)}
  for s in layout.ia3_out:
    out['ia3_out'][s.path] = np.ones((slots, *s.out_shape), np.float32)
  for s in layout.ia3_in:
    out['ia3_in'][s.path] = np.ones((slots, *s.in_shape), np.float32)
  for s in layout.kernels:
    out['kernel'][s.path] = np.zeros((slots, *s.in_shape, *s.out_shape), np.float32)
  for p in layout.biases:
    out['bias'][p] = np.zeros((slots, *np.shape(base_flat[f'{p}/bias'])), np.float32)
  return out


def _contract_in(site: Site, x, w, per_example: bool):
  """``x`` contracted over the site's input axes with ``w``'s leading input dims."""
  n = len(site.in_shape)
  if per_example:  # w: (B, *in, ...); the batch axis of x is its first
    return jax.lax.dot_general(x, w, ((site.x_axes, tuple(range(1, n + 1))), ((0,), (0,))))
  return jax.lax.dot_general(x, w, ((site.x_axes, tuple(range(n))), ((), ())))


def _rank_up(xa, b, per_example: bool):
  """``(..., R) · (R, *out)`` (per example: batch axis first on both)."""
  if per_example:
    return jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (1,)), ((0,), (0,))))
  return jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))


def _trailing(v, ndim: int, per_example: bool):
  """A per-example vector ``(B, *feat)`` shaped to broadcast over trailing feature dims."""
  if not per_example:
    return v
  return v.reshape(v.shape[:1] + (1,) * (ndim - v.ndim) + v.shape[1:])


def _at_inputs(site: Site, v, ndim: int, per_example: bool):
  """An input-feature vector ``([B,] *in)`` (kernel order) placed on the site's input axes."""
  lead = 1 if per_example else 0
  order = np.argsort(site.x_axes)
  v = jnp.transpose(v, (*range(lead), *(lead + order)))
  shape = [1] * ndim
  if per_example:
    shape[0] = v.shape[0]
  for ax, n in zip(sorted(site.x_axes), np.asarray(site.in_shape)[order]):
    shape[ax] = int(n)
  return v.reshape(shape)


def stacked_scope(layout: Layout, stacks: dict, index):
  """Context under which the model runs with adapter slot ``index`` (scalar or ``(B,)``).

  Per layer, for the example's adapter: ``y = l_out ⊙ (layer(l_in ⊙ x) + x·ΔK + Δb) + (x·A)·B``
  (the order of ``peft.method='lora+ia3'``; an adapter of one method leaves the others at
  identity).
  """
  per_example = jnp.ndim(index) == 1
  take = lambda s: s[index]
  lora = {s.path: s for s in layout.lora}
  outs = {s.path: s for s in layout.ia3_out}
  ins = {s.path: s for s in layout.ia3_in}
  kernels = {s.path: s for s in layout.kernels}

  def wrap(path, module, call, x):
    del module
    x_in = x
    if path in ins:
      x_in = x * _at_inputs(ins[path], take(stacks['ia3_in'][path]).astype(x.dtype), x.ndim,
                            per_example)
    y = call(x_in)
    if path in kernels:
      y = y + _contract_in(kernels[path], x_in, take(stacks['kernel'][path]).astype(y.dtype),
                           per_example)
    if path in layout.biases:
      y = y + _trailing(take(stacks['bias'][path]).astype(y.dtype), y.ndim, per_example)
    if path in outs:
      y = y * _trailing(take(stacks['ia3_out'][path]).astype(y.dtype), y.ndim, per_example)
    if path in lora:
      site = lora[path]
      a, b = stacks['lora'][path]['a'], stacks['lora'][path]['b']
      if site.kind == 'embed':  # x holds token ids: gather rows of A (per example: its A)
        xa = a[index[:, None], x] if per_example else a[index][x]
      else:
        xa = _contract_in(site, x, take(a).astype(y.dtype), per_example)
      y = y + _rank_up(xa.astype(y.dtype), take(b).astype(y.dtype), per_example)
    return y

  return layer_scope(WRAPPED, layout.paths(), wrap)
