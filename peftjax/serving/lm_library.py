"""A library of causal-LM adapters over one frozen base, generating together in one batch.

Every request of a decode batch names its adapter, and all of them run in one jitted prefill
and one jitted decode step (:func:`peftjax.generation.generate`'s programs):

* LoRA of any rank up to ``max_rank`` (rsLoRA too: the scale is folded into ``B``, the rank
  zero-padded) and IA3 (``'lora+ia3'`` too) live in per-slot stacks beside the weights they
  adapt, sliced per layer by the layer scan, and are applied per row
  (:mod:`peftjax.serving.lm_slots`);
* prompt and prefix tuning live as a per-slot prefix ``(slots, L, 2, max_prefix, kv_heads,
  head_dim)`` + its length, computed once when the adapter is added
  (:func:`peftjax.generation.method_prefix`; soft prompts become per-layer keys and values,
  exactly equivalent); a batch's cache is made with each row's prefix
  (``init_cache(prefix_kv=..., prefix_mask=...)``: shorter prefixes are masked padding).

Slot 0 is the base model (the name :data:`BASE`); slots are a power of two. Replacing an
adapter by one that uses the same layers (any rank up to ``max_rank``, any prefix up to the
library's padded length) keeps every shape: a hot swap compiles nothing, and neither does any
other mix of adapters in a batch. Each row's tokens equal its adapter's generation alone
(:meth:`alone`), greedy, token for token.

>>> lib = LMAdapterLibrary(model, params, max_rank=16)                    # doctest: +SKIP
>>> lib.load('sql', 'runs/sql/adapter.safetensors')                        # doctest: +SKIP
>>> lib.add_method('poet', prompt_method, prompt_params)                   # doctest: +SKIP
>>> out = lib.generate(ids, lengths, ['sql', 'poet', 'base'], max_new_tokens=32)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from peftjax import delta
from peftjax import generation
from peftjax import tree as tree_lib
from peftjax.models.llama import LlamaForCausalLM
from peftjax.models.llama import init_cache
from peftjax.peft import ia3 as ia3_lib
from peftjax.peft import lora as lora_lib
from peftjax.peft import sections as peft_sections
from peftjax.serving.adapter import AdapterError
from peftjax.serving.adapter import lora_scale
from peftjax.serving.lm_slots import SLOTS

BASE = 'base'  # the reserved name of slot 0: the base model, no adapter
SERVABLE = ('lora', 'ia3', 'lora+ia3', 'prompt', 'prefix')
# Methods a library cannot serve per row, and why (merge them into a base of their own).
_WHY_NOT = {
    'dora': "DoRA rescales each column of the merged weight by its magnitude vector",
    'pissa': "PiSSA's factors are relative to its own residual base, not this one",
    'adapter': 'bottleneck adapters add layers of their own',
    'full': 'full fine-tuning changes the base itself',
    'bitfit': 'BitFit trains the base biases',
    'linear_probe': 'a linear probe trains a head of the base',
}


def check_servable(method: str, where: str) -> None:
  """Refuses (naming ``where`` and why) a method an LM library cannot serve per row.

  >>> check_servable('lora', 'adapter a')
  """
  if method in SERVABLE:
    return
  parts = str(method).split('+')
  why = next((_WHY_NOT[p] for p in parts if p in _WHY_NOT), 'it is not servable per row')
  raise AdapterError(f'{where}: method {method!r} cannot be served from an LM library ({why}); '
                     f'servable: {", ".join(SERVABLE)}. Merge it into the base instead '
                     '(python -m peftjax.export) and serve that model')


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass
class LMAdapter:
  """One adapter as a library holds it (float32 numpy, unpadded).

  ``lora[path] = (A, B)`` with a scanned layer's stack axis leading (``(L, *in, r)``,
  ``(L, r, *out)``) and the update ``scale·(x·A)·B``; ``ia3_out`` / ``ia3_in`` the IA3 vectors
  (``(L, *out)``, ``(L, *in)``); ``prefix`` ``(L, 2, n, kv_heads, head_dim)`` for prompt and
  prefix tuning. ``method_obj`` and ``peft_params`` are the method and its tree as trained (what
  :meth:`LMAdapterLibrary.alone` runs).
  """
  method: str
  peft_config: dict
  peft_params: Any = None
  method_obj: Any = dataclasses.field(default=None, repr=False)
  scale: float = 1.0
  lora: dict = dataclasses.field(default_factory=dict)
  ia3_out: dict = dataclasses.field(default_factory=dict)
  ia3_in: dict = dataclasses.field(default_factory=dict)
  prefix: np.ndarray | None = None
  manifest: dict | None = None
  source: str = ''

  @property
  def rank(self) -> int:
    return max((a.shape[-1] for a, _ in self.lora.values()), default=0)

  @property
  def prefix_length(self) -> int:
    return 0 if self.prefix is None else int(self.prefix.shape[2])


@dataclasses.dataclass(frozen=True)
class LMLayout:
  """The static structure of a library's stacks: equal layouts and slot counts share programs."""
  rank: int                       # padded LoRA rank R
  lora: tuple[str, ...] = ()      # module paths with LoRA in some slot
  ia3_out: tuple[str, ...] = ()
  ia3_in: tuple[str, ...] = ()
  prefix: int = 0                 # padded prefix length (0: no slot has a prefix)


