"""One adapter in a form a library can stack: its parts per layer, validated against a base.

:func:`parse` turns a trainable partition ``{'base': ..., 'peft': ...}`` of a supported method
(``lora``, ``ia3``, ``lora+ia3``, ``bitfit``, ``linear_probe``) into an :class:`Adapter`, checking
every leaf against the base model's layers: a site that does not exist, a shape that does not
fit (an adapter trained for another model shape), a rank above the library's padded maximum.
Nothing here mutates anything: a library validates the whole adapter before it changes state.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from peftjax import tree as tree_lib
from peftjax.errors import UserInputError
from peftjax.peft import sections as peft_sections
from peftjax.peft.lora import Site

SERVABLE = ('lora', 'ia3', 'lora+ia3', 'bitfit', 'linear_probe')


class AdapterError(UserInputError):
  """An adapter a library cannot take: unsupported method, wrong shapes, rank too large..."""


@dataclasses.dataclass
class Adapter:
  """An adapter's parts, by module path (float32 numpy arrays, unpadded).

  ``lora[path] = (A, B)`` with the update ``scale·(x·A)·B``; ``ia3_out`` / ``ia3_in`` the IA3
  vectors; ``base[leaf path]`` the trained base leaves (head kernel and bias, BitFit biases) at
  their full values.
  """
  method: str
  peft_config: dict
  scale: float = 1.0
  lora: dict = dataclasses.field(default_factory=dict)
  ia3_out: dict = dataclasses.field(default_factory=dict)
  ia3_in: dict = dataclasses.field(default_factory=dict)
  base: dict = dataclasses.field(default_factory=dict)
  manifest: dict | None = None
  source: str = ''

  @property
  def rank(self) -> int:
    return max((a.shape[-1] for a, _ in self.lora.values()), default=0)

  def trainable(self) -> dict:
    """The trainable partition ``{'base', 'peft'}`` (as training produced it)."""
    lora = {}
    for p, (a, b) in self.lora.items():
      lora[f'{p}/lora_a'], lora[f'{p}/lora_b'] = a, b
    ia3 = {**{f'{p}/ia3_out/scale': v for p, v in self.ia3_out.items()},
           **{f'{p}/ia3_in/scale': v for p, v in self.ia3_in.items()}}
    peft = {'lora': lora, 'ia3': ia3}
    if self.method == 'lora+ia3':
      peft = {k: tree_lib.unflatten(v) for k, v in peft.items()}
    else:
      peft = tree_lib.unflatten(lora if self.method == 'lora' else ia3)
    return {'base': tree_lib.unflatten(self.base), 'peft': peft}


def lora_scale(peft_config: dict) -> float:
  """``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``) of the ``lora`` section, as
  :class:`peftjax.peft.LoRA` uses."""
  lora = peft_config['lora']
  rank = float(lora['rank'])
  return float(lora['alpha']) / (np.sqrt(rank) if lora.get('rslora') else rank)


def _fail(where: str, msg: str):
  raise AdapterError(f'{where}: {msg}')


def parse(trainable: dict, method: str, peft_config: dict, *, sites: dict[str, Site],
          base_flat: dict, biased: set[str], max_rank: int, where: str = 'adapter') -> Adapter:
  """Validates ``trainable`` against the base and returns its :class:`Adapter`.

  ``sites`` maps module paths to the base's dense/embedding layers, ``base_flat`` the base
  leaves, ``biased`` the module paths whose bias a per-example delta may vary (dense and
  LayerNorm layers); ``where`` names the adapter in messages.
  """
  if method not in SERVABLE:
    _fail(where, f'method {method!r} cannot be served from a library; servable: '
          f'{", ".join(SERVABLE)} (merge other methods into the base instead)')
  peft = tree_lib.flatten(trainable.get('peft', {}))
  if method == 'lora+ia3':
    peft = {k.split('/', 1)[1]: v for k, v in peft.items()}
  # In sections (peftjax.peft.sections) also when it comes flat from an older file.
  ad = Adapter(method=method, peft_config=peft_sections.upgrade(dict(peft_config)))
  names = {'lora_a', 'lora_b'} if 'lora' in method else set()
  pairs: dict[str, dict] = {}
  for path, v in peft.items():
    v = np.asarray(v, np.float32)
    module, leaf = path.rsplit('/', 1)
    if leaf in names:
      pairs.setdefault(module, {})[leaf] = v
    elif 'ia3' in method and path.endswith(('/ia3_out/scale', '/ia3_in/scale')):
      mod, kind = path.rsplit('/', 2)[:2]
      site = sites.get(mod)
      if site is None or site.kind != 'dense':
        _fail(where, f'{path!r}: the base has no dense layer {mod!r}')
      want = site.out_shape if kind == 'ia3_out' else site.in_shape
      if v.shape != tuple(want):
        _fail(where, f'{path!r} has shape {v.shape} but the base layer needs {tuple(want)}: '
              'the adapter was trained for another model shape')
      getattr(ad, kind)[mod] = v
    else:
      _fail(where, f'unexpected leaf {path!r} for method {method!r}')
  for module, ab in sorted(pairs.items()):
    site = sites.get(module)
    if site is None or site.kind not in ('dense', 'embed'):
      _fail(where, f'LoRA site {module!r} is not a dense or embedding layer of the base; '
            f'e.g. {sorted(sites)[:3]}')
    if set(ab) != {'lora_a', 'lora_b'}:
      _fail(where, f'LoRA site {module!r} has {sorted(ab)}; it needs lora_a and lora_b')
    a, b = ab['lora_a'], ab['lora_b']
    r = a.shape[-1]
    if a.shape != (*site.in_shape, r) or b.shape != (r, *site.out_shape):
      _fail(where, f'LoRA site {module!r} has A {a.shape}, B {b.shape} but the base layer '
            f'needs A {(*site.in_shape, r)}, B {(r, *site.out_shape)}: the adapter was trained '
            'for another model shape')
    if r > max_rank:
      _fail(where, f'LoRA rank {r} at {module!r} exceeds the library max_rank={max_rank}; '
            f'build the library with max_rank >= {r}')
    ad.lora[module] = (a, b)
  if ad.lora:
    lora_cfg = ad.peft_config.get('lora') or {}
    bad = {f'lora.{k}': lora_cfg.get(k) for k in ('rank', 'alpha')
           if not isinstance(lora_cfg.get(k), (int, float)) or lora_cfg.get(k) <= 0}
    if bad:
      _fail(where, f'its peft_config has {bad}; a LoRA adapter needs positive rank and alpha '
            '(its scale is alpha/rank)')
    ad.scale = lora_scale(ad.peft_config)
  for path, v in tree_lib.flatten(trainable.get('base', {})).items():
    v = np.asarray(v, np.float32)
    if path not in base_flat:
      _fail(where, f'trained base leaf {path!r} does not exist in the base model')
    if v.shape != np.shape(base_flat[path]):
      _fail(where, f'trained base leaf {path!r} has shape {v.shape}, the base '
            f'{np.shape(base_flat[path])}: the adapter was trained for another model shape '
            '(e.g. another number of classes)')
    module, leaf = path.rsplit('/', 1)
    ok = ((leaf == 'kernel' and module in sites and sites[module].kind == 'dense')
          or (leaf == 'bias' and module in biased))
    if not ok:
      _fail(where, f'trained base leaf {path!r} cannot vary per adapter (only dense kernels and '
            'dense/LayerNorm biases can); merge this adapter into the base instead')
    ad.base[path] = v
  return ad


def slot_values(ad: Adapter, layout, base_flat: dict) -> dict[tuple, np.ndarray]:
  """The adapter's entries in a library's stacks (see :mod:`peftjax.serving.stacked`), keyed by
  ``(group, module path[, 'a' | 'b'])``; parts the adapter does not have are left out (they stay
  at identity)."""
  r = layout.rank
  out = {}
  for path, (a, b) in ad.lora.items():
    pad = r - a.shape[-1]
    out['lora', path, 'a'] = np.concatenate([a, np.zeros((*a.shape[:-1], pad), np.float32)], -1)
    out['lora', path, 'b'] = np.concatenate(
        [b * np.float32(ad.scale), np.zeros((pad, *b.shape[1:]), np.float32)], 0)
  for path, v in ad.ia3_out.items():
    out['ia3_out', path] = v
  for path, v in ad.ia3_in.items():
    out['ia3_in', path] = v
  for leaf, v in ad.base.items():
    module, name = leaf.rsplit('/', 1)
    out[name, module] = v - np.asarray(base_flat[leaf], np.float32)
  return out
