"""Routers: which tokens go to which experts, with what weight, and the auxiliary statistics.

Tokens are routed in *groups* (one group = one sequence of the batch, shape ``(G, S, ...)``):
capacities, priorities and the balance loss are per group, so a layer's result does not depend on
how the batch is split over devices (the expert-parallel layer equals the single-device one).

Two routers:

* :func:`top_k_route` (GShard / Switch / Mixtral): every token picks its ``k`` highest-probability
  experts; the weights are the softmax probabilities of those experts, renormalized to sum to 1
  (``renormalize=True``) or raw (Switch's top-1 gate). Padding tokens route nowhere.
* :func:`expert_choice_route` (Zhou et al., 2022): every expert picks its ``C`` highest-scoring
  tokens; perfectly balanced by construction, a token may be taken by 0..E experts.

Both end in a *slot table* ``(slot_token, slot_weight)`` of shape ``(G, E, C)``: slot ``c`` of
expert ``e`` in group ``g`` holds token ``slot_token[g, e, c]`` (``S`` = empty) with combine
weight ``slot_weight[g, e, c]`` -- the one format every dispatch implementation consumes.

Positions in an expert's buffer follow GShard's priority: all first choices before any second
choice, then token order. :func:`positions_sorted` computes them with one stable sort per group
(work ``O(S·k·log(S·k))``, independent of the number of experts);
:func:`positions_onehot` is the cumulative-sum reference (work ``O(S·k·E)``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TopK(NamedTuple):
  """Top-k routing of ``G`` groups of ``S`` tokens; assignments are choice-major (``A = k·S``).

  ``expert``: (G, A) int32, the chosen expert (``E`` for padding tokens, which route nowhere);
  ``weight``: (G, A) float32 combine weights; ``probs``: (G, S, E) router probabilities.
  """
  expert: jax.Array
  weight: jax.Array
  probs: jax.Array


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float,
             dropless: bool = False) -> int:
  """Slots per expert and group: ``ceil(k·S·cf / E)``, at least 1 and at most ``S``.

  ``dropless`` gives ``S``: a token picks an expert at most once, so no expert can overflow.

  >>> capacity(64, 8, 2, 1.25)
  20
  """
  if dropless:
    return group_size
  return int(min(group_size, max(1, math.ceil(top_k * group_size * capacity_factor /
                                              num_experts))))


def top_k_route(logits: jax.Array, k: int, token_mask: jax.Array | None = None, *,
                renormalize: bool = True) -> TopK:
  """Top-``k`` experts per token from router ``logits`` (G, S, E).

  >>> r = top_k_route(jnp.zeros((1, 4, 8)), 2)
  >>> r.expert.shape, r.weight.shape
  ((1, 8), (1, 8))
  """
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weight, expert = jax.lax.top_k(probs, k)  # (G, S, k)
  if renormalize:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  if token_mask is not None:
    expert = jnp.where(token_mask[..., None], expert, num_experts)
    weight = jnp.where(token_mask[..., None], weight, 0.0)
  g = logits.shape[0]
  # Choice-major: every token's first choice comes before any token's second choice (GShard).
  expert = jnp.swapaxes(expert, 1, 2).reshape(g, -1).astype(jnp.int32)
  weight = jnp.swapaxes(weight, 1, 2).reshape(g, -1)
  return TopK(expert, weight, probs)


def positions_sorted(expert: jax.Array, num_experts: int) -> jax.Array:
  """Rank of each assignment among the earlier ones of the same expert, by a stable sort.

  ``expert`` (G, A) -> (G, A) int32. Work per group is one sort of ``A`` keys and a histogram
  of ``E + 1`` bins: it does not grow with ``E x capacity``.

  >>> positions_sorted(jnp.array([[1, 0, 1, 1]]), 2)
  Array([[0, 0, 1, 2]], dtype=int32)
  """
  def one(e):
    order = jnp.argsort(e, stable=True)
    sorted_e = e[order]
    counts = jnp.bincount(e, length=num_experts + 1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(e.shape[0], dtype=jnp.int32) - starts[sorted_e].astype(jnp.int32)
    return jnp.zeros_like(rank_sorted).at[order].set(rank_sorted, unique_indices=True)
  return jax.vmap(one)(expert)


def positions_onehot(expert: jax.Array, num_experts: int) -> jax.Array:
  """The GShard reference for :func:`positions_sorted`: a cumulative sum over one-hot masks."""
  onehot = jax.nn.one_hot(expert, num_experts + 1, dtype=jnp.int32)  # (G, A, E+1)
  ranks = jnp.cumsum(onehot, axis=1) - 1
  return jnp.take_along_axis(ranks, expert[..., None], axis=-1)[..., 0]


def top_k_slots(route: TopK, positions: jax.Array, num_experts: int, cap: int):
  """The slot table ``(slot_token, slot_weight)`` (G, E, C) of a top-k routing.

  Assignments past an expert's capacity are dropped (their token keeps only the residual).
  Integer scatter per group, ``O(k·S)`` work.
  """
  g, a = route.expert.shape
  s = route.probs.shape[1]
  token = jnp.arange(a, dtype=jnp.int32) % s
  valid = (route.expert < num_experts) & (positions < cap)
  slot = jnp.where(valid, route.expert * cap + positions, num_experts * cap)  # sentinel slot

  def one(slot_g, weight_g):
    tok = jnp.full((num_experts * cap + 1,), s, jnp.int32).at[slot_g].set(token)
    w = jnp.zeros((num_experts * cap + 1,), weight_g.dtype).at[slot_g].set(weight_g)
    return tok[:-1].reshape(num_experts, cap), w[:-1].reshape(num_experts, cap)
  return jax.vmap(one)(slot, route.weight)


def expert_choice_route(logits: jax.Array, cap: int, token_mask: jax.Array | None = None):
  """Expert-choice routing: each expert takes its ``cap`` highest-probability tokens.

  Returns ``(slot_token, slot_weight, probs)`` with slots (G, E, C); a slot that could only be
  filled with a padding token is left empty.

  >>> tok, w, p = expert_choice_route(jnp.zeros((1, 6, 3)), 2)
  >>> tok.shape
  (1, 3, 2)
  """
  s = logits.shape[1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # (G, S, E)
  scores = jnp.swapaxes(probs, 1, 2)  # (G, E, S)
  if token_mask is not None:
    scores = jnp.where(token_mask[:, None, :], scores, -1.0)  # padding is chosen last
  weight, token = jax.lax.top_k(scores, min(cap, s))
  real = weight >= 0.0
  return (jnp.where(real, token, s).astype(jnp.int32), jnp.where(real, weight, 0.0), probs)


def router_stats(logits: jax.Array, probs: jax.Array, expert: jax.Array | None,
                 positions: jax.Array | None, cap: int, token_mask: jax.Array | None,
                 slot_token: jax.Array | None = None) -> dict:
  """Auxiliary losses and reports of one routing, each a scalar (or an (E,) vector).

  * ``balance_loss`` (Switch Transformer, eq. 4, over all k choices): ``E · Σ_e f_e · P_e`` per
    group, averaged over the groups that hold a real token, where ``f_e`` is the fraction of the
    group's assignments routed to ``e`` (before capacity) and ``P_e`` its mean router
    probability; 1.0 when uniform. Zero for expert-choice routing (``expert=None``), which is
    balanced by construction.
  * ``z_loss`` (ST-MoE): mean over real tokens of ``logsumexp(logits)^2``.
  * ``dropped_fraction``: assignments of real tokens past capacity / all such assignments.
  * ``expert_load`` (E,): the fraction of assignments each expert received (before capacity);
    for expert choice, of the filled slots (``slot_token`` (G, E, C), ``S`` = empty).
  """
  g, s, e = probs.shape
  mask = jnp.ones((g, s), bool) if token_mask is None else token_mask
  m = mask.astype(jnp.float32)
  n_tokens = jnp.maximum(m.sum(), 1.0)
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2
  out = {'z_loss': jnp.sum(z * m) / n_tokens}
  if expert is None:  # expert choice
    filled = jnp.sum(slot_token < s, axis=(0, 2)).astype(jnp.float32)
    out['balance_loss'] = jnp.zeros((), jnp.float32)
    out['dropped_fraction'] = jnp.zeros((), jnp.float32)
    out['expert_load'] = filled / jnp.maximum(filled.sum(), 1.0)
    return out
  counts = jax.vmap(lambda x: jnp.bincount(x, length=e + 1))(expert)[:, :e].astype(jnp.float32)
  per_group = jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
  f = counts / per_group  # (G, E)
  p = jnp.sum(probs * m[..., None], axis=1) / jnp.maximum(m.sum(1), 1.0)[:, None]
  # An all-padding sequence has no routing to balance: it does not pull the mean down.
  has_tokens = (m.sum(1) > 0).astype(jnp.float32)
  out['balance_loss'] = (jnp.sum(e * jnp.sum(f * p, axis=-1) * has_tokens) /
                         jnp.maximum(has_tokens.sum(), 1.0))
  real = expert < e
  out['dropped_fraction'] = (jnp.sum(real & (positions >= cap)) /
                             jnp.maximum(jnp.sum(real), 1)).astype(jnp.float32)
  out['expert_load'] = counts.sum(0) / jnp.maximum(counts.sum(), 1.0)
  return out
