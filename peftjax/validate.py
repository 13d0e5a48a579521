"""Config validation at the boundary: one clear message before any compute.

Every error names the field, the bad value, and what would be valid.
"""
from __future__ import annotations

import pathlib
import re

from peftjax import peft
from peftjax.errors import ConfigError
from peftjax.models.bert import REMAT_POLICIES
from peftjax.models.build import MODEL_NAMES
from peftjax.models.build import moe_settings
from peftjax.optim import SCHEDULES
from peftjax.optim import check_multipliers
from peftjax.quant.qat import check_config as check_quant
from peftjax.unfreeze import check_schedule



def _fail(field: str, value, valid: str):
  raise ConfigError(f'config.{field}={value!r} is invalid; valid: {valid}')


def _check(cond: bool, field: str, value, valid: str):
  if not cond:
    _fail(field, value, valid)


def _regex(field: str, value):
  patterns = [value] if isinstance(value, str) else list(value)
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      _fail(field, p, f'a Python regular expression ({e})')


def validate(c) -> None:
  """Raises :class:`ConfigError` for the first invalid field of config ``c``.

  >>> validate(configs.quickstart.get_config())  # doctest: +SKIP
  """
  m, d, p, o, t = c.model, c.data, c.peft, c.optim, c.train
  _check(m.name in MODEL_NAMES, 'model.name', m.name, ', '.join(MODEL_NAMES))
  _check(m.pooling in ('mean', 'cls'), 'model.pooling', m.pooling, "'mean' or 'cls'")
  _check(c.dtype in ('float32', 'bfloat16'), 'dtype', c.dtype,
         "'float32' or 'bfloat16' (the compute dtype; parameters stay float32)")
  _check(m.remat in REMAT_POLICIES, 'model.remat', m.remat,
         ', '.join(repr(k) for k in REMAT_POLICIES) + ' (per-layer rematerialization)')
  _check(m.num_layers >= 0, 'model.num_layers', m.num_layers, '0 (all layers) or a positive count')
  _check(0.0 <= m.dropout_rate < 1.0, 'model.dropout_rate', m.dropout_rate, '0 <= rate < 1')
  if m.name == 'bert' and m.pretrained not in ('', 'random'):
    path = pathlib.Path(m.pretrained).expanduser()
    _check((path / 'config.json').is_file() and (path / 'model.safetensors').is_file(),
           'model.pretrained', m.pretrained,
           "'' (bundled MiniLM-L6), 'random', or a directory with config.json and model.safetensors")
  _check(all(int(h) > 0 for h in m.hidden), 'model.hidden', m.hidden, 'positive layer sizes')

  _check(isinstance(d.name, str) and d.name != '', 'data.name', d.name,
         "'rotten_tomatoes', 'mnist5k', 'digits' or a prepared TFDS dataset name")
  _check(2 <= d.max_length <= 512, 'data.max_length', d.max_length, '2..512 tokens')
  _check(d.padding in ('max_length', 'longest'), 'data.padding', d.padding,
         "'max_length' or 'longest'")
  _check(d.max_train_examples == -1 or d.max_train_examples > 0, 'data.max_train_examples',
         d.max_train_examples, '-1 (all) or a positive count')
  _check(d.max_eval_examples == -1 or d.max_eval_examples > 0, 'data.max_eval_examples',
         d.max_eval_examples, '-1 (all) or a positive count')

  names = p.method.split('+')
  _check(all(n in peft.method_names() for n in names) and len(set(names)) == len(names),
         'peft.method', p.method,
         ', '.join(peft.method_names()) + ', or several distinct ones joined by "+"')
  _check(isinstance(p.rank, int) and p.rank > 0, 'peft.rank', p.rank, 'a positive integer')
  _check(p.alpha > 0, 'peft.alpha', p.alpha, 'a positive number')
  _check(0.0 <= p.dropout < 1.0, 'peft.dropout', p.dropout, '0 <= dropout < 1')
  _regex('peft.targets', p.targets)
  _regex('peft.head', p.head)
  _regex('quant.targets', c.quant.targets)
  if c.quant.qat or c.quant.qlora:
    check_quant(c.quant)

  validate_moe(c)

  _check(o.learning_rate > 0, 'optim.learning_rate', o.learning_rate, 'a positive number')
  _check(o.schedule in SCHEDULES, 'optim.schedule', o.schedule, ', '.join(SCHEDULES))
  _check(0 <= o.warmup_steps < t.steps, 'optim.warmup_steps', o.warmup_steps,
         f'0 <= warmup_steps < train.steps ({t.steps})')
  _check(0.0 <= o.end_lr_fraction <= 1.0, 'optim.end_lr_fraction', o.end_lr_fraction, '0..1')
  _check(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, '>= 0')
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, 'optim.b1/b2', (o.b1, o.b2), '0 <= b < 1')
  _check(o.clip_norm >= 0, 'optim.clip_norm', o.clip_norm, '>= 0 (0 = off)')
  _check(o.grad_accum_steps >= 1, 'optim.grad_accum_steps', o.grad_accum_steps, '>= 1')
  _check(0.0 < o.layer_decay <= 1.0, 'optim.layer_decay', o.layer_decay, '0 < decay <= 1 (1 = off)')
  try:
    check_multipliers(o.lr_multipliers)
  except ValueError as e:
    raise ConfigError(str(e)) from None

  _check(t.steps > 0, 'train.steps', t.steps, 'a positive number of steps')
  _check(t.batch_size > 0, 'train.batch_size', t.batch_size, 'a positive batch size')
  _check(t.eval_batch_size > 0, 'train.eval_batch_size', t.eval_batch_size, 'a positive size')
  _check(t.eval_every >= 0, 'train.eval_every', t.eval_every, '>= 0 (0 = only at the end)')
  _check(t.log_every > 0, 'train.log_every', t.log_every, '>= 1')
  _check(t.checkpoint_every >= 0, 'train.checkpoint_every', t.checkpoint_every, '>= 0 (0 = off)')
  _check(t.keep_checkpoints >= 1, 'train.keep_checkpoints', t.keep_checkpoints, '>= 1')
  try:
    check_schedule(t.unfreeze)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if c.get('compress') is not None:
    from peftjax.compress import plan  # pylint: disable=g-import-not-at-top
    plan.validate(c.compress)
    if c.compress.prune.kind in ('magnitude', 'nm') and t.unfreeze:
      raise ConfigError(f'compress.prune.kind={c.compress.prune.kind!r} with train.unfreeze='
                        f'{t.unfreeze!r}; valid: one of them (masks are kept on the leaves '
                        'trainable from the start)')


