"""Per-layer activation ranges of a model whose layers run under one ``nn.scan``.

A scanned stack (``LlamaForCausalLM`` with ``scan_layers=True``) stores every layer's weights
under one path with a leading layer axis, ``layers/attn/q_proj/kernel (L, in, out)``, and calls
each layer inside the scan body, where the values a calibration observes cannot leave the loop.
Each layer has its own activation range all the same, so the ranges are observed on the model's
unrolled twin (``scan_layers=False``: ``layer_0/...``, ``layer_1/...``, the same computation)
and stacked back: ``ranges['layers/attn/q_proj'] = (lo (L,), hi (L,))``. The int8 model and QAT
read them per layer, as the scan slices them with the weights.

>>> ranges = calibrate(module, params, sites, batches, config.quant, input_keys)  # doctest: +SKIP
>>> ranges['layers/attn/q_proj'][0].shape                                        # doctest: +SKIP
(30,)
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.lora import Site

STACK = 'layers'  # the stack's subtree (LlamaForCausalLM's nn.scan)


def is_stacked(sites) -> bool:
  """Whether any site lies in a stack (a leading layer axis on its weight)."""
  return any(s.lead for s in sites)


def unrolled_module(module):
  """The module with its layers unrolled (``cfg.scan_layers=False``): the same computation,
  one ``layer_<i>`` subtree per layer. A ConfigError for a model that has no such twin."""
  cfg = getattr(module, 'cfg', None)
  if not (dataclasses.is_dataclass(cfg) and getattr(cfg, 'scan_layers', False)):
    raise ConfigError(
        f'{type(module).__name__}: its layers are stacked but it has no unrolled twin '
        '(cfg.scan_layers) to observe each layer\'s activations in; valid: '
        "quant.activations='dynamic' or 'none' for this model")
  return module.clone(cfg=dataclasses.replace(cfg, scan_layers=False))


def num_layers(params) -> int:
  """The stack's depth: the leading axis of the leaves under ``layers/``."""
  leaves = [v for p, v in tree_lib.flatten(params).items() if p.startswith(f'{STACK}/')]
  if not leaves:
    raise ConfigError(f'no stacked layers under {STACK}/ in the parameters')
  return int(leaves[0].shape[0])


def unroll(params, n: int) -> dict:
  """``layers/<rest> (L, ...)`` leaves as ``layer_<i>/<rest>`` slices; other leaves as they are.

  >>> unroll({'layers': {'w': jnp.arange(4).reshape(2, 2)}}, 2)['layer_1']['w']
  Array([2, 3], dtype=int32)
  """
  out = {}
  for p, v in tree_lib.flatten(params).items():
    if p.startswith(f'{STACK}/'):
      rest = p[len(STACK) + 1:]
      for i in range(n):
        out[f'layer_{i}/{rest}'] = v[i]
    else:
      out[p] = v
  return tree_lib.unflatten(out)


def unrolled_sites(sites, n: int) -> list[Site]:
  """The sites of the unrolled twin: a stacked site ``layers/<rest>`` becomes ``n`` sites
  ``layer_<i>/<rest>`` without the layer axis."""
  out = []
  for s in sites:
    if not s.lead:
      out.append(s)
      continue
    if not s.path.startswith(f'{STACK}/') or tuple(s.lead) != (n,):
      raise ConfigError(f'{s.path}: a stacked layer outside {STACK}/ (axes {s.lead}) cannot '
                        "be calibrated per layer; valid: quant.activations='dynamic' or 'none'")
    rest = s.path[len(STACK) + 1:]
    out += [dataclasses.replace(s, path=f'layer_{i}/{rest}', lead=()) for i in range(n)]
  return out


def restack(ranges: dict, n: int) -> dict:
  """The unrolled twin's ranges back on the stack: ``layer_<i>/<rest>`` -> ``layers/<rest>``
  with ``(lo (n,), hi (n,))``; unstacked paths as they are."""
  out, stacks = {}, {}
  for p, (lo, hi) in ranges.items():
    head, _, rest = p.partition('/')
    if head.startswith('layer_') and head[len('layer_'):].isdigit():
      stacks.setdefault(rest, {})[int(head[len('layer_'):])] = (lo, hi)
    else:
      out[p] = (lo, hi)
  for rest, per in stacks.items():
    if sorted(per) != list(range(n)):
      raise ValueError(f'ranges of {rest} for layers {sorted(per)}; expected 0..{n - 1}')
    out[f'{STACK}/{rest}'] = (jnp.stack([per[i][0] for i in range(n)]),
                              jnp.stack([per[i][1] for i in range(n)]))
  return out


def calibrate(module, params, sites, batches, q, input_keys) -> dict:
  """Activation ranges ``{layer path: (lo, hi)}`` of every dense site over ``batches``
  (:func:`peftjax.quant.qat.calibrate_ranges`), per layer for a stacked model (``lo``/``hi``
  then have the stack's shape ``(L,)``). ``params`` are the float weights the model runs with
  (a method merged in: the unrolled twin runs no method).

  >>> ranges = calibrate(model, merged, sites, batches[:8], config.quant, keys)  # doctest: +SKIP
  """
  from peftjax.quant import qat  # pylint: disable=g-import-not-at-top  (qat imports this module)
  keys = tuple(input_keys)
  if not is_stacked(sites):
    fwd = lambda p, b: module.apply({'params': p}, **{k: b[k] for k in keys})
    return qat.calibrate_ranges(fwd, params, list(sites), batches, q)
  n = num_layers(params)
  twin = unrolled_module(module)
  fwd = lambda p, b: twin.apply({'params': p}, **{k: b[k] for k in keys})
  ranges = qat.calibrate_ranges(fwd, unroll(params, n), unrolled_sites(sites, n), batches, q)
  return restack(ranges, n)
