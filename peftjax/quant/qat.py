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
  (this batch's min/max), 'per_token' (each token's own min/max: a row's grid never depends on
  the other rows of a batch, as decoding needs), 'static' (ranges calibrated on
  ``quant.calibration_batches`` batches before training), 'lsq' (a learned step per layer,
  trained with the method's parameters) or 'none'. The method's own branches (LoRA, adapters)
  read the float input.
* **QLoRA** (``quant.qlora``) — the frozen base is *stored* in int8 with per-channel scales
  (:meth:`Quantized.prepare_base`), a quarter of its float32 bytes, and dequantized inside the
  step; the method trains in float on top. Merge it for serving with
  :func:`peftjax.quant.int8.convert` on :meth:`Quantized.merge`, which re-quantizes the merged
  weights.

Stacked layers (``nn.scan``: ``layers/attn/q_proj/kernel (L, in, out)``) get scales per layer
and output channel, static ranges and LSQ steps per layer (``(L,)``, calibrated on the unrolled
twin: :mod:`peftjax.quant.stacked`). A tied embedding (``quant.embeddings``; the Llama LM's
``embed/embedding``, also its output layer through ``attend``) is quantized once with one scale
per row: the lookup reads ``int8 row · row scale``, and ``attend``'s output channels are those
rows, so both uses share the one grid; ``attend``'s input is quantized per call ('per_token' or
'dynamic': no calibrated range).
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft import layers
from peftjax.peft.base import Method
from peftjax.peft.base import layer_scope
from peftjax.peft.lora import Site
from peftjax.peft.lora import find_sites
from peftjax.quant import observers
from peftjax.quant import ops
from peftjax.quant import stacked

ACTIVATIONS = ('dynamic', 'per_token', 'static', 'lsq', 'none')
OF = ('base', 'effective')
_MATMULS = (nn.Dense, nn.DenseGeneral, nn.Conv)  # layers whose input activations are quantized
_ACT_KINDS = ('dense', 'conv')
_INT8_SUFFIX = '/int8'     # QLoRA: '<path>/kernel/int8' holds the weight, '.../scale' its scales
_SCALE_SUFFIX = '/scale'
_STATIC = ('act_scale', 'act_zero')  # a calibrated layer's static activation quantizer


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


def weight_channel_axes(site: Site, per_channel: bool = True) -> tuple:
  """The weight axes that get their own scale: a stack's layer axes (``site.lead``, e.g. the
  ``nn.scan`` axis of ``layers/...``: every layer has its own scales), then the output features
  (rows for embeddings). Per tensor (``per_channel=False``) keeps only the layer axes.

  >>> weight_channel_axes(Site('layers/q', 'dense', (64,), (32,), (2,), lead=(30,)))
  (0, 2)
  """
  lead = tuple(range(len(site.lead)))
  if not per_channel:
    return lead
  k = len(site.lead)
  if site.kind == 'embed':
    return lead + (k,)
  n_in = len(site.in_shape)
  return lead + tuple(range(k + n_in, k + n_in + len(site.out_shape)))


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


def load_int8(params, sites: Iterable, dtype=jnp.float32) -> dict:
  """Inverse of :func:`store_int8` up to rounding: float weights ``int8 * scale``."""
  flat = tree_lib.flatten(params)
  for s in sites:
    wp = s if isinstance(s, str) else s.weight_path  # a Site or a weight path
    wq = flat.pop(wp + _INT8_SUFFIX)
    scale = flat.pop(wp + _SCALE_SUFFIX)
    flat[wp] = (wq.astype(dtype) * scale.astype(dtype))
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


def act_paths(sites: Iterable[Site]) -> list[str]:
  """The module paths of the sites whose *input* is quantized (dense and conv layers)."""
  return [s.path for s in sites if s.kind in _ACT_KINDS]


def _targets(q):
  return [q.targets, r'/embedding$'] if q.embeddings else q.targets


