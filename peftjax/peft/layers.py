"""What a method needs to know about a layer it adapts, for linen and NNX layers alike.

Methods act on layers from outside the model's code: an interceptor (:mod:`peftjax.intercept`)
hands them the layer being called, and these functions answer the few questions they ask of it,
so one implementation of LoRA, IA3, adapters... serves every model family:

* :func:`kind` -- ``'dense'`` (``nn.Dense``, ``nn.DenseGeneral``, NNX ``Linear``,
  ``LinearGeneral``, a matmul-shaped ``Einsum``), ``'embed'``, ``'conv'``, or ``None``;
* :func:`path` -- its ``'/'``-joined module path, the prefix of its weights' paths;
* :func:`params` -- the weights *of this call*: inside ``nn.scan`` the one layer's slice, and with
  a method's own leaves beside them (:func:`peftjax.peft.base.apply` puts the method's tree in
  the ``params`` collection, so lifted transforms slice it like the weights);
* :func:`contracted_axes` -- the input axes the layer contracts, in the order its kernel stores
  them (flax sorts ``DenseGeneral``'s ``axis``; so do we);
* :func:`out_ndim` -- how many trailing output feature axes it produces;
* :func:`conv_with` -- the layer's own convolution with another kernel (conv LoRA's ``x * A``).

A layer that is not a linen module (an NNX layer seen through :mod:`peftjax.models.nnx_bridge`)
answers through methods of the same names prefixed ``peft_`` (``peft_kind()``, ``peft_path()``,
``peft_params()``, ``peft_contracted_axes(x_ndim)``, ``peft_out_ndim()``,
``peft_conv_with(x, kernel)``).

>>> kind(nn.Dense(3))
'dense'
"""
from __future__ import annotations

import flax.linen as nn
import numpy as np

from peftjax.errors import ConfigError

_KIND = ((nn.Embed, 'embed'), (nn.Conv, 'conv'), (nn.DenseGeneral, 'dense'), (nn.Dense, 'dense'))
WEIGHT_NAME = {'dense': 'kernel', 'conv': 'kernel', 'embed': 'embedding'}


def _linen(mod) -> bool:
  return isinstance(mod, nn.Module)


def kind(mod) -> str | None:
  """``'dense'``, ``'embed'``, ``'conv'``, or ``None`` for a layer no method adapts."""
  if not _linen(mod):
    fn = getattr(mod, 'peft_kind', None)
    return fn() if fn is not None else None
  for cls, name in _KIND:
    if isinstance(mod, cls):
      return name
  return None


def path(mod) -> str:
  """The layer's module path, ``'/'``-joined (``'encoder/layer_0/attention/query'``)."""
  if not _linen(mod):
    return mod.peft_path()
  return '/'.join(mod.path)


def params(mod) -> dict:
  """This call's ``params`` of the layer (a scanned layer's slice), method leaves included."""
  if not _linen(mod):
    return mod.peft_params()
  return mod.variables.get('params', {})


def weight(mod):
  """This call's weight: the kernel, or the embedding table."""
  return params(mod)[WEIGHT_NAME[kind(mod)]]


def contracted_axes(mod, x_ndim: int) -> tuple:
  """The input axes (non-negative, ascending: the kernel's order) a dense layer contracts.

  >>> contracted_axes(nn.DenseGeneral(3, axis=(-1, -2)), 3)
  (1, 2)
  """
  if not _linen(mod):
    return tuple(mod.peft_contracted_axes(x_ndim))
  if isinstance(mod, nn.DenseGeneral):
    if mod.batch_dims:
      raise ConfigError(f'{path(mod)}: DenseGeneral with batch_dims is not supported')
    axis = (mod.axis,) if isinstance(mod.axis, int) else tuple(mod.axis)
  else:
    axis = (-1,)
  # flax stores DenseGeneral's kernel with the contracted axes sorted, whatever order `axis`
  # lists them in; reading them in the user's order would pair the wrong dims.
  return tuple(sorted(a % x_ndim for a in axis))


def out_ndim(mod) -> int:
  """How many trailing output feature axes the layer produces (1 for Dense, Conv and Embed)."""
  if not _linen(mod):
    return int(mod.peft_out_ndim())
  features = getattr(mod, 'features', 1)
  return 1 if isinstance(features, int) else len(tuple(features))


def conv_with(mod, x, kernel):
  """``mod``'s convolution of ``x`` with ``kernel`` (same strides, padding, dilation), no bias.

  Conv LoRA runs its ``A`` through this: a conv is linear in its kernel, so
  ``conv(x, W + s·A·B) = conv(x, W) + s·conv(x, A)·B`` with ``A`` a conv kernel of ``r`` filters.
  """
  if not _linen(mod):
    return mod.peft_conv_with(x, kernel)
  if mod.feature_group_count != 1:
    raise ConfigError(f'{path(mod)}: LoRA on a grouped convolution (feature_group_count='
                      f'{mod.feature_group_count}) is not supported')
  twin = mod.clone(parent=None, features=int(kernel.shape[-1]), use_bias=False, name=None)
  return twin.apply({'params': {'kernel': kernel}}, x)


def input_ndim(args, kwargs) -> int:
  """The rank of a layer call's first argument."""
  x = args[0] if args else next(iter(kwargs.values()))
  return int(np.ndim(x))
