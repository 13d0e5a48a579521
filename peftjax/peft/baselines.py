"""Baselines that train a subset of the base weights: full fine-tuning, linear probe, BitFit."""
from __future__ import annotations

import re

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.base import Method
from peftjax.peft.base import register


_BIAS = re.compile(r'(^|/)bias$')


@register('full')
class FullFineTune(Method):
  """Every base parameter trains."""

  @property
  def trainable_base(self):
    return '.*'


@register('linear_probe')
class LinearProbe(Method):
  """Only the head (``peft.head``) trains."""


@register('bitfit')
class BitFit(Method):
  """Biases and the head train (Ben Zaken et al., 2021).

  A model without biases (Llama, Mistral, SmolLM: no bias anywhere) is refused at ``init``:
  BitFit would train nothing but the head.
  """

  @property
  def trainable_base(self):
    return [r'(^|/)bias$', self.cfg.head]

  def init(self, rng, module, base_params, inputs) -> dict:
    del rng, inputs
    paths = tree_lib.paths(base_params)
    if not any(_BIAS.search(p) for p in paths):
      raise ConfigError(
          f'peft.method=bitfit trains the biases, and {type(module).__name__} has none (its '
          f'{len(paths)} parameters are {", ".join(sorted({p.rsplit("/", 1)[-1] for p in paths}))}'
          '); valid: a model with biases (BERT; Qwen2 with its q/k/v biases) or another method '
          'for this one (lora, ia3, full, ...)')
    return {}
