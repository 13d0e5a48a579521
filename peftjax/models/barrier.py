"""A gradient fusion barrier for the residual stream.

XLA's CPU backend re-fuses the whole LayerNorm-backward chain of the residual stream into
every consumer when no weight-gradient dots force that gradient into a buffer, which is exactly
the situation of LoRA training (the frozen kernels get no gradient). The backward work then
grows quadratically with depth. ``grad_barrier`` is an identity whose backward routes the
cotangent through a ``lax.cond`` on a predicate XLA cannot fold, so the cotangent is
materialized once per layer boundary and the fusions stay local.

Forward: identity, no cost. Backward: one cheap conditional per call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def grad_barrier(x: jax.Array) -> jax.Array:
  """Identity in the forward pass; its gradient is materialized at this point.

  >>> y = grad_barrier(jnp.ones(3))
  """
  return x


def _fwd(x):
  return x, None


def _bwd(_, g):
  # g[...] == g[...] is false only for NaN, so XLA cannot decide it at compile time and has to
  # build the operand before the branch. Both branches return g: the values never change.
  first = g.reshape(-1)[0]
  g = jax.lax.cond(first == first, lambda t: t, lambda t: t + jnp.zeros_like(t), g)
  return (g,)


grad_barrier.defvjp(_fwd, _bwd)
