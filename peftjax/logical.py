"""Logical axis names on parameters.

``param_init(init, axes)`` is ``nn.with_logical_partitioning`` made safe for ``nn.DenseGeneral``:
DenseGeneral calls its kernel initialiser on a *flattened* 2-D shape and reshapes afterwards,
and flax re-runs that initialiser (under ``eval_shape``) on every ``apply`` to check shapes. Inside
a mesh with logical rules, the stock box then applies a 3-axis sharding constraint to the 2-D
array and fails. Our box skips the constraint while the rank does not match the names yet; the
reshaped, full-rank parameter is constrained as usual.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import numpy as np


@flax.struct.dataclass
class LogicalParam(nn.LogicallyPartitioned):
  """A ``LogicallyPartitioned`` box that tolerates DenseGeneral's flat initialisation."""

  def unbox(self, apply_constraint=True) -> Any:
    if np.ndim(self.value) != len(self.names):
      return self.value
    return super().unbox(apply_constraint)


def param_init(init: Callable, axes: tuple) -> Callable:
  """Wraps an initialiser so its parameter carries the logical ``axes``.

  >>> kernel_init = param_init(nn.initializers.normal(0.02), ('embed', 'mlp'))
  """
  def wrapped(*args, **kwargs):
    return LogicalParam(init(*args, **kwargs), tuple(axes))
  return wrapped
