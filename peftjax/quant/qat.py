"""Quantization-aware training and QLoRA as a transform that wraps any PEFT method.

:class:`Quantized` wraps a method from the registry (``lora``, ``full``, ``bitfit``, ``lora+ia3``
...) and quantizes the matmuls whose weight path matches ``quant.targets`` inside the same jitted
step, so LoRA, QAT and the rest compose without touching the model's code:

* **weights** — fake-quantized (straight-through estimator) with one scale per output channel,
  computed from the weight itself every step (:meth:`Quantized.forward_base`). With
  ``quant.of='base'`` the (frozen or trainable) base weights are quantized and the method runs in
  float on top, e.g. ``y = Q(x)·Q(W) + s·(x·A)·B``; with ``quant.of='effective'`` the merged weight
  is, ``y = Q(x)·Q(W + s·A·B)``, so the trained adapter survives int8 export unchanged.
* **activations** — the input of every matched Dense/DenseGeneral is fake-quantized: 'dynamic'
  (this batch's min/max), 'static' (ranges calibrated on ``quant.calibration_batches`` batches
  before training), 'lsq' (a learned step per layer, trained with the method's parameters) or
  'none'. The method's own branches (LoRA, adapters) read the float input.
* **QLoRA** (``quant.qlora``) — the frozen base is *stored* in int8 with per-channel scales
  (:meth:`Quantized.prepare_base`), a quarter of its float32 bytes, and dequantized inside the step;
  the method trains in float on top. Merge it for serving with :func:`peftjax.quant.int8.convert`
  on :meth:`Quantized.merge`, which re-quantizes the merged weights.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.base import Method
from peftjax.peft.base import layer_scope
from peftjax.peft.lora import Site
from peftjax.peft.lora import find_sites
from peftjax.quant import observers
from peftjax.quant import ops

ACTIVATIONS = ('dynamic', 'static', 'lsq', 'none')
OF = ('base', 'effective')
_MATMULS = (nn.Dense, nn.DenseGeneral, nn.Conv)  # layers whose input activations are quantized
_ACT_KINDS = ('dense', 'conv')
_INT8_SUFFIX = '/int8'     # QLoRA: '<path>/kernel/int8' holds the weight, '.../scale' its scales
_SCALE_SUFFIX = '/scale'


def check_config(q) -> None:
  """Validates ``config.quant`` (raises :class:`ConfigError` naming the field)."""
  ops.check_bits(q.bits, 'quant.bits')
  ops.check_bits(q.act_bits, 'quant.act_bits')
  if q.activations not in ACTIVATIONS:
    raise ConfigError(f'quant.activations={q.activations!r} is invalid; valid: {ACTIVATIONS}')
  if q.of not in OF:
    raise ConfigError(f'quant.of={q.of!r} is invalid; valid: {OF}')
  observers.init_state(q.observer)  # raises for an unknown observer
  if not 0.0 < q.percentile <= 100.0:
    raise ConfigError(f'quant.percentile={q.percentile!r} is invalid; valid: 0 < p <= 100')
  if q.calibration_batches < 1 and q.activations in ('static', 'lsq'):
    raise ConfigError(f'quant.calibration_batches={q.calibration_batches} is invalid with '
                      f"quant.activations={q.activations!r}; valid: >= 1")
  if q.activations == 'lsq' and not q.act_symmetric:
    raise ConfigError("quant.act_symmetric=False is invalid with quant.activations='lsq'; "
                      'valid: True (LSQ learns a symmetric step)')
  if q.qlora and q.qat and q.of == 'effective':
    raise ConfigError("quant.of='effective' is invalid with quant.qlora=True; valid: 'base' "
                      '(QLoRA keeps the stored base fixed and the adapter in float)')


def weight_channel_axes(site: Site, per_channel: bool = True) -> tuple | None:
  """The weight axes that get their own scale: the output features (rows for embeddings)."""
  if not per_channel:
    return None
  if site.kind == 'embed':
    return (0,)
  n_in = len(site.in_shape)
  return tuple(range(n_in, n_in + len(site.out_shape)))


def find_quant_sites(module, params, inputs, q) -> list[Site]:
  """Layers whose matmul ``quant.targets`` (plus the embeddings with ``quant.embeddings``) selects."""
  targets = [q.targets, r'/embedding$'] if q.embeddings else q.targets
  return find_sites(module, params, inputs, targets, field='quant.targets', user='quantization',
                    conv=True)


def fake_quant_weights(params, sites: Iterable[Site], q) -> dict:
  """``params`` with every site's weight fake-quantized (STE gradient, per-channel scales)."""
  flat = tree_lib.flatten(params)
  for s in sites:
    flat[s.weight_path] = ops.fake_quant_minmax(
        flat[s.weight_path], q.bits, symmetric=q.symmetric,
        channel_axes=weight_channel_axes(s, q.per_channel))
  return tree_lib.unflatten(flat)


