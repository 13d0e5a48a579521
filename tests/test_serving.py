"""The adapter library (peftjax/serving): a batch where every example names its own adapter equals
each example run alone with its adapter (peft.apply); switching and hot-swapping adapters reuse
the compiled program; padded ranks are exact; weighted merges equal their dense references;
folding for export; delta files round trip; bad input is refused and changes nothing."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import tinybert as tb
from peftjax import delta
from peftjax import peft
from peftjax import tree
from peftjax.models import BertClassifier
from peftjax.serving import AdapterError
from peftjax.serving import AdapterLibrary

MAX_RANK = 8
EMBED = r'(attention/(query|value)/kernel|word_embeddings/embedding)$'
# name: (peft.method, peft overrides, randomization seed). Every adapter trains its own head.
SPECS = {
    'r1': ('lora', dict(rank=1, alpha=2.0), 1),
    'r2': ('lora', dict(rank=2), 2),  # alpha 16: scale 8
    'r5': ('lora', dict(rank=5, alpha=4.0, targets=r'encoder/.*kernel$'), 3),  # every dense layer
    'r8': ('lora', dict(rank=8, alpha=8.0, rslora=True, targets=EMBED), 4),  # + embedding LoRA
    'ia3': ('ia3', dict(ffn_targets=r'(/output|attention/out)$'), 5),  # (2, 8) inputs too
    'lora_ia3': ('lora+ia3', dict(rank=3), 6),
    'bitfit': ('bitfit', {}, 7),
}
# Same method and layers as an adapter above, other values: hot swaps and merges.
VARIANTS = {'r2b': ('r2', 12), 'ia3b': ('ia3', 15)}
ASSIGN = ['lora_ia3', 'r1', 'bitfit', 'r8', 'ia3', 'r5', 'r2', 'r8']
# jax/_src/dispatch.py BACKEND_COMPILE_EVENT; test_each_index_kind_compiles_once fails if renamed.
BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'


def _inputs() -> dict:
  """8 examples x 8 tokens, some padded, both token types."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, tb.BERT.vocab_size, (8, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = mask[4, 3:] = mask[6, 7:] = 0
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  return {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask),
          'token_type_ids': jnp.asarray(types)}


X = _inputs()


