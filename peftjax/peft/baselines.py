"""Baselines that train a subset of the base weights: full fine-tuning, linear probe, BitFit."""
from __future__ import annotations

from peftjax.peft.base import Method
from peftjax.peft.base import register


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
  """Biases and the head train (Ben Zaken et al., 2021)."""

  @property
  def trainable_base(self):
    return [r'(^|/)bias$', self.cfg.head]
