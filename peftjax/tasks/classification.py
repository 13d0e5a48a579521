"""Text and image classification: cross-entropy training, accuracy / NLL / ECE evaluation."""
from __future__ import annotations

import pathlib

import jax.numpy as jnp
import optax

from peftjax import data as data_lib
from peftjax import evaluate as eval_lib
from peftjax import models
from peftjax import validate as validate_lib
from peftjax.models.build import sample_inputs
from peftjax.tasks.base import register


def resolve_pretrained(model_cfg) -> str | None:
  """The HF directory to load, or None for random init."""
  if model_cfg.name != 'bert' or model_cfg.pretrained == 'random':
    return None
  return model_cfg.pretrained or str(data_lib.minilm_dir())


class Classification:
  """A batch holds the model's inputs and ``label`` (int); the model returns logits.

  >>> task = Classification(config)  # doctest: +SKIP
  >>> loss, metrics = task.loss(logits, batch)  # doctest: +SKIP
  """
  name = 'classification'
  headline = 'accuracy'

  def __init__(self, config):
    self.config = config

  def build_data(self, config):
    pretrained = resolve_pretrained(config.model)
    tokenizer = str(pathlib.Path(pretrained) / 'tokenizer.json') if pretrained else None
    data = data_lib.build(config.data, tokenizer_path=tokenizer)
    validate_lib.validate_data(config, data)  # the model reads this data; a batch fits the split
    return data

  def build_model(self, config, data):
    info = data.info
    return models.build(config.model, num_classes=info.num_classes,
                        pretrained_dir=resolve_pretrained(config.model),
                        image_shape=info.image_shape, seed=config.seed,
                        moe_cfg=config.get('moe'), dtype=config.get('dtype', 'float32'))

  def sample_inputs(self, built, data):
    return sample_inputs(built.input_keys, length=self.config.data.max_length,
                         image_shape=data.info.image_shape)

  def loss(self, logits, batch):
    logits = logits.astype(jnp.float32)  # the loss in float32 whatever the compute dtype
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, {'accuracy': (logits.argmax(-1) == batch['label']).mean()}

  def eval_stats(self, logits, batch):
    return eval_lib.batch_stats(logits, batch['label'], batch['weight'])

  def eval_reduce(self, stats):
    return eval_lib.reduce_stats(stats)

  def summary(self, before, after):
    return {'accuracy_before': None if before is None else before['accuracy'],
            'accuracy_after': after['accuracy'], 'nll_after': after['loss'],
            'ece_after': after['ece']}

  def progress(self, logged: dict) -> dict:
    """The progress bar's fields from the logged train metrics."""
    return {'loss': f"{logged['loss']:.4f}", 'acc': f"{logged['accuracy']:.3f}"}


register('classification', Classification)
