"""Loop components selected from the config (see :mod:`peftjax.components.base`).

Adding one is a new module with ``from_config(config, setup) -> Component | None`` and one line
in ``REGISTRY``; the loop and the train step call it without knowing its name. The order is
the order the step applies them in (``after_update``, ``trainable``) and reports merge in.

>>> comps = build(config, setup)  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Callable

from peftjax.components import calibration
from peftjax.components import compression_report
from peftjax.components import distill
from peftjax.components import l2sp
from peftjax.components import lowrank
from peftjax.components import moe_aux
from peftjax.components import prune
from peftjax.components import quant_report
from peftjax.components import unfreeze
from peftjax.components.base import Component
from peftjax.components.base import LossContext
from peftjax.components.base import capture_filter
from peftjax.components.base import changes_at
from peftjax.components.base import merge_reports
from peftjax.components.base import trainable_selector

REGISTRY: list[tuple[str, Callable]] = [
    ('calibration', calibration.from_config),
    ('unfreezing', unfreeze.from_config),
    ('lowrank', lowrank.from_config),
    ('moe_aux', moe_aux.from_config),
    ('distill', distill.from_config),
    ('prune', prune.from_config),
    ('compression_report', compression_report.from_config),
    ('l2sp', l2sp.from_config),
    ('quant_report', quant_report.from_config),
]


def register(name: str, from_config: Callable) -> None:
  """Adds a component factory ``from_config(config, setup) -> Component | None`` (last in order).

  >>> register('my_penalty', lambda config, setup: Component('my_penalty', loss=...))  # doctest: +SKIP
  """
  if any(n == name for n, _ in REGISTRY):
    raise ValueError(f'loop component {name!r} registered twice')
  REGISTRY.append((name, from_config))


def build(config, setup) -> tuple[Component, ...]:
  """The components ``config`` turns on, in registry order."""
  out = []
  for _, from_config in REGISTRY:
    comp = from_config(config, setup)
    if comp is not None:
      out.append(comp)
  if sum(c.replaces_task_loss for c in out) > 1:
    raise ValueError('more than one loop component replaces the task loss: '
                     f'{[c.name for c in out if c.replaces_task_loss]}')
  return tuple(out)
