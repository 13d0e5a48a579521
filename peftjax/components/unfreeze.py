"""Gradual unfreezing (``train.unfreeze``): more base leaves join the trainable partition."""
from __future__ import annotations

from peftjax import unfreeze as unfreeze_lib
from peftjax.components.base import Component


def from_config(config, setup) -> Component | None:
  """On with a non-empty ``train.unfreeze`` schedule (its regexes checked against the model)."""
  schedule = config.train.unfreeze
  if not schedule:
    return None
  unfreeze_lib.check_targets(schedule, setup.built.params)
  return Component('unfreezing',
                   trainable=lambda sel, update: unfreeze_lib.selector(sel, schedule, update),
                   changes_at=frozenset(unfreeze_lib.boundaries(schedule)))
