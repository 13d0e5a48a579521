"""Bottleneck adapters as a functional transform, selected as ``peft.method='adapter'``.

An adapter is a small residual MLP ``h -> h + up(act(down(h)))`` with ``down: (D, m)`` and
``up: (m, D)`` (both with bias, ``m = peft.adapter_size``). ``up`` starts at zero, so the model is
exactly unchanged at step 0. ``peft.adapter_kind`` picks the placement:

* ``'houlsby'`` (Houlsby et al., 2019): after the attention output projection (the output of the
  modules matching ``peft.adapter_attn_targets``, before the residual add and LayerNorm) and after
  the FFN (the output of ``peft.adapter_ffn_targets``);
* ``'pfeiffer'`` (Pfeiffer et al., 2021): only after the FFN;
* ``'parallel'`` (He et al., 2022): the adapter reads the FFN block's *input* — the input ``x`` of
  the sibling module matching ``peft.adapter_ffn_inputs`` (BERT's ``intermediate``) — and its
  result is added to the FFN output: ``FFN(x) + up(act(down(x)))``. The interceptor captures
  ``x`` when ``intermediate`` runs and adds the branch when ``output`` of the same parent module
  runs, so both must be called in that order within one trace (true of every standard
  Transformer block; a ``nn.remat``/``nn.scan`` boundary *between* the two calls would not work).

It runs through ``flax.linen.intercept_methods`` and finds layers by module path, so any linen
model with those module names works unedited. The tree mirrors the base tree::

    encoder/layer_0/attention/out/adapter/{down,up}/{kernel,bias}
    encoder/layer_0/output/adapter/{down,up}/{kernel,bias}

Adapters add nonlinear computation, so they cannot be folded into the base weights:
:meth:`Adapter.merge` raises ``NotImplementedError``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.base import Method
from peftjax.peft.base import register
from peftjax.peft.ia3 import DenseSite
from peftjax.peft.ia3 import dense_sites
from peftjax.peft.ia3 import match_module_paths

KINDS = ('houlsby', 'pfeiffer', 'parallel')
ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': lambda h: jax.nn.gelu(h, approximate=False)}
_DENSE = (nn.Dense, nn.DenseGeneral)


@dataclasses.dataclass(frozen=True)
class AdapterSite:
  """One adapter: added to the output of ``out``; reads ``out``'s output, or ``src``'s input."""
  out: DenseSite                 # the module whose output the adapter is added to
  src: DenseSite | None = None   # parallel: the module whose input the adapter reads

  @property
  def path(self) -> str:
    return self.out.path

  @property
  def d_in(self) -> int:
    return self.src.d_in if self.src is not None else self.out.d_out

  @property
  def d_out(self) -> int:
    return self.out.d_out


def _flat_features(h, n: int):
  """``h`` with its trailing ``n`` feature dims flattened into one."""
  return h.reshape(*h.shape[:h.ndim - n], -1)


def _adapter(p: dict, h, act, dtype):
  """``up(act(down(h)))`` on the last axis of ``h``."""
  z = h.astype(dtype) @ p['down']['kernel'].astype(dtype) + p['down']['bias'].astype(dtype)
  return act(z) @ p['up']['kernel'].astype(dtype) + p['up']['bias'].astype(dtype)


@contextlib.contextmanager
def adapter_scope(sites: list[AdapterSite], adapter_params, activation: str):
  """Context under which every site's output gets its adapter branch added.

  >>> with adapter_scope(method.sites, adapters, 'gelu'):  # doctest: +SKIP
  ...   logits = model.apply({'params': params}, ids, mask)
  """
  act = ACTIVATIONS[activation]
  by_out = {s.path: s for s in sites}
  src_to_out = {s.src.path: s.path for s in sites if s.src is not None}
  pending: dict[str, Any] = {}  # parallel: out path -> the captured FFN input
  flat = tree_lib.flatten(adapter_params)

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != '__call__' or not isinstance(mod, _DENSE):
      return next_fun(*args, **kwargs)
    path = '/'.join(mod.path)
    if path in src_to_out:
      pending[src_to_out[path]] = args[0] if args else next(iter(kwargs.values()))
    y = next_fun(*args, **kwargs)
    site = by_out.get(path)
    if site is None:
      return y
    pre = f'{path}/adapter/'
    p = tree_lib.unflatten({k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)})
    if site.src is None:
      h = _flat_features(y, len(site.out.out_shape))
    else:
      if path not in pending:
        raise RuntimeError(f'parallel adapter at {path}: its input module {site.src.path} did '
                           'not run before it in this forward')
      h = _flat_features(pending.pop(path), len(site.src.in_shape))
    delta = _adapter(p, h, act, y.dtype)
    return y + delta.reshape(y.shape)

  with nn.intercept_methods(interceptor):
    yield


def _parallel_sources(sites: dict[str, DenseSite], outs: list[str], pattern: str) -> list:
  """For each FFN output module, the sibling (same parent) module whose input feeds the adapter."""
  srcs = match_module_paths(sites, pattern, 'adapter_ffn_inputs')
  by_parent = {p.rsplit('/', 1)[0]: p for p in srcs}
  pairs = []
  for out in outs:
    parent = out.rsplit('/', 1)[0]
    if parent not in by_parent:
      raise ConfigError(
          f'peft.adapter_ffn_inputs={pattern!r} matches no sibling of {out} (a module under '
          f'{parent}/); matches: {srcs[:3]}')
    src = sites[by_parent[parent]]
    n = len(src.x_axes)
    if src.x_axes != tuple(range(src.x_axes[-1] - n + 1, src.x_axes[-1] + 1)):
      raise ConfigError(f'parallel adapter: {src.path} contracts input axes {src.x_axes}; the '
                        'adapter needs them trailing and in order')
    pairs.append(AdapterSite(sites[out], src))
  return pairs


@register('adapter')
class Adapter(Method):
  """Bottleneck adapters from config: ``adapter_kind``, ``adapter_size``, ``adapter_activation``,
  and the module-path regexes ``adapter_attn_targets``, ``adapter_ffn_targets``,
  ``adapter_ffn_inputs``.

  >>> method = peft.build(config.peft)                          # doctest: +SKIP (method='adapter')
  >>> adapters = method.init(rng, model, params, inputs)        # doctest: +SKIP
  >>> logits = peft.apply(model, method, params, adapters, inputs)  # doctest: +SKIP
  """

  def __init__(self, peft_cfg):
    super().__init__(peft_cfg)
    self.sites: list[AdapterSite] | None = None

  def _validate(self):
    c = self.cfg
    if c.adapter_kind not in KINDS:
      raise ConfigError(f'peft.adapter_kind={c.adapter_kind!r}; valid: {", ".join(KINDS)}')
    if c.adapter_activation not in ACTIVATIONS:
      raise ConfigError(f'peft.adapter_activation={c.adapter_activation!r}; valid: '
                        f'{", ".join(ACTIVATIONS)}')
    if int(c.adapter_size) <= 0:
      raise ConfigError(f'peft.adapter_size={c.adapter_size}; valid: a positive integer')

  def init(self, rng, module, base_params, inputs) -> dict:
    """``down`` uniform in ±1/sqrt(D) (PyTorch's Linear default), ``up`` and biases zero."""
    self._validate()
    c = self.cfg
    found = dense_sites(module, base_params, inputs)
    ffn = match_module_paths(found, c.adapter_ffn_targets, 'adapter_ffn_targets')
    if c.adapter_kind == 'parallel':
      sites = _parallel_sources(found, ffn, c.adapter_ffn_inputs)
    else:
      sites = [AdapterSite(found[p]) for p in ffn]
      if c.adapter_kind == 'houlsby':
        attn = match_module_paths(found, c.adapter_attn_targets, 'adapter_attn_targets')
        sites = [AdapterSite(found[p]) for p in attn] + sites
    m = int(c.adapter_size)
    flat = {}
    for s in sites:
      key = jax.random.fold_in(rng, zlib.crc32(s.path.encode()))
      bound = 1.0 / np.sqrt(s.d_in)
      flat[f'{s.path}/adapter/down/kernel'] = jax.random.uniform(
          key, (s.d_in, m), jnp.float32, -bound, bound)
      flat[f'{s.path}/adapter/down/bias'] = jnp.zeros((m,), jnp.float32)
      # Zero up-projection: the branch adds exactly 0 until the first update.
      flat[f'{s.path}/adapter/up/kernel'] = jnp.zeros((m, s.d_out), jnp.float32)
      flat[f'{s.path}/adapter/up/bias'] = jnp.zeros((s.d_out,), jnp.float32)
    self.sites = sites
    return tree_lib.unflatten(flat)

  def _need_sites(self):
    if self.sites is None:
      raise RuntimeError('Adapter.init must run before the method is applied')
    return self.sites

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del rng, deterministic  # no adapter dropout; the model's own dropout follows the adapter
    return adapter_scope(self._need_sites(), peft_params, self.cfg.adapter_activation)

  def merge(self, base_params, peft_params) -> dict:
    del base_params, peft_params
    raise NotImplementedError(
        f"peft.method='adapter' (kind {self.cfg.adapter_kind!r}) cannot be merged: the adapter "
        'is a nonlinear branch, not a change of the base weights. Export the adapter-only '
        "parameters instead, or use a mergeable method ('lora', 'ia3').")

  def logical_specs(self, base_specs, peft_params) -> Any:
    """D-sized axes take the adapted kernel's feature axis; the bottleneck is unsharded."""
    del peft_params
    specs = tree_lib.flatten(base_specs)

    def axis(site: DenseSite, which: str):
      w = specs.get(site.weight_path)
      n_in = len(site.in_shape)
      if w is None:
        return None
      axes = tuple(w)[:n_in] if which == 'in' else tuple(w)[n_in:]
      return axes[0] if len(axes) == 1 else None  # flattened multi-axis features: replicate

    out = {}
    for s in self._need_sites():
      d_in = axis(s.src, 'in') if s.src is not None else axis(s.out, 'out')
      d_out = axis(s.out, 'out')
      out[f'{s.path}/adapter/down/kernel'] = P(d_in, None)
      out[f'{s.path}/adapter/down/bias'] = P(None)
      out[f'{s.path}/adapter/up/kernel'] = P(None, d_out)
      out[f'{s.path}/adapter/up/bias'] = P(d_out)
    return tree_lib.unflatten(out)
