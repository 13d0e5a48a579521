"""Unstructured pruning: magnitude and N:M masks, and the gradual schedule.

Unstructured pruning works on *masks*: a sparse tree with the same nesting as the parameters
holding one mask per targeted leaf (1 = keep, 0 = pruned), stored in the parameter's dtype so
:func:`apply_masks` is one multiply per leaf and a mask can live in a jitted train state next to
the parameters. Leaves are targeted by a regex over their '/'-joined paths
(``r'encoder/.*(query|key|value|out|intermediate|output)/kernel$'``), as everywhere in peftjax.

* :func:`magnitude_masks` prunes exactly ``round(sparsity * n)`` smallest-|w| entries per leaf
  (``scope='layer'``) or over all targeted leaves together (``scope='global'``). It is pure jnp,
  so gradual pruning recomputes the masks inside a jitted step with a traced ``sparsity`` from
  :func:`cubic_sparsity` (Zhu & Gupta 2017).
* :func:`nm_masks` keeps the N largest of every M consecutive input weights of each output unit
  (2:4 is what sparse tensor cores run).
* :func:`sparsity` reports the fraction of zeros per leaf and overall.

Structured pruning (heads, FFN channels removed) is in :mod:`peftjax.compress.structured`.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.errors import UserInputError

PyTree = Any
SCOPES = ('layer', 'global')


class PruneError(UserInputError):
  """A bad pruning argument (sparsity, targets, N:M shape, structured-pruning sizes)."""


# ----------------------------------------------------------------------------- masks


def _targeted(params: PyTree, targets: tree.Selector) -> dict[str, Any]:
  """``{path: leaf}`` of the leaves ``targets`` selects; an error naming close paths if none."""
  flat = tree.flatten(params)
  pred = tree.make_selector(targets)
  chosen = {p: v for p, v in flat.items() if pred(p, v)}
  if not chosen:
    if isinstance(targets, str) or callable(targets) or targets is None:
      query = targets if isinstance(targets, str) else ''
    else:
      query = ' '.join(t for t in targets if isinstance(t, str))
    close = tree.closest_paths(query, flat) if query else list(flat)[:5]
    raise PruneError(f'targets={targets!r} matches no parameter; closest paths: {close}')
  return chosen


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """``params`` with every masked leaf multiplied by its mask; other leaves are untouched.

  Works under ``jax.jit``. Masks may be float (as made here) or bool.

  >>> params = {'dense': {'kernel': jnp.array([1., -2., 3.]), 'bias': jnp.ones(3)}}
  >>> apply_masks(params, {'dense': {'kernel': jnp.array([0., 1., 1.])}})['dense']['kernel']
  Array([ 0., -2.,  3.], dtype=float32)
  """
  flat_masks = tree.flatten(masks)
  flat = tree.flatten(params)
  for path, m in flat_masks.items():
    if path not in flat:
      raise PruneError(f'mask {path!r} has no parameter; closest paths: '
                       f'{tree.closest_paths(path, flat)}')
    if tuple(m.shape) != tuple(flat[path].shape):
      raise PruneError(f'mask {path!r} has shape {tuple(m.shape)}; the parameter has '
                       f'{tuple(flat[path].shape)}')
  return tree.map_with_path(
      lambda p, x: x * flat_masks[p].astype(x.dtype) if p in flat_masks else x, params)


def _check_sparsity(value) -> None:
  """Validates a concrete ``sparsity``; a traced one can't be checked (it is clipped instead)."""
  if isinstance(value, jax.core.Tracer):
    return
  if np.ndim(value) != 0:
    raise PruneError(f'sparsity must be a scalar in [0, 1); got shape {np.shape(value)}')
  v = float(value)
  if not 0.0 <= v < 1.0:  # also rejects NaN
    raise PruneError(f'sparsity={v!r} is outside the valid range [0, 1) '
                     '(the fraction of targeted weights to prune)')


def _ranks(scores: jax.Array) -> jax.Array:
  """0-based ascending rank of each entry of a 1-D array; ties in index order (stable sort)."""
  order = jnp.argsort(scores, stable=True)
  return jnp.zeros(scores.shape, jnp.int32).at[order].set(jnp.arange(scores.size, dtype=jnp.int32))


def _num_pruned(sparsity, n: int) -> jax.Array:
  # float32 on device whether or not sparsity is traced, so eager and jitted masks agree exactly
  # (round half to even, like Python's round; for n > 2**24 the float32 product may differ by
  # one from float64). Clipped because a traced sparsity can't be validated.
  k = jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
  return jnp.clip(k, 0, n)


