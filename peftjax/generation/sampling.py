"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Every function is pure and jittable; randomness comes from an explicit key. A
:class:`SamplingConfig` is a frozen (hashable) dataclass, so it can be a static argument of a
jitted decoder: one program per setting.

The order is the usual one (and transformers'): logits / temperature, then top-k, then top-p,
then a draw from the softmax of what is left. ``temperature=0`` is greedy (argmax; top-k and
top-p are then irrelevant and ignored).

>>> cfg = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9)
>>> ids = sample(logits, jax.random.key(0), cfg)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from peftjax.errors import ConfigError


class SamplingError(ConfigError):
  """An invalid sampling setting; the message names the field, its value and what is valid."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen.

  ``temperature`` >= 0 (0 = greedy); ``top_k`` >= 0 keeps the k most likely tokens (0 = all);
  ``top_p`` in (0, 1] keeps the smallest set of most likely tokens whose probability reaches
  ``top_p`` (1 = all; the most likely token is always kept).

  >>> SamplingConfig(temperature=0.8, top_p=0.95).greedy
  False
  >>> SamplingConfig(top_p=0)  # doctest: +SKIP
  SamplingError: top_p=0 is invalid; valid: a number in (0, 1] (1 = no nucleus filtering)
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    if (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
        or t < 0):
      raise SamplingError(f'temperature={t!r} is invalid; valid: a finite number >= 0 '
                          '(0 = greedy decoding)')
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise SamplingError(f'top_k={k!r} is invalid; valid: an integer >= 0 (0 = no top-k '
                          'filtering)')
    if (isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p)
        or not 0 < p <= 1):
      raise SamplingError(f'top_p={p!r} is invalid; valid: a number in (0, 1] (1 = no '
                          'nucleus filtering)')
    # Canonical types, so equal settings hash alike (one compiled program for 1 and 1.0).
    object.__setattr__(self, 'temperature', float(t))
    object.__setattr__(self, 'top_p', float(p))

  @property
  def greedy(self) -> bool:
    """Whether this setting is argmax decoding (temperature 0)."""
    return self.temperature == 0.0


GREEDY = SamplingConfig()


def greedy(logits: jax.Array) -> jax.Array:
  """The most likely token of each row: ``argmax`` over the last axis (the first on ties).

  >>> greedy(jnp.array([[0., 2., 1.]]))  # doctest: +SKIP
  Array([1], dtype=int32)
  """
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """``logits`` with all but the ``k`` largest of each row set to -inf (``k`` static; 0 or
  ``k >= vocab`` keeps all). Exactly ``k`` survive, ties broken toward the lower id.

  >>> top_k_mask(jnp.array([[1., 3., 2.]]), 2)  # doctest: +SKIP
  Array([[-inf, 3., 2.]], dtype=float32)
  """
  vocab = logits.shape[-1]
  if k <= 0 or k >= vocab:
    return logits
  flat = logits.reshape((-1, vocab))
  _, idx = jax.lax.top_k(flat, k)  # (rows, k); lax.top_k prefers the lower index on ties
  rows = jnp.arange(flat.shape[0])[:, None]
  keep = jnp.zeros(flat.shape, bool).at[rows, idx].set(True)
  return jnp.where(keep, flat, -jnp.inf).reshape(logits.shape)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """``logits`` restricted to each row's nucleus: the most likely tokens, in order, until their
  total probability reaches ``p`` (the token that crosses ``p`` is kept; the most likely token
  always is). ``p >= 1`` keeps all.

  >>> top_p_mask(jnp.log(jnp.array([[0.5, 0.3, 0.2]])), 0.6)  # doctest: +SKIP
  Array([[-0.69, -1.2, -inf]], dtype=float32)
  """
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)  # most likely first, lower id on ties
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
  keep_sorted = before < p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # Back to vocabulary order: the inverse permutation of `order`.
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


def filtered_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """The float32 logits a temperature sample draws from: scaled by ``1 / temperature``, then
  top-k and top-p masked (-inf outside). Not for greedy settings."""
  x = logits.astype(jnp.float32) / cfg.temperature
  x = top_k_mask(x, cfg.top_k)
  return top_p_mask(x, cfg.top_p)


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig = GREEDY) -> jax.Array:
  """The next token of each row of ``logits`` (..., vocab) as int32 (...,).

  Greedy settings ignore ``rng``. Otherwise one categorical draw per row from
  ``softmax(filtered_logits)``; every row gets its own key (``fold_in(rng, row)``), so a row's
  draw depends on the key and its row index, not on how many rows are in the batch.

  >>> sample(logits, jax.random.key(0), SamplingConfig(temperature=1.0, top_k=1))  # doctest: +SKIP
  """
  if cfg.greedy:
    return greedy(logits)
  x = filtered_logits(logits, cfg)
  lead = x.shape[:-1]
  flat = x.reshape((-1, x.shape[-1]))
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(flat.shape[0]))
  ids = jax.vmap(jax.random.categorical)(keys, flat)
  return ids.astype(jnp.int32).reshape(lead)


__all__ = ['SamplingConfig', 'SamplingError', 'GREEDY', 'greedy', 'top_k_mask', 'top_p_mask',
           'filtered_logits', 'sample']
