"""The MoE auxiliary losses: Switch load balancing and the ST-MoE router z-loss."""
from __future__ import annotations

from peftjax.components.base import Component
from peftjax.moe import losses


def component(balance_coef: float = 0.01, z_coef: float = 1e-3) -> Component:
  """``balance_coef`` x the load-balancing loss + ``z_coef`` x the router z-loss, averaged over
  the MoE layers the model sowed statistics from; metrics ``balance_loss``, ``z_loss``,
  ``dropped_fraction``.

  >>> comp = component(0.01, 1e-3)
  """
  return Component('moe_aux', loss=lambda ctx: losses.aux_losses(ctx.aux, balance_coef, z_coef))


def from_config(config, setup) -> Component | None:
  """On for a model with MoE layers (``moe.num_experts > 0``)."""
  del setup
  moe = config.get('moe')
  if moe is None or moe.num_experts <= 0:
    return None
  return component(moe.balance_coef, moe.z_coef)
