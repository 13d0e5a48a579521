"""The verbs a user needs, in one place (re-exported by ``import peftjax``).

>>> import peftjax as pj
>>> cfg = pj.config('quickstart')  # doctest: +SKIP
>>> method = pj.build_method(cfg.peft)  # doctest: +SKIP
"""
from __future__ import annotations

import pathlib

from peftjax import cli
from peftjax import models
from peftjax import optim
from peftjax import peft
from peftjax import run
from peftjax import tasks
from peftjax import tree
from peftjax.errors import ConfigError
from peftjax.models.build import Built
from peftjax.models.build import sample_inputs as _sample_inputs

_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def config(spec: str = 'quickstart', *, lock: bool = False):
  """A config: a bundled one by name (``'quickstart'``, ``'moe:lora'``: ``configs/<name>.py``
  with an optional variant), or a config file path (``'my/config.py:variant'``). Unlocked by
  default, so that fields can be set in code; from any working directory.

  >>> cfg = config('quickstart'); cfg.peft.method  # doctest: +SKIP
  'lora'
  """
  path, sep, arg = str(spec).partition(':')
  if not pathlib.Path(path).expanduser().exists():
    bundled = _CONFIGS / (path if path.endswith('.py') else f'{path}.py')
    if not bundled.exists():
      names = sorted(p.stem for p in _CONFIGS.glob('*.py') if p.stem != '__init__')
      raise ConfigError(f'config {spec!r}: no such file, and no bundled config of that name; '
                        f'valid: a config file path or one of {", ".join(names)}')
    path = str(bundled)
  return cli.load_config_file(path + sep + arg, lock=lock)


def build_model(cfg, *, num_classes: int, image_shape=None) -> Built:
  """The model of ``cfg.model`` (the bundled MiniLM-L6 by default) with a fresh
  ``num_classes`` head.

  >>> model = build_model(cfg, num_classes=2)  # doctest: +SKIP
  """
  return models.build(cfg.model, num_classes=num_classes,
                      pretrained_dir=run.resolve_pretrained(cfg.model), image_shape=image_shape,
                      seed=cfg.seed, moe_cfg=cfg.get('moe'), dtype=cfg.get('dtype', 'float32'))


def sample_inputs(model: Built, cfg, *, batch: int = 2, image_shape=None) -> dict:
  """Dummy inputs of the right shapes and dtypes for ``model`` (for ``method.init``)."""
  return _sample_inputs(model.input_keys, batch=batch, length=cfg.data.max_length,
                        image_shape=image_shape)


def merge(method: peft.Method, base_params, peft_params):
  """The base weights with ``method`` folded in (``W + s·A·B`` for LoRA), for export/serving."""
  return method.merge(base_params, peft_params)


def optimizer(cfg, *, num_layers: int = 0):
  """The optimizer of ``cfg.optim`` over ``cfg.train.steps`` (clipping, AdamW, schedule,
  per-group learning rates, accumulation). Built over the trainable partition only, so a
  frozen leaf never gets optimizer state."""
  return optim.make_optimizer(cfg.optim, cfg.train.steps, num_layers=num_layers)


def task(cfg):
  """The task of ``cfg.task`` (its loss and metrics; see :mod:`peftjax.tasks`)."""
  return tasks.get(cfg)


build_method = peft.build
method_names = peft.method_names
apply = peft.apply
partition = tree.partition
combine = tree.combine


def size_report(trainable, frozen) -> str:
  """A table of parameter counts per top-level group: trainable and total."""
  return tree.format_report(tree.size_report(trainable, frozen))
