"""Real int8 inference: int8 weights, ``int8 x int8 -> int32`` matmuls, float rescale.

:func:`convert` turns a float model (pretrained, fine-tuned, or fine-tuned with LoRA and merged)
into an :class:`Int8Model`: every weight ``quant.targets`` selects is stored as int8 with one
symmetric scale per output channel, and at run time each matched Dense/DenseGeneral computes::

    acc = dot_general(q(x), Wq, preferred_element_type=int32)       # exact integer accumulate
    y   = (acc - z_x·colsum(Wq)) · s_x · s_w + bias

with the activation scale ``s_x`` (and zero point ``z_x``, asymmetric only) either computed per
batch ('dynamic') or calibrated before conversion ('static', see
:func:`peftjax.quant.qat.calibrate_ranges`). Embedding tables (``quant.embeddings``) are gathered
as int8 rows times their row scale. The arithmetic is the fake-quant model's, so outputs agree
with it to float rounding.

>>> model = convert(module, params, inputs, config.quant, ranges=ranges)  # doctest: +SKIP
>>> logits = model(inputs)                                                # doctest: +SKIP
>>> save(model, '/tmp/int8'); model = load('/tmp/int8', module, params_shapes)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from peftjax import storage
from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.errors import UserInputError
from peftjax.peft.base import layer_scope
from peftjax.peft.lora import Site
from peftjax.quant import ops
from peftjax.quant import qat

_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Embed, nn.Conv)
# The quantization settings an int8 model keeps (everything its forward needs).
_SETTINGS = ('bits', 'act_bits', 'act_symmetric', 'activations', 'per_channel')


@dataclasses.dataclass
class Int8Model:
  """A model whose matched matmuls run in int8.

  ``params`` is the model's parameter tree with each quantized weight replaced by its int8
  values (same path and shape; biases, norms and the head stay float); ``qparams`` maps each
  site's path to ``{'w_scale': f32}`` (+ ``'x_scale'``, ``'x_zero'`` with static activations,
  ``'colsum'`` with asymmetric ones). Call it like a function of the inputs.
  """
  module: nn.Module
  params: dict
  qparams: dict
  sites: list[Site]
  settings: dict

  def __call__(self, inputs: dict):
    return apply(self, inputs)

  def jit(self):
    """A jitted ``inputs -> logits`` taking the weights as arguments, not as baked-in constants
    (which would copy every weight into the compiled program).

    >>> fwd = model.jit(); logits = fwd(inputs)  # doctest: +SKIP
    """
    run = jax.jit(lambda params, qparams, inputs: apply(
        dataclasses.replace(self, params=params, qparams=qparams), inputs))
    return lambda inputs: run(self.params, self.qparams, inputs)

  @property
  def weight_bytes(self) -> int:
    """Bytes of all parameters as held in memory (int8 weights + scales + float leaves)."""
    return qat.bytes_of(self.params) + qat.bytes_of(self.qparams)


def _settings(quant_cfg, activations: str) -> dict:
  s = {k: quant_cfg[k] for k in _SETTINGS}
  s['activations'] = activations
  return s


def convert(module, params, inputs, quant_cfg, *, ranges: dict | None = None) -> Int8Model:
  """An :class:`Int8Model` from float ``params`` (merge any adapter into them first).

  ``ranges`` (from :func:`peftjax.quant.qat.calibrate_ranges`) gives static activation scales;
  without it, activations are quantized dynamically (``quant.activations='none'``: weight-only).
  """
  qat.check_config(quant_cfg)
  if not quant_cfg.symmetric:
    raise ConfigError('quant.symmetric=False is invalid for int8 inference; valid: True (int8 '
                      'weights are symmetric so the int32 accumulator needs no weight zero point)')
  activations = 'none' if quant_cfg.activations == 'none' else (
      'static' if ranges is not None else 'dynamic')
  sites = qat.find_quant_sites(module, params, inputs, quant_cfg)
  flat = tree_lib.flatten(params)
  qparams = {}
  scales = qat.static_scales(ranges, quant_cfg) if ranges is not None else {}
  for s in sites:
    wq, w_scale = qat.quantize_weight(flat[s.weight_path], s, quant_cfg)
    flat[s.weight_path] = wq  # int8 in place of the float weight: same path, same shape
    entry = {'w_scale': w_scale}
    if s.kind == 'conv' and not quant_cfg.act_symmetric and activations != 'none':
      raise ConfigError(f'quant.act_symmetric=False is invalid for the conv layer {s.path} in '
                        'int8 inference (zero padding would not be the zero point); valid: True')
    if s.kind != 'embed' and activations == 'static':
      if s.path not in scales:
        raise ConfigError(f'no calibrated range for {s.path}; calibrate with the same '
                          'quant.targets as the conversion')
      entry['x_scale'], entry['x_zero'] = scales[s.path]
    if s.kind == 'dense' and not quant_cfg.act_symmetric:
      entry['colsum'] = jnp.sum(wq.astype(jnp.int32), axis=tuple(range(len(s.in_shape))))
    qparams[s.path] = entry
  return Int8Model(module, tree_lib.unflatten(flat), qparams, sites,
                   _settings(quant_cfg, activations))


def _conv_fn(module: nn.Conv, x):
  """``(x, w, **kw) -> y``: the layer's convolution (NHWC x HWIO, as flax lays them out)."""
  nd = x.ndim - 2
  if isinstance(module.padding, str) and module.padding not in ('SAME', 'VALID'):
    raise ConfigError(f'{module.name}: padding {module.padding!r} is not supported in int8 '
                      "inference; valid: 'SAME', 'VALID' or explicit pairs")
  if module.feature_group_count != 1:
    raise ConfigError(f'{module.name}: grouped convolutions are not supported in int8 inference')
  as_tuple = lambda v: (1,) * nd if v is None else ((v,) * nd if isinstance(v, int) else tuple(v))
  padding = module.padding if isinstance(module.padding, str) else [
      (p, p) if isinstance(p, int) else tuple(p) for p in module.padding]
  dn = jax.lax.ConvDimensionNumbers((0, nd + 1, *range(1, nd + 1)),
                                    (nd + 1, nd, *range(nd)), (0, nd + 1, *range(1, nd + 1)))
  return lambda x, w, **kw: jax.lax.conv_general_dilated(
      x, w, as_tuple(module.strides), padding, lhs_dilation=as_tuple(module.input_dilation),
      rhs_dilation=as_tuple(module.kernel_dilation), dimension_numbers=dn, **kw)


