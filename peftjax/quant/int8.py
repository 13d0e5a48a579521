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

import contextlib
import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from peftjax import storage
from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.errors import UserInputError
from peftjax.peft import layers
from peftjax.peft.base import layer_scope
from peftjax.peft.base import takes_deterministic
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

  def as_module(self) -> 'Int8Module':
    """The model as a flax module (:class:`Int8Module`) over :meth:`merged_params`."""
    return Int8Module(self.module, tuple(self.sites), tuple(sorted(self.settings.items())))

  def merged_params(self) -> dict:
    """``params`` with the ``qparams`` beside their weights (:func:`with_qparams`)."""
    return with_qparams(self.params, self.qparams)

  def step(self):
    """A decode step of this model (a causal LM honouring the cache contract of
    :mod:`peftjax.generation.decode`): its weights are arguments of the compiled programs.

    >>> step = model.step()                                               # doctest: +SKIP
    >>> out = generation.generate(step, make_cache, ids, lens, max_new_tokens=8)  # doctest: +SKIP
    """
    from peftjax import generation  # pylint: disable=g-import-not-at-top  (generation is below)
    return generation.model_step(self.as_module(), self.merged_params())

  def jit(self):
    """A jitted ``inputs -> logits`` taking the weights as arguments, not as baked-in constants
    (which would copy every weight into the compiled program).

    >>> fwd = model.jit(); logits = fwd(inputs)  # doctest: +SKIP
    """
    module = self.as_module()
    run = jax.jit(lambda params, inputs: module.apply({'params': params}, **inputs,
                                                      deterministic=True))
    merged = self.merged_params()
    return lambda inputs: run(merged, inputs)

  @property
  def weight_bytes(self) -> int:
    """Bytes of all parameters as held in memory (int8 weights + scales + float leaves)."""
    return qat.bytes_of(self.params) + qat.bytes_of(self.qparams)


def _settings(quant_cfg, activations: str) -> dict:
  s = {k: quant_cfg[k] for k in _SETTINGS}
  s['activations'] = activations
  return s


def convert(module, params, inputs, quant_cfg, *, ranges: dict | None = None,
            scales: dict | None = None) -> Int8Model:
  """An :class:`Int8Model` from float ``params`` (merge any adapter into them first).

  ``ranges`` (from :func:`peftjax.quant.qat.calibrate_ranges` or
  :func:`peftjax.quant.stacked.calibrate`) gives static activation scales, or ``scales``
  (layer path -> ``(scale, zero_point)``, e.g. a static QAT run's) gives them directly;
  without either, activations are quantized per call ('dynamic', or 'per_token' when
  ``quant.activations`` says so; ``'none'``: weight-only).
  """
  qat.check_config(quant_cfg)
  if not quant_cfg.symmetric:
    raise ConfigError('quant.symmetric=False is invalid for int8 inference; valid: True (int8 '
                      'weights are symmetric so the int32 accumulator needs no weight zero point)')
  if ranges is not None and scales is not None:
    raise ValueError('convert: pass ranges or scales, not both')
  activations = ('static' if ranges is not None or scales is not None else
                 quant_cfg.activations if quant_cfg.activations in ('none', 'per_token')
                 else 'dynamic')
  sites = qat.find_quant_sites(module, params, inputs, quant_cfg)
  flat = tree_lib.flatten(params)
  qparams = {}
  if ranges is not None:
    scales = qat.static_scales(ranges, quant_cfg)
  scales = scales or {}
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
      k = len(s.lead)  # a stack's layer axes come first: one column sum per layer
      entry['colsum'] = jnp.sum(wq.astype(jnp.int32), axis=tuple(range(k, k + len(s.in_shape))))
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


def _act_params(x, x_axes, st: dict):
  """Per-call activation ``(scale, zero)``: per tensor ('dynamic') or per token ('per_token',
  keepdims over the contracted ``x_axes``)."""
  keep = qat.token_axes(x.ndim, x_axes) if st['activations'] == 'per_token' else None
  return ops.minmax_params(x, st['act_bits'], symmetric=st['act_symmetric'], channel_axes=keep)