def _randomize(trainable, seed):
  """Trained-looking values: LoRA B nonzero, IA3 scales around 1, everything else perturbed."""
  rng = np.random.default_rng(seed)

  def f(p, x):
    x = np.asarray(x, np.float32)
    if p.endswith('lora_b'):
      return (0.3 * rng.normal(size=x.shape)).astype(np.float32)
    if p.endswith('scale'):
      return (1 + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
    return (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
  return tree.map_with_path(f, trainable)


@dataclasses.dataclass
class Trained:
  method: object      # the peft method (its init has run)
  name: str           # peft.method
  cfg: object         # config.peft
  trainable: dict     # {'base': head (+ biases), 'peft': ...}
  ref: np.ndarray     # logits of X with this adapter alone, through peft.apply


@pytest.fixture(scope='module')
def trained() -> dict[str, Trained]:
  b = tb.built()
  out = {}
  for name, (method, kw, seed) in SPECS.items():
    m, c = tb.method(method, **kw)
    pp = m.init(jax.random.key(seed), b.module, b.params, X)
    head = tree.partition(b.params, m.trainable_base)[0]
    out[name] = Trained(m, m.name, c.peft, _randomize({'base': head, 'peft': pp}, seed), None)
  for name, (of, seed) in VARIANTS.items():
    t = out[of]
    out[name] = Trained(t.method, t.name, t.cfg, _randomize(t.trainable, seed), None)
  for t in out.values():
    frozen = tree.partition(b.params, t.method.trainable_base)[1]
    full = tree.combine(frozen, t.trainable['base'])
    t.ref = np.asarray(peft.apply(b.module, t.method, full, t.trainable['peft'], X))
  return out


class Compiles:
  """Counts real XLA compilations (all, and of the library's forward) while active."""

  def __init__(self):
    self.names: list[str] = []

  def _listen(self, event, duration, **kw):
    del duration
    if event == BACKEND_COMPILE:
      self.names.append(kw.get('fun_name', ''))

  @property
  def forward(self) -> int:
    return self.names.count('jit(forward)')

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.fixture(scope='module')
def lib(trained) -> AdapterLibrary:
  """Every adapter of SPECS in one library (7 adapters: 8 slots), both index kinds compiled."""
  b = tb.built()
  lib = AdapterLibrary(b.module, b.params, max_rank=MAX_RANK)
  for name in SPECS:
    t = trained[name]
    lib.add_trained(name, t.trainable, t.name, t.cfg)
  with Compiles() as c:
    lib.logits(X, 'r1').block_until_ready()
    lib.logits(X, ASSIGN).block_until_ready()
  lib.warmup = (lib.compiles, c.forward)
  return lib


def _state(lib: AdapterLibrary) -> dict:
  """Everything a failed call must leave as it was (and the active adapter's logits)."""
  return {'names': lib.names, 'active': lib.active, 'layout': lib.layout, 'slots': lib.slots,
          'index': {n: int(lib.index(n)) for n in lib.names},
          'adapters': {n: id(lib[n]) for n in lib.names},
          'stacks': tree.fingerprint(lib.stacks), 'compiles': lib.compiles,
          'logits': np.asarray(lib.logits(X)).tobytes()}


def _save(path, t: Trained, base_params, **kw):
  frozen = tree.partition(base_params, t.method.trainable_base)[1]
  return delta.save_delta(path, t.trainable, base_params=frozen, method=t.name,
                          peft_config=t.cfg, **kw)


# ------------------------------------------------------------------ batched multi-adapter forward
def test_references_differ_so_the_checks_below_can_fail(trained):
  refs = {n: t.ref for n, t in trained.items()}
  base = np.asarray(tb.built().module.apply({'params': tb.built().params}, **X))
  for n, r in refs.items():
    assert np.abs(r - base).max() > 0.05, n
    for m, q in refs.items():
      assert n == m or np.abs(r - q).max() > 0.05, (n, m)


def test_each_adapter_alone_equals_its_reference(lib, trained):
  for name in SPECS:
    np.testing.assert_allclose(lib.logits(X, name), trained[name].ref, atol=1e-5, rtol=0,
                               err_msg=name)
    lib.activate(name)  # the scalar (active) index
    assert lib.active == name
    np.testing.assert_allclose(lib.logits(X), trained[name].ref, atol=1e-5, rtol=0,
                               err_msg=name)
  lib.activate('r1')


def test_mixed_batch_equals_each_example_alone(lib, trained):
  for assign in (ASSIGN, ASSIGN[::-1], ['r8'] * 8, ['bitfit', 'ia3', 'r1', 'r2', 'r5', 'r8',
                                                    'lora_ia3', 'ia3']):
    got = np.asarray(lib.logits(X, assign))
    want = np.stack([trained[n].ref[j] for j, n in enumerate(assign)])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=str(assign))


def test_layout_covers_every_part(lib):
  paths = lambda sites: sorted(s.path for s in sites)
  lora = paths(lib.layout.lora)
  assert 'encoder/embeddings/word_embeddings' in lora
  assert len(lora) == 1 + 2 * 6  # the embedding + 6 dense layers per layer (r5)
  assert paths(lib.layout.ia3_out) == [f'encoder/layer_{i}/attention/{k}'
                                       for i in (0, 1) for k in ('key', 'value')]
  assert paths(lib.layout.ia3_in) == [f'encoder/layer_{i}/{k}' for i in (0, 1)
                                      for k in ('attention/out', 'output')]
  assert lib.stacks['ia3_in']['encoder/layer_1/attention/out'].shape == (8, 2, 8)
  assert paths(lib.layout.kernels) == ['classifier']
  assert len(lib.layout.biases) == 18  # BitFit: every bias (with the head's, every adapter's)
  assert lib.slots == 8 and lib.layout.rank == MAX_RANK
  assert lib.stacks['lora']['encoder/layer_0/attention/query']['a'].shape == (8, 16, MAX_RANK)


# ------------------------------------------------------------------ no recompilation
def test_each_index_kind_compiles_once(lib):
  assert lib.warmup == (2, 2)  # one trace and one XLA compile for scalar, one for per-example


def test_switching_adapters_does_not_recompile(lib, trained):
  before = lib.compiles
  with Compiles() as c:
    outs = {}
    for name in SPECS:
      lib.activate(name)
      outs[name] = lib.logits(X)
    mixed = [lib.logits(X, a) for a in (ASSIGN, ASSIGN[::-1], ['ia3'] * 8)]
    jax.block_until_ready((outs, mixed))
  assert lib.compiles == before and c.names == []
  for name in SPECS:
    np.testing.assert_allclose(outs[name], trained[name].ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(mixed[2], trained['ia3'].ref, atol=1e-5, rtol=0)
  lib.activate('r1')


def test_hot_swap_takes_effect_without_recompiling(lib, trained, tmp_path):
  r2, r2b = trained['r2'], trained['r2b']
  _save(tmp_path / 'r2.safetensors', r2, tb.built().params)
  _save(tmp_path / 'r2b.safetensors', r2b, tb.built().params)
  before, layout, slots, slot = lib.compiles, lib.layout, lib.slots, int(lib.index('r2'))
  with Compiles() as c:
    lib.add_trained('r2', r2b.trainable, r2b.name, r2b.cfg)  # replaces in place
    swapped = np.asarray(lib.logits(X, 'r2'))
    mixed = np.asarray(lib.logits(X, ASSIGN))
  assert c.names == [] and lib.compiles == before, c.names  # no XLA compilation of any kind
  np.testing.assert_allclose(swapped, r2b.ref, atol=1e-5, rtol=0)
  want = np.stack([(r2b if n == 'r2' else trained[n]).ref[j] for j, n in enumerate(ASSIGN)])
  np.testing.assert_allclose(mixed, want, atol=1e-5, rtol=0)
  # From files: no XLA compilation of any kind either.
  for path, want in (('r2.safetensors', r2.ref), ('r2b.safetensors', r2b.ref),
                     ('r2.safetensors', r2.ref)):
    with Compiles() as c:
      lib.load('r2', tmp_path / path)
      got = np.asarray(lib.logits(X, 'r2'))
    assert c.names == [] and lib.compiles == before, c.names
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert (lib.layout, lib.slots, int(lib.index('r2')), len(lib)) == (layout, slots, slot, 7)
  assert lib['r2'].source == str(tmp_path / 'r2.safetensors')


def test_adding_within_capacity_does_not_recompile_growing_doubles_slots(trained):
  b = tb.built()
  small = AdapterLibrary(b.module, b.params, max_rank=2)
  for name in ('r1', 'r2', 'ia3'):
    t = trained[name]
    small.add_trained(name, t.trainable, t.name, t.cfg)
  assert small.slots == 4
  np.testing.assert_allclose(small.logits(X, ['r1', 'r2', 'ia3'] * 2 + ['r2'] * 2),
                             np.stack([trained[n].ref[j] for j, n in
                                       enumerate(['r1', 'r2', 'ia3'] * 2 + ['r2'] * 2)]),
                             atol=1e-5, rtol=0)
  assert small.compiles == 1
  t = trained['r2b']
  with Compiles() as c:
    small.add_trained('r2b', t.trainable, t.name, t.cfg)  # the 4th of 4 slots
    got = np.asarray(small.logits(X, ['r2b'] * 8))
  assert (small.slots, small.compiles, c.forward) == (4, 1, 0)
  np.testing.assert_allclose(got, t.ref, atol=1e-5, rtol=0)
  t = trained['ia3b']
  with Compiles() as c:
    small.add_trained('ia3b', t.trainable, t.name, t.cfg)  # the 5th: 8 slots, a new shape
    got = np.asarray(small.logits(X, ['ia3b'] * 8))
  assert (small.slots, small.compiles, c.forward) == (8, 2, 1)
  np.testing.assert_allclose(got, t.ref, atol=1e-5, rtol=0)
  for name in ('r1', 'r2', 'ia3', 'r2b'):  # survived the rebuild in their slots
    np.testing.assert_allclose(small.logits(X, [name] * 8), trained[name].ref, atol=1e-5, rtol=0)
  small.remove('r1')
  assert small.names == ['r2', 'ia3', 'r2b', 'ia3b'] and small.slots == 8
  assert small.active == 'r2'  # the removed adapter was the active one
  with pytest.raises(AdapterError, match="unknown adapter 'r1'"):
    small.logits(X, 'r1')
  small.add_trained('r1', trained['r1'].trainable, 'lora', trained['r1'].cfg)  # reuses slot 0
  assert int(small.index('r1')) == 0 and small.compiles == 2


def test_padded_rank_gives_the_same_logits_as_an_unpadded_library(lib, trained):
  """A rank-2 adapter padded to rank 8 == the same adapter in a max_rank=2 library, bit for bit
  (the padded rows and columns are exact zeros); among other adapters' layers, to rounding."""
  b, t = tb.built(), trained['r2']
  out = {}
  for rank in (2, MAX_RANK):
    own = AdapterLibrary(b.module, b.params, max_rank=rank)
    own.add_trained('r2', t.trainable, t.name, t.cfg)
    a = np.asarray(own.stacks['lora']['encoder/layer_0/attention/query']['a'])
    assert a.shape == (1, 16, rank) and not a[..., 2:].any()  # zero padding
    out[rank] = np.asarray(own.logits(X, 'r2'))
  np.testing.assert_array_equal(out[MAX_RANK], out[2])
  np.testing.assert_allclose(lib.logits(X, 'r2'), out[2], atol=1e-6, rtol=0)
  np.testing.assert_allclose(out[2], t.ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ merges and export
def _merge_lib(lib, names) -> AdapterLibrary:
  """A library (never run, so never compiled) holding ``lib``'s adapters ``names``."""
  b = tb.built()
  m = AdapterLibrary(b.module, b.params, max_rank=MAX_RANK)
  for n in names:
    m.add(n, lib[n])
  return m


def _dense_update(ad, site_path, weight_shape):
  a, b = ad.lora[site_path]
  r = a.shape[-1]
  return (np.float64(ad.scale) * (a.reshape(-1, r).astype(np.float64)
                                  @ b.reshape(r, -1).astype(np.float64))).reshape(weight_shape)


def test_cat_merge_equals_the_weighted_sum_of_updates(lib):
  ml = _merge_lib(lib, ['r2', 'r5'])
  a2, a5 = ml['r2'], ml['r5']
  merged = ml.combine('mix', {'r2': 0.3, 'r5': 0.7}, combination='cat')
  assert merged.rank == 2 + 5 and merged.scale == 1.0 and ml.names == ['r2', 'r5', 'mix']
  assert merged.lora['encoder/layer_0/intermediate'][0].shape == (16, 5)  # only r5 adapts it
  base = tree.flatten(tb.built().params)
  got = tree.flatten(ml.merged_params('mix'))
  kernels = {f'{p}/kernel' for p in a5.lora}
  assert set(a2.lora) < set(a5.lora) and len(kernels) == 12
  for path, w in base.items():
    if path in kernels:
      site = path.rsplit('/', 1)[0]
      want = np.asarray(w, np.float64) + 0.7 * _dense_update(a5, site, w.shape)
      if site in a2.lora:
        want += 0.3 * _dense_update(a2, site, w.shape)
      np.testing.assert_allclose(got[path], want, atol=1e-5, rtol=0, err_msg=path)
    elif path.startswith('classifier/'):  # heads merge linearly
      want = 0.3 * a2.base[path] + 0.7 * a5.base[path]
      np.testing.assert_allclose(got[path], want, atol=1e-6, rtol=0)
    else:
      np.testing.assert_array_equal(got[path], w, err_msg=path)
  assert merged.manifest['merged_from'][1]['name'] == 'r5'
  assert [m['weight'] for m in merged.manifest['merged_from']] == [0.3, 0.7]


def test_svd_merge_is_exact_at_full_rank_and_optimal_below(lib):
  ml = _merge_lib(lib, ['r2', 'r5'])
  base = tree.flatten(tb.built().params)
  ml.combine('cat', {'r2': 0.3, 'r5': 0.7}, combination='cat')
  cat = tree.flatten(ml.merged_params('cat'))
  ml.combine('svd7', {'r2': 0.3, 'r5': 0.7}, combination='svd', rank=7)
  full = tree.flatten(ml.merged_params('svd7'))
  for path in cat:
    np.testing.assert_allclose(full[path], cat[path], atol=1e-5, rtol=0, err_msg=path)
  svd2 = ml.combine('svd2', {'r2': 0.3, 'r5': 0.7}, combination='svd', rank=2)
  assert svd2.rank == 2 and ml['svd7'].rank == 7
  low = tree.flatten(ml.merged_params('svd2'))
  for site in ml['r5'].lora:
    w = base[f'{site}/kernel']
    d_in = int(np.prod(ml['r5'].lora[site][0].shape[:-1]))
    dw = (np.asarray(cat[f'{site}/kernel'], np.float64) - w).reshape(d_in, -1)  # the exact update
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vt[:2]  # Eckart-Young: the best rank-2 approximation
    got = (np.asarray(low[f'{site}/kernel'], np.float64) - w).reshape(dw.shape)
    np.testing.assert_allclose(got, best, atol=1e-5, rtol=0, err_msg=site)
    err, opt = np.linalg.norm(got - dw), np.sqrt(np.sum(s[2:] ** 2))
    assert err == pytest.approx(opt, rel=1e-3, abs=1e-6) and opt > 1e-2, site


def test_ia3_and_heads_merge_linearly(lib, trained):
  ml = _merge_lib(lib, ['ia3'])
  t = trained['ia3b']
  ml.add_trained('ia3b', t.trainable, t.name, t.cfg)
  a, b = ml['ia3'], ml['ia3b']
  merged = ml.combine('soup', {'ia3': 0.3, 'ia3b': 0.7}, combination='linear')
  assert sorted(merged.ia3_out) == sorted(a.ia3_out) and len(merged.ia3_out) == 4
  assert sorted(merged.ia3_in) == sorted(a.ia3_in) and len(merged.ia3_in) == 4
  for part in ('ia3_out', 'ia3_in', 'base'):
    for k, v in getattr(merged, part).items():
      want = 0.3 * getattr(a, part)[k] + 0.7 * getattr(b, part)[k]
      np.testing.assert_allclose(v, want, atol=1e-6, rtol=0, err_msg=k)
  # Folded: the key kernel scaled per output feature by the merged vector.
  key = 'encoder/layer_1/attention/key'
  np.testing.assert_allclose(tree.flatten(ml.merged_params('soup'))[f'{key}/kernel'],
                             tree.flatten(tb.built().params)[f'{key}/kernel']
                             * merged.ia3_out[key], atol=1e-6, rtol=0)


def test_bad_merges_are_refused_and_change_nothing(lib):
  ml = _merge_lib(lib, ['r2', 'r5', 'r8', 'ia3'])
  cases = [({'r2': 0.5, 'ia3': 0.5}, {}, "different methods \\['ia3', 'lora'\\]"),
           ({'r2': 0.5, 'r5': 0.5}, dict(combination='linear'), "combination='linear' is for IA3"),
           ({'r5': 0.5, 'r8': 0.5}, {}, "merge 'bad' has LoRA rank 13 > max_rank=8"),
           ({'r2': 0.5, 'r5': 0.5}, dict(combination='svd', rank=9),
            "merge 'bad' has LoRA rank 9 > max_rank=8"),
           ({'r2': 0.5, 'nope': 0.5}, {}, "unknown adapter 'nope'"),
           ({'r2': 0.5}, dict(combination='mean'), "combination='mean' is invalid")]
  before = (ml.names, ml.layout, ml.slots, tree.fingerprint(ml.stacks), ml.active)
  for weights, kw, msg in cases:
    with pytest.raises(AdapterError, match=msg):
      ml.combine('bad', weights, **kw)
    assert (ml.names, ml.layout, ml.slots, tree.fingerprint(ml.stacks), ml.active) == before


def test_merged_params_forward_equals_the_adapter(lib, trained):
  b = tb.built()
  forward = jax.jit(lambda p: b.module.apply({'params': p}, **X, deterministic=True))
  shapes = jax.tree.map(np.shape, b.params)
  for name in SPECS:
    merged = lib.merged_params(name)
    assert jax.tree.map(np.shape, merged) == shapes  # a plain model of the base's structure
    np.testing.assert_allclose(forward(merged), trained[name].ref, atol=1e-5, rtol=0,
                               err_msg=name)


# ------------------------------------------------------------------ files
def _parts(ad) -> dict:
  flat = {f'lora/{p}/{i}': v for p, ab in ad.lora.items() for i, v in enumerate(ab)}
  flat.update({f'ia3_out/{p}': v for p, v in ad.ia3_out.items()})
  flat.update({f'ia3_in/{p}': v for p, v in ad.ia3_in.items()})
  flat.update({f'base/{p}': v for p, v in ad.base.items()})
  return flat


def test_save_then_load_round_trips(lib, trained, tmp_path):
  b = tb.built()
  fresh = AdapterLibrary(b.module, b.params, max_rank=MAX_RANK)
  for name in ('r8', 'lora_ia3', 'bitfit', 'ia3'):
    m = lib.save(name, tmp_path / f'{name}.safetensors')
    assert m['method'] == trained[name].name and m['parent'] is None
    assert m['base']['sha256'] == lib.frozen_hash(lib[name].base)
    got = fresh.load(name, tmp_path / f'{name}.safetensors')
    assert got['params']['sha256'] == m['params']['sha256']
    want, have = _parts(lib[name]), _parts(fresh[name])
    assert sorted(want) == sorted(have) and fresh[name].scale == lib[name].scale
    for k in want:
      np.testing.assert_array_equal(have[k], want[k], err_msg=k)
  assert fresh['r8'].scale == pytest.approx(8.0 / np.sqrt(8.0))  # rslora survives the file
  # Loaded into the running library under a new name: bit-identical logits, no recompilation.
  before = lib.compiles
  lib.load('r8_copy', tmp_path / 'r8.safetensors')
  try:
    np.testing.assert_array_equal(lib.logits(X, 'r8_copy'), lib.logits(X, 'r8'))
    assert lib.compiles == before and lib.slots == 8
  finally:
    lib.remove('r8_copy')


def test_resaved_adapter_records_its_parent_and_merges_their_sources(lib, tmp_path):
  b = tb.built()
  lib.save('r2', tmp_path / 'a.safetensors')
  lib.save('r5', tmp_path / 'b.safetensors')
  fresh = AdapterLibrary(b.module, b.params, max_rank=MAX_RANK, base_source='tiny-random')
  ma = fresh.load('r2', tmp_path / 'a.safetensors')
  mb = fresh.load('r5', tmp_path / 'b.safetensors')
  m = fresh.save('r2', tmp_path / 'a2.safetensors')
  assert m['parent'] == {'path': str(tmp_path / 'a.safetensors'),
                         'params_sha256': ma['params']['sha256']}
  assert m['params']['sha256'] == ma['params']['sha256']
  fresh.combine('mix', {'r2': 0.25, 'r5': 0.75})
  m = fresh.save('mix', tmp_path / 'mix.safetensors')
  assert m['merged_from'] == [
      {'name': 'r2', 'weight': 0.25, 'source': str(tmp_path / 'a.safetensors'),
       'params_sha256': ma['params']['sha256']},
      {'name': 'r5', 'weight': 0.75, 'source': str(tmp_path / 'b.safetensors'),
       'params_sha256': mb['params']['sha256']}]
  assert delta.read_manifest(tmp_path / 'mix.safetensors')['merged_from'] == m['merged_from']
  assert m['peft_config']['lora']['rank'] == 7 and m['parent'] is None
  again = AdapterLibrary(b.module, b.params, max_rank=MAX_RANK)
  again.load('mix', tmp_path / 'mix.safetensors')
  for k, v in _parts(fresh['mix']).items():
    np.testing.assert_array_equal(_parts(again['mix'])[k], v, err_msg=k)
  assert again['mix'].scale == 1.0


# ------------------------------------------------------------------ bad input changes nothing
def _refused(lib, call, error, *fragments):
  """``call()`` raises ``error`` naming every fragment, and the library is as it was."""
  before = _state(lib)
  with pytest.raises(error) as e:
    call()
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))
  assert _state(lib) == before
  return str(e.value)


def _r2_tree(trained, **replace):
  flat = tree.flatten(trained['r2'].trainable)
  flat.update(replace)
  return tree.unflatten(flat)


@pytest.mark.parametrize('name', ['new', 'r2'])  # a new name, and a hot swap of a loaded one
def test_wrong_base_is_refused_naming_both_hashes(lib, trained, tmp_path, name):
  t = trained['r2']
  other = tree.flatten(tb.built().params)
  key = 'encoder/layer_0/attention/key/kernel'
  other[key] = other[key] + np.float32(1e-3)
  other = tree.unflatten(other)
  path = tmp_path / 'other.safetensors'
  m = _save(path, t, other, base_source='another-base')
  want = tree.fingerprint(tree.partition(other, t.method.trainable_base)[1])
  have = lib.frozen_hash(lib['r2'].base)
  assert m['base']['sha256'] == want != have
  _refused(lib, lambda: lib.load(name, path), delta.DeltaError, want[:16], have[:16],
           'another-base', str(path))


def test_truncated_and_corrupted_files_are_refused(lib, trained, tmp_path):
  path = tmp_path / 'r2.safetensors'
  _save(path, trained['r2'], tb.built().params)
  data = path.read_bytes()
  (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
  (tmp_path / 'cut_header.safetensors').write_bytes(data[:40])
  flipped = bytearray(data)
  flipped[-5] ^= 0x10  # one bit of the last tensor
  (tmp_path / 'flip.safetensors').write_bytes(bytes(flipped))
  for name in ('new', 'r2'):
    for f in ('cut', 'cut_header'):
      _refused(lib, lambda: lib.load(name, tmp_path / f'{f}.safetensors'), delta.DeltaError,
               'corrupt or truncated', f'{f}.safetensors')
    _refused(lib, lambda: lib.load(name, tmp_path / 'flip.safetensors'), delta.DeltaError,
             'do not match the manifest hash')
    _refused(lib, lambda: lib.load(name, tmp_path / 'missing.safetensors'), delta.DeltaError,
             'does not exist')


def test_manifest_missing_fields_is_refused(lib, trained, tmp_path):
  good = tmp_path / 'r2.safetensors'
  _save(good, trained['r2'], tb.built().params)
  manifest = delta.read_manifest(good)
  tensors = safetensors.numpy.load_file(str(good))
  for drop in ('base', 'method', 'params'):
    path = tmp_path / f'no_{drop}.safetensors'
    m = {k: v for k, v in manifest.items() if k != drop}
    safetensors.numpy.save_file(tensors, str(path),
                                metadata={delta.MANIFEST_KEY: json.dumps(m)})
    _refused(lib, lambda: lib.load('r2', path), delta.DeltaError, f"manifest misses ['{drop}']")
  path = tmp_path / 'plain.safetensors'
  safetensors.numpy.save_file(tensors, str(path))
  _refused(lib, lambda: lib.load('new', path), delta.DeltaError, 'has no peftjax manifest')


def test_rank_above_max_rank_is_refused(lib, trained, tmp_path):
  rng = np.random.default_rng(9)
  flat = tree.flatten(trained['r2'].trainable)  # every LoRA site (query, value) at rank 9
  for p in flat:
    if p.endswith('lora_a'):
      flat[p] = rng.normal(size=(16, 9)).astype(np.float32)
    elif p.endswith('lora_b'):
      flat[p] = rng.normal(size=(9, 2, 8)).astype(np.float32)
  big = tree.unflatten(flat)
  cfg = trained['r2'].cfg.to_dict()
  cfg['lora']['rank'] = 9
  path = tmp_path / 'r9.safetensors'
  delta.save_delta(path, big, base_params=tree.partition(
      tb.built().params, trained['r2'].method.trainable_base)[1], method='lora', peft_config=cfg)
  for name in ('new', 'r2'):
    _refused(lib, lambda: lib.load(name, path), AdapterError, 'LoRA rank 9', 'max_rank=8',
             'max_rank >= 9')
    _refused(lib, lambda: lib.add_trained(name, big, 'lora', cfg), AdapterError, 'LoRA rank 9',
             'max_rank=8')


def test_adapter_for_another_model_shape_is_refused(lib, trained, tmp_path):
  """A LoRA adapter of a tiny BERT with hidden 32 (so its base hash differs too: the shape check
  runs first and names the layer and both shapes)."""
  module = BertClassifier(dataclasses.replace(tb.BERT, hidden_size=32), num_classes=3)
  ids = jnp.ones((4, 8), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), ids, ids)['params'])
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  m, c = tb.method('lora', rank=2)
  pp = m.init(jax.random.key(0), module, params, X)
  head, frozen = tree.partition(params, m.trainable_base)
  path = tmp_path / 'h32.safetensors'
  delta.save_delta(path, {'base': head, 'peft': _randomize(pp, 0)}, base_params=frozen,
                   method='lora', peft_config=c.peft)
  for name in ('new', 'r2'):
    _refused(lib, lambda: lib.load(name, path), AdapterError,
             "'encoder/layer_0/attention/query'", 'A (32, 2), B (2, 2, 16)',
             'needs A (16, 2), B (2, 2, 8)', 'another model shape')
  # Another number of classes: the head does not fit.
  five = _r2_tree(trained, **{'base/classifier/kernel': np.zeros((16, 5), np.float32),
                              'base/classifier/bias': np.zeros(5, np.float32)})
  _refused(lib, lambda: lib.add_trained('r2', five, 'lora', trained['r2'].cfg), AdapterError,
           "'classifier/bias' has shape (5,), the base (3,)", 'another model shape')
  # IA3 vectors of another width.
  flat = tree.flatten(trained['ia3'].trainable)
  flat['peft/encoder/layer_0/output/ia3_in/scale'] = np.ones(64, np.float32)
  _refused(lib, lambda: lib.add_trained('ia3', tree.unflatten(flat), 'ia3', trained['ia3'].cfg),
           AdapterError, "'encoder/layer_0/output/ia3_in/scale' has shape (64,)", '(32,)')