def magnitude_masks(params: PyTree, sparsity, *, targets: tree.Selector,
                    scope: str = 'layer') -> dict:
  """Masks pruning the ``round(sparsity * n)`` smallest-|w| entries of the targeted leaves.

  Args:
    params: the parameter tree.
    sparsity: fraction to prune, in [0, 1); a Python float or a (possibly traced) jnp scalar.
      A traced value can't be validated: ``round(sparsity * n)`` is clipped to ``[0, n]``.
    targets: regex (or list of regexes / predicate) over '/'-joined leaf paths.
    scope: ``'layer'``: ``n`` is each leaf's size and each leaf gets exactly its count;
      ``'global'``: ``n`` is the size of all targeted leaves together, ranked as one vector
      (|w| compared as float32).

  Returns:
    A sparse tree (the targeted leaves only, same nesting) of masks in each leaf's dtype with
    exactly ``round(sparsity * n)`` zeros: ties are broken by a stable order (flatten order of
    the leaves, then row-major index), never by a threshold that could prune extra entries.
    Already-pruned (zero) weights rank first, so masks recomputed from masked weights with a
    growing sparsity keep them pruned (gradual pruning).

  >>> params = {'dense': {'kernel': jnp.array([[0.1, -3.], [2., 0.5]]), 'bias': jnp.zeros(2)}}
  >>> magnitude_masks(params, 0.5, targets='kernel$')['dense']['kernel']
  Array([[0., 1.],
         [1., 0.]], dtype=float32)
  >>> step = jax.jit(lambda p, s: magnitude_masks(p, s, targets='kernel$'))  # traced sparsity
  """
  _check_sparsity(sparsity)
  if scope not in SCOPES:
    raise PruneError(f'scope={scope!r}; valid: {", ".join(map(repr, SCOPES))}')
  chosen = _targeted(params, targets)
  return tree.unflatten(_magnitude(chosen, jnp.asarray(sparsity, jnp.float32), scope))


@functools.partial(jax.jit, static_argnums=(2,))
def _magnitude(chosen: dict, sparsity, scope: str) -> dict:
  # One jitted program for all leaves: eager calls compile once per tree shape (not once per
  # op and leaf shape) and run exactly the program a traced call inlines, so they agree.
  if scope == 'layer':
    return {path: (_ranks(jnp.abs(jnp.ravel(w))) >= _num_pruned(sparsity, w.size)
                   ).reshape(w.shape).astype(w.dtype) for path, w in chosen.items()}
  flat_abs = jnp.concatenate([jnp.abs(jnp.ravel(w)).astype(jnp.float32)
                              for w in chosen.values()])
  keep = _ranks(flat_abs) >= _num_pruned(sparsity, flat_abs.size)
  masks, start = {}, 0
  for path, w in chosen.items():
    masks[path] = keep[start:start + w.size].reshape(w.shape).astype(w.dtype)
    start += w.size
  return masks


def default_out_axes(path: str, leaf) -> int:
  """How many trailing axes of a kernel are output axes (the rule :func:`nm_masks` uses).

  2 for BERT's DenseGeneral ``query``/``key``/``value`` kernels ``(embed, heads, kv)``; 1
  otherwise: Dense ``(in, out)``, ``attention/out`` ``(heads, kv, embed)`` (its input is
  ``heads * kv``), Conv ``(kh, kw, cin, cout)``.

  >>> default_out_axes('encoder/layer_0/attention/query/kernel', jnp.zeros((8, 2, 4)))
  2
  """
  return 2 if re.search(r'(query|key|value)/kernel$', path) and np.ndim(leaf) == 3 else 1