def _int8_matmul(matmul, xq, w, rows: int):
  """``matmul(xq, w)`` with an int32 accumulator. XLA CPU runs an int8 matrix-*vector* product
  (one row: batch-1 decoding) ~20x slower than with two rows, so a lone row gets a zero twin."""
  if rows == 1 and xq.ndim >= 2 and xq.shape[0] == 1:
    pair = jnp.concatenate([xq, jnp.zeros_like(xq)], axis=0)
    return matmul(pair, w, preferred_element_type=jnp.int32)[:1]
  return matmul(xq, w, preferred_element_type=jnp.int32)


def _per_row(scale, x_axes, n_out: int):
  """A keepdims per-token scale of ``x`` laid out for the matmul's output (rows..., out...)."""
  s = jnp.squeeze(scale, axis=tuple(x_axes))
  return s.reshape(s.shape + (1,) * n_out)


def _dense(site: Site, x, w, qp: dict, bias, st: dict, module=None):
  if site.kind == 'conv':
    n_in = len(site.in_shape)
    x_axes = ()
    matmul = _conv_fn(module, x)
  else:
    x_axes = layers.contracted_axes(module, x.ndim) if module is not None else site.x_axes
    n_in = len(x_axes)
    dims = ((x_axes, tuple(range(n_in))), ((), ()))
    matmul = lambda a, b, **kw: jax.lax.dot_general(a, b, dims, **kw)
  w_scale = qp['w_scale'].reshape(qp['w_scale'].shape[n_in:])  # drop the kept input dims
  if st['activations'] == 'none':  # weight-only: float matmul on the dequantized weight
    y = matmul(x, w.astype(x.dtype)) * w_scale.astype(x.dtype)
  else:
    if st['activations'] == 'static':
      x_scale, x_zero = qp['x_scale'], qp['x_zero']
    else:
      if st['activations'] == 'per_token' and site.kind == 'conv':
        raise ConfigError(f"quant.activations='per_token' is invalid for the convolution "
                          f"{site.path}; valid: 'dynamic', 'static' or 'none'")
      x_scale, x_zero = _act_params(x, x_axes, st)
    xq = ops.quantize(x, x_scale, x_zero, st['act_bits'], st['act_symmetric'])
    rows = int(np.prod([d for i, d in enumerate(x.shape) if i not in x_axes]))
    acc = _int8_matmul(matmul, xq, w, rows if site.kind == 'dense' else 0)
    if st['activations'] == 'per_token':
      n_out = w.ndim - n_in
      x_scale, x_zero = _per_row(x_scale, x_axes, n_out), _per_row(x_zero, x_axes, n_out)
    else:
      x_scale, x_zero = jnp.reshape(x_scale, ()), jnp.reshape(x_zero, ())
    if not st['act_symmetric']:  # (q - z)·W = q·W - z·colsum(W)
      acc = acc - x_zero.astype(jnp.int32) * qp['colsum']
    y = acc.astype(jnp.float32) * (x_scale * w_scale)
    y = y.astype(x.dtype)
  return y if bias is None else y + bias.astype(y.dtype)


def _embed(ids, w, qp: dict):
  rows = jnp.take(w, ids, axis=0).astype(jnp.float32)
  scale = qp['w_scale'].reshape(-1)
  return rows * (jnp.take(scale, ids, axis=0)[..., None] if scale.size > 1 else scale)


def _attend(module, q, w, qp: dict, st: dict):
  """A tied output layer ``q · Eᵀ`` on the int8 table: its rows' scales are the logits'
  output-channel scales. ``q`` is quantized per call ('per_token' or per tensor: there is no
  calibrated range for it) unless the model is weight-only."""
  dtype = module.dtype or q.dtype
  q = q.astype(dtype)
  scale = qp['w_scale'].reshape(-1)
  dims = (((q.ndim - 1,), (1,)), ((), ()))
  matmul = lambda a, b, **kw: jax.lax.dot_general(a, b, dims, **kw)
  if st['activations'] == 'none':
    return (matmul(q, w.astype(dtype)) * scale.astype(dtype)).astype(dtype)
  mode = {**st, 'activations': 'per_token' if st['activations'] == 'per_token' else 'dynamic'}
  x_scale, x_zero = _act_params(q, (q.ndim - 1,), mode)
  xq = ops.quantize(q, x_scale, x_zero, st['act_bits'], st['act_symmetric'])
  acc = _int8_matmul(matmul, xq, w, int(np.prod(q.shape[:-1])))
  if not st['act_symmetric']:
    acc = acc - x_zero.astype(jnp.int32) * jnp.sum(w.astype(jnp.int32), axis=1)
  # x_scale is (1,)*ndim per tensor or (..., 1) per token: it broadcasts over the vocabulary.
  return (acc.astype(jnp.float32) * (x_scale * scale)).astype(dtype)


