"""The loop-component protocol: pure functions the loop calls at fixed points, optax-style.

A component is a :class:`Component` of optional functions; the loop and the train step call
each one that is set, in the order the components are listed, and know no component by name:

* ``prepare(setup) -> setup``: once, when the run's setup is built, before the partition is
  placed on the mesh (e.g. quantization ranges calibrated on the first batches);
* ``trainable(selector, update) -> selector`` with ``changes_at``: which base leaves train at
  optimizer update ``update`` (gradual unfreezing); the loop re-partitions at ``changes_at``;
* ``init(params) -> state``: extra train state (``TrainState.extra[name]``, checkpointed);
  ``None`` for none. ``params`` is the placed trainable partition ``{'base', 'peft'}``;
* ``consts`` (with logical axes ``consts_specs``): arrays the step reads but neither trains nor
  checkpoints (a teacher's weights, the pretrained values of L2-SP), passed to the jitted step as
  an argument so they are not baked into the program;
* ``scope() -> context manager``: entered around every forward, train and eval (low-rank
  factored layers);
* ``capture``: a flax ``capture_intermediates`` filter whose intermediates the loss reads;
* ``loss(ctx: LossContext) -> (term, metrics)``: an extra loss term added to the task's loss,
  or, with ``replaces_task_loss``, the objective replacing it (distillation);
* ``after_update(micro_step, params, state) -> (params, state)``: after each update (pruning
  masks re-applied, so pruned weights stay zero);
* ``report(params) -> dict``: entries merged into ``summary.json`` (``params`` the final full
  base on the host; a report declaring ``report(params, peft=None)`` also gets the trained
  method parameters when the loop passes them).

>>> comp = Component('double', loss=lambda ctx: (ctx.params['peft']['w'].sum(), {}))  # doctest: +SKIP
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple


class LossContext(NamedTuple):
  """What a component's loss term may read (inside the jitted step)."""
  outputs: Any        # the model's outputs (logits)
  aux: dict           # the 'moe'-style collections the model sowed
  intermediates: dict  # captured intermediates ({} without a capture filter)
  batch: dict
  params: dict        # the trainable partition {'base', 'peft'} (differentiated)
  frozen: dict
  consts: Any         # this component's consts
  state: Any          # this component's extra train state
  task_loss: Any      # the task's loss of this batch
  task_metrics: dict


class Component(NamedTuple):
  """One loop component (see the module docstring for when each function runs)."""
  name: str
  prepare: Callable | None = None
  trainable: Callable | None = None
  changes_at: frozenset = frozenset()
  init: Callable | None = None
  consts: Any = None
  consts_specs: Any = None
  scope: Callable | None = None
  capture: Callable | None = None
  loss: Callable | None = None
  replaces_task_loss: bool = False
  after_update: Callable | None = None
  report: Callable | None = None


def capture_filter(components) -> Callable | None:
  """One ``capture_intermediates`` filter for every component's (``None`` if none asks)."""
  filters = [c.capture for c in components if c.capture is not None]
  if not filters:
    return None
  return lambda mdl, method_name: any(f(mdl, method_name) for f in filters)


def trainable_selector(components, base_selector, update: int):
  """The base leaves that train at ``update``: ``base_selector`` through each component's
  ``trainable``."""
  for c in components:
    if c.trainable is not None:
      base_selector = c.trainable(base_selector, update)
  return base_selector


def changes_at(components) -> frozenset:
  """The optimizer updates at which some component changes which leaves train."""
  return frozenset().union(*(c.changes_at for c in components))


def merge_reports(components, params, peft=None) -> dict:
  """The components' reports merged (nested dicts merged key by key).

  ``peft`` (the trained method parameters, on the host) goes to the reports that take it
  (``report(params, peft=None)``: e.g. the quant report merges a LoRA into the base to convert
  the merged model); the others get the base alone.
  """
  out: dict = {}

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) and isinstance(dst.get(k), dict):
        merge(dst[k], v)
      else:
        dst[k] = v
  for c in components:
    if c.report is not None:
      takes = peft is not None and 'peft' in inspect.signature(c.report).parameters
      merge(out, c.report(params, peft=peft) if takes else c.report(params))
  return out
