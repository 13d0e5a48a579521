"""Pruning masks (``compress.prune.kind`` magnitude / nm): kept in the train state and
re-applied after every update, so pruned weights stay exactly zero (recomputed on a schedule
for gradual pruning)."""
from __future__ import annotations

import jax

from peftjax import tree as tree_lib
from peftjax.components.base import Component
from peftjax.compress import plan as plan_lib
from peftjax.errors import ConfigError


def component(masks: dict, prune_cfg, *, accum: int = 1, gradual: bool = False) -> Component:
  """Keeps the ``masks`` of the trainable base leaves in the train state and applies them after
  every update (recomputing them on ``prune_cfg``'s schedule when ``gradual``). Masks of frozen
  leaves are left out: those leaves were pruned once, before training.

  >>> comp = component(masks, config.compress.prune)  # doctest: +SKIP
  """
  update = plan_lib.mask_update(prune_cfg, accum)

  def init(params):
    train_masks, frozen_masks = plan_lib.split_masks(masks, params['base'])
    if gradual and frozen_masks:
      raise ConfigError(
          f'gradual pruning (compress.prune.end_step={prune_cfg.end_step}) of frozen weights '
          f'({next(iter(tree_lib.flatten(frozen_masks)))}, ...): their mask could never '
          'change; use peft.method=full, or end_step=0 to prune once before training')
    if not train_masks:
      return None
    flat = tree_lib.flatten(params['base'])
    return tree_lib.unflatten({k: jax.device_put(m, flat[k].sharding)
                               for k, m in tree_lib.flatten(train_masks).items()})

  def after_update(micro_step, params, state):
    if state is None:
      return params, state
    base, state = update(micro_step, params['base'], state)
    return {**params, 'base': base}, state

  return Component('prune', init=init, after_update=after_update)


def from_config(config, setup) -> Component | None:
  """On when the model preparation made masks (``compress.prune.kind`` magnitude / nm)."""
  plan = setup.plan
  if plan.masks is None:
    return None
  return component(plan.masks, config.compress.prune, accum=config.optim.grad_accum_steps,
                   gradual=plan.gradual)