def activation_scope(q, scales: dict | None = None, lsq_steps: dict | None = None):
  """Context under which the input of every Dense/DenseGeneral/Conv layer whose kernel
  ``quant.targets`` selects is fake-quantized before its matmul.

  The layers are recognised as they are called (type and kernel path), so nothing about the
  model is stored. ``scales`` (static: layer path -> ``(scale, zero_point)``) and ``lsq_steps``
  (layer path -> step) are data; the static scales are held constant (``stop_gradient``). A
  layer whose own parameters hold ``act_scale``/``act_zero`` (or ``act_step``) reads those
  instead: :meth:`Quantized.layer_tree` puts them there, so a stacked layer (``nn.scan``) gets
  its own layer's slice.

  >>> with activation_scope(config.quant):  # doctest: +SKIP  (dynamic ranges)
  ...   logits = model.apply({'params': params}, **inputs)
  """
  if q.activations == 'none':
    return contextlib.nullcontext()
  pred = tree_lib.make_selector(_targets(q))

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == 'attend' and isinstance(mod, nn.Embed):
      if not pred(f"{'/'.join(mod.path)}/embedding", None):
        return next_fun(*args, **kwargs)
      # The tied output layer: its input (the final norm's output) has no calibrated range,
      # so it is quantized per call whatever quant.activations says.
      return _first_arg(next_fun, args, kwargs, lambda x: dynamic_fake_quant(x, q, (x.ndim - 1,)))
    if context.method_name != '__call__' or not isinstance(mod, _MATMULS):
      return next_fun(*args, **kwargs)
    path = '/'.join(mod.path)
    if not pred(f'{path}/kernel', None):
      return next_fun(*args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()))
    own = layers.params(mod)  # a stacked layer's own slice (the method put it beside W)
    if q.activations == 'lsq':
      step = own['act_step'] if 'act_step' in own else lsq_steps[path]
      # The optimizer may push a step through zero; LSQ needs it positive.
      step = jnp.maximum(step, ops.MIN_SCALE).astype(x.dtype)
      xq = ops.lsq_fake_quant(x, step, q.act_bits)
    elif q.activations == 'static':
      if all(k in own for k in _STATIC):
        pair = tuple(own[k] for k in _STATIC)
      elif path in scales:
        pair = scales[path]
      else:
        raise KeyError(f'no calibrated activation range for {path}')
      scale, zero = (jax.lax.stop_gradient(v).astype(x.dtype) for v in pair)
      xq = ops.fake_quant(x, scale, zero, q.act_bits, q.act_symmetric)
    else:
      if q.activations == 'per_token' and isinstance(mod, nn.Conv):
        raise ConfigError(f"quant.activations='per_token' is invalid for the convolution {path}; "
                          "valid: 'dynamic', 'static', 'lsq' or 'none'")
      xq = dynamic_fake_quant(x, q, layers.contracted_axes(mod, x.ndim))
    return _first_arg(next_fun, args, kwargs, lambda _: xq)

  return nn.intercept_methods(interceptor)


def _first_arg(next_fun, args, kwargs, fn):
  """``next_fun`` with its first argument ``x`` replaced by ``fn(x)``."""
  if args:
    return next_fun(fn(args[0]), *args[1:], **kwargs)
  first = next(iter(kwargs))
  return next_fun(**{**kwargs, first: fn(kwargs[first])})


def token_axes(ndim: int, x_axes) -> tuple:
  """The axes of an input that keep their own scale under 'per_token': all but the contracted
  ones (a Dense's ``(batch, length, in)`` -> ``(0, 1)``: one scale per token).

  >>> token_axes(3, (2,))
  (0, 1)
  """
  x_axes = {a % ndim for a in x_axes}
  return tuple(a for a in range(ndim) if a not in x_axes)


def dynamic_fake_quant(x, q, x_axes):
  """``x`` fake-quantized from its own min/max: one scale per token with
  ``quant.activations='per_token'`` (``x_axes``: the axes the layer contracts), else one for
  the whole tensor (the batch: a row's grid then depends on the other rows)."""
  keep = token_axes(x.ndim, x_axes) if q.activations == 'per_token' else None
  return ops.fake_quant_minmax(x, q.act_bits, symmetric=q.act_symmetric, channel_axes=keep)


def _signature(tree) -> tuple:
  """``((path, shape, dtype), ...)`` of a tree of arrays, tracers or shapes: a hashable key."""
  return tuple((p, tuple(x.shape), np.dtype(x.dtype)) for p, x in tree_lib.flatten(tree).items())