def _dense(site: Site, x, w, qp: dict, bias, st: dict, module=None):
  if site.kind == 'conv':
    n_in = len(site.in_shape)
    matmul = _conv_fn(module, x)
  else:
    n_in = len(site.x_axes)
    dims = ((site.x_axes, tuple(range(n_in))), ((), ()))
    matmul = lambda a, b, **kw: jax.lax.dot_general(a, b, dims, **kw)
  w_scale = qp['w_scale'].reshape(qp['w_scale'].shape[n_in:])  # drop the kept input dims
  if st['activations'] == 'none':  # weight-only: float matmul on the dequantized weight
    y = matmul(x, w.astype(x.dtype)) * w_scale.astype(x.dtype)
  else:
    if st['activations'] == 'static':
      x_scale, x_zero = qp['x_scale'], qp['x_zero']
    else:
      x_scale, x_zero = ops.minmax_params(x, st['act_bits'], symmetric=st['act_symmetric'])
    xq = ops.quantize(x, x_scale, x_zero, st['act_bits'], st['act_symmetric'])
    acc = matmul(xq, w, preferred_element_type=jnp.int32)
    if not st['act_symmetric']:  # (q - z)·W = q·W - z·colsum(W)
      acc = acc - jnp.asarray(x_zero, jnp.int32).reshape(()) * qp['colsum']
    y = acc.astype(jnp.float32) * (jnp.reshape(x_scale, ()) * w_scale)
    y = y.astype(x.dtype)
  return y if bias is None else y + bias.astype(y.dtype)


def _embed(ids, w, qp: dict):
  rows = jnp.take(w, ids, axis=0).astype(jnp.float32)
  scale = qp['w_scale'].reshape(-1)
  return rows * (jnp.take(scale, ids, axis=0)[..., None] if scale.size > 1 else scale)


