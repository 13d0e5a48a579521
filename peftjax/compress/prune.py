"""Pruning: unstructured (magnitude, N:M) masks, a gradual schedule, and structured BERT pruning.

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

Structured pruning of :class:`~peftjax.models.bert.BertClassifier` really removes parts: the
kept heads / FFN channels are sliced out into a smaller tree, with a :class:`BertConfig` that
builds the smaller model (:func:`prune_heads`, :func:`prune_ffn`; scores by :func:`head_scores`
and :func:`ffn_scores`, by magnitude or first-order Taylor importance).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.errors import UserInputError
from peftjax.models.bert import BertConfig

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


# ----------------------------------------------------------------------------- structured (BERT)


def _encoder(params: PyTree) -> dict:
  """The encoder tree of a ``BertClassifier`` tree (``params['encoder']``) or of an encoder."""
  return params['encoder'] if 'encoder' in params else params


def _rebuild(params: PyTree, flat_encoder: dict) -> dict:
  """A new tree like ``params`` (classifier or encoder) with the encoder leaves replaced."""
  enc = tree.unflatten(flat_encoder)
  if 'encoder' in params:
    return tree.unflatten({**tree.flatten(params), **{'encoder/' + p: v
                                                      for p, v in tree.flatten(enc).items()}})
  return enc


def _check_dense(cfg: BertConfig, what: str) -> None:
  if cfg.moe_layers:
    raise PruneError(f'{what}: model.moe_layers={cfg.moe_layers}; structured pruning supports '
                     'dense BERT models only (an MoE layer has per-expert FFNs)')


def _check_leaf(flat: dict, path: str, shape: tuple) -> Any:
  if path not in flat:
    raise PruneError(f'encoder has no {path!r} (does params match the BertConfig?); closest '
                     f'paths: {tree.closest_paths(path, flat)}')
  if tuple(flat[path].shape) != tuple(shape):
    raise PruneError(f'encoder {path!r} has shape {tuple(flat[path].shape)}; the BertConfig '
                     f'expects {tuple(shape)}')
  return flat[path]


def _head_groups(flat: dict, cfg: BertConfig, i: int) -> list[tuple[str, Any, int]]:
  """``(path, leaf, head axis)`` of layer ``i``'s per-head parameters (what pruning removes)."""
  d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  a = f'layer_{i}/attention/'
  out = []
  for n in ('query', 'key', 'value'):
    out.append((a + n + '/kernel', _check_leaf(flat, a + n + '/kernel', (d, h, dh)), 1))
    out.append((a + n + '/bias', _check_leaf(flat, a + n + '/bias', (h, dh)), 0))
  out.append((a + 'out/kernel', _check_leaf(flat, a + 'out/kernel', (h, dh, d)), 0))
  return out


