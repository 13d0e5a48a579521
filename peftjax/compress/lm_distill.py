"""Distillation of a causal LM: a shallower student from the teacher's own layers, and the
token-level KD objective on the completion tokens.

* :func:`student_from_teacher` -- a ``LlamaForCausalLM`` keeping teacher layers ``layers``
  (``'every_other'``: 0, 2, 4, ...; SmolLM2's 30 -> 15), everything else (the tied embedding,
  the final norm, an untied ``lm_head``) copied. A pure function over the parameter tree: a
  scanned stack's leaves ``layers/... (L, ...)`` are indexed along their layer axis, unrolled
  ``layer_<i>`` subtrees renumbered.
* :func:`kd_loss` -- Hinton et al.'s loss per token, ``alpha * T^2 * KL(p_t^T || p_s^T) +
  (1 - alpha) * CE(s, target)``, averaged over the tokens ``loss_mask`` scores (the completion
  and its end-of-turn, as the ``causal_lm`` task's loss): the prompt is not distilled.
* :func:`objective` -- that loss with the training loop's metrics, what the distillation
  component runs for a causal LM.

>>> student = student_from_teacher(cfg, params, 'every_other')  # doctest: +SKIP
>>> student.cfg.num_layers, student.layer_map                    # doctest: +SKIP
(15, (1, 3, 5, ..., 29))
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax import tree as tree_lib
from peftjax.compress import distill as distill_lib
from peftjax.errors import UserInputError
from peftjax.models.llama import LlamaConfig

STACK = 'layers'  # LlamaForCausalLM's nn.scan subtree


def student_from_teacher(cfg: LlamaConfig, params: dict, layers='every_other'
                         ) -> distill_lib.Student:
  """A ``len(layers)``-layer student initialised from teacher layers ``layers``.

  Layer ``i`` of the student is teacher layer ``layers[i]`` exactly; every leaf outside the
  layers is copied. Leaves are new buffers, so donating the student's train state never deletes
  the teacher's arrays. ``layer_map[i]`` is the last teacher layer of the span student layer
  ``i`` replaces (as for BERT: :func:`peftjax.compress.distill.student_from_teacher`).

  >>> student = student_from_teacher(LlamaConfig(num_layers=4), params, (0, 3))  # doctest: +SKIP
  >>> student.cfg.num_layers, student.layer_map                                  # doctest: +SKIP
  (2, (2, 3))
  """
  kept = distill_lib.select_layers(cfg.num_layers, layers)
  flat = tree_lib.flatten(params)
  copy = lambda x: jnp.array(x, copy=True)
  out = {}
  if cfg.scan_layers:
    stacked = {p: v for p, v in flat.items() if p.startswith(f'{STACK}/')}
    depths = {int(v.shape[0]) for v in stacked.values()}
    if depths != {cfg.num_layers}:
      raise UserInputError(f'teacher params have stacked layers of depth {sorted(depths)} under '
                           f'{STACK}/; the teacher config has num_layers={cfg.num_layers}')
    idx = jnp.asarray(kept)
    for p, v in flat.items():
      out[p] = jnp.take(v, idx, axis=0) if p in stacked else copy(v)
  else:
    found = sorted({int(p.split('/', 1)[0][len('layer_'):]) for p in flat
                    if p.startswith('layer_')})
    if found != list(range(cfg.num_layers)):
      raise UserInputError(f'teacher params have layers {found}; the teacher config has '
                           f'num_layers={cfg.num_layers} (layers 0..{cfg.num_layers - 1})')
    new_index = {j: i for i, j in enumerate(kept)}
    for p, v in flat.items():
      head, _, rest = p.partition('/')
      if head.startswith('layer_'):
        j = int(head[len('layer_'):])
        if j in new_index:
          out[f'layer_{new_index[j]}/{rest}'] = copy(v)
      else:
        out[p] = copy(v)
  ends = tuple(j - 1 for j in kept[1:]) + (cfg.num_layers - 1,)
  return distill_lib.Student(dataclasses.replace(cfg, num_layers=len(kept)),
                             tree_lib.unflatten(out), ends)


def _masked_mean(x, mask):
  m = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def kd_loss(student_logits, teacher_logits, targets, loss_mask, *, temperature, alpha):
  """``(loss, {'soft', 'hard'})`` over the scored tokens, in float32 (see the module docstring).

  ``soft`` is the mean of ``T^2 * KL(softmax(t / T) || softmax(s / T))`` and ``hard`` the mean
  cross-entropy of ``targets`` over the tokens where ``loss_mask`` is 1; ``loss = alpha * soft +
  (1 - alpha) * hard``. Logits (B, T, V); the teacher's gradient is stopped; a batch with
  nothing scored gives 0.

  >>> loss, parts = kd_loss(s, t, batch['targets'], batch['loss_mask'], temperature=2.0,
  ...                       alpha=0.5)  # doctest: +SKIP
  """
  distill_lib.check_hparams(temperature, alpha)
  s_shape, t_shape = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if tuple(s_shape) != tuple(t_shape):
    raise UserInputError(f'logits: the student has shape {tuple(s_shape)}, the teacher '
                         f'{tuple(t_shape)}; they must match (the same vocabulary and batch)')
  for name, x in (('targets', targets), ('loss_mask', loss_mask)):
    if tuple(jnp.shape(x)) != tuple(s_shape[:-1]):
      raise UserInputError(f'{name} has shape {tuple(jnp.shape(x))}; valid: {s_shape[:-1]} '
                           f'(the logits are {tuple(s_shape)})')
  s = jnp.asarray(student_logits).astype(jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits).astype(jnp.float32))
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  soft = temperature ** 2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  picked = jnp.take_along_axis(s, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[..., 0]
  hard = jax.nn.logsumexp(s, axis=-1) - picked
  parts = {'soft': _masked_mean(soft, loss_mask), 'hard': _masked_mean(hard, loss_mask)}
  return alpha * parts['soft'] + (1 - alpha) * parts['hard'], parts


def objective(student_logits, teacher_logits, batch: dict, *, temperature: float,
              alpha: float) -> tuple[jax.Array, dict]:
  """``(loss, metrics)`` of a causal-LM student against its teacher on one packed batch
  (``targets``, ``loss_mask``): :func:`kd_loss`, with ``soft_loss``, ``hard_loss`` (the task's
  own completion loss, comparable with a run without a teacher), ``token_accuracy`` and
  ``agreement`` (student argmax == teacher argmax) over the scored tokens.

  >>> loss, m = objective(s_logits, t_logits, batch, temperature=2.0, alpha=0.5)  # doctest: +SKIP
  """
  mask = batch['loss_mask']
  loss, parts = kd_loss(student_logits, teacher_logits, batch['targets'], mask,
                        temperature=temperature, alpha=alpha)
  pred = jnp.argmax(student_logits, -1)
  return loss, {'soft_loss': parts['soft'], 'hard_loss': parts['hard'],
                'token_accuracy': _masked_mean((pred == batch['targets']).astype(jnp.float32),
                                               mask),
                'agreement': _masked_mean(
                    (pred == jnp.argmax(teacher_logits, -1)).astype(jnp.float32), mask),
                'loss': loss}
