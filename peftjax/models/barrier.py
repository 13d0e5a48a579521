"""A gradient fusion barrier for the residual stream.

Some XLA CPU versions re-fuse the whole LayerNorm-backward chain of the residual stream into
every consumer when no weight-gradient dot forces that gradient into a buffer, which is exactly
the situation of LoRA training (the frozen kernels get no gradient); the backward work then
grows quadratically with depth. ``grad_barrier`` is an identity whose derivative routes the
tangent (and so, after transposition, the cotangent) through a ``lax.conditional`` whose
predicate is decided at run time: XLA cannot fuse across a conditional, so the gradient is built
once per layer boundary and the fusions stay local.

Measured on jax/jaxlib 0.10.2 (XLA CPU with YNNPACK fusions), MiniLM-L6, batch 32 x 64, LoRA r=8
on query/value (``benchmarks/lora_vs_full.py``): that version does *not* re-fuse. The optimized
LoRA step has 974 fusions without the barrier and 979 with it (the 5 extra are the predicates of
the 5 conditionals), the largest fusion has 26 operands either way (the global gradient norm
over the 26 trainable leaves), none has 100 or more, and the step time is unchanged within
noise. The barrier is kept because it is free where the re-fusion does not happen and bounds
the damage where it does.

How it is built, and why:

* ``custom_jvp``, not ``custom_vjp``: the tangent goes through ``lax.cond``, which is linear in
  the tangent, so reverse mode gets the conditional by transposition while ``jax.jvp``,
  ``jax.linearize`` and ``jax.jacfwd`` keep working (a ``custom_vjp`` raises under them).
* The predicate is a bit of the primal's first element, so it is known before the backward
  runs and no fast-math setting can fold it.
* The two branches must differ in the HLO XLA simplifies: with two identical identity branches
  the conditional simplifier replaces the conditional by a select and then by its operand
  (checked: 0 conditionals left). One branch wraps the value in an optimization barrier,
  which is removed only after that pass; the compiled LoRA step keeps all 5 conditionals, each
  with two parameter-passing branches (no copy, no arithmetic).

Forward: identity, no cost. Backward: one conditional and a one-element predicate per call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _predicate(x: jax.Array) -> jax.Array:
  """A boolean XLA cannot decide at compile time: the low bit of the first element of ``x``.

  Integer bits, not ``x == x``, so no fast-math assumption (no NaNs) can fold it away.
  """
  first = x.reshape(-1)[0]
  bits = jax.lax.bitcast_convert_type(first, _UINT[first.dtype.itemsize])
  return (bits & 1) == 0


def _materialize(pred: jax.Array, t: jax.Array) -> jax.Array:
  # Both branches return ``t`` unchanged, whichever runs. They must not be *identical*, or
  # XLA's conditional simplifier turns the conditional into a select and then into ``t``,
  # barrier gone; an optimization barrier in one branch keeps them distinct without arithmetic
  # (``t + 0`` would turn -0.0 into +0.0).
  return jax.lax.cond(pred, lambda u: u, jax.lax.optimization_barrier, t)


@jax.custom_jvp
def grad_barrier(x: jax.Array) -> jax.Array:
  """Identity whose gradient is materialized at this point (a fusion barrier for the backward).

  Works under ``jax.grad``, ``jax.jvp``, ``jax.linearize`` and ``jax.hessian``; the values of
  the function and of all its derivatives are exactly those of the identity.

  >>> y = grad_barrier(jnp.ones(3))
  """
  return x


@grad_barrier.defjvp
def _grad_barrier_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  if np.size(x) == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
    return x, t
  # The predicate depends on the primal only, so the conditional is linear in ``t`` and its
  # transpose (the backward pass) is again a conditional with identity branches.
  return x, _materialize(_predicate(jax.lax.stop_gradient(x)), t)