def quantize_weight(w, site: Site, q) -> tuple[jax.Array, jax.Array]:
  """``(int8 weight, float32 scale)`` with symmetric per-channel scales (keepdims shape)."""
  scale, zero = ops.minmax_params(w, q.bits, symmetric=True,
                                  channel_axes=weight_channel_axes(site, q.per_channel))
  return ops.quantize(w, scale, zero, q.bits, True), scale


def store_int8(params, sites: Iterable[Site], q) -> dict:
  """QLoRA storage: each site's weight becomes ``{.../int8, .../scale}`` leaves."""
  flat = tree_lib.flatten(params)
  for s in sites:
    wq, scale = quantize_weight(flat.pop(s.weight_path), s, q)
    flat[s.weight_path + _INT8_SUFFIX] = wq
    flat[s.weight_path + _SCALE_SUFFIX] = scale
  return tree_lib.unflatten(flat)


def load_int8(params, sites: Iterable[Site], dtype=jnp.float32) -> dict:
  """Inverse of :func:`store_int8` up to rounding: float weights ``int8 * scale``."""
  flat = tree_lib.flatten(params)
  for s in sites:
    wq = flat.pop(s.weight_path + _INT8_SUFFIX)
    scale = flat.pop(s.weight_path + _SCALE_SUFFIX)
    flat[s.weight_path] = (wq.astype(dtype) * scale.astype(dtype))
  return tree_lib.unflatten(flat)


def calibrate_ranges(apply_fn, params, sites: list[Site], batches, q) -> dict:
  """Observed activation range ``(min, max)`` of every dense site's input over ``batches``.

  ``apply_fn(params, batch)`` runs the float model (deterministic); the observer is
  ``quant.observer``. Raises ConfigError when ``batches`` is empty.

  >>> ranges = calibrate_ranges(fwd, params, sites, batches[:8], config.quant)  # doctest: +SKIP
  """
  dense = {s.path for s in sites if s.kind in _ACT_KINDS}

  @jax.jit
  def observe(state, batch):
    new = dict(state)

    def wrap(path, module, call, x):
      del module
      new[path] = observers.update(q.observer, new[path], x, percentile=q.percentile)
      return call(x)

    with layer_scope(_MATMULS, dense, wrap):
      apply_fn(params, batch)
    return new

  state = {p: observers.init_state(q.observer) for p in dense}
  for batch in batches:
    state = observe(state, batch)
  return {p: observers.finalize(q.observer, st) for p, st in state.items()}


def static_scales(ranges: dict, q) -> dict:
  """Activation ``(scale, zero_point)`` per site from calibrated ranges."""
  return {p: ops.compute_scale(jnp.asarray(lo), jnp.asarray(hi), q.act_bits, q.act_symmetric)
          for p, (lo, hi) in ranges.items()}


def activation_scope(sites: Iterable[Site], q, scales: dict | None = None,
                     lsq_steps: dict | None = None):
  """Context under which each dense/conv site's *input* is fake-quantized before its matmul."""
  dense = {s.path for s in sites if s.kind in _ACT_KINDS}
  if q.activations == 'none' or not dense:
    return contextlib.nullcontext()

  def wrap(path, module, call, x):
    del module
    if q.activations == 'lsq':
      # The optimizer may push a step through zero; LSQ needs it positive.
      step = jnp.maximum(lsq_steps[path], ops.MIN_SCALE).astype(x.dtype)
      xq = ops.lsq_fake_quant(x, step, q.act_bits)
    elif q.activations == 'static':
      scale, zero = scales[path]
      xq = ops.fake_quant(x, scale.astype(x.dtype), zero.astype(x.dtype), q.act_bits,
                          q.act_symmetric)
    else:
      xq = ops.fake_quant_minmax(x, q.act_bits, symmetric=q.act_symmetric)
    return call(xq)

  return layer_scope(_MATMULS, dense, wrap)