class LMAdapterLibrary:
  """Named causal-LM adapters over one frozen base (see the module docstring).

  ``module`` a :class:`~peftjax.models.llama.LlamaForCausalLM` (scanned or unrolled layers,
  tied or untied output layer) and ``base_params`` its weights; ``max_rank`` the padded LoRA
  rank every adapter must fit; ``max_prefix`` the padded prefix length (None: grown to the next
  power of two as prefixes arrive, which changes shapes); ``slots`` a fixed slot count (None:
  the next power of two above the adapters + the base slot, never shrinking).
  """

  def __init__(self, module, base_params: dict, *, max_rank: int = 16,
               max_prefix: int | None = None, slots: int | None = None, base_source: str = ''):
    if not isinstance(module, LlamaForCausalLM):
      raise AdapterError(f'LMAdapterLibrary serves a LlamaForCausalLM; got '
                         f'{type(module).__name__} (the encoder library is AdapterLibrary)')
    for field, value, low in (('max_rank', max_rank, 1), ('max_prefix', max_prefix, 1),
                              ('slots', slots, 2)):
      if value is not None and (not isinstance(value, int) or value < low):
        raise AdapterError(f'{field}={value!r} is invalid; valid: an integer >= {low}'
                           + ('' if field == 'max_rank' else ' or None (automatic)'))
    self.module, self.cfg = module, module.cfg
    self.max_rank, self.max_prefix, self.base_source = int(max_rank), max_prefix, base_source
    self.base = jax.tree.map(jnp.asarray, base_params)
    inputs = {'input_ids': jnp.ones((1, 8), jnp.int32)}
    found = lora_lib.find_sites(module, self.base, inputs, r'(kernel|embedding)$',
                                field='library')
    self._sites = {s.path: s for s in found}
    self._fixed_slots = slots
    self._adapters: dict[str, LMAdapter] = {}
    self._slot: dict[str, int] = {}
    self._hash: str | None = None
    self.layout = LMLayout(rank=self.max_rank)
    self.stacks = _device(self._host_stacks(self.layout, slots or 2))
    self.compiles = 0  # traces of logits()
    self._logits_fn = self._make_logits()

  # ---------------------------------------------------------------- queries
  @property
  def names(self) -> list[str]:
    return list(self._adapters)

  @property
  def slots(self) -> int:
    return int(self.stacks['prefix']['length'].shape[0])

  def __getitem__(self, name: str) -> LMAdapter:
    self._check_names([name], base_ok=False)
    return self._adapters[name]

  def __len__(self) -> int:
    return len(self._adapters)

  def _check_names(self, names, *, base_ok: bool = True, where: str = 'adapter'):
    for n in names:
      if not isinstance(n, str) or n not in self._adapters and not (base_ok and n == BASE):
        valid = ([BASE] if base_ok else []) + self.names
        raise AdapterError(f'{where} {n!r} is not in the library; valid: '
                           f'{", ".join(map(repr, valid)) or "none loaded"}')

  def slot_of(self, name: str) -> int:
    """The slot of adapter ``name`` (0 for :data:`BASE`)."""
    self._check_names([name])
    return 0 if name == BASE else self._slot[name]

  # ---------------------------------------------------------------- loading
  def base_hash(self) -> str:
    """The content hash of the base (what an adapter file's manifest names), computed once."""
    if self._hash is None:
      self._hash = delta.base_hash(jax.device_get(self.base))
    return self._hash

  def load(self, name: str, path: str | pathlib.Path) -> LMAdapter:
    """Adds (or hot-swaps in place) adapter ``name`` from a delta checkpoint of a causal-LM run
    (``adapter.safetensors``, written with ``train.save_adapter=True``).

    Everything is checked before the library changes: the file (a
    :class:`~peftjax.delta.DeltaError` if missing, damaged, or for another base: both hashes
    named), its method, every tensor against the base's layers, the rank against ``max_rank``.
    """
    self._check_new_name(name)
    trainable, manifest = delta.load_delta(path)
    where = f'adapter {name!r} ({path})'
    model = ((manifest.get('base') or {}).get('model_config') or {}).get('name')
    if model not in (None, 'llama'):
      raise AdapterError(f"{where} is an adapter of model.name={model!r}; this library serves "
                         "causal LMs (model.name='llama')")
    self._refuse_method(manifest['method'], where)
    if tree_lib.flatten(trainable.get('base', {})):
      self._refuse_base_leaves(trainable, where)
    if manifest['base']['sha256'] != self.base_hash():
      raise delta.DeltaError(
          f"{where} was trained on base {manifest['base']['sha256'][:16]}... "
          f"({manifest['base'].get('source') or 'unknown source'}); this library's base is "
          f'{self.base_hash()[:16]}... ({self.base_source or "unknown source"}): refusing to '
          'serve it on another base')
    ad = self._parse(trainable, manifest['method'], manifest['peft_config'], None, where)
    ad.manifest, ad.source = manifest, str(path)
    self.add(name, ad)
    return ad

  def add_method(self, name: str, method, peft_params) -> LMAdapter:
    """Adds adapter ``name`` from a method object (``peft.build(cfg.peft)``) and its trained
    tree in memory (e.g. right after training)."""
    self._check_new_name(name)
    cfg = method.cfg.to_dict() if hasattr(method.cfg, 'to_dict') else dict(method.cfg or {})
    ad = self._parse({'peft': peft_params}, method.name, cfg, method, f'adapter {name!r}')
    self.add(name, ad)
    return ad

  def add_trained(self, name: str, trainable: dict, method: str, peft_config) -> LMAdapter:
    """Adds adapter ``name`` from a trainable partition ``{'base', 'peft'}``, its method's name
    and ``peft`` config section (what :func:`peftjax.serving.hf.load_peft` passes)."""
    self._check_new_name(name)
    cfg = peft_config.to_dict() if hasattr(peft_config, 'to_dict') else dict(peft_config)
    ad = self._parse(jax.device_get(trainable), method, cfg, None, f'adapter {name!r}')
    self.add(name, ad)
    return ad

  def _check_new_name(self, name):
    if not isinstance(name, str) or not name or name == BASE:
      raise AdapterError(f'adapter name {name!r} is invalid; valid: a non-empty string other '
                         f'than {BASE!r} (the base model\'s own slot)')

  def _refuse_method(self, method: str, where: str):
    check_servable(method, where)

  def _refuse_base_leaves(self, trainable, where: str):
    leaves = sorted(tree_lib.flatten(trainable.get('base', {})))
    raise AdapterError(f'{where} trains base leaves {leaves[:3]}; the adapters of a library '
                       'share one frozen base. Merge it into the base instead '
                       '(python -m peftjax.export) and serve that model')

  def _parse(self, trainable, method: str, peft_config: dict, method_obj, where: str):
    """The :class:`LMAdapter` of a trainable partition, every leaf checked against the base."""
    self._refuse_method(method, where)
    if tree_lib.flatten(trainable.get('base', {})):
      self._refuse_base_leaves(trainable, where)
    cfg = peft_sections.upgrade(dict(peft_config))
    peft = jax.tree.map(lambda v: np.asarray(v, np.float32), trainable.get('peft', {}))
    if method_obj is None:
      from peftjax import peft as peft_lib  # pylint: disable=g-import-not-at-top
      try:
        method_obj = peft_lib.build(ml_collections.ConfigDict(cfg))
      except Exception as e:  # pylint: disable=broad-except  (a config of another version)
        raise AdapterError(f'{where}: its peft config does not build a method ({e})') from None
    ad = LMAdapter(method=method, peft_config=cfg, peft_params=peft, method_obj=method_obj)
    if method in ('lora', 'ia3', 'lora+ia3'):
      parts = peft if method == 'lora+ia3' else {method: peft}
      unknown = sorted(set(parts) - {'lora', 'ia3'})
      if unknown:
        raise AdapterError(f'{where}: unexpected parts {unknown} for method {method!r}')
      self._parse_lora(ad, parts.get('lora', {}), where)
      self._parse_ia3(ad, parts.get('ia3', {}), where)
    else:
      self._parse_prefix(ad, where)
    return ad

  def _parse_lora(self, ad: LMAdapter, lora: dict, where: str):
    flat = tree_lib.flatten(lora)
    for path in sorted(flat):
      if not path.endswith(('/lora_a', '/lora_b')):
        raise AdapterError(f'{where}: unexpected LoRA leaf {path!r}; valid: <layer>/lora_a, '
                           '<layer>/lora_b')
    for module in lora_lib.factor_paths(lora):
      site = self._sites.get(module)
      if site is None:
        raise AdapterError(f'{where}: LoRA site {module!r} is not a dense or embedding layer of '
                           f'the base; e.g. {sorted(self._sites)[:3]}')
      a, b = flat[f'{module}/lora_a'], flat.get(f'{module}/lora_b')
      if b is None:
        raise AdapterError(f'{where}: LoRA site {module!r} has lora_a but no lora_b')
      r = a.shape[-1]
      lead = tuple(site.lead)
      want_a, want_b = (*lead, *site.in_shape, r), (*lead, r, *site.out_shape)
      if a.shape != want_a or b.shape != want_b:
        raise AdapterError(f'{where}: LoRA site {module!r} has A {a.shape}, B {b.shape}; the '
                           f'base layer needs A {want_a}, B {want_b}: the adapter was trained '
                           'for another model shape')
      if r > self.max_rank:
        raise AdapterError(f'{where}: LoRA rank {r} at {module!r} exceeds the library '
                           f'max_rank={self.max_rank}; build the library with max_rank >= {r}')
      ad.lora[module] = (a, b)
    unpaired = sorted(p[:-len('/lora_b')] for p in flat if p.endswith('/lora_b')
                      and p[:-len('/lora_b')] not in ad.lora)
    if unpaired:
      raise AdapterError(f'{where}: LoRA site {unpaired[0]!r} has lora_b but no lora_a')
    if ad.lora:
      section = ad.peft_config.get('lora') or {}
      bad = {f'lora.{k}': section.get(k) for k in ('rank', 'alpha')
             if not isinstance(section.get(k), (int, float)) or section.get(k) <= 0}
      if bad:
        raise AdapterError(f'{where}: its peft config has {bad}; a LoRA adapter needs positive '
                           'rank and alpha (its scale is alpha/rank, alpha/sqrt(rank) with '
                           'rslora)')
      ad.scale = lora_scale(ad.peft_config)

  def _parse_ia3(self, ad: LMAdapter, ia3: dict, where: str):
    for path, v in sorted(tree_lib.flatten(ia3).items()):
      module, which, leaf = (path.rsplit('/', 2) + ['', ''])[:3]
      site = self._sites.get(module)
      if leaf != 'scale' or which not in ('ia3_out', 'ia3_in'):
        raise AdapterError(f'{where}: unexpected IA3 leaf {path!r}; valid: '
                           '<layer>/ia3_out/scale, <layer>/ia3_in/scale')
      if site is None or site.kind != 'dense':
        raise AdapterError(f'{where}: IA3 vector {path!r}: the base has no dense layer '
                           f'{module!r}; e.g. {sorted(self._sites)[:3]}')
      out_shape, in_shape = ia3_lib.vector_shapes(site)
      want = out_shape if which == 'ia3_out' else in_shape
      if v.shape != tuple(want):
        raise AdapterError(f'{where}: IA3 vector {path!r} has shape {v.shape}; the base layer '
                           f'needs {tuple(want)}: the adapter was trained for another model shape')
      lead = tuple(site.lead)
      feat = site.out_shape if which == 'ia3_out' else site.in_shape
      getattr(ad, which)[module] = v.reshape(*lead, *feat)

  def _parse_prefix(self, ad: LMAdapter, where: str):
    """The prompt or prefix adapter's per-layer keys and values, computed once, here."""
    try:
      prefix = generation.method_prefix(self.module, ad.method_obj, self.base, ad.peft_params)
    except Exception as e:  # pylint: disable=broad-except  (the model's own shape error)
      raise AdapterError(f'{where}: its {ad.method} parameters do not fit this base ('
                         f'{" ".join(str(e).split())[:300]}): the adapter was trained for '
                         'another model shape') from None
    if prefix is None:
      raise AdapterError(f'{where}: method {ad.method!r} computed no prefix')
    ad.prefix = np.asarray(prefix, np.float32)
    n = ad.prefix_length
    if self.max_prefix is not None and n > self.max_prefix:
      raise AdapterError(f'{where}: its prefix has {n} positions, over the library '
                         f'max_prefix={self.max_prefix}; build the library with max_prefix >= '
                         f'{n} (or None)')

  # ---------------------------------------------------------------- slots
  def add(self, name: str, ad: LMAdapter) -> None:
    """Puts a parsed adapter in slot ``name``: in place when the layout and slot count stay
    (a hot swap: no new shapes, no new program), else every stack rebuilt."""
    self._check_new_name(name)
    if ad.rank > self.max_rank:
      raise AdapterError(f'adapter {name!r} has LoRA rank {ad.rank} > max_rank={self.max_rank}')
    layout = self._layout_with(ad)
    n = len(self._adapters) + (name not in self._adapters)
    if self._fixed_slots is not None and n + 1 > self._fixed_slots:
      raise AdapterError(f'the library has slots={self._fixed_slots} (one is the base), all in '
                         f'use by {self.names}; remove one first')
    slots = self._fixed_slots or max(_pow2(n + 1), self.slots)
    slot = self._slot.get(name, self._free_slot())
    if layout == self.layout and slots == self.slots:
      stacks = _write_slot(self.stacks, jnp.asarray(slot, jnp.int32),
                           _device(self._slot_values(ad, layout)), self._axes(self.stacks))
    else:  # new layers, a longer prefix or more slots: new shapes, every stack rebuilt
      host = self._host_stacks(layout, slots)
      axes = self._axes(host)
      for n_, a in {**self._adapters, name: ad}.items():
        _put(host, self._slot.get(n_, slot), self._slot_values(a, layout), axes)
      stacks = _device(host)
    self.stacks, self.layout = stacks, layout
    self._adapters[name], self._slot[name] = ad, slot

  def remove(self, name: str) -> None:
    """Drops adapter ``name``; its slot is reset to the base and reused. No new shapes."""
    self._check_names([name], base_ok=False)
    slot = self._slot.pop(name)
    del self._adapters[name]
    blank = LMAdapter(method='lora', peft_config={})
    self.stacks = _write_slot(self.stacks, jnp.asarray(slot, jnp.int32),
                              _device(self._slot_values(blank, self.layout)),
                              self._axes(self.stacks))

  def _free_slot(self) -> int:
    used = {0, *self._slot.values()}
    return next(i for i in range(len(used) + 1) if i not in used)

  def _axes(self, stacks: dict) -> tuple:
    """The slot axis of every stack, in leaf order: after a scanned layer's stack axis."""
    k = lambda p: len(self._sites[p].lead)
    axes = {'lora': {p: {'a': k(p), 'b': k(p)} for p in stacks['lora']},
            'ia3_out': {p: k(p) for p in stacks['ia3_out']},
            'ia3_in': {p: k(p) for p in stacks['ia3_in']}, 'prefix': {'kv': 0, 'length': 0}}
    return tuple(jax.tree.leaves(axes))

  def _layout_with(self, ad: LMAdapter) -> LMLayout:
    cur = self.layout
    union = lambda old, new: tuple(sorted({*old, *new}))
    prefix = cur.prefix
    if ad.prefix_length > prefix:
      prefix = self.max_prefix or _pow2(ad.prefix_length)
    return LMLayout(rank=self.max_rank, lora=union(cur.lora, ad.lora),
                    ia3_out=union(cur.ia3_out, ad.ia3_out), ia3_in=union(cur.ia3_in, ad.ia3_in),
                    prefix=prefix)

  def _host_stacks(self, layout: LMLayout, slots: int) -> dict:
    """Stacks of ``slots`` base slots (LoRA zeros, IA3 ones, no prefix) for ``layout``."""
    cfg, r = self.cfg, layout.rank
    out = {'lora': {}, 'ia3_out': {}, 'ia3_in': {}}
    for p in layout.lora:
      s = self._sites[p]
      out['lora'][p] = {'a': np.zeros((*s.lead, slots, *s.in_shape, r), np.float32),
                        'b': np.zeros((*s.lead, slots, r, *s.out_shape), np.float32)}
    for group, feat in (('ia3_out', 'out_shape'), ('ia3_in', 'in_shape')):
      for p in getattr(layout, group):
        s = self._sites[p]
        out[group][p] = np.ones((*s.lead, slots, *getattr(s, feat)), np.float32)
    kv = (slots, cfg.num_layers, 2, layout.prefix, cfg.num_kv_heads, cfg.head_dim)
    out['prefix'] = {'kv': np.zeros(kv, np.float32), 'length': np.zeros((slots,), np.int32)}
    return out

  def _slot_values(self, ad: LMAdapter, layout: LMLayout) -> dict:
    """Stacks of one slot (slot axis of size 1) holding ``ad`` (the base where it has no part)."""
    one = self._host_stacks(layout, 1)
    r = layout.rank
    for p, (a, b) in ad.lora.items():
      k = len(self._sites[p].lead)
      pad = r - a.shape[-1]
      a = np.concatenate([a, np.zeros((*a.shape[:-1], pad), np.float32)], -1)
      b = b * np.float32(ad.scale)
      b = np.concatenate([b, np.zeros((*b.shape[:k], pad, *b.shape[k + 1:]), np.float32)], k)
      one['lora'][p] = {'a': np.expand_dims(a, k), 'b': np.expand_dims(b, k)}
    for group in ('ia3_out', 'ia3_in'):
      for p, v in getattr(ad, group).items():
        one[group][p] = np.expand_dims(v, len(self._sites[p].lead))
    if ad.prefix is not None:
      n = ad.prefix_length
      one['prefix']['kv'][0, :, :, :n] = ad.prefix
      one['prefix']['length'][0] = n
    return one

  # ---------------------------------------------------------------- running
  def index(self, adapters: Sequence[str]) -> np.ndarray:
    """Each row's slot for adapter names (``'base'`` for none); an unknown name is refused."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
      raise AdapterError(f'adapters={adapters!r} is invalid; valid: a list with one adapter '
                         'name per row')
    self._check_names(adapters)
    return np.asarray([self.slot_of(a) for a in adapters], np.int32)

  def step(self, adapters: Sequence[str]):
    """``(step, make_cache)`` for :func:`peftjax.generation.generate` (or ``stream``) of a batch
    whose row ``b`` runs ``adapters[b]``: the slot index padded as ``generate`` pads the batch
    (to a power of two, filler rows on the base), each cache made with its rows' prefixes.

    Call ``generate`` with ``share_prefix=False``: a prefix shared across rows is computed once
    for all of them, but every row's keys differ under its own adapter (:meth:`generate` does).
    """
    rows = self.index(adapters)
    index = np.zeros((generation.batch_bucket(len(rows)),), np.int32)
    index[:len(rows)] = rows
    index = jnp.asarray(index)
    tree = {'index': index, **{g: self.stacks[g] for g in ('lora', 'ia3_out', 'ia3_in')}}
    step = generation.method_step(self.module, SLOTS, self.base, tree)
    make_cache = functools.partial(_slot_cache, self.cfg, self.stacks['prefix'], index)
    return step, make_cache

  def generate(self, prompt_ids, prompt_lengths, adapters: Sequence[str], **kwargs):
    """:func:`peftjax.generation.generate` of right-padded prompts where row ``b`` runs adapter
    ``adapters[b]`` (``'base'`` for the base model); every keyword is ``generate``'s
    (``max_new_tokens``, ``sampling``, ``stop_ids``, ...). One prefill and one decode program
    per batch and length bucket, whatever the adapters.

    >>> out = lib.generate(ids, lengths, ['a', 'b', 'base'], max_new_tokens=16)  # doctest: +SKIP
    """
    rows = np.shape(prompt_ids)[0] if np.ndim(prompt_ids) == 2 else None
    if isinstance(adapters, str) or rows != len(adapters):
      raise AdapterError(f'adapters names {1 if isinstance(adapters, str) else len(adapters)} '
                         f'rows for {rows} prompt rows; valid: one adapter name per prompt row')
    if kwargs.pop('share_prefix', False):
      raise AdapterError('share_prefix=True is invalid for a library batch: a prefix shared by '
                         'the rows is computed once, but each row\'s keys and values are its own '
                         "adapter's; valid: False (the default here)")
    step, make_cache = self.step(adapters)
    kwargs.setdefault('max_positions', self.cfg.max_position)
    return generation.generate(step, make_cache, prompt_ids, prompt_lengths, share_prefix=False,
                               **kwargs)

  def _make_logits(self):
    module = self.module

    def forward(base, tree, prefix, inputs):
      self.compiles += 1  # runs once per trace
      from peftjax import peft  # pylint: disable=g-import-not-at-top
      hooks = {}
      if prefix is not None:
        hooks = {'prefix_kv': prefix['kv'], 'prefix_mask': prefix['mask']}
      return peft.apply(module, SLOTS, base, tree, {**inputs, **hooks})
    return jax.jit(forward)

  def logits(self, input_ids, adapters: Sequence[str], attention_mask=None):
    """Full-forward logits ``(B, T, vocab)`` where row ``b`` runs ``adapters[b]`` (no cache;
    ``attention_mask`` the model's segment ids, default all ones)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    index = self.index(adapters)
    if ids.ndim != 2 or ids.shape[0] != len(index):
      raise AdapterError(f'input_ids has shape {ids.shape} for {len(index)} adapters; valid: '
                         '(one row per adapter name, length)')
    tree = {'index': jnp.asarray(index), **{g: self.stacks[g]
                                            for g in ('lora', 'ia3_out', 'ia3_in')}}
    prefix = None
    if self.layout.prefix:
      kv, mask = _row_prefix(self.stacks['prefix'], jnp.asarray(index))
      prefix = {'kv': kv, 'mask': mask}
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask)
    return self._logits_fn(self.base, tree, prefix, {'input_ids': ids, 'attention_mask': mask})

  def alone(self, name: str):
    """``(step, make_cache)`` of adapter ``name`` on its own, as a run generates with it
    (:func:`peftjax.generation.method_step` / ``method_cache`` of its method and tree; the plain
    model for :data:`BASE`): what each row of a mixed batch must equal."""
    self._check_names([name])
    make = functools.partial(init_cache, self.cfg)
    if name == BASE:
      return generation.model_step(self.module, self.base), make
    ad = self._adapters[name]
    peft_params = jax.tree.map(jnp.asarray, ad.peft_params)
    step = generation.method_step(self.module, ad.method_obj, self.base, peft_params)
    return step, generation.method_cache(make, self.module, ad.method_obj, self.base,
                                         peft_params)

  def merged_params(self, name: str) -> dict:
    """The base with LoRA/IA3 adapter ``name`` folded in (``Method.merge``): a plain model."""
    ad = self[name]
    if ad.prefix is not None:
      raise AdapterError(f'adapter {name!r} is {ad.method!r}: its prefix is extra keys and '
                         'values, not a change of any weight, so it has no merged form')
    return ad.method_obj.merge(self.base, jax.tree.map(jnp.asarray, ad.peft_params))


