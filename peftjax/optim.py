"""Optax optimizers from config, built over the trainable partition only.

The trainer differentiates with respect to the trainable partition alone, so the optimizer
never sees a frozen leaf and keeps no state for one. :func:`masked` covers the other case, an
optimizer that must be handed a whole tree: ``optax.multi_transform`` with ``set_to_zero`` on
the frozen labels (``optax.masked`` alone passes masked updates through unchanged).
"""
from __future__ import annotations

import re

import numpy as np
import optax

from peftjax import tree as tree_lib
from peftjax.validate import SCHEDULES
from peftjax.validate import check_lr_multipliers

# Decoupled weight decay skips biases and normalization parameters, as is standard.
# Biases, norms, quantizer step sizes (LSQ) and calibrated static activation scales (QAT: held
# constant, zero gradient) are not weights: no decay.
_NO_DECAY = (r'(^|/)bias$', r'(^|/)scale$', r'norm/', r'(^|/)act_step$', r'(^|/)act_(scale|zero)$')


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine/linear decay or constant.

  >>> lr = schedule(config.optim, 600); float(lr(0))  # doctest: +SKIP
  0.0
  """
  peak, warm = optim_cfg.learning_rate, optim_cfg.warmup_steps
  end = peak * optim_cfg.end_lr_fraction
  decay_steps = max(total_steps - warm, 1)
  if optim_cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_cfg.end_lr_fraction)
  elif optim_cfg.schedule == 'linear':
    after = optax.linear_schedule(peak, end, decay_steps)
  elif optim_cfg.schedule == 'constant':
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f'optim.schedule={optim_cfg.schedule!r}; valid: {SCHEDULES}')
  if warm <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def decay_mask(params):
  """True where AdamW's decoupled weight decay applies."""
  no_decay = tree_lib.make_selector(list(_NO_DECAY))
  return tree_lib.map_with_path(lambda p, x: not no_decay(p, x), params)


def make_optimizer(optim_cfg, total_steps: int, *, num_layers: int = 0
                   ) -> optax.GradientTransformation:
  """Clipping + AdamW with the schedule (+ per-group factors), in ``MultiSteps`` for accumulation.

  ``num_layers`` (the encoder depth) is needed only for ``optim.layer_decay``.

  >>> tx = make_optimizer(config.optim, config.train.steps)  # doctest: +SKIP
  >>> opt_state = tx.init(trainable)                          # doctest: +SKIP
  """
  parts = []
  if optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  parts.append(optax.adamw(schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                           eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay,
                           mask=decay_mask))
  decay = optim_cfg.get('layer_decay', 1.0)
  if optim_cfg.lr_multipliers or decay != 1.0:
    parts.append(scale_by_path(path_factors(optim_cfg.lr_multipliers, layer_decay=decay,
                                            num_layers=num_layers)))
  tx = optax.chain(*parts)
  if optim_cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim_cfg.grad_accum_steps)
  return tx


def check_multipliers(multipliers) -> tuple[tuple[str, float], ...]:
  """Validates ``((regex, factor), ...)``; raises ConfigError (a ValueError) naming the bad entry."""
  return check_lr_multipliers(multipliers)


def path_factors(multipliers=(), *, layer_decay: float = 1.0, num_layers: int = 0):
  """``path -> learning-rate factor`` from config: regex multipliers, then layer-wise decay.

  The first matching ``(regex, factor)`` wins; otherwise, with ``layer_decay < 1``, a path under
  ``layer_i/`` gets ``decay**(num_layers - i)`` and one under ``embeddings/`` (BERT) or
  ``embed/`` (the Llama LM, whose tied table is also its output layer) gets
  ``decay**(num_layers + 1)`` (Howard & Ruder, 2018; Clark et al., 2020); everything else 1.
  A leaf of a scanned stack (under ``layers/``, its first axis the layer) gets the array of
  its layers' factors, ``decay**(num_layers - i)`` for ``i = 0..num_layers-1``, which
  :func:`scale_by_path` applies slice by slice.

  >>> f = path_factors(layer_decay=0.5, num_layers=2)
  >>> f('encoder/layer_1/attention/query/lora_a'), f('encoder/embeddings/layer_norm/bias')
  (0.5, 0.125)
  >>> f('layers/attn/q_proj/kernel')
  array([0.25, 0.5 ])
  """
  rules = [(tree_lib.make_selector(r), f) for r, f in check_multipliers(multipliers)]

  def factor(path: str) -> float:
    for pred, f in rules:
      if pred(path, None):
        return f
    if layer_decay != 1.0:
      m = _LAYER.search(path)
      if m:
        return layer_decay ** (num_layers - int(m.group(1)))
      if _STACK.search(path):
        return layer_decay ** (num_layers - np.arange(num_layers, dtype=np.float64))
      if '/embeddings/' in f'/{path}' or '/embed/' in f'/{path}':
        return layer_decay ** (num_layers + 1)
    return 1.0

  return factor


_LAYER = re.compile(r'(?:^|/)layer_(\d+)/')
_STACK = re.compile(r'(?:^|/)layers/')  # a scanned layer stack: the leaves' first axis is the layer


def scale_by_path(factor) -> optax.GradientTransformation:
  """Multiplies each leaf's update by ``factor(path)``: per-group learning rates.

  Placed after AdamW this is a per-group learning rate (decoupled decay scales with it, as with
  a separate optimizer per group). LoRA+ (Hayou et al., 2024) is
  ``scale_by_path(path_factors((('lora_b$', 16.0),)))``. Stateless: factors are Python constants
  resolved from the static paths at trace time.
  """
  def scaled(path, u):
    f = factor(path)
    if np.ndim(f) == 0:
      return u if f == 1.0 else u * f
    f = np.asarray(f, np.float32)  # per-layer factors of a stacked leaf, along its first axis
    if u.ndim == 0 or u.shape[0] != f.shape[0]:
      raise ValueError(f'{path}: {f.shape[0]} per-layer learning-rate factors for a leaf of '
                       f'shape {u.shape}; valid: a stacked leaf whose first axis is the layer')
    return u * f.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)

  def update_fn(updates, state, params=None):
    del params
    return tree_lib.map_with_path(scaled, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def masked(tx: optax.GradientTransformation, params, trainable: tree_lib.Selector):
  """``tx`` on the leaves chosen by ``trainable``, exact zeros (and no state) elsewhere.

  >>> tx = masked(optax.adam(1e-3), params, 'lora_')  # doctest: +SKIP
  """
  labels = tree_lib.label_tree(params, trainable)
  return optax.multi_transform({'trainable': tx, 'frozen': optax.set_to_zero()}, labels)
