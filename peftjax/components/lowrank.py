"""Low-rank factored layers (``compress.lowrank``): the forward runs them as two matmuls."""
from __future__ import annotations

from peftjax.compress import lowrank
from peftjax.components.base import Component


def component() -> Component:
  """Every forward runs the factored layers of its parameters as two matmuls."""
  return Component('lowrank', scope=lowrank.scope)


def from_config(config, setup) -> Component | None:
  """On when the model preparation factored some kernels (``compress.lowrank``)."""
  del config
  return component() if setup.plan.factored else None
