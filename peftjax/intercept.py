"""Method interception for linen and NNX layers: the one way methods reach a model's layers.

:func:`intercept_methods` registers an interceptor with flax linen's own mechanism
(``flax.linen.intercept_methods``) *and* on a stack of ours, which the NNX bridge
(:mod:`peftjax.models.nnx_bridge`) runs around the calls of NNX layers with :func:`run`. An
interceptor has linen's signature, ``interceptor(next_fun, args, kwargs, context)``, where
``context.module`` is the layer (answering :mod:`peftjax.peft.layers`' questions) and
``context.method_name`` the method called (``'__call__'``, ``'attend'``), so one interceptor
serves both model families. The order is linen's: the interceptor entered last runs innermost.

>>> def double(next_fun, args, kwargs, context):
...   return 2 * next_fun(*args, **kwargs)
>>> with intercept_methods(double):  # doctest: +SKIP
...   y = model.apply(variables, x)
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable

import flax.linen as nn

_STACK = threading.local()


def _stack() -> list:
  if not hasattr(_STACK, 'items'):
    _STACK.items = []
  return _STACK.items


@contextlib.contextmanager
def intercept_methods(interceptor: Callable):
  """Registers ``interceptor`` for linen modules and for NNX layers (see the module docstring)."""
  stack = _stack()
  stack.append(interceptor)
  try:
    with nn.intercept_methods(interceptor):
      yield
  finally:
    assert stack.pop() is interceptor


def active() -> bool:
  """Whether any interceptor is registered (the NNX bridge skips :func:`run` otherwise)."""
  return bool(_stack())


@dataclasses.dataclass(frozen=True)
class Context:
  """What an interceptor is told of a non-linen call (the fields of linen's context it reads)."""
  module: Any
  method_name: str
  orig_method: Callable


def run(module, method_name: str, fun: Callable, args, kwargs):
  """Calls ``fun(*args, **kwargs)`` (a layer's method) through the registered interceptors.

  The first registered is outermost, as in linen.
  """
  context = Context(module, method_name, fun)

  def wrap(interceptor, inner):
    return lambda *a, **k: interceptor(inner, a, k, context)

  for interceptor in reversed(_stack()):  # the last entered wraps the method itself
    fun = wrap(interceptor, fun)
  return fun(*args, **kwargs)
