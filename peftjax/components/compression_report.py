"""The ``compression`` entry of ``summary.json``: what the model preparation did, and the final
model's size (parameters, zeros in the prune targets, sparse storage bytes)."""
from __future__ import annotations

from peftjax.components.base import Component
from peftjax.compress import plan as plan_lib


def from_config(config, setup) -> Component | None:
  """On when the model preparation compressed something."""
  plan = setup.plan
  if not plan.report and plan.masks is None:
    return None
  return Component('compression_report', report=lambda base: {'compression': {
      **plan.report, **plan_lib.size_summary(base, config.compress)}})
