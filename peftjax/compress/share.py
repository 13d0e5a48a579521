"""Weight sharing (Deep Compression, Han et al. 2016): k-means codebooks per layer.

Each targeted leaf is replaced by ``2^bits`` shared values (centroids) and one ``uint8`` cluster
index per weight. A *shared leaf* is a plain dict, so the tree stays a nested dict that
:func:`peftjax.tree.partition` / :func:`~peftjax.tree.combine` and checkpoints handle as usual::

    {'centroids': float32 (k,),           # the shared values, sorted ascending
     'indices':   uint8  (leaf shape),     # cluster of each weight
     'mask':      bool   (leaf shape)}     # only for a pruned leaf: True = kept

Pruned weights are *not* clustered and get no centroid: all ``k`` centroids describe kept
weights, and :func:`expand` writes an exact 0 wherever ``mask`` is False (the index stored there is
0 and meaningless). This mirrors Deep Compression's storage, where the sparse structure (relative
indices) and the cluster indices of the kept weights are separate streams
(:func:`peftjax.compress.huffman.compressed_size`).

Fine-tuning trains the centroids only: ``expand`` is a gather, whose transpose is a scatter-add,
so the gradient of a centroid is the sum of the gradients of the (kept) weights in its cluster,
exactly Han et al.'s update. :func:`partition_centroids` splits the trainable centroids from the
frozen indices and masks.

>>> params = {'dense': {'kernel': np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
...                     'bias': np.zeros(4, np.float32)}}
>>> shared = share(params, bits=2, targets='kernel$')
>>> sorted(shared['dense']['kernel'])
['centroids', 'indices']
>>> np.unique(np.asarray(expand(shared)['dense']['kernel'])).size
4
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.errors import ConfigError
from peftjax.errors import UserInputError

PyTree = Any

MIN_BITS, MAX_BITS = 1, 8  # indices live in uint8, so at most 256 shared values per leaf
INITS = ('linear', 'density')
SHARED_KEYS = (frozenset({'centroids', 'indices'}), frozenset({'centroids', 'indices', 'mask'}))


def check_bits(bits, field: str = 'bits') -> int:
  """Returns ``bits`` if it is an integer in 1..8, else raises :class:`ConfigError`.

  >>> check_bits(5)
  5
  >>> check_bits(9)  # doctest: +SKIP
  ConfigError: bits=9 is invalid; valid: an integer in 1..8 (2^bits shared values per leaf)
  """
  # bool is an int subclass; True as a bit width is a mistake, not 1.
  ok = isinstance(bits, (int, np.integer)) and not isinstance(bits, (bool, np.bool_))
  if not ok or not MIN_BITS <= bits <= MAX_BITS:
    raise ConfigError(f'{field}={bits!r} is invalid; valid: an integer in {MIN_BITS}..{MAX_BITS} '
                      '(2^bits shared values per leaf, indices stored as uint8)')
  return int(bits)


def _init_centroids(x: np.ndarray, k: int, init: str) -> np.ndarray:
  if init == 'linear':
    # Evenly spaced over [min, max]: keeps the few large weights represented, which Han et al.
    # found matters more than density (they compared random, density and linear; linear won).
    return np.linspace(x.min(), x.max(), k).astype(np.float32)
  # 'density': evenly spaced on the CDF's y axis, i.e. quantiles.
  return np.quantile(x, np.linspace(0.0, 1.0, k)).astype(np.float32)


def kmeans(w, bits: int, *, mask=None, iters: int = 10_000,
           init: str = 'linear') -> tuple[np.ndarray, np.ndarray]:
  """1-D k-means (Lloyd) of one leaf's weights into ``k = 2^bits`` shared values.

  Runs on the host in numpy, once per layer. In 1-D the clusters are intervals of the sorted
  weights, so after one sort each iteration costs O(k log n) (boundaries by ``searchsorted``,
  cluster sums from a prefix sum); it stops when no assignment changes. Centroids are kept in
  float32 throughout and compared with float32 weights through exact float64 midpoints, so on
  return every weight's index is its nearest centroid (a weight exactly half-way goes to the
  larger one) and, at convergence, each centroid is its cluster's mean rounded to float32.
  Centroids stay sorted ascending; an empty cluster keeps its previous value. Deterministic.

  Args:
    w: the weights, any shape (cast to float32).
    bits: 1..8; ``k = 2^bits`` centroids.
    mask: optional pruning mask of ``w``'s shape (nonzero = kept). Only kept weights are
      clustered; pruned positions get index 0, which :func:`expand` ignores (writes 0).
    iters: maximum number of Lloyd iterations (0 returns the initial centroids). 1-D Lloyd
      can need a few thousand for 5-8 bits, but iterations are cheap next to the sort.
    init: ``'linear'`` (evenly spaced between the min and max kept weight, Han et al.'s best) or
      ``'density'`` (quantiles of the kept weights).

  Returns:
    ``(centroids, indices)``: numpy float32 ``(k,)`` and uint8 of ``w``'s shape. With no kept
    weight the centroids are all 0.

  >>> c, idx = kmeans(np.array([0., 0.1, 0.9, 1.0], np.float32), 1)
  >>> c.tolist(), idx.tolist()
  ([0.05000000074505806, 0.949999988079071], [0, 0, 1, 1])
  """
  k = 2**check_bits(bits)
  if init not in INITS:
    raise ConfigError(f'init={init!r} is invalid; valid: one of {INITS}')
  if not isinstance(iters, (int, np.integer)) or isinstance(iters, bool) or iters < 0:
    raise ConfigError(f'iters={iters!r} is invalid; valid: an integer >= 0')
  w = np.asarray(jax.device_get(w), np.float32)
  if mask is None:
    keep = np.ones(w.shape, bool)
  else:
    keep = np.asarray(jax.device_get(mask)) != 0
    if keep.shape != w.shape:
      raise UserInputError(f'mask has shape {keep.shape}; the weights have shape {w.shape}')
  indices = np.zeros(w.shape, np.uint8)
  x = w[keep].astype(np.float64)  # float32 -> float64 is exact
  if x.size == 0:
    return np.zeros(k, np.float32), indices
  order = np.argsort(x, kind='stable')
  xs = x[order]
  csum = np.concatenate([[0.0], np.cumsum(xs)])

  def edges_for(c):
    # The sum of two float32 in float64 is exact, so `xs < mid` is exactly "nearer to c[j]".
    mid = (c[:-1].astype(np.float64) + c[1:]) / 2
    return np.concatenate([[0], np.searchsorted(xs, mid, side='left'), [xs.size]])

  c = _init_centroids(xs, k, init)
  prev = None
  for _ in range(iters):
    edges = edges_for(c)
    if prev is not None and np.array_equal(edges, prev):
      break  # c are already the means of this very assignment
    prev = edges
    n = np.diff(edges)
    sums = csum[edges[1:]] - csum[edges[:-1]]
    c = np.where(n > 0, sums / np.maximum(n, 1), c).astype(np.float32)
  # Final assignment against the returned centroids, so "nearest" holds even without convergence.
  n = np.diff(edges_for(c))
  sorted_idx = np.repeat(np.arange(k, dtype=np.uint8), n)
  kept_idx = np.empty(xs.size, np.uint8)
  kept_idx[order] = sorted_idx
  indices[keep] = kept_idx
  return c, indices


def is_shared(node) -> bool:
  """True for a shared leaf: a dict with keys ``centroids``, ``indices`` (and optional ``mask``).

  >>> is_shared({'centroids': np.zeros(2), 'indices': np.zeros(3, np.uint8)})
  True
  """
  return isinstance(node, Mapping) and frozenset(node) in SHARED_KEYS


def share(params: PyTree, *, bits: int, targets: tree.Selector, masks: PyTree = None,
          iters: int = 10_000, init: str = 'linear') -> dict:
  """Replaces every targeted leaf by a shared leaf ``{centroids, indices[, mask]}`` (k-means).

  Args:
    params: a nested dict of parameters.
    bits: 1..8, the same for every targeted leaf (``k = 2^bits`` centroids each).
    targets: regex / list of regexes / predicate over '/'-paths (see
      :func:`peftjax.tree.make_selector`), e.g. ``'kernel$'``.
    masks: optional pruning masks, a (sparse) tree with the nesting of ``params`` as
      :mod:`peftjax.compress.prune` makes them (nonzero = kept). Every mask must belong to a
      targeted leaf: this is where the sparse structure is stored, and a mask silently dropped
      for an untargeted leaf would lose the pruning.
    iters, init: passed to :func:`kmeans`.

  Returns:
    A nested dict like ``params`` where each targeted leaf is a shared leaf of jnp arrays
    (``mask`` only for masked leaves); other leaves are the same objects as in ``params``.

  >>> p = {'d': {'kernel': np.array([[0., .1], [.9, 1.]], np.float32), 'bias': np.ones(2)}}
  >>> s = share(p, bits=1, targets='kernel$')
  >>> s['d']['kernel']['indices'].tolist(), s['d']['bias'] is p['d']['bias']
  ([[0, 0], [1, 1]], True)
  """
  bits = check_bits(bits)
  flat = tree.flatten(params)
  pred = tree.make_selector(targets)
  chosen = [p for p, v in flat.items() if pred(p, v)]
  if not chosen:
    if isinstance(targets, str):
      query = targets
    elif callable(targets) or targets is None:
      query = ''
    else:
      query = ' '.join(t for t in targets if isinstance(t, str))
    near = tree.closest_paths(query, flat) if query else list(flat)[:5]
    raise ConfigError(f'targets={targets!r} matches no parameter; closest paths: {near}')
  flat_masks = tree.flatten(masks) if masks is not None else {}
  for p in flat_masks:
    if p not in flat:
      raise UserInputError(f'masks has {p!r}, which is no parameter; closest paths: '
                           f'{tree.closest_paths(p, flat)}')
    if p not in chosen:
      raise UserInputError(f'masks has {p!r}, which targets={targets!r} does not select; the '
                           'pruning of a leaf is stored with its shared leaf, so target it too')
  out = dict(flat)
  for p in chosen:
    w = flat[p]
    if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
      raise UserInputError(f'targets={targets!r} selects {p!r} of dtype '
                           f'{jnp.result_type(w)}; weight sharing needs floating-point leaves')
    m = flat_masks.get(p)
    if m is not None and tuple(np.shape(m)) != tuple(np.shape(w)):
      raise UserInputError(f'masks[{p!r}] has shape {tuple(np.shape(m))}; the parameter has '
                           f'{tuple(np.shape(w))}')
    c, idx = kmeans(w, bits, mask=m, iters=iters, init=init)
    leaf = {'centroids': jnp.asarray(c), 'indices': jnp.asarray(idx)}
    if m is not None:
      leaf['mask'] = jnp.asarray(np.asarray(jax.device_get(m)) != 0)
    out[p] = leaf
  return tree.unflatten(out)


def expand_leaf(leaf: Mapping) -> jax.Array:
  """``centroids[indices]`` (float32), with exact zeros where ``mask`` is False.

  >>> expand_leaf({'centroids': jnp.array([-1., 2.]), 'indices': jnp.array([1, 0, 1], jnp.uint8)})
  Array([ 2., -1.,  2.], dtype=float32)
  """
  c = jnp.asarray(leaf['centroids'])
  # A gather; its transpose is a scatter-add, so d/dc_j = sum of dL/dw over cluster j.
  w = jnp.take(c, jnp.asarray(leaf['indices']).astype(jnp.int32), axis=0)
  if 'mask' in leaf:
    # jnp.where, not a multiply: a pruned weight is 0 and sends no gradient to centroid 0.
    w = jnp.where(jnp.asarray(leaf['mask']), w, jnp.zeros((), w.dtype))
  return w


def expand(shared: PyTree) -> PyTree:
  """The parameters back from :func:`share`'s output: every shared leaf becomes its weights.

  Jittable and differentiable w.r.t. the centroids (see :func:`expand_leaf`); other leaves pass
  through unchanged. Expanded weights are float32 whatever the original dtype.

  >>> s = {'d': {'kernel': {'centroids': jnp.array([0., 1.]),
  ...                       'indices': jnp.array([1, 0], jnp.uint8),
  ...                       'mask': jnp.array([True, False])}}}
  >>> expand(s)['d']['kernel']
  Array([1., 0.], dtype=float32)
  """
  return jax.tree.map(lambda x: expand_leaf(x) if is_shared(x) else x, shared, is_leaf=is_shared)


def shared_paths(shared: PyTree) -> list[str]:
  """The '/'-paths of the shared leaves (the dicts, not their arrays), in flatten order.

  >>> shared_paths({'d': {'kernel': {'centroids': 0, 'indices': 0}, 'bias': 0}})
  ['d/kernel']
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(shared, is_leaf=is_shared)
  return [tree.path_str(p) for p, x in leaves if is_shared(x)]


def partition_centroids(shared: PyTree, *, also: tree.Selector = None) -> tuple[dict, dict]:
  """``(trainable, frozen)``: the centroids (+ leaves ``also`` selects) vs. everything else.

  Indices and masks are always frozen (integers / structure); ``also`` applies to the untouched
  leaves only, e.g. ``also='bias$'`` to fine-tune biases together with the centroids.
  :func:`peftjax.tree.combine` puts the two back together for :func:`expand`.

  >>> s = {'d': {'kernel': {'centroids': 0, 'indices': 1}, 'bias': 2}}
  >>> partition_centroids(s)
  ({'d': {'kernel': {'centroids': 0}}}, {'d': {'bias': 2, 'kernel': {'indices': 1}}})
  >>> partition_centroids(s, also='bias$')[0]
  {'d': {'bias': 2, 'kernel': {'centroids': 0}}}
  """
  inside = set(shared_paths(shared))
  extra = tree.make_selector(also)

  def pred(path, leaf):
    parent, _, name = path.rpartition('/')
    if parent in inside:
      return name == 'centroids'
    return extra(path, leaf)

  return tree.partition(shared, pred)