# -------------------------------------------------------------------------- array helpers


def _device(host: dict) -> dict:
  return jax.tree.map(jnp.asarray, host)


def _put(host: dict, slot: int, values: dict, axes: tuple) -> None:
  """Writes a one-slot ``values`` tree into ``host`` stacks at ``slot`` (numpy, in place)."""
  for h, v, ax in zip(jax.tree.leaves(host), jax.tree.leaves(values), axes):
    h[(slice(None),) * ax + (slot,)] = np.take(v, 0, axis=ax)


@functools.partial(jax.jit, static_argnames=('axes',))
def _write_slot(stacks, slot, values, axes):
  """``stacks`` with entry ``slot`` of every stack (along its slot axis) set to ``values``."""
  leaves, tree = jax.tree.flatten(stacks)
  new = [jax.lax.dynamic_update_slice_in_dim(s, v.astype(s.dtype), slot, ax)
         for s, v, ax in zip(leaves, jax.tree.leaves(values), axes)]
  return jax.tree.unflatten(tree, new)


@jax.jit
def _row_prefix(prefix: dict, index):
  """Each row's prefix ``(L, B, 2, P, kv_heads, head_dim)`` and its mask ``(B, P)``."""
  kv = jnp.moveaxis(prefix['kv'][index], 0, 1)
  n = prefix['kv'].shape[3]
  mask = jnp.arange(n)[None, :] < prefix['length'][index][:, None]
  return kv, mask


def _slot_cache(cfg, prefix: dict, index, batch: int, max_len: int, dtype=jnp.float32,
                **kwargs):
  """An empty cache of ``batch`` rows holding each row's prefix (none without prefixes)."""
  if batch != index.shape[0]:
    raise generation.GenerationError(
        f'the cache is asked for batch {batch}; this step was made for {index.shape[0]} rows '
        '(its adapters, padded to a power of two); valid: generate with that batch')
  if kwargs:
    raise generation.GenerationError(f'a library cache takes no {sorted(kwargs)}: each row\'s '
                                     'prefix is its adapter\'s')
  if prefix['kv'].shape[3] == 0:
    return init_cache(cfg, batch, max_len, dtype)
  kv, mask = _row_prefix(prefix, index)
  return init_cache(cfg, batch, max_len, dtype, prefix_kv=kv, prefix_mask=mask)
