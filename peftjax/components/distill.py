"""Knowledge distillation (``compress.distill.teacher``): the teacher runs inside the jitted
step on its own weights (a step argument, gradient stopped) and the student's objective is
:func:`peftjax.compress.distill.objective` (the one implementation, tested against a reference)
or, for a causal LM, :func:`peftjax.compress.lm_distill.objective` (KD on the completion
tokens)."""
from __future__ import annotations

import json

import jax

from peftjax import storage
from peftjax.components.base import Component
from peftjax.compress import distill as distill_lib
from peftjax.compress import lm_distill
from peftjax.compress import lowrank
from peftjax.compress import plan as plan_lib


def teacher_forward(teacher, *, taps: bool = False):
  """``forward(params, inputs) -> logits`` of the teacher in eval mode, no method; with
  ``taps`` a :class:`distill.Taps` with every layer's output and attention probabilities."""
  factored = bool(lowrank.factored_paths(teacher.params))

  def forward(params, inputs):
    with lowrank.scope_if(factored):
      if taps:
        return distill_lib.run_bert(teacher.module, params, inputs)
      return teacher.module.apply({'params': params}, **inputs, deterministic=True)
  return forward


def component(teacher, *, temperature: float, alpha: float, hidden_weight: float = 0.0,
              attention_weight: float = 0.0, layer_map=None, teacher_workdir: str = '',
              causal: bool = False, teacher_report=None) -> Component:
  """Distillation from ``teacher`` (a ``models.Built``): the student's objective becomes
  :func:`peftjax.compress.distill.objective` (``causal``: the causal LM's
  :func:`peftjax.compress.lm_distill.objective`); its consts are the teacher's weights. With
  ``hidden_weight``/``attention_weight`` the student's layer calls are captured and matched
  with teacher layer ``layer_map[i]``. The teacher's test score is reported: read from
  ``teacher_workdir``'s summary, or ``teacher_report()``'s (a pretrained teacher, scored at
  the end of the run).

  >>> comp = component(teacher, temperature=2.0, alpha=0.5)  # doctest: +SKIP
  """
  matching = bool(hidden_weight or attention_weight)
  t_forward = teacher_forward(teacher, taps=matching)
  input_keys = tuple(teacher.input_keys)

  def loss(ctx):
    inputs = {k: ctx.batch[k] for k in input_keys}
    t_out = t_forward(jax.lax.stop_gradient(ctx.consts), inputs)
    if causal:
      return lm_distill.objective(ctx.outputs, jax.lax.stop_gradient(t_out), ctx.batch,
                                  temperature=temperature, alpha=alpha)
    student = (distill_lib.taps_from(ctx.outputs, ctx.intermediates) if matching
               else distill_lib.Taps(ctx.outputs))
    teacher_taps = t_out if matching else distill_lib.Taps(t_out)
    return distill_lib.objective(student, jax.lax.stop_gradient(teacher_taps), ctx.batch,
                                 temperature=temperature, alpha=alpha,
                                 hidden_weight=hidden_weight, attention_weight=attention_weight,
                                 layer_map=layer_map)

  def report(params):
    del params
    if teacher_report is not None:
      return {'compression': {'distill': teacher_report()}}
    summary = json.loads((storage.path(teacher_workdir) / 'summary.json').read_text())
    headline = summary.get('headline', 'accuracy')
    return {'compression': {'distill': {f'teacher_{headline}': summary[f'{headline}_after']}}}

  return Component('distill', consts=teacher.params, consts_specs=teacher.logical_specs,
                   capture=distill_lib.is_layer_call if matching else None, loss=loss,
                   replaces_task_loss=True,
                   report=report if (teacher_workdir or teacher_report) else None)


def _pretrained_teacher_score(config, setup, teacher):
  """``report()`` of a pretrained LM teacher: its exact match on the test split, generated as
  the run's own evaluation generates (the score a student is compared with)."""
  def score():
    from peftjax.quant import lm  # pylint: disable=g-import-not-at-top
    metrics = lm.exact_match(config, setup, teacher.module, teacher.params)
    return {f'teacher_{k}': v for k, v in metrics.items()}
  return score


def from_config(config, setup) -> Component | None:
  """On when the model preparation found a teacher (``compress.distill.teacher``)."""
  teacher = setup.plan.teacher
  if teacher is None:
    return None
  d = config.compress.distill
  causal = getattr(setup.task, 'name', '') == 'causal_lm'
  pretrained = d.teacher == plan_lib.PRETRAINED_TEACHER
  from peftjax import run as run_lib  # pylint: disable=g-import-not-at-top
  scored = pretrained and run_lib.generates(setup)
  return component(teacher, temperature=d.temperature, alpha=d.alpha,
                   hidden_weight=d.hidden_weight, attention_weight=d.attention_weight,
                   layer_map=setup.plan.layer_map,
                   teacher_workdir='' if pretrained else d.teacher, causal=causal,
                   teacher_report=_pretrained_teacher_score(config, setup, teacher)
                   if scored else None)
