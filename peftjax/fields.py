"""Field checks shared by every config-section owner: each raises one :class:`ConfigError`
``config.<field>=<value> is invalid; valid: <what is>``. Imports nothing heavy.

>>> integer('train.steps', 3, 1, 'a positive number of steps')
"""
from __future__ import annotations

import numbers
import re

from peftjax.errors import ConfigError


def fail(field: str, value, valid: str):
  """Raises the one-line error for ``field``."""
  raise ConfigError(f'config.{field}={value!r} is invalid; valid: {valid}')


def check(cond: bool, field: str, value, valid: str):
  if not cond:
    fail(field, value, valid)


def is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer(field: str, v, lo: int, valid: str):
  """An integer >= ``lo``."""
  check(is_int(v) and v >= lo, field, v, valid)


def number(field: str, v, ok, valid: str):
  """A real number for which ``ok(v)`` holds."""
  check(is_num(v) and ok(v), field, v, valid)


def boolean(field: str, v):
  check(isinstance(v, bool), field, v, 'True or False')


def regex(field: str, value):
  """A regular expression, or a sequence of them (each must compile)."""
  patterns = [value] if isinstance(value, str) else list(value)
  for p in patterns:
    if not isinstance(p, str):
      fail(field, p, 'a Python regular expression (a string)')
    try:
      re.compile(p)
    except re.error as e:
      fail(field, p, f'a Python regular expression ({e})')