class Quantized(Method):
  """A PEFT method with QAT and/or a QLoRA base; built by :func:`wrap` from ``config.quant``.

  The parameter tree is the method's own; with ``quant.activations='lsq'`` it becomes
  ``{'method': <method's tree>, 'lsq': {layer path: step}}``.

  >>> method = wrap(peft.build(config.peft), config.quant)      # doctest: +SKIP
  >>> peft_params = method.init(rng, model, params, inputs)     # doctest: +SKIP
  """

  def __init__(self, inner: Method, quant_cfg):
    super().__init__(inner.cfg)
    check_config(quant_cfg)
    self.inner, self.q = inner, quant_cfg
    self.name = inner.name
    self.sites: list[Site] | None = None
    self.scales: dict | None = None  # static activation scales, after calibrate()

  # ------------------------------------------------------------------ tree layout
  @property
  def qat(self) -> bool:
    return bool(self.q.qat)

  @property
  def lsq(self) -> bool:
    return self.qat and self.q.activations == 'lsq'

  def _parts(self, peft_params) -> tuple[Any, dict | None]:
    return (peft_params['method'], peft_params['lsq']) if self.lsq else (peft_params, None)

  @property
  def trainable_base(self):
    return self.inner.trainable_base

  @property
  def needs_calibration(self) -> bool:
    return self.qat and self.q.activations in ('static', 'lsq')

  def _need_sites(self) -> list[Site]:
    if self.sites is None:
      raise RuntimeError('Quantized.init must run before the method is applied')
    return self.sites

  # ------------------------------------------------------------------ Method interface
  def init(self, rng, module, base_params, inputs) -> dict:
    inner = self.inner.init(rng, module, base_params, inputs)
    self.sites = find_quant_sites(module, base_params, inputs, self.q)
    if self.qat and self.q.of == 'effective':
      try:
        self.inner.merge(base_params, inner)
      except NotImplementedError as e:
        raise ConfigError(f"quant.of='effective' needs a mergeable method; "
                          f'peft.method={self.inner.name!r} is not: {e}') from None
    if not self.lsq:
      return inner
    dense = [s for s in self.sites if s.kind in _ACT_KINDS]
    # Placeholder steps; calibrate() sets them from real activations before training.
    return {'method': inner,
            'lsq': tree_lib.unflatten({f'{s.path}/act_step': jnp.ones((), jnp.float32)
                                       for s in dense})}

  def prepare_base(self, base_params, peft_params) -> dict:
    base = self.inner.prepare_base(base_params, self._parts(peft_params)[0])
    if self.q.qlora:
      base = store_int8(base, self._frozen_sites(base), self.q)
    return base

  def base_logical_specs(self, base_specs):
    """QLoRA's int8 weight keeps the kernel's axes; its scales keep the output axes only."""
    specs = self.inner.base_logical_specs(base_specs)
    if not self.q.qlora:
      return specs
    flat = tree_lib.flatten(specs)
    for s in self._frozen_sites(specs):
      axes = flat.pop(s.weight_path)
      axes = tuple(axes) if axes is not None else (None,) * (len(s.in_shape) + len(s.out_shape))
      flat[s.weight_path + _INT8_SUFFIX] = P(*axes)
      n_in = len(s.in_shape)  # the scale keeps size-1 dims where the weight is reduced
      kept = ([axes[0]] + [None] * (len(axes) - 1) if s.kind == 'embed'
              else [None] * n_in + list(axes[n_in:]))
      if not self.q.per_channel:
        kept = [None] * len(axes)
      flat[s.weight_path + _SCALE_SUFFIX] = P(*kept)
    return tree_lib.unflatten(flat)

  def _frozen_sites(self, base_params) -> list[Site]:
    """QLoRA stores only weights that stay frozen (a trained weight must stay float)."""
    pred = tree_lib.make_selector(self.inner.trainable_base)
    flat = tree_lib.flatten(base_params)
    return [s for s in self._need_sites()
            if s.weight_path in flat and not pred(s.weight_path, flat[s.weight_path])]

  def calibrate(self, module, base_params, peft_params, batches, input_keys) -> dict:
    """Static ranges (or LSQ's initial steps) from ``batches``; returns the peft params.

    The ranges are those of the float model with the method applied, in eval mode.
    """
    from peftjax.peft.base import apply  # the registry's forward; imported here: no cycle
    inner, lsq = self._parts(peft_params)
    base = self.forward_base(base_params, peft_params, quantize=False)
    fwd = lambda p, b: apply(module, self.inner, p, inner, {k: b[k] for k in input_keys})
    ranges = calibrate_ranges(fwd, base, self._need_sites(), batches, self.q)
    self.scales = static_scales(ranges, self.q)
    if lsq is None:
      return peft_params
    qmax = ops.qrange(self.q.act_bits, True)[1]
    # LSQ's step starts where a min/max calibration would put it (|x|max / qmax): the paper's
    # 2·mean|x|/sqrt(qmax) clips BERT's heavy-tailed activations hard at step 0.
    steps = {f'{p}/act_step': jnp.maximum(jnp.maximum(-lo, hi) / qmax, 1e-8).astype(jnp.float32)
             for p, (lo, hi) in ranges.items()}
    return {'method': inner, 'lsq': tree_lib.unflatten(steps)}

  def forward_base(self, base_params, peft_params, *, quantize: bool = True) -> dict:
    """The weights the step computes with: dequantized (QLoRA), merged ('effective'), fake-quantized."""
    inner, _ = self._parts(peft_params)
    if self.q.qlora:
      base_params = load_int8(base_params, self._stored_sites(base_params))
    base_params = self.inner.forward_base(base_params, inner)
    if not (self.qat and quantize):
      return base_params
    if self.q.of == 'effective':
      base_params = self.inner.merge(base_params, inner)
    return fake_quant_weights(base_params, self._need_sites(), self.q)

  def _stored_sites(self, base_params) -> list[Site]:
    flat = tree_lib.flatten(base_params)
    return [s for s in self._need_sites() if s.weight_path + _INT8_SUFFIX in flat]

  @contextlib.contextmanager
  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    inner, lsq = self._parts(peft_params)
    if lsq is not None:
      lsq = {p[:-len('/act_step')]: v for p, v in tree_lib.flatten(lsq).items()}
    with contextlib.ExitStack() as stack:
      if not (self.qat and self.q.of == 'effective'):  # 'effective' already merged the method
        stack.enter_context(self.inner.intercept(inner, rng=rng, deterministic=deterministic))
      if self.qat:
        if self.q.activations == 'static' and self.scales is None:
          raise RuntimeError("quant.activations='static': call calibrate() before training")
        # Entered last = innermost: it quantizes what the layer itself reads, not the
        # method's float branches.
        stack.enter_context(activation_scope(self._need_sites(), self.q, self.scales, lsq))
      yield

  def merge(self, base_params, peft_params) -> dict:
    """The float model with the method folded in (QLoRA: from the dequantized base)."""
    inner, _ = self._parts(peft_params)
    if self.q.qlora:
      base_params = load_int8(base_params, self._stored_sites(base_params))
    return self.inner.merge(base_params, inner)

  def logical_specs(self, base_specs, peft_params) -> Any:
    inner, lsq = self._parts(peft_params)
    specs = self.inner.logical_specs(base_specs, inner)
    if lsq is None:
      return specs
    return {'method': specs, 'lsq': jax.tree.map(lambda _: None, lsq)}


def wrap(method: Method, quant_cfg) -> Method:
  """``method`` itself, or :class:`Quantized` around it when ``quant.qat``/``quant.qlora`` is on."""
  if not (quant_cfg.qat or quant_cfg.qlora):
    return method
  return Quantized(method, quant_cfg)


def bytes_of(tree) -> int:
  """Bytes of a pytree's arrays (int8 counts one byte per element)."""
  return int(sum(np.dtype(x.dtype).itemsize * np.prod(x.shape)
                 for x in jax.tree.leaves(tree)))
