"""Bottleneck adapters as a functional transform, selected as ``peft.method='adapter'``.

An adapter is a small residual MLP ``h -> h + up(act(down(h)))`` with ``down: (D, m)`` and
``up: (m, D)`` (both with bias, ``m = peft.adapter.size``). ``up`` starts at zero, so the model is
exactly unchanged at step 0. ``peft.adapter.kind`` picks the placement:

* ``'houlsby'`` (Houlsby et al., 2019): after the attention output projection (the output of the
  modules matching ``peft.adapter.attn_targets``, before the residual add and LayerNorm) and after
  the FFN (the output of ``peft.adapter.ffn_targets``);
* ``'pfeiffer'`` (Pfeiffer et al., 2021): only after the FFN;
* ``'parallel'`` (He et al., 2022): the adapter reads the FFN block's *input* — the input ``x`` of
  the sibling module matching ``peft.adapter.ffn_inputs`` (BERT's ``intermediate``) — and its
  result is added to the FFN output: ``FFN(x) + up(act(down(x)))``. The interceptor captures
  ``x`` when ``intermediate`` runs and adds the branch when ``output`` of the same parent module
  runs, so both must be called in that order within one trace (true of every standard
  Transformer block; a ``nn.remat``/``nn.scan`` boundary *between* the two calls would not work).

It runs through method interception (:mod:`peftjax.intercept`) and finds layers by module
path, so any linen or NNX model with those module names works unedited. The tree mirrors the base tree::

    encoder/layer_0/attention/out/adapter/{down,up}/{kernel,bias}
    encoder/layer_0/output/adapter/{down,up}/{kernel,bias}

Adapters add nonlinear computation, so they cannot be folded into the base weights:
:meth:`Adapter.merge` raises ``NotImplementedError``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.base import Method
from peftjax.peft.base import register
from peftjax.peft import layers
from peftjax.peft import sections
from peftjax.intercept import intercept_methods
from peftjax.peft.ia3 import DenseSite
from peftjax.peft.ia3 import dense_sites
from peftjax.peft.ia3 import match_module_paths

KINDS = ('houlsby', 'pfeiffer', 'parallel')
ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': lambda h: jax.nn.gelu(h, approximate=False)}


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


def adapter_paths(adapter_params) -> list[str]:
  """Module paths whose output gets an adapter (``<path>/adapter/...``), sorted.

  >>> adapter_paths({'l0': {'output': {'adapter': {'down': {'kernel': 0}}}}})
  ['l0/output']
  """
  suffix = '/adapter/down/kernel'
  return sorted(p[:-len(suffix)] for p in tree_lib.flatten(adapter_params) if p.endswith(suffix))


@contextlib.contextmanager
def adapter_scope(adapter_params, activation: str, ffn_inputs: str | None = None):
  """Context under which every adapted layer's output gets its adapter branch added.

  The tree names the adapted layers; the called layer gives its feature axes. With
  ``ffn_inputs`` (a module-path regex: the parallel kind) the branch reads the input of the
  sibling module it matches instead of the layer's output.

  >>> with adapter_scope(adapters, 'gelu'):  # doctest: +SKIP
  ...   logits = model.apply({'params': params}, ids, mask)
  """
  act = ACTIVATIONS[activation]
  outs = set(adapter_paths(adapter_params))
  by_parent = {p.rpartition('/')[0]: p for p in outs}
  src_rx = re.compile(ffn_inputs) if ffn_inputs is not None else None
  pending: dict[str, Any] = {}  # parallel: out path -> (the captured FFN input, its feature axes)
  flat = tree_lib.flatten(adapter_params)

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != '__call__' or layers.kind(mod) != 'dense':
      return next_fun(*args, **kwargs)
    path = layers.path(mod)
    out_of_src = by_parent.get(path.rpartition('/')[0])
    if src_rx is not None and out_of_src is not None and src_rx.search(path):
      x = args[0] if args else next(iter(kwargs.values()))
      pending[out_of_src] = (x, len(layers.contracted_axes(mod, x.ndim)))
    y = next_fun(*args, **kwargs)
    if path not in outs:
      return y
    # This call's adapter: from the layer's params (a scanned layer's slice), else the tree.
    p = layers.params(mod).get('adapter')
    if p is None:
      pre = f'{path}/adapter/'
      p = tree_lib.unflatten({k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)})
    if src_rx is None:
      h = _flat_features(y, layers.out_ndim(mod))
    else:
      if path not in pending:
        raise RuntimeError(f'parallel adapter at {path}: no sibling module matching '
                           f'{ffn_inputs!r} ran before it in this forward')
      h = _flat_features(*pending.pop(path))
    delta = _adapter(p, h, act, y.dtype)
    return y + delta.reshape(y.shape)

  with intercept_methods(interceptor):
    yield


def _parallel_sources(sites: dict[str, DenseSite], outs: list[str], pattern: str) -> list:
  """For each FFN output module, the sibling (same parent) module whose input feeds the adapter."""
  srcs = match_module_paths(sites, pattern, 'adapter.ffn_inputs')
  by_parent: dict[str, list] = {}
  for p in srcs:
    by_parent.setdefault(p.rsplit('/', 1)[0], []).append(p)
  pairs = []
  for out in outs:
    parent = out.rsplit('/', 1)[0]
    if len(by_parent.get(parent, ())) > 1:  # the forward finds the source by this match alone
      raise ConfigError(
          f'peft.adapter.ffn_inputs={pattern!r} matches several siblings of {out}: '
          f'{by_parent[parent]}; valid: a regex matching one module per block')
    if parent not in by_parent:
      raise ConfigError(
          f'peft.adapter.ffn_inputs={pattern!r} matches no sibling of {out} (a module under '
          f'{parent}/); matches: {srcs[:3]}')
    src = sites[by_parent[parent][0]]
    n = len(src.x_axes)
    if src.x_axes != tuple(range(src.x_axes[-1] - n + 1, src.x_axes[-1] + 1)):
      raise ConfigError(f'parallel adapter: {src.path} contracts input axes {src.x_axes}; the '
                        'adapter needs them trailing and in order')
    pairs.append(AdapterSite(sites[out], src))
  return pairs


@register('adapter')
class Adapter(Method):
  """Bottleneck adapters from config ``peft.adapter``: ``kind``, ``size``, ``activation``,
  and the module-path regexes ``attn_targets``, ``ffn_targets``,
  ``ffn_inputs``.

  >>> method = peft.build(config.peft)                          # doctest: +SKIP (method='adapter')
  >>> adapters = method.init(rng, model, params, inputs)        # doctest: +SKIP
  >>> logits = peft.apply(model, method, params, adapters, inputs)  # doctest: +SKIP
  """

  def _validate(self):
    sections.check_adapter(self.cfg.adapter)

  def init(self, rng, module, base_params, inputs) -> dict:
    """``down`` uniform in ±1/sqrt(D) (PyTorch's Linear default), ``up`` and biases zero."""
    self._validate()
    c = self.cfg.adapter
    found = dense_sites(module, base_params, inputs)
    ffn = match_module_paths(found, c.ffn_targets, 'adapter.ffn_targets')
    if c.kind == 'parallel':
      sites = _parallel_sources(found, ffn, c.ffn_inputs)
    else:
      sites = [AdapterSite(found[p]) for p in ffn]
      if c.kind == 'houlsby':
        attn = match_module_paths(found, c.attn_targets, 'adapter.attn_targets')
        sites = [AdapterSite(found[p]) for p in attn] + sites
    m = int(c.size)
    flat = {}
    for s in sites:
      key = jax.random.fold_in(rng, zlib.crc32(s.path.encode()))
      bound = 1.0 / np.sqrt(s.d_in)
      lead = tuple(s.out.lead)  # a stacked layer (nn.scan) gets one adapter per layer
      flat[f'{s.path}/adapter/down/kernel'] = jax.random.uniform(
          key, (*lead, s.d_in, m), jnp.float32, -bound, bound)
      flat[f'{s.path}/adapter/down/bias'] = jnp.zeros((*lead, m), jnp.float32)
      # Zero up-projection: the branch adds exactly 0 until the first update.
      flat[f'{s.path}/adapter/up/kernel'] = jnp.zeros((*lead, m, s.d_out), jnp.float32)
      flat[f'{s.path}/adapter/up/bias'] = jnp.zeros((*lead, s.d_out), jnp.float32)
    return tree_lib.unflatten(flat)

  def layer_tree(self, peft_params) -> dict:
    """The whole tree: each adapter sits beside the layer whose output it adds to."""
    return peft_params

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del rng, deterministic  # no adapter dropout; the model's own dropout follows the adapter
    c = self.cfg.adapter
    return adapter_scope(peft_params, c.activation,
                         c.ffn_inputs if c.kind == 'parallel' else None)

  def merge(self, base_params, peft_params) -> dict:
    del base_params, peft_params
    raise NotImplementedError(
        f"peft.method='adapter' (kind {self.cfg.adapter.kind!r}) cannot be merged: the adapter "
        'is a nonlinear branch, not a change of the base weights. Export the adapter-only '
        "parameters instead, or use a mergeable method ('lora', 'ia3').")

  def logical_specs(self, base_specs, peft_params) -> Any:
    """D-sized axes take the adapted kernel's feature axis; the bottleneck is unsharded."""
    specs = tree_lib.flatten(base_specs)

    lp = tree_lib.flatten(peft_params)

    def axis(path: str, which: str, k: int):
      # The bias has the layer's output axes, which splits the kernel's axes into in / out;
      # without a bias only a 2-d kernel splits for sure (else replicate: always valid).
      # ``k`` leading axes are a stack's (nn.scan), on the kernel and the bias alike.
      w, bias = specs.get(f'{path}/kernel'), specs.get(f'{path}/bias')
      if w is None or (bias is None and len(w) != 2 + k):
        return None
      n_in = len(w) - (len(bias) - k if bias is not None else 1)
      axes = tuple(w)[k:n_in] if which == 'in' else tuple(w)[n_in:]
      return axes[0] if len(axes) == 1 else None  # flattened multi-axis features: replicate

    c = self.cfg.adapter
    modules = {p[:-len('/kernel')] for p in specs if p.endswith('/kernel')}
    rx = re.compile(c.ffn_inputs)
    out = {}
    for path in adapter_paths(peft_params):
      k = lp[f'{path}/adapter/down/kernel'].ndim - 2
      w = specs.get(f'{path}/kernel')
      lead = tuple(w)[:k] if w is not None else (None,) * k
      parent = path.rpartition('/')[0]
      src = next((m for m in sorted(modules) if m.rpartition('/')[0] == parent and rx.search(m)),
                 None) if c.kind == 'parallel' else None
      d_in = axis(src, 'in', k) if src is not None else axis(path, 'out', k)
      d_out = axis(path, 'out', k)
      out[f'{path}/adapter/down/kernel'] = P(*lead, d_in, None)
      out[f'{path}/adapter/down/bias'] = P(*lead, None)
      out[f'{path}/adapter/up/kernel'] = P(*lead, None, d_out)
      out[f'{path}/adapter/up/bias'] = P(*lead, d_out)
    return tree_lib.unflatten(out)