# The int8 model's per-layer quantities, stored beside each weight in the forward's parameters.
QPARAM_NAMES = ('w_scale', 'x_scale', 'x_zero', 'colsum')


def with_qparams(params: dict, qparams: dict) -> dict:
  """``params`` with each site's ``qparams`` beside its weight (``<layer>/w_scale``...): every
  layer call reads its own from its variables, so a stacked layer (``nn.scan``) gets its
  layer's slice of the scales, as of the weights.

  >>> tree = with_qparams({'d': {'kernel': wq}}, {'d': {'w_scale': s}})  # doctest: +SKIP
  >>> tree['d']['w_scale'] is s                                          # doctest: +SKIP
  True
  """
  flat = tree_lib.flatten(params)
  for path, entry in qparams.items():
    for k, v in entry.items():
      flat[f'{path}/{k}'] = v
  return tree_lib.unflatten(flat)


def int8_scope(sites, settings: dict):
  """Context under which the ``sites``' layers run in int8 from their own parameters: the int8
  weight and the ``qparams`` beside it (:func:`with_qparams`), and a tied embedding's
  ``attend`` from the same int8 table."""
  by_path = {s.path: s for s in sites}
  settings = dict(settings)

  def wrap(path, module, call, x):
    del call  # the float layer never runs: its weight is int8
    site, own = by_path[path], layers.params(module)
    if site.kind == 'embed':
      return _embed(x, own['embedding'], own)
    return _dense(site, x, own['kernel'], own, own.get('bias'), settings, module)

  def attend(path, module, call, q):
    del path, call
    own = layers.params(module)
    return _attend(module, q, own['embedding'], own, settings)

  embeds = [s.path for s in sites if s.kind == 'embed']

  @contextlib.contextmanager
  def scope():
    with layer_scope(_LAYERS, by_path, wrap), \
        layer_scope((nn.Embed,), embeds, attend, method='attend'):
      yield
  return scope()


def apply(model: Int8Model, inputs: dict):
  """The int8 model's forward (eval mode): ``model.module`` with its matched layers in int8."""
  return model.as_module().apply({'params': model.merged_params()}, **inputs,
                                 deterministic=True)


class Int8Module(nn.Module):
  """A model whose matched layers run in int8: ``inner`` under :func:`int8_scope`, in the same
  scope (its parameters keep their paths: the int8 weights and, beside each, its ``qparams``;
  see :meth:`Int8Model.merged_params`). Hashable, so it can be a jitted step's static part:
  ``generation.model_step(Int8Module(...), params)`` decodes in int8 through the step contract
  of :mod:`peftjax.generation.decode` (``logits_at`` passed on to a model that takes it).

  >>> step = model.step()  # doctest: +SKIP  (an Int8Model's decode step)
  """
  inner: nn.Module
  sites: tuple
  settings: tuple  # sorted (key, value) pairs of Int8Model.settings

  def setup(self):
    nn.share_scope(self, self.inner)

  @property
  def cfg(self):
    """The inner model's config (a decoder's, for its cache)."""
    return self.inner.cfg

  def __call__(self, *args, logits_at=None, **kwargs):
    if logits_at is not None:
      kwargs['logits_at'] = logits_at
    if 'deterministic' in kwargs and not takes_deterministic(self.inner):
      kwargs.pop('deterministic')
    with int8_scope(self.sites, dict(self.settings)):
      return self.inner(*args, **kwargs)


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
