"""L2-SP (Li et al., 2018): a penalty pulling the trainable base weights towards their
pretrained values instead of towards zero.

    Omega(w) = alpha/2 * ||w_S - w_S^0||^2 + beta/2 * ||w_new||^2

``w_S`` are the trainable base leaves that start from the pretrained model, ``w_S^0`` their
values at the start of the run, and ``w_new`` the freshly initialised leaves (those ``peft.head``
selects: the new head), which get plain weight decay. The method's own parameters (LoRA's A and
B, ...) are not penalised. ``--config.l2sp.alpha=0.01 --config.l2sp.beta=0.01``.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import fields
from peftjax import tree as tree_lib
from peftjax import unfreeze
from peftjax.components.base import Component


def _check(section) -> None:
  for field in ('alpha', 'beta'):
    fields.number(f'l2sp.{field}', section[field], lambda v: v >= 0, 'a number >= 0 (0 = off)')


def penalty(base: dict, reference: dict, head: tree_lib.Selector, *, alpha: float,
            beta: float):
  """``Omega`` of the trainable base ``base`` against the pretrained ``reference`` (flat dict
  path -> start value of every non-head leaf that may train).

  >>> penalty({'w': jnp.ones(2)}, {'w': jnp.zeros(2)}, None, alpha=1.0, beta=0.0)  # doctest: +SKIP
  Array(1., dtype=float32)
  """
  is_head = tree_lib.make_selector(head)
  total = jnp.zeros((), jnp.float32)
  for path, w in tree_lib.flatten(base).items():
    w = w.astype(jnp.float32)
    if path in reference:
      total += 0.5 * alpha * jnp.sum(jnp.square(w - reference[path].astype(jnp.float32)))
    elif is_head(path, w):
      total += 0.5 * beta * jnp.sum(jnp.square(w))
  return total


def component(reference: dict, head: tree_lib.Selector, *, alpha: float, beta: float,
              reference_specs: dict | None = None) -> Component:
  """The L2-SP loss term (metric ``l2sp``) against ``reference`` (flat path -> pretrained
  value), the ``head`` leaves decayed towards zero.

  >>> comp = component({'dense/kernel': w0}, 'head/', alpha=0.01, beta=0.01)  # doctest: +SKIP
  """
  def loss(ctx):
    value = penalty(ctx.params['base'], ctx.consts, head, alpha=alpha, beta=beta)
    return value, {'l2sp': value}

  specs = reference_specs if reference_specs is not None else {p: P() for p in reference}
  return Component('l2sp', consts=reference, consts_specs=specs, loss=loss)


def from_config(config, setup) -> Component | None:
  """On when ``l2sp.alpha`` or ``l2sp.beta`` is positive."""
  section = config.get('l2sp')
  if section is None:
    return None
  _check(section)
  if not (section.alpha or section.beta):
    return None
  head = config.peft.head
  is_head = tree_lib.make_selector(head)
  # Every base leaf that ever trains in this run (gradual unfreezing included), but the head.
  may_train = unfreeze.selector(setup.method.trainable_base, config.train.unfreeze,
                                config.train.steps)
  picked, _ = tree_lib.partition(setup.base(), may_train)
  # Host copies: the trainable leaves' own buffers are donated to the step at every update.
  reference = {p: np.array(v) for p, v in tree_lib.flatten(picked).items() if not is_head(p, v)}
  specs = tree_lib.flatten(setup.method.base_logical_specs(setup.built.logical_specs))
  return component(reference, head, alpha=section.alpha, beta=section.beta,
                   reference_specs={p: specs[p] for p in reference})