def validate_moe(c) -> None:
  """The ``moe`` section: routing fields, loss weights, and a model that has FFNs to replace."""
  moe = c.get('moe')
  if moe is None or moe.num_experts == 0:
    return
  _check(isinstance(moe.num_experts, int) and moe.num_experts > 0, 'moe.num_experts',
         moe.num_experts, '0 (dense) or a positive number of experts')
  _check(c.model.name == 'bert', 'model.name', c.model.name, "'bert' with moe.num_experts > 0")
  _check(isinstance(moe.every, int) and moe.every >= 1, 'moe.every', moe.every,
         'a positive layer interval')
  _check(moe.balance_coef >= 0, 'moe.balance_coef', moe.balance_coef, '>= 0')
  _check(moe.z_coef >= 0, 'moe.z_coef', moe.z_coef, '>= 0')
  try:
    cfg, _ = moe_settings(moe, 1)
    cfg.check()
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None


def validate_mesh_moe(c, mesh) -> None:
  """Experts must split evenly over the mesh's ``expert`` axis."""
  moe, n = c.get('moe'), mesh.shape.get('expert', 1)
  if moe is None or moe.num_experts <= 0:
    return
  _check(moe.num_experts % n == 0, 'moe.num_experts', moe.num_experts,
         f'a multiple of the mesh expert axis size {n} (mesh.expert)')
  if n > 1:
    _check(moe.dispatch != 'ragged', 'moe.dispatch', moe.dispatch,
           "'sorted' or 'onehot' with mesh.expert > 1")


def validate_mesh_batch(c, data_parallel: int) -> None:
  """The global batch must split evenly over the data-parallel devices."""
  for field in ('batch_size', 'eval_batch_size'):
    v = getattr(c.train, field)
    _check(v % data_parallel == 0, f'train.{field}', v,
           f"a multiple of the data-parallel size {data_parallel} (the mesh axes of 'batch')")