def int8_scope(model: Int8Model):
  """Context under which the model's matched layers run from ``model.qparams``."""
  by_path = {s.path: s for s in model.sites}
  flat = tree_lib.flatten(model.params)

  def wrap(path, module, call, x):
    del call  # the float layer never runs: its weight in model.params is int8
    site = by_path[path]
    w = flat[site.weight_path]
    if site.kind == 'embed':
      return _embed(x, w, model.qparams[path])
    return _dense(site, x, w, model.qparams[path], flat.get(f'{path}/bias'), model.settings,
                  module)

  return layer_scope(_LAYERS, by_path, wrap)


def apply(model: Int8Model, inputs: dict):
  """The int8 model's forward (eval mode): ``model.module`` with its matched layers in int8."""
  with int8_scope(model):
    return model.module.apply({'params': model.params}, **inputs, deterministic=True)


# ---------------------------------------------------------------------------- save / load
_META = 'int8_model.json'


def save(model: Int8Model, directory: str | os.PathLike) -> int:
  """Writes the int8 model (orbax arrays + a JSON manifest); returns its size on disk in bytes.

  The directory is written next to its final place and renamed when complete, so a failed save
  leaves no half-written model.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise UserInputError(f'{directory} exists; refusing to overwrite an int8 model')
  with storage.atomic_dir(directory) as tmp:
    write(model, tmp)
  return disk_bytes(directory)


def write(model, directory: pathlib.Path) -> int:
  """Writes the int8 model into the existing empty ``directory`` (see :func:`save`, which makes
  it atomic); returns its size on disk in bytes."""
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory / 'arrays', {'params': model.params, 'qparams': model.qparams})
  meta = {'format': 'peftjax-int8/1', 'settings': model.settings,
          'sites': [dataclasses.asdict(s) for s in model.sites]}
  (directory / _META).write_text(json.dumps(meta, indent=2))
  return disk_bytes(directory)


def disk_bytes(directory: str | os.PathLike) -> int:
  """Total size of the files under ``directory``."""
  return sum(p.stat().st_size for p in pathlib.Path(directory).rglob('*') if p.is_file())


def load(directory: str | os.PathLike, module, float_params_shapes) -> Int8Model:
  """An int8 model saved by :func:`save`, checked against the float model it runs in.

  ``float_params_shapes`` is the float model's parameter tree (arrays or ShapeDtypeStructs,
  e.g. from ``jax.eval_shape(module.init, ...)``); every int8 weight must have the shape of the
  float weight it replaces and every float leaf must match, else a UserInputError names them.
  """
  directory = pathlib.Path(directory).absolute()
  meta_path = directory / _META
  if not meta_path.exists():
    raise UserInputError(f'{directory} is not an int8 model (no {_META}); write one with '
                         'peftjax.quant.int8.save')
  meta = json.loads(meta_path.read_text())
  sites = [Site(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
           for s in meta['sites']]
  expected = tree_lib.flatten(float_params_shapes)
  with ocp.StandardCheckpointer() as ckpt:
    meta_tree = ckpt.metadata(directory / 'arrays')
  tree = getattr(meta_tree, 'item_metadata', meta_tree)
  tree = getattr(tree, 'tree', tree)
  saved_float = tree_lib.flatten(tree['params'])
  problems = []
  for p in sorted(set(saved_float) | set(expected)):
    got, want = saved_float.get(p), expected.get(p)
    got_shape = None if got is None else tuple(got.shape)
    want_shape = None if want is None else tuple(want.shape)
    if got_shape != want_shape:
      problems.append(f'{p}: saved {got_shape} vs float model {want_shape}')
  if problems:
    raise UserInputError(f'int8 model {directory} does not fit this model ({len(problems)} '
                         f'mismatches), e.g. {problems[:3]}')
  with ocp.StandardCheckpointer() as ckpt:
    arrays = ckpt.restore(directory / 'arrays')
  settings = meta['settings']
  return Int8Model(module, arrays['params'], arrays['qparams'], sites, settings)


def summary(model: Int8Model, float_params) -> dict[str, Any]:
  """Bytes of the int8 model vs the float one, and how many weights went int8."""
  fbytes = qat.bytes_of(float_params)
  return {'int8_bytes': model.weight_bytes, 'float_bytes': fbytes,
          'bytes_ratio': model.weight_bytes / fbytes, 'int8_layers': len(model.sites),
          'activations': model.settings['activations']}
