"""Sparse upcycling (Komatsuzaki et al., 2023): an MoE layer initialised from a dense FFN.

Every expert starts as a copy of the FFN. With renormalized top-k weights (they sum to 1) the
routed output of identical experts is the dense FFN's output whatever the router says, so the
upcycled model computes exactly the dense model as long as no token is dropped; the router
starts small and random so the load starts spread. With shared experts, the dense FFN is split
in halves (the output projections scaled by 1/2): shared + routed = dense again.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax import tree as tree_lib
from peftjax.errors import UserInputError


class UpcycleError(UserInputError):
  """The source path does not hold a dense FFN (``intermediate`` and ``output`` kernels)."""


def _ffn(flat: dict, path: str) -> dict:
  names = [f'{path}/{m}/{w}' for m in ('intermediate', 'output') for w in ('kernel', 'bias')]
  missing = [n for n in names if n not in flat]
  if missing:
    children = sorted({p[len(path) + 1:].split('/')[0] for p in flat if p.startswith(path + '/')})
    raise UpcycleError(
        f'upcycling source {path!r} is not an FFN: it needs intermediate/{{kernel,bias}} and '
        f'output/{{kernel,bias}}, missing {missing[:2]}; it holds {children or "nothing"}')
  w1, b1, w2, b2 = (flat[n] for n in names)
  if not (w1.ndim == 2 and w2.ndim == 2 and w1.shape[::-1] == w2.shape
          and b1.shape == w1.shape[1:] and b2.shape == w2.shape[1:]):
    raise UpcycleError(f'upcycling source {path!r} is not an FFN: intermediate/kernel '
                       f'{w1.shape} and output/kernel {w2.shape} are not (D, F) and (F, D)')
  return {'w1': w1, 'b1': b1, 'w2': w2, 'b2': b2}


def upcycle_ffn(params: dict, path: str, num_experts: int, *, rng: jax.Array,
                shared_experts: int = 0, router_std: float = 0.02,
                target: str = 'moe') -> dict:
  """Replaces the dense FFN under ``path`` by an MoE layer at ``path/target``.

  ``params`` is a parameter tree holding ``{path}/intermediate/{kernel,bias}`` and
  ``{path}/output/{kernel,bias}``; the result holds ``{path}/{target}/router/kernel``,
  ``{path}/{target}/{intermediate,output}/{kernel,bias}`` with a leading expert axis, and with
  ``shared_experts`` the ``{path}/{target}/shared/...`` FFN. Raises :class:`UpcycleError` when
  ``path`` is not a dense FFN.

  >>> enc = upcycle_ffn(enc, 'layer_1', 8, rng=jax.random.key(0))  # doctest: +SKIP
  """
  flat = tree_lib.flatten(params)
  f = _ffn(flat, path)
  for m in ('intermediate', 'output'):
    for w in ('kernel', 'bias'):
      del flat[f'{path}/{m}/{w}']
  d, hidden = f['w1'].shape
  half = 0.5 if shared_experts else 1.0
  tile = lambda a, s: jnp.broadcast_to(jnp.asarray(a) * s, (num_experts,) + a.shape)
  out = f'{path}/{target}'
  flat[f'{out}/router/kernel'] = router_std * jax.random.normal(rng, (d, num_experts),
                                                                jnp.float32)
  flat[f'{out}/intermediate/kernel'] = tile(f['w1'], 1.0)
  flat[f'{out}/intermediate/bias'] = tile(f['b1'], 1.0)
  flat[f'{out}/output/kernel'] = tile(f['w2'], half)
  flat[f'{out}/output/bias'] = tile(f['b2'], half)
  if shared_experts:
    n = shared_experts
    flat[f'{out}/shared/intermediate/kernel'] = jnp.tile(f['w1'], (1, n))
    flat[f'{out}/shared/intermediate/bias'] = jnp.tile(f['b1'], n)
    flat[f'{out}/shared/output/kernel'] = jnp.tile(f['w2'], (n, 1)) * (0.5 / n)
    flat[f'{out}/shared/output/bias'] = jnp.asarray(f['b2']) * 0.5
  del hidden
  return tree_lib.unflatten(flat)
