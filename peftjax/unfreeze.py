"""Gradual unfreezing: base-parameter groups join the trainable partition on a step schedule.

``config.train.unfreeze = ((step, regex), ...)`` — from update ``step`` on, base leaves whose
path matches ``regex`` train too (top-down, e.g. the head at 0, ``layer_5/`` at 100, ``layer_4/``
at 200; Howard & Ruder, 2018). The partition is rebuilt at each boundary: leaves that are still
frozen get no gradient and no optimizer state, and the state of the leaves that were already
training carries over unchanged (:func:`transplant`). Adam's step count is shared, so a group
that joins late starts with bias correction already ~1 (its first updates are a little larger
than a fresh Adam's).
"""
from __future__ import annotations

from typing import Any


from peftjax import tree as tree_lib
from peftjax.errors import ConfigError


def check_schedule(schedule) -> tuple[tuple[int, str], ...]:
  """Validates ``((step, regex), ...)`` (steps >= 0, non-decreasing); raises ValueError."""
  out, last = [], 0
  for entry in schedule:
    ok = (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], int)
          and isinstance(entry[1], str) and entry[0] >= last)
    if not ok:
      raise ValueError(f'train.unfreeze entry {entry!r} is invalid; valid: (step, regex) pairs '
                       "with non-decreasing steps >= 0, e.g. ((0, 'classifier/'), (100, "
                       "'layer_5/'))")
    tree_lib.make_selector(entry[1])
    out.append((entry[0], entry[1]))
    last = entry[0]
  return tuple(out)


def check_targets(schedule, base_params) -> None:
  """Every group must name existing base leaves; raises ConfigError with the closest paths."""
  paths = tree_lib.paths(base_params)
  for start, regex in check_schedule(schedule):
    if not tree_lib.select(base_params, regex):
      stacked = any(p.startswith('layers/') for p in paths)
      hint = (' (the layers are one scanned stack, layers/..., whose leaves hold every layer: '
              'per-layer groups need --config.model.scan_layers=False, which names them '
              'layer_<i>/...)' if stacked else '')
      raise ConfigError(f'train.unfreeze group ({start}, {regex!r}) matches no base parameter; '
                        f'closest paths: {tree_lib.closest_paths(regex, paths)}{hint}')


def selector(base: tree_lib.Selector, schedule, update: int) -> tree_lib.Selector:
  """What trains at ``update`` (0-based): the method's ``base`` plus every group due by then."""
  due = [regex for start, regex in check_schedule(schedule) if start <= update]
  preds = [tree_lib.make_selector(base)] + [tree_lib.make_selector(r) for r in due]
  return lambda path, leaf: any(p(path, leaf) for p in preds)


def boundaries(schedule) -> set[int]:
  """Updates at which the partition changes (a group due at 0 is in the first partition)."""
  return {start for start, _ in check_schedule(schedule) if start > 0}


def transplant(new_state: Any, old_state: Any) -> Any:
  """``new_state`` with every leaf that ``old_state`` also has (same path and shape) copied over.

  Optimizer states mirror the parameter tree inside their own structure, so the '/'-paths of
  their leaves (``.../mu/base/encoder/layer_5/...``) identify the same parameter in both.

  >>> transplant({'mu': {'a': 0, 'b': 0}}, {'mu': {'a': 7}})  # doctest: +SKIP
  {'mu': {'a': 7, 'b': 0}}
  """
  old = tree_lib.flatten(old_state)

  def pick(path, leaf):
    prev = old.get(path)
    if prev is not None and getattr(prev, 'shape', None) == getattr(leaf, 'shape', None):
      return prev
    return leaf

  return tree_lib.map_with_path(pick, new_state)