def _ffn_groups(flat: dict, cfg: BertConfig, i: int) -> list[tuple[str, Any, int]]:
  """``(path, leaf, channel axis)`` of layer ``i``'s per-FFN-channel parameters."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  p = f'layer_{i}/'
  return [(p + 'intermediate/kernel', _check_leaf(flat, p + 'intermediate/kernel', (d, f)), 1),
          (p + 'intermediate/bias', _check_leaf(flat, p + 'intermediate/bias', (f,)), 0),
          (p + 'output/kernel', _check_leaf(flat, p + 'output/kernel', (f, d)), 0)]


def _scores(params, cfg, grads, groups_fn, what: str) -> jax.Array:
  _check_dense(cfg, what)
  flat = tree.flatten(_encoder(params))
  flat_g = None if grads is None else tree.flatten(_encoder(grads))
  groups = [groups_fn(flat, cfg, i) for i in range(cfg.num_layers)]
  ws = tuple(tuple(w for _, w, _ in layer) for layer in groups)
  gs = None if flat_g is None else tuple(
      tuple(_check_leaf(flat_g, path, w.shape) for path, w, _ in layer) for layer in groups)
  return _unit_scores(ws, gs, tuple(axis for _, _, axis in groups[0]))


@functools.partial(jax.jit, static_argnums=(2,))
def _unit_scores(ws: tuple, gs: tuple | None, axes: tuple) -> jax.Array:
  """``(layers, units)``: per unit, the L2 norm of its weights, or ``|sum(w * g)|``."""
  rows = []
  for i, layer in enumerate(ws):
    total = 0.0
    for j, (w, axis) in enumerate(zip(layer, axes)):
      other = tuple(a for a in range(w.ndim) if a != axis)
      w = w.astype(jnp.float32)
      g = w if gs is None else gs[i][j].astype(jnp.float32)
      total = total + jnp.sum(w * g, axis=other)
    rows.append(jnp.sqrt(total) if gs is None else jnp.abs(total))
  return jnp.stack(rows)


def head_scores(params: PyTree, cfg: BertConfig, grads: PyTree | None = None) -> jax.Array:
  """Importance of every attention head, ``(num_layers, num_heads)``.

  A head's parameters are the ones :func:`prune_heads` removes: its slices of the query, key
  and value kernels and biases and its rows of the ``out`` kernel. Without ``grads``: their L2
  norm. With ``grads`` (a tree like ``params``, e.g. the loss gradient summed over a few
  batches): the first-order Taylor estimate of the loss change when the head is removed,
  ``|sum(w * g)|`` over those parameters (Molchanov et al. 2019; its ``out``-kernel term alone
  is Michel et al.'s head-mask gradient ``|dL/d xi_h|``).

  ``params`` is a ``BertClassifier`` tree (with ``'encoder'``) or an encoder tree.

  >>> s = head_scores(params, cfg)                         # doctest: +SKIP
  >>> g = jax.grad(loss)(params); s = head_scores(params, cfg, g)  # doctest: +SKIP
  """
  return _scores(params, cfg, grads, _head_groups, 'head_scores')


def ffn_scores(params: PyTree, cfg: BertConfig, grads: PyTree | None = None) -> jax.Array:
  """Importance of every FFN channel, ``(num_layers, intermediate_size)``.

  A channel's parameters are its ``intermediate`` kernel column and bias and its ``output``
  kernel row; the score is their L2 norm, or ``|sum(w * g)|`` with ``grads`` (as in
  :func:`head_scores`).

  >>> s = ffn_scores(params, cfg)  # doctest: +SKIP
  """
  return _scores(params, cfg, grads, _ffn_groups, 'ffn_scores')


def _check_keep(name: str, keep, limit: int, field: str) -> None:
  if not isinstance(keep, (int, np.integer)) or isinstance(keep, bool) or not 1 <= keep <= limit:
    raise PruneError(f'{name}={keep!r}; valid: an integer in 1..{limit} ({field}={limit})')


def _kept(scores, shape: tuple, keep: int, name: str) -> np.ndarray:
  """Indices (ascending) of the ``keep`` highest scores of each row; ties keep lower indices."""
  s = np.asarray(jax.device_get(scores), np.float64)
  if s.shape != shape:
    raise PruneError(f'{name} has shape {s.shape}; expected {shape} (num_layers, units)')
  return np.sort(np.argsort(-s, axis=1, kind='stable')[:, :keep], axis=1)


def _prune(params, cfg, keep, scores, groups_fn, shape, name) -> dict:
  flat = dict(tree.flatten(_encoder(params)))
  kept = _kept(scores, shape, keep, name)
  for i in range(cfg.num_layers):
    for path, w, axis in groups_fn(flat, cfg, i):
      # On the host: an offline, shape-changing step (the result is a new, smaller model).
      flat[path] = jnp.asarray(np.take(np.asarray(jax.device_get(w)), kept[i], axis=axis))
  return _rebuild(params, flat)


def prune_heads(params: PyTree, cfg: BertConfig, keep_per_layer: int,
                scores=None) -> tuple[dict, BertConfig]:
  """Removes all but the ``keep_per_layer`` highest-scoring heads of every layer.

  The kept heads keep their order and size (``head_dim``), the hidden size is unchanged, so the
  new config has ``num_heads=keep_per_layer`` and ``head_size`` set to the old head size. The
  result is a real, smaller tree: ``BertClassifier(new_cfg, ...)`` applies to it, and its
  outputs equal the original model's with the removed heads' ``out`` rows zeroed. A head-pruned
  model has no HF BERT equivalent (its export raises).

  Args:
    params: a ``BertClassifier`` tree (with ``'encoder'``) or an encoder tree.
    cfg: its config (dense: no MoE layers).
    keep_per_layer: heads kept in each layer, ``1..cfg.num_heads`` (the same in every layer,
      as ``BertConfig`` has one ``num_heads``).
    scores: ``(num_layers, num_heads)`` importances; default :func:`head_scores` (magnitude).

  Returns:
    ``(new_params, new_cfg)``, ``new_params`` shaped like ``params`` (classifier or encoder).

  >>> scores = head_scores(params, cfg, grads)  # doctest: +SKIP
  >>> small, small_cfg = prune_heads(params, cfg, 8, scores)  # doctest: +SKIP
  >>> BertClassifier(small_cfg, num_classes=2).apply({'params': small}, ids, mask)  # doctest: +SKIP
  """
  _check_dense(cfg, 'prune_heads')
  _check_keep('keep_per_layer', keep_per_layer, cfg.num_heads, 'cfg.num_heads')
  if scores is None:
    scores = head_scores(params, cfg)
  new = _prune(params, cfg, keep_per_layer, scores, _head_groups,
               (cfg.num_layers, cfg.num_heads), 'scores')
  if keep_per_layer == cfg.num_heads:
    return new, cfg
  return new, dataclasses.replace(cfg, num_heads=int(keep_per_layer), head_size=cfg.head_dim)


def prune_ffn(params: PyTree, cfg: BertConfig, keep: int, scores=None) -> tuple[dict, BertConfig]:
  """Removes all but the ``keep`` highest-scoring FFN (intermediate) channels of every layer.

  The kept channels' ``intermediate`` kernel columns and biases and ``output`` kernel rows are
  sliced out; the new config has ``intermediate_size=keep``. The smaller model equals the
  original with the removed channels' ``output`` rows zeroed.

  Args:
    params: a ``BertClassifier`` tree (with ``'encoder'``) or an encoder tree.
    cfg: its config (dense: no MoE layers).
    keep: channels kept per layer, ``1..cfg.intermediate_size``.
    scores: ``(num_layers, intermediate_size)`` importances; default :func:`ffn_scores`.

  Returns:
    ``(new_params, new_cfg)``.

  >>> small, small_cfg = prune_ffn(params, cfg, keep=768)  # doctest: +SKIP
  """
  _check_dense(cfg, 'prune_ffn')
  _check_keep('keep', keep, cfg.intermediate_size, 'cfg.intermediate_size')
  if scores is None:
    scores = ffn_scores(params, cfg)
  new = _prune(params, cfg, keep, scores, _ffn_groups,
               (cfg.num_layers, cfg.intermediate_size), 'scores')
  return new, dataclasses.replace(cfg, intermediate_size=int(keep))