def test_unsupported_method_is_refused(lib, trained, tmp_path):
  # A prefix-tuning partition, as peft.prefix (prefix.length=2, no reparameterization) makes it.
  rng = np.random.default_rng(0)
  t = {'base': trained['r2'].trainable['base'],
       'peft': {'prefix': rng.normal(size=(2, 2, 2, 2, 8)).astype(np.float32)}}
  path = tmp_path / 'prefix.safetensors'
  delta.save_delta(path, t, base_params=tree.partition(
      tb.built().params, trained['r2'].method.trainable_base)[1], method='prefix',
                   peft_config={'method': 'prefix', 'prefix': {'length': 2}})
  for call in (lambda: lib.load('p', path), lambda: lib.add_trained('r2', t, 'prefix', {})):
    _refused(lib, call, AdapterError, "method 'prefix' cannot be served",
             'lora, ia3, lora+ia3, bitfit, linear_probe')


def test_bad_names_and_batch_lengths_are_refused(lib):
  _refused(lib, lambda: lib.logits(X, 'nope'), AdapterError, "unknown adapter 'nope'", 'r1')
  _refused(lib, lambda: lib.logits(X, ['r1'] * 7 + ['nope']), AdapterError,
           "unknown adapter 'nope'")
  _refused(lib, lambda: lib.activate('nope'), AdapterError, "unknown adapter 'nope'")
  _refused(lib, lambda: lib.remove('nope'), AdapterError, "unknown adapter 'nope'")
  _refused(lib, lambda: lib.logits(X, ['r1', 'r2', 'ia3']), AdapterError,
           'names 3 adapters for a batch of 8')
  _refused(lib, lambda: lib.add('', lib['r1']), AdapterError, "adapter name '' is invalid")
  with pytest.raises(AdapterError, match='max_rank=0 is invalid'):
    AdapterLibrary(tb.built().module, tb.built().params, max_rank=0)
  empty = AdapterLibrary(tb.built().module, tb.built().params)
  with pytest.raises(AdapterError, match='no adapters; load one first'):
    empty.logits(X)


def test_fixed_slots_full_is_refused(trained):
  b = tb.built()
  two = AdapterLibrary(b.module, b.params, max_rank=2, slots=2)
  for name in ('r1', 'r2'):
    two.add_trained(name, trained[name].trainable, 'lora', trained[name].cfg)
  before = (two.names, two.slots, tree.fingerprint(two.stacks))
  with pytest.raises(AdapterError, match=r"slots=2, all in use by \['r1', 'r2'\]"):
    two.add_trained('r2b', trained['r2b'].trainable, 'lora', trained['r2b'].cfg)
  assert (two.names, two.slots, tree.fingerprint(two.stacks)) == before
  two.add_trained('r2', trained['r2b'].trainable, 'lora', trained['r2b'].cfg)  # replacing fits
  assert two.names == ['r1', 'r2'] and two.slots == 2
