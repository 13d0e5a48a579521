"""Parameter pytrees: '/'-joined paths, regex selectors, partition/combine and size reports.

Trees here are plain nested dicts (flax's ``params`` collections). A *selector* decides, for a
leaf path such as ``'encoder/layer_0/attention/query/kernel'``, whether the leaf is selected.
``partition`` splits a tree into two *sparse* trees (leaves absent from one are present in the
other), so an optimizer built over the trainable part never sees, and never keeps state for, a
frozen leaf.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from typing import Any, Callable, Iterable, Mapping, Union

import jax
import numpy as np

PyTree = Any
Selector = Union[str, Iterable[str], Callable[[str, Any], bool], None]


def path_str(key_path) -> str:
  """Joins a jax key path into ``'a/b/c'``.

  >>> path_str((jax.tree_util.DictKey('a'), jax.tree_util.DictKey('b')))
  'a/b'
  """
  parts = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    else:
      parts.append(str(k))
  return '/'.join(parts)


def flatten(tree: PyTree) -> dict[str, Any]:
  """Maps every leaf's '/'-joined path to the leaf.

  >>> flatten({'a': {'b': 1, 'c': 2}})
  {'a/b': 1, 'a/c': 2}
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(p): v for p, v in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten` for dict trees.

  >>> unflatten({'a/b': 1, 'a/c': 2})
  {'a': {'b': 1, 'c': 2}}
  """
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def paths(tree: PyTree) -> list[str]:
  """All leaf paths of ``tree`` in flatten order."""
  return list(flatten(tree))


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """``jax.tree.map`` whose function also receives the leaf's '/'-path.

  >>> map_with_path(lambda p, x: p, {'a': {'b': 0}})
  {'a': {'b': 'a/b'}}
  """
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def make_selector(sel: Selector) -> Callable[[str, Any], bool]:
  """Turns a regex, a list of regexes (any may match), a predicate or None into a predicate.

  Regexes use ``re.search`` on the leaf path, so ``'query/kernel$'`` selects every query kernel.

  >>> make_selector(['bias$', 'classifier/'])('classifier/kernel', None)
  True
  """
  if sel is None or sel == '':
    return lambda path, leaf: False
  if callable(sel):
    return sel
  patterns = [sel] if isinstance(sel, str) else list(sel)
  try:
    compiled = [re.compile(p) for p in patterns if p]
  except re.error as e:
    raise ValueError(f'invalid selector regex {patterns!r}: {e}') from None
  return lambda path, leaf: any(c.search(path) for c in compiled)


def select(tree: PyTree, sel: Selector) -> list[str]:
  """The paths of ``tree`` chosen by ``sel``."""
  pred = make_selector(sel)
  return [p for p, v in flatten(tree).items() if pred(p, v)]


def label_tree(tree: PyTree, sel: Selector, true_label='trainable', false_label='frozen') -> PyTree:
  """A tree of labels (same structure) for ``optax.multi_transform``."""
  pred = make_selector(sel)
  return map_with_path(lambda p, x: true_label if pred(p, x) else false_label, tree)


def partition(tree: PyTree, sel: Selector) -> tuple[dict, dict]:
  """Splits ``tree`` into ``(selected, rest)``, two sparse nested dicts.

  >>> partition({'a': {'kernel': 1, 'bias': 2}}, 'bias$')
  ({'a': {'bias': 2}}, {'a': {'kernel': 1}})
  """
  pred = make_selector(sel)
  flat = flatten(tree)
  chosen = {p: v for p, v in flat.items() if pred(p, v)}
  rest = {p: v for p, v in flat.items() if p not in chosen}
  return unflatten(chosen), unflatten(rest)


def combine(*trees: PyTree) -> dict:
  """Inverse of :func:`partition`: merges sparse trees; a path present twice is an error.

  >>> combine({'a': {'bias': 2}}, {'a': {'kernel': 1}})
  {'a': {'bias': 2, 'kernel': 1}}
  """
  merged: dict[str, Any] = {}
  for t in trees:
    for p, v in flatten(t).items():
      if p in merged:
        raise ValueError(f'combine: leaf {p!r} is present in more than one tree')
      merged[p] = v
  return unflatten(merged)


def closest_paths(query: str, candidates: Iterable[str], n: int = 5) -> list[str]:
  """The ``n`` candidate paths most similar to ``query`` (for error messages)."""
  candidates = list(candidates)
  # Strip regex syntax so 'encoder/.*/quer/kernel' still lands near the real paths.
  plain = re.sub(r'[\\^$.*+?()\[\]{}|]', '', query)
  close = difflib.get_close_matches(plain, candidates, n=n, cutoff=0.0)
  return close[:n]


# ----------------------------------------------------------------------------- size reports


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def count(tree: PyTree) -> int:
  """Number of scalars in ``tree`` (works on arrays and ShapeDtypeStructs)."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def nbytes(tree: PyTree) -> int:
  """Bytes of all leaves of ``tree``."""
  return int(sum(_nbytes(x) for x in jax.tree.leaves(tree)))


def group_of(path: str, depth: int = 2) -> str:
  """The group a path belongs to in reports: its first ``depth`` components."""
  return '/'.join(path.split('/')[:depth])


def size_report(trainable: PyTree, frozen: PyTree, depth: int = 2) -> dict:
  """Parameter counts and bytes, total and per group, with the trainable share.

  Returns ``{'total_params', 'trainable_params', 'trainable_fraction', 'total_bytes',
  'trainable_bytes', 'groups': {group: {'params', 'trainable', 'bytes'}}}``.
  """
  groups: dict[str, dict] = {}
  for is_trainable, t in ((True, trainable), (False, frozen)):
    for p, x in flatten(t).items():
      g = groups.setdefault(group_of(p, depth), {'params': 0, 'trainable': 0, 'bytes': 0})
      n = int(np.prod(x.shape))
      g['params'] += n
      g['bytes'] += _nbytes(x)
      if is_trainable:
        g['trainable'] += n
  n_train, n_frozen = count(trainable), count(frozen)
  total = n_train + n_frozen
  return {
      'total_params': total,
      'trainable_params': n_train,
      'trainable_fraction': n_train / max(total, 1),
      'total_bytes': nbytes(trainable) + nbytes(frozen),
      'trainable_bytes': nbytes(trainable),
      'groups': groups,
  }


def format_report(report: dict) -> str:
  """A readable table of :func:`size_report`."""
  rows = [f"{'group':40s} {'params':>12s} {'trainable':>12s} {'MiB':>9s}"]
  for g, r in sorted(report['groups'].items()):
    rows.append(f"{g:40s} {r['params']:12,d} {r['trainable']:12,d} {r['bytes'] / 2**20:9.2f}")
  rows.append(
      f"{'total':40s} {report['total_params']:12,d} {report['trainable_params']:12,d} "
      f"{report['total_bytes'] / 2**20:9.2f}")
  rows.append(f"trainable: {report['trainable_params']:,d} of {report['total_params']:,d} "
              f"({100 * report['trainable_fraction']:.3f}%)")
  return '\n'.join(rows)


def fingerprint(tree: PyTree) -> str:
  """A deterministic SHA-256 of a tree's paths, shapes, dtypes and bytes.

  Equal fingerprints mean bit-identical trees (used to compare runs and identify base weights).

  >>> fingerprint({'a': np.zeros(2)}) == fingerprint({'a': np.zeros(2)})
  True
  """
  h = hashlib.sha256()
  for path, leaf in sorted(flatten(tree).items()):
    arr = np.asarray(jax.device_get(leaf))
    h.update(f'{path}:{arr.shape}:{arr.dtype}\n'.encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()
