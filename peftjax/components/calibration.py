"""Quantization calibration: static activation ranges / LSQ step sizes from the first batches."""
from __future__ import annotations

import dataclasses

from peftjax import tree as tree_lib
from peftjax.components.base import Component


def from_config(config, setup) -> Component | None:
  """On when the method needs calibration (``quant.activations`` 'static' or 'lsq')."""
  if not getattr(setup.method, 'needs_calibration', False):
    return None
  n = config.quant.calibration_batches

  def prepare(s):
    batches = s.data.train_batches(config.train.batch_size, config.seed)
    base = tree_lib.combine(s.frozen, s.trainable['base'])
    peft_params = s.method.calibrate(s.built.module, base, s.trainable['peft'],
                                     [batches[i] for i in range(n)], s.built.input_keys)
    return dataclasses.replace(s, trainable={**s.trainable, 'peft': peft_params})
  return Component('calibration', prepare=prepare)
