"""The train step: the task's loss plus the components' terms, gradients w.r.t. the trainable
partition only, one optimizer update, the components' after-update transforms."""
from __future__ import annotations

import jax
import optax

from peftjax import components as comp_lib
from peftjax import xla_cpu


def make_train_step(forward, tx: optax.GradientTransformation, task, components=()):
  """``train_step(state, frozen, batch, consts=None) -> (state, metrics)``, to be jitted.

  ``forward(trainable, frozen, inputs, rng, deterministic, with_aux, capture)`` is
  :func:`peftjax.run.make_forward`'s; ``task`` gives the loss (:mod:`peftjax.tasks`);
  ``components`` (:mod:`peftjax.components`) add loss terms (or replace the task's loss),
  read ``consts`` (a dict by component name, an argument of the step so that e.g. a teacher's
  weights are not compiled in) and transform the parameters after each update. ``state`` is a
  :class:`peftjax.run.TrainState`; its ``micro_step`` seeds dropout.

  The metrics are the task's (``loss`` is the objective without the regularising terms: the
  task's loss, or the component's that replaces it), each component's, and ``grad_norm``.

  >>> step = jax.jit(make_train_step(forward, tx, task, comps), donate_argnums=(0,))  # doctest: +SKIP
  >>> state, metrics = step(state, frozen, batch, consts)  # doctest: +SKIP
  """
  xla_cpu.use_unrolled_threefry()  # dropout masks ~15x faster on CPU, same bits
  components = tuple(components)
  capture = comp_lib.capture_filter(components)
  with_loss = [c for c in components if c.loss is not None]
  after = [c for c in components if c.after_update is not None]

  def loss_fn(params, frozen, batch, rng, consts, extra):
    inputs = batch  # the forward picks the model's inputs from the batch
    if capture is not None:
      outputs, aux, inter = forward(params, frozen, inputs, rng, deterministic=False,
                                    capture=capture)
    else:
      (outputs, aux), inter = forward(params, frozen, inputs, rng, deterministic=False,
                                      with_aux=True), {}
    loss, metrics = task.loss(outputs, batch)
    metrics = dict(metrics)
    regular = 0.0
    for c in with_loss:
      ctx = comp_lib.LossContext(outputs, aux, inter, batch, params, frozen,
                                 consts.get(c.name), extra.get(c.name), loss, metrics)
      term, m = c.loss(ctx)
      metrics.update(m)
      if c.replaces_task_loss:
        loss = term
      else:
        regular = regular + term
    metrics['loss'] = loss
    return loss + regular, metrics

  def train_step(state, frozen, batch, consts=None):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.micro_step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, frozen, batch, rng, consts or {}, state.extra)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    micro = state.micro_step + 1
    extra = dict(state.extra)
    for c in after:
      params, new = c.after_update(micro, params, extra.get(c.name))
      if new is not None:
        extra[c.name] = new
    state = state.replace(micro_step=micro, params=params, opt_state=opt_state, extra=extra)
    return state, {**metrics, 'grad_norm': optax.tree.norm(grads)}

  return train_step