def nm_masks(params: PyTree, *, n: int = 2, m: int = 4, targets: tree.Selector,
             out_axes: int | Callable[[str, Any], int] | None = None) -> dict:
  """N:M masks: for each output unit, the ``n`` largest |w| of every ``m`` consecutive inputs.

  A kernel is ``(*in_axes, *out_axes)``; its input axes are flattened row-major and cut into
  groups of ``m`` consecutive weights (for a Conv ``(kh, kw, cin, cout)`` with ``cin % m == 0``
  every group lies within ``cin``, as sparse tensor cores expect). Ties keep the lower index.

  Args:
    params: the parameter tree.
    n: weights kept per group, ``1 <= n <= m``.
    m: group size; the flattened input size of every targeted leaf must be divisible by it.
    targets: regex (or list of regexes / predicate) over '/'-joined leaf paths.
    out_axes: the number of trailing output axes: an int for every leaf, or a function
      ``(path, leaf) -> int``; ``None`` uses :func:`default_out_axes`.

  Returns:
    A sparse tree of masks (targeted leaves only) in each leaf's dtype.

  >>> w = jnp.array([[1., 4.], [-3., 3.], [2., 2.], [0., 1.]])  # (in=4, out=2)
  >>> nm_masks({'d': {'kernel': w}}, n=2, m=4, targets='kernel$')['d']['kernel']
  Array([[0., 1.],
         [1., 1.],
         [1., 0.],
         [0., 0.]], dtype=float32)
  """
  for name, v in (('n', n), ('m', m)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise PruneError(f'{name}={v!r}; N:M sparsity needs integers with 1 <= n <= m')
  if n > m:
    raise PruneError(f'n={n} > m={m}; N:M sparsity keeps n of every m weights, so 1 <= n <= m')
  rule = default_out_axes if out_axes is None else (
      out_axes if callable(out_axes) else lambda path, leaf: out_axes)
  chosen = _targeted(params, targets)
  d_outs = {}
  for path, w in chosen.items():
    k = rule(path, w)
    if not isinstance(k, (int, np.integer)) or not 1 <= k < w.ndim:
      raise PruneError(f'{path}: out_axes={k!r} for a kernel of shape {tuple(w.shape)}; '
                       f'valid: 1..{w.ndim - 1} (at least one input and one output axis)')
    d_in, d_outs[path] = math.prod(w.shape[:-k]), math.prod(w.shape[-k:])
    if d_in % m:
      raise PruneError(f'{path}: input size {d_in} (shape {tuple(w.shape)}, {k} output axes) is '
                       f'not divisible by m={m}; N:M needs an input size that is a multiple of m')
  return tree.unflatten(_nm(chosen, tuple(sorted(d_outs.items())), int(n), int(m)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm(chosen: dict, d_outs: tuple, n: int, m: int) -> dict:
  masks = {}
  for path, d_out in d_outs:
    w = chosen[path]
    # (groups, m, out): rank each weight within its group by descending |w|.
    groups = jnp.abs(w.reshape(-1, m, d_out))
    order = jnp.argsort(-groups, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1)  # inverse permutation
    masks[path] = (rank < n).reshape(w.shape).astype(w.dtype)
  return masks


# ----------------------------------------------------------------------------- schedule


def cubic_sparsity(step, *, initial: float, final: float, begin: int, end: int,
                   every: int = 1):
  """The gradual pruning schedule of Zhu & Gupta (2017).

  ``s_t = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** 3`` for ``t`` in
  ``[begin, end)``, ``initial`` before ``begin`` and ``final`` from ``end`` on. ``t`` is
  quantised down to ``begin + every * j`` (the masks are updated every ``every`` steps), so the
  value is constant between updates.

  Args:
    step: the training step, a Python int (-> Python float) or a (traced) jnp scalar (-> jnp
      float32 scalar).
    initial: sparsity at and before ``begin``, in [0, 1).
    final: sparsity from ``end`` on, in [0, 1).
    begin: first pruning step.
    end: step at which ``final`` is reached, ``> begin``.
    every: mask update interval in steps, ``>= 1``.

  >>> cubic_sparsity(50, initial=0.0, final=0.875, begin=0, end=100)
  0.765625
  >>> cubic_sparsity(59, initial=0.0, final=0.875, begin=0, end=100, every=10)  # as step 50
  0.765625
  """
  for name, v in (('initial', initial), ('final', final)):
    if not 0.0 <= float(v) < 1.0:
      raise PruneError(f'cubic_sparsity: {name}={v!r} is outside the valid range [0, 1)')
  if not end > begin:
    raise PruneError(f'cubic_sparsity: end={end!r} must be > begin={begin!r}')
  if not isinstance(every, (int, np.integer)) or every < 1:
    raise PruneError(f'cubic_sparsity: every={every!r}; valid: an integer >= 1')
  span = end - begin
  if isinstance(step, (int, float, np.integer, np.floating)):
    t = begin + (step - begin) // every * every
    frac = min(max((t - begin) / span, 0.0), 1.0)
    if step >= end:
      frac = 1.0
    return float(final + (initial - final) * (1.0 - frac) ** 3)
  step = jnp.asarray(step)
  t = begin + (step - begin) // every * every
  frac = jnp.clip((t - begin).astype(jnp.float32) / span, 0.0, 1.0)
  frac = jnp.where(step >= end, 1.0, frac)  # held at final from end on, even if every ∤ span
  return (final + (initial - final) * (1.0 - frac) ** 3).astype(jnp.float32)


# ----------------------------------------------------------------------------- report


def sparsity(params: PyTree, masks: PyTree | None = None, *,
             targets: tree.Selector = None) -> dict:
  """Fraction of zeros per leaf and overall, as host floats.

  With ``masks``: the leaves that have a mask, counted after :func:`apply_masks`. Without: the
  leaves ``targets`` selects (every leaf if ``None``).

  Returns:
    ``{'leaves': {path: fraction}, 'overall': fraction, 'zeros': int, 'total': int}``.

  >>> sparsity({'d': {'kernel': jnp.array([0., 1., 0., 2.])}})['overall']
  0.5
  """
  flat = tree.flatten(params)
  if masks is not None:
    flat_masks = tree.flatten(masks)
    masked = tree.flatten(apply_masks(params, masks))
    chosen = {p: masked[p] for p in flat_masks}
  elif targets is None:
    chosen = flat
  else:
    chosen = _targeted(params, targets)
  leaves, zeros, total = {}, 0, 0
  for path, x in chosen.items():
    x = np.asarray(jax.device_get(x))
    z = int(x.size - np.count_nonzero(x))
    leaves[path] = z / max(x.size, 1)
    zeros, total = zeros + z, total + x.size
  return {'leaves': leaves, 'overall': zeros / max(total, 1), 'zeros': zeros, 'total': total}
