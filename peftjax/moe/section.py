"""The ``moe`` config section: what is valid in it, checked by :mod:`peftjax.validate` when the
section is in use (``moe.num_experts != 0``; a dense model never imports this module).

The routing fields are :class:`peftjax.moe.layer.MoeConfig`'s (its ``check``); this module adds
the fields only the model builder and the loop read (``every``, the loss weights) and what the
section needs from the rest of the config (a BERT model, a mesh whose expert axis divides E).
"""
from __future__ import annotations

import numbers

from peftjax.errors import ConfigError


def _fail(field: str, value, valid: str):
  raise ConfigError(f'config.{field}={value!r} is invalid; valid: {valid}')


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _nonneg(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0


def check(moe, model_name: str) -> None:
  """Raises :class:`ConfigError` for the first invalid field of the ``moe`` section ``moe``.

  >>> check(config.moe, config.model.name)  # doctest: +SKIP
  """
  if not (_is_int(moe.num_experts) and moe.num_experts > 0):
    _fail('moe.num_experts', moe.num_experts, '0 (dense) or a positive number of experts')
  if model_name != 'bert':
    _fail('model.name', model_name, "'bert' with moe.num_experts > 0")
  if not (_is_int(moe.every) and moe.every >= 1):
    _fail('moe.every', moe.every, 'a positive layer interval')
  for field in ('balance_coef', 'z_coef'):
    if not _nonneg(moe[field]):
      _fail(f'moe.{field}', moe[field], '>= 0')
  from peftjax.models.build import moe_settings  # pylint: disable=g-import-not-at-top
  try:
    cfg, _ = moe_settings(moe, 1)
    cfg.check()
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None


def check_mesh(moe, expert_devices: int) -> None:
  """Experts must split evenly over the mesh's ``expert`` axis (``expert_devices`` devices)."""
  if moe.num_experts % expert_devices:
    _fail('moe.num_experts', moe.num_experts,
          f'a multiple of the mesh expert axis size {expert_devices} (mesh.expert)')
  if expert_devices > 1 and moe.dispatch == 'ragged':
    _fail('moe.dispatch', moe.dispatch, "'sorted' or 'onehot' with mesh.expert > 1")