@functools.lru_cache(maxsize=64)
def _sites_for(module, params_sig: tuple, inputs_sig: tuple, targets, embeddings: bool
               ) -> tuple[Site, ...]:
  """:func:`find_quant_sites` of a (hashable) model for parameters and inputs of these shapes.

  A cache of a pure function, keyed on everything it reads: the sites depend on the model and
  the shapes, never on values. Besides skipping a trace, it keeps the abstract forward that
  finds the layers out of the step, where outer interceptors would see it (an uncached first
  call made inside such a context would show them abstract values).
  """
  params = tree_lib.unflatten({p: jax.ShapeDtypeStruct(s, d) for p, s, d in params_sig})
  # numpy: never staged into a trace; nested inputs (a decode step's cache) keep their nesting.
  inputs = tree_lib.unflatten({p: np.zeros(s, d) for p, s, d in inputs_sig})
  q = types.SimpleNamespace(targets=targets if isinstance(targets, str) else list(targets),
                            embeddings=embeddings)
  return tuple(find_quant_sites(module, params, inputs, q))


class Quantized(Method):
  """A PEFT method with QAT and/or a QLoRA base; built by :func:`wrap` from ``config.quant``.

  The parameter tree is the method's own; with ``quant.activations='lsq'`` it is
  ``{'method': <method's tree>, 'lsq': {layer path: {'act_step'}}}`` and, once calibrated, with
  ``'static'`` it is ``{'method': <method's tree>, 'static': {layer path: {'act_scale',
  'act_zero'}}}``. The static scales are data that never train: the forward reads them under
  ``stop_gradient`` (their gradient is exactly zero) and the optimizer's weight decay skips
  ``act_scale`` / ``act_zero`` leaves, so AdamW leaves them unchanged.

  The object holds only its config: the quantized layers are found again from the model
  (:meth:`sites`) wherever they are needed, so one object serves any number of models.

  >>> method = wrap(peft.build(config.peft), config.quant)      # doctest: +SKIP
  >>> peft_params = method.init(rng, model, params, inputs)     # doctest: +SKIP
  """

  def __init__(self, inner: Method, quant_cfg):
    super().__init__(inner.cfg)
    check_config(quant_cfg)
    self.inner, self.q = inner, quant_cfg
    self.name = inner.name

  # ------------------------------------------------------------------ tree layout
  @property
  def qat(self) -> bool:
    return bool(self.q.qat)

  @property
  def lsq(self) -> bool:
    return self.qat and self.q.activations == 'lsq'

  @property
  def static(self) -> bool:
    return self.qat and self.q.activations == 'static'

  def _parts(self, peft_params) -> tuple[Any, dict | None, dict | None]:
    """``(method's tree, LSQ steps or None, static scales or None)``."""
    if self.lsq:
      return peft_params['method'], peft_params['lsq'], None
    if self.static and isinstance(peft_params, dict) and set(peft_params) == {'method', 'static'}:
      return peft_params['method'], None, peft_params['static']
    return peft_params, None, None

  @property
  def trainable_base(self):
    return self.inner.trainable_base

  @property
  def needs_calibration(self) -> bool:
    return self.qat and self.q.activations in ('static', 'lsq')

  def sites(self, module, base_params, inputs) -> list[Site]:
    """The layers ``quant.targets`` selects in this model (float ``base_params``, arrays or
    shapes): :func:`find_quant_sites`, memoized on the model and the shapes (see
    :func:`_sites_for`), so the step's trace does not trace the model a second time."""
    targets = self.q.targets
    return list(_sites_for(module, _signature(base_params), _signature(inputs),
                           targets if isinstance(targets, str) else tuple(targets),
                           bool(self.q.embeddings)))

  # ------------------------------------------------------------------ Method interface
  def init(self, rng, module, base_params, inputs) -> dict:
    inner = self.inner.init(rng, module, base_params, inputs)
    sites = self.sites(module, base_params, inputs)  # validates quant.targets on this model
    if self.qat and self.q.of == 'effective':
      try:
        self.inner.merge(base_params, inner)
      except NotImplementedError as e:
        raise ConfigError(f"quant.of='effective' needs a mergeable method; "
                          f'peft.method={self.inner.name!r} is not: {e}') from None
    if not self.lsq:
      return inner
    # Placeholder steps; calibrate() sets them from real activations before training.
    # One step per layer (a stack's layers each have their own: shape ``site.lead``).
    return {'method': inner,
            'lsq': tree_lib.unflatten({f'{s.path}/act_step': jnp.ones(s.lead, jnp.float32)
                                       for s in sites if s.kind in _ACT_KINDS})}

  def prepare_base(self, base_params, peft_params, *, module=None, inputs=None) -> dict:
    """The inner method's base; with QLoRA its frozen quantized weights stored in int8.

    QLoRA needs ``module`` and ``inputs`` (a sample batch): which axes of each kernel are its
    output channels is the layer's, not the weight's, to say.
    """
    base = self.inner.prepare_base(base_params, self._parts(peft_params)[0], module=module,
                                   inputs=inputs)
    if self.q.qlora:
      if module is None or inputs is None:
        raise ValueError('QLoRA: prepare_base(base, peft, module=..., inputs=...) needs the model '
                         'and a sample of its inputs to find the layers it stores in int8')
      base = store_int8(base, self._frozen(self.sites(module, base, inputs), base), self.q)
    return base

  def base_logical_specs(self, base_specs):
    """QLoRA's int8 weight keeps the kernel's axes; its (small) scales are replicated."""
    specs = self.inner.base_logical_specs(base_specs)
    if not self.q.qlora:
      return specs
    flat = tree_lib.flatten(specs)
    for wp in self._frozen_paths(flat):
      axes = flat.pop(wp)
      flat[wp + _INT8_SUFFIX] = P(*axes)
      flat[wp + _SCALE_SUFFIX] = P(*(None,) * len(axes))
    return tree_lib.unflatten(flat)

  def _frozen_paths(self, flat: dict) -> list[str]:
    """QLoRA stores only weights that stay frozen (a trained weight must stay float)."""
    chosen = tree_lib.make_selector(_targets(self.q))
    trained = tree_lib.make_selector(self.inner.trainable_base)
    return [p for p, v in flat.items() if chosen(p, v) and not trained(p, v)]

  def _frozen(self, sites: list[Site], base_params) -> list[Site]:
    frozen = set(self._frozen_paths(tree_lib.flatten(base_params)))
    return [s for s in sites if s.weight_path in frozen]

  def calibrate(self, module, base_params, peft_params, batches, input_keys) -> dict:
    """Static scales (or LSQ's initial steps) from ``batches``; returns the peft params with
    them (``'static'`` / ``'lsq'`` entries): the method object keeps nothing.

    The ranges are those of the float model with the method applied, in eval mode.
    """
    from peftjax.peft.base import apply  # the registry's forward; imported here: no cycle
    inner, lsq, _ = self._parts(peft_params)
    batches = list(batches)
    if not batches:
      raise ConfigError('no calibration batches observed; quant.calibration_batches must be >= 1')
    sample = {k: batches[0][k] for k in input_keys}
    base = self.forward_base(base_params, peft_params, quantize=False, module=module,
                             inputs=sample)
    sites = self.sites(module, base, sample)
    if stacked.is_stacked(sites):
      # Observed per layer on the unrolled twin, which runs plain weights: the method merged.
      try:
        merged = self.inner.merge(base, inner)
      except NotImplementedError as e:
        raise ConfigError(f'quant.activations={self.q.activations!r} on stacked layers '
                          f'calibrates the merged model; peft.method={self.inner.name!r} does '
                          f"not merge ({e}); valid: quant.activations='dynamic'") from None
      ranges = stacked.calibrate(module, merged, sites, batches, self.q, input_keys)
    else:
      fwd = lambda p, b: apply(module, self.inner, p, inner, {k: b[k] for k in input_keys})
      ranges = calibrate_ranges(fwd, base, sites, batches, self.q)
    if self.static:
      scales = static_scales(ranges, self.q)
      return {'method': inner, 'static': tree_lib.unflatten(
          {f'{p}/{k}': v for p, sz in scales.items() for k, v in zip(_STATIC, sz)})}
    if lsq is None:
      return peft_params
    qmax = ops.qrange(self.q.act_bits, True)[1]
    # LSQ's step starts where a min/max calibration would put it (|x|max / qmax): the paper's
    # 2·mean|x|/sqrt(qmax) clips BERT's heavy-tailed activations hard at step 0.
    steps = {f'{p}/act_step': jnp.maximum(jnp.maximum(-lo, hi) / qmax, 1e-8).astype(jnp.float32)
             for p, (lo, hi) in ranges.items()}
    return {'method': inner, 'lsq': tree_lib.unflatten(steps)}

  def static_scales(self, peft_params) -> dict | None:
    """Layer path -> ``(scale, zero_point)`` of calibrated static activations (else None)."""
    static = self._parts(peft_params)[2]
    if static is None:
      return None
    flat = tree_lib.flatten(static)
    paths = sorted({p.rsplit('/', 1)[0] for p in flat})
    return {p: tuple(flat[f'{p}/{k}'] for k in _STATIC) for p in paths}

  def forward_base(self, base_params, peft_params, *, quantize: bool = True, module=None,
                   inputs=None) -> dict:
    """The weights the step computes with: dequantized (QLoRA), merged ('effective'), fake-quantized.

    Fake-quantizing needs ``module`` and ``inputs`` (``peft.apply`` passes them) to find the
    layers and their output channels.
    """
    inner = self._parts(peft_params)[0]
    if self.q.qlora:
      base_params = load_int8(base_params, self._stored(base_params))
    base_params = self.inner.forward_base(base_params, inner, module=module, inputs=inputs)
    if not (self.qat and quantize):
      return base_params
    if module is None or inputs is None:
      raise ValueError('QAT: forward_base(base, peft, module=..., inputs=...) needs the model '
                       'and its inputs to find the layers it quantizes (peft.apply passes them)')
    if self.q.of == 'effective':
      base_params = self.inner.merge(base_params, inner)
    return fake_quant_weights(base_params, self.sites(module, base_params, inputs), self.q)

  @staticmethod
  def _stored(base_params) -> list[str]:
    """The weight paths QLoRA holds in int8 (``<weight>/int8`` leaves)."""
    return [p[:-len(_INT8_SUFFIX)] for p in tree_lib.flatten(base_params)
            if p.endswith(_INT8_SUFFIX)]

  @contextlib.contextmanager
  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    inner, lsq, _ = self._parts(peft_params)
    if lsq is not None:
      lsq = {p[:-len('/act_step')]: v for p, v in tree_lib.flatten(lsq).items()}
    with contextlib.ExitStack() as stack:
      if not (self.qat and self.q.of == 'effective'):  # 'effective' already merged the method
        stack.enter_context(self.inner.intercept(inner, rng=rng, deterministic=deterministic))
      if self.qat:
        scales = self.static_scales(peft_params)
        if self.static and scales is None:
          raise RuntimeError("quant.activations='static': call calibrate() before training")
        # Entered last = innermost: it quantizes what the layer itself reads, not the
        # method's float branches.
        stack.enter_context(activation_scope(self.q, scales, lsq))
      yield

  def layer_tree(self, peft_params) -> dict:
    """The inner method's layer leaves (none with 'effective': it is merged into the weights)
    and the activation quantizers' (``act_step``, ``act_scale``, ``act_zero``), which mirror
    the layers too: beside the kernel, a stacked layer reads its own layer's slice."""
    inner, lsq, static = self._parts(peft_params)
    own = {} if (self.qat and self.q.of == 'effective') else self.inner.layer_tree(inner)
    quantizers = lsq if lsq is not None else static
    if quantizers is None:
      return own
    return tree_lib.unflatten({**tree_lib.flatten(own), **tree_lib.flatten(quantizers)})

  def merge(self, base_params, peft_params) -> dict:
    """The float model with the method folded in (QLoRA: from the dequantized base)."""
    inner = self._parts(peft_params)[0]
    if self.q.qlora:
      base_params = load_int8(base_params, self._stored(base_params))
    return self.inner.merge(base_params, inner)

  def logical_specs(self, base_specs, peft_params) -> Any:
    inner, lsq, static = self._parts(peft_params)
    specs = self.inner.logical_specs(base_specs, inner)
    if lsq is not None:
      return {'method': specs, 'lsq': jax.tree.map(lambda _: None, lsq)}
    if static is not None:
      return {'method': specs, 'static': jax.tree.map(lambda _: None, static)}
    return specs


def wrap(method: Method, quant_cfg) -> Method:
  """``method`` itself, or :class:`Quantized` around it when ``quant.qat``/``quant.qlora`` is on."""
  if not (quant_cfg.qat or quant_cfg.qlora):
    return method
  return Quantized(method, quant_cfg)


def bytes_of(tree) -> int:
  """Bytes of a pytree's arrays (int8 counts one byte per element)."""
  return int(sum(np.dtype(x.dtype).itemsize * np.prod(x.shape)
                 for x in jax.tree.leaves(tree)))
