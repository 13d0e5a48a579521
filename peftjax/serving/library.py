"""An adapter library: many named adapters over one frozen base, swappable and servable together.

* ``load(name, path)`` reads a delta checkpoint (:mod:`peftjax.delta`), verifies it belongs to
  this base (content hash), checks every tensor against the base's layers, and only then adds it
  (or replaces the adapter of that name in place: a hot swap). A failed load changes nothing.
* Every adapter lives in one set of stacked arrays (:mod:`peftjax.serving.stacked`): LoRA ranks
  padded to ``max_rank``, slots rounded up to a power of two. Switching the active adapter, or
  replacing an adapter by one with the same layers, reuses the compiled program: the adapter is
  an argument, not a constant.
* ``logits(inputs, adapters=[...])`` runs a batch where every example names its own adapter, in
  one jitted forward pass.
* ``combine`` makes weighted merges (:mod:`peftjax.serving.merge`); ``merged_params`` folds one
  adapter into the base for export; ``save`` writes any adapter back as a delta checkpoint.

>>> lib = AdapterLibrary(model, base_params, max_rank=16)            # doctest: +SKIP
>>> lib.load('sentiment', 'runs/a/adapter.safetensors')               # doctest: +SKIP
>>> lib.load('topic', 'runs/b/adapter.safetensors')                   # doctest: +SKIP
>>> lib.logits(batch, adapters=['sentiment', 'topic', 'topic', ...])  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import delta
from peftjax import tree as tree_lib
from peftjax.models.build import sample_inputs
from peftjax.peft import ia3 as ia3_lib
from peftjax.peft import lora as lora_lib
from peftjax.serving import merge as merge_lib
from peftjax.serving.adapter import Adapter
from peftjax.serving.adapter import AdapterError
from peftjax.serving.adapter import parse
from peftjax.serving.adapter import slot_values
from peftjax.serving.stacked import Layout
from peftjax.serving.stacked import empty_stacks
from peftjax.serving.stacked import stacked_scope

BERT_INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class AdapterLibrary:
  """Named adapters over one base model (see the module docstring).

  ``max_rank`` is the padded LoRA rank every adapter must fit; ``slots`` fixes the number of
  adapter slots (default: the next power of two, so adding adapters rarely changes shapes).
  ``compiles`` counts how many times the forward pass was traced (one per distinct layout,
  slot count, batch shape and index kind).
  """

  def __init__(self, module: nn.Module, base_params: dict, *, input_keys=BERT_INPUTS,
               max_rank: int = 16, slots: int | None = None, base_source: str = ''):
    if max_rank < 1:
      raise AdapterError(f'max_rank={max_rank} is invalid; valid: a positive integer')
    if slots is not None and slots < 1:
      raise AdapterError(f'slots={slots} is invalid; valid: None (automatic) or >= 1')
    self.module = module
    self.input_keys = tuple(input_keys)
    self.max_rank = int(max_rank)
    self.base_source = base_source
    self.base = jax.tree.map(jnp.asarray, base_params)
    self._base_flat = {p: np.asarray(v) for p, v in tree_lib.flatten(base_params).items()}
    inputs = sample_inputs(self.input_keys)
    found = lora_lib.find_sites(module, base_params, inputs, r'(kernel|embedding)$',
                                field='library', conv=True, experts=True)
    stacked = sorted(s.path for s in found if s.lead)
    if stacked:  # one slot table per layer would need the stack's axis in every slot
      raise AdapterError(f'the adapter library serves unstacked layers; {stacked[:3]} are '
                         'stacked by nn.scan. Serve a merged model (method.merge), or the '
                         'model with its stack unrolled')
    self._sites = {s.path: s for s in found if s.kind in ('dense', 'embed')}
    types = (nn.Dense, nn.DenseGeneral, nn.LayerNorm)
    self._biased = {p for p in lora_lib._record_modules(module, base_params, inputs, types)
                    if f'{p}/bias' in self._base_flat}
    self._fixed_slots = slots
    self._adapters: dict[str, Adapter] = {}
    self._slot: dict[str, int] = {}
    self._hashes: dict[frozenset, str] = {}
    self.active: str | None = None
    self.layout = Layout(rank=self.max_rank)
    self.stacks = jax.tree.map(jnp.asarray, empty_stacks(self.layout, 1, self._base_flat))
    self.compiles = 0
    self._fn = self._make_fn()

  # ---------------------------------------------------------------- queries
  @property
  def names(self) -> list[str]:
    return list(self._adapters)

  @property
  def slots(self) -> int:
    return int(jax.tree.leaves(self.stacks)[0].shape[0]) if jax.tree.leaves(self.stacks) else 1

  def __getitem__(self, name: str) -> Adapter:
    self._check_names([name])
    return self._adapters[name]

  def __len__(self) -> int:
    return len(self._adapters)

  def _check_names(self, names):
    unknown = sorted({n for n in names if n not in self._adapters})
    if unknown:
      raise AdapterError(f'unknown adapter {unknown[0]!r}; loaded: {self.names or "none"}')

  # ---------------------------------------------------------------- loading
  def frozen_hash(self, trained_base_paths) -> str:
    """The hash of the base minus the leaves an adapter trains (what training hashed)."""
    key = frozenset(trained_base_paths)
    if key not in self._hashes:
      self._hashes[key] = delta.base_hash(
          {p: v for p, v in self._base_flat.items() if p not in key})
    return self._hashes[key]

  def load(self, name: str, path: str | pathlib.Path) -> dict:
    """Adds (or hot-swaps in place) adapter ``name`` from a delta checkpoint; its manifest.

    Everything is checked before the library changes: a :class:`~peftjax.delta.DeltaError` for a
    missing, truncated, altered or incomplete file or a file for another base (both hashes
    named); an :class:`AdapterError` for shapes of another model or a rank above ``max_rank``.
    """
    trainable, manifest = delta.load_delta(path)
    ad = self._parse(trainable, manifest['method'], manifest['peft_config'],
                     where=f'adapter {name!r} ({path})')
    frozen = self.frozen_hash(ad.base)
    if frozen != manifest['base']['sha256']:
      delta.check_base(manifest, {p: v for p, v in self._base_flat.items()
                                  if p not in ad.base}, path)
    ad.manifest, ad.source = manifest, str(path)
    self.add(name, ad)
    return manifest

  def _parse(self, trainable, method, peft_config, where) -> Adapter:
    return parse(trainable, method, dict(peft_config), sites=self._sites,
                 base_flat=self._base_flat, biased=self._biased, max_rank=self.max_rank,
                 where=where)

  def add_trained(self, name: str, trainable: dict, method: str, peft_config) -> Adapter:
    """Adds an adapter from a trainable partition in memory (e.g. right after training)."""
    cfg = peft_config.to_dict() if hasattr(peft_config, 'to_dict') else dict(peft_config)
    ad = self._parse(jax.device_get(trainable), method, cfg, where=f'adapter {name!r}')
    self.add(name, ad)
    return ad

  def add(self, name: str, ad: Adapter) -> None:
    """Puts a parsed :class:`Adapter` in slot ``name`` (replacing one of that name)."""
    if not isinstance(name, str) or not name:
      raise AdapterError(f'adapter name {name!r} is invalid; valid: a non-empty string')
    if ad.rank > self.max_rank:
      raise AdapterError(f'adapter {name!r} has LoRA rank {ad.rank} > max_rank={self.max_rank}')
    layout = self._layout_with(ad)
    n = len(self._adapters) + (name not in self._adapters)
    slots = self._fixed_slots or max(_pow2(n), self.slots)
    if self._fixed_slots and n > self._fixed_slots:
      raise AdapterError(f'the library has slots={self._fixed_slots}, all in use by '
                         f'{self.names}; remove one first')
    if layout == self.layout and slots == self.slots:
      slot = self._slot.get(name, self._free_slot())
      stacks = self._write(self.stacks, slot, ad, layout)
      self.stacks, self._slot[name], self._adapters[name] = stacks, slot, ad
    else:  # new layers or more slots: new shapes, so rebuild every stack
      adapters = {**self._adapters, name: ad}
      order = list(self._adapters) + ([name] if name not in self._adapters else [])
      host = empty_stacks(layout, slots, self._base_flat)
      slot_of = {**self._slot}
      slot_of.setdefault(name, self._free_slot())
      for n_, a in adapters.items():
        for key, v in slot_values(a, layout, self._base_flat).items():
          _leaf(host, key)[slot_of[n_]] = v
      self.stacks = jax.tree.map(jnp.asarray, host)
      # Compile the slot writer for these shapes now (a no-op write), so that later hot swaps
      # compile nothing.
      _write_slot(self.stacks, jnp.asarray(0, jnp.int32), jax.tree.map(lambda x: x[:1],
                                                                         self.stacks))
      new_layout = layout != self.layout
      self.layout, self._adapters, self._slot = layout, {k: adapters[k] for k in order}, slot_of
      if new_layout:  # the layout is part of the program; slot counts only change shapes
        self._fn = self._make_fn()
    if self.active is None:
      self.active = name

  def remove(self, name: str) -> None:
    """Drops adapter ``name`` (its slot is reset to identity and reused)."""
    self._check_names([name])
    slot = self._slot.pop(name)
    del self._adapters[name]
    blank = Adapter(method='lora', peft_config={})
    self.stacks = self._write(self.stacks, slot, blank, self.layout)
    if self.active == name:
      self.active = self.names[0] if self.names else None

  def activate(self, name: str) -> None:
    """Makes ``name`` the adapter :meth:`logits` uses by default. No recompilation."""
    self._check_names([name])
    self.active = name

  def _free_slot(self) -> int:
    used = set(self._slot.values())
    return next(i for i in range(len(used) + 1) if i not in used)

  def _layout_with(self, ad: Adapter) -> Layout:
    """The current layout extended by the layers ``ad`` uses (sorted, so order-independent)."""
    cur = self.layout
    union = lambda old, new: tuple(sorted({*old, *new}, key=lambda s: s.path))
    kernels = [self._sites[p.rsplit('/', 1)[0]] for p in ad.base if p.endswith('/kernel')]
    biases = [p.rsplit('/', 1)[0] for p in ad.base if p.endswith('/bias')]
    return Layout(
        rank=self.max_rank,
        lora=union(cur.lora, [self._sites[p] for p in ad.lora]),
        ia3_out=union(cur.ia3_out, [self._sites[p] for p in ad.ia3_out]),
        ia3_in=union(cur.ia3_in, [self._sites[p] for p in ad.ia3_in]),
        kernels=union(cur.kernels, kernels),
        biases=tuple(sorted({*cur.biases, *biases})))

  def _write(self, stacks, slot: int, ad: Adapter, layout: Layout):
    """``stacks`` with slot ``slot`` holding ``ad`` (identity where ``ad`` has no part).

    One jitted update with the slot as an argument: a hot swap compiles nothing after the
    first write at these shapes.
    """
    values = empty_stacks(layout, 1, self._base_flat)
    for key, v in slot_values(ad, layout, self._base_flat).items():
      _leaf(values, key)[0] = v
    return _write_slot(stacks, jnp.asarray(slot, jnp.int32), values)

  # ---------------------------------------------------------------- running
  def _make_fn(self):
    layout, module = self.layout, self.module

    def forward(base, stacks, inputs, index):
      self.compiles += 1  # runs once per trace
      with stacked_scope(layout, stacks, index):
        return module.apply({'params': base}, **inputs, deterministic=True)

    return jax.jit(forward)

  def index(self, adapters: str | Sequence[str] | None = None):
    """The slot index for :meth:`logits`: a scalar for one adapter, a vector per example."""
    if adapters is None:
      if self.active is None:
        raise AdapterError('the library has no adapters; load one first')
      adapters = self.active
    if isinstance(adapters, str):
      self._check_names([adapters])
      return jnp.asarray(self._slot[adapters], jnp.int32)
    self._check_names(adapters)
    return jnp.asarray([self._slot[a] for a in adapters], jnp.int32)

  def logits(self, inputs: dict, adapters: str | Sequence[str] | None = None):
    """Logits of ``inputs`` (a batch dict) under the active adapter, one named adapter, or one
    adapter per example (a list as long as the batch)."""
    index = self.index(adapters)
    inputs = {k: inputs[k] for k in self.input_keys if k in inputs}
    if index.ndim == 1:
      batch = next(iter(inputs.values())).shape[0]
      if index.shape[0] != batch:
        raise AdapterError(f'adapters names {index.shape[0]} adapters for a batch of {batch}; '
                           'give one per example')
    return self._fn(self.base, self.stacks, inputs, index)

  # ---------------------------------------------------------------- merges and export
  def combine(self, new_name: str, weights: dict[str, float], *, combination: str = 'cat',
              rank: int | None = None) -> Adapter:
    """Adds ``new_name``: the weighted merge of loaded adapters (see :func:`merge.weighted`)."""
    self._check_names(list(weights))
    ad = merge_lib.weighted([self._adapters[n] for n in weights], list(weights.values()),
                            combination=combination, rank=rank, names=list(weights))
    if ad.rank > self.max_rank:
      raise AdapterError(f'merge {new_name!r} has LoRA rank {ad.rank} > max_rank='
                         f"{self.max_rank}; use combination='svd' with rank=<= {self.max_rank}")
    merged = self._parse(ad.trainable(), ad.method, ad.peft_config, where=f'merge {new_name!r}')
    first = self._adapters[next(iter(weights))].manifest or {}
    merged.manifest = {'base': first.get('base', {}), 'class_names': first.get('class_names'),
                       'params': {'sha256': tree_lib.fingerprint(merged.trainable())},
                       **ad.manifest}
    self.add(new_name, merged)
    return merged

  def merged_params(self, name: str) -> dict:
    """The base with adapter ``name`` folded in: a plain model, as fast as the base, to export.

    Equal to running the adapter (to float rounding): IA3 is folded first, then LoRA on top,
    the order of ``peft.method='lora+ia3'``.
    """
    ad = self[name]
    flat = dict(self._base_flat)
    flat.update(ad.base)
    params = tree_lib.unflatten(flat)
    if ad.ia3_out or ad.ia3_in:
      vecs = {**{f'{p}/ia3_out/scale': v for p, v in ad.ia3_out.items()},
              **{f'{p}/ia3_in/scale': v for p, v in ad.ia3_in.items()}}
      params = ia3_lib.fold(params, tree_lib.unflatten(vecs))  # the paths are in the tree
    if ad.lora:
      lp = {}
      for p, (a, b) in ad.lora.items():
        lp[f'{p}/lora_a'], lp[f'{p}/lora_b'] = a, b
      params = lora_lib.fold(params, [self._sites[p] for p in ad.lora], tree_lib.unflatten(lp),
                             ad.scale)
    return jax.tree.map(np.asarray, params)

  def save(self, name: str, path: str | pathlib.Path) -> dict:
    """Writes adapter ``name`` as a delta checkpoint (its manifest's provenance kept)."""
    ad = self[name]
    m = ad.manifest or {}
    frozen = {p: v for p, v in self._base_flat.items() if p not in ad.base}
    return delta.save_delta(
        path, ad.trainable(), base_params=frozen, method=ad.method, peft_config=ad.peft_config,
        base_source=m.get('base', {}).get('source', self.base_source),
        model_config=m.get('base', {}).get('model_config'), class_names=m.get('class_names'),
        dataset=m.get('dataset'), metrics=m.get('metrics'),
        parent={'path': ad.source, 'params_sha256': m.get('params', {}).get('sha256')}
        if ad.source else None, merged_from=m.get('merged_from'))


@jax.jit
def _write_slot(stacks, slot, values):
  """``stacks`` with entry ``slot`` of every array replaced by ``values`` (leading dim 1)."""
  return jax.tree.map(lambda s, v: jax.lax.dynamic_update_slice_in_dim(s, v.astype(s.dtype),
                                                                       slot, 0),
                      stacks, values)


def _leaf(stacks: dict, key: tuple):
  node = stacks
  for k in key:
    node = node[k]
  return node
