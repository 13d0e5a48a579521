"""Every PEFT method on the causal LM (configs/lm_tiny.py's random 2-layer Llama, 4 query / 2
key-value heads): exact trainable counts; identity at initialisation where the method promises
it; the implicit forward equal to the merged model (mergeable methods) in a full forward and in
cached prefill + decode; prompt and prefix tuning decoding from a prefix that lives in the KV
cache; gradients reaching every trainable leaf; BitFit refused on a bias-free model; LoRA+,
layer-wise learning-rate decay (scanned and unrolled) and gradual unfreezing on the LM."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import generation
from peftjax import optim
from peftjax import peft
from peftjax import run as run_lib
from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.models.llama import init_cache

# name -> peft overrides ('section.field': value) on configs/lm_tiny.py
METHODS = {
    'lora': {},
    'rslora': {'lora.rslora': True},
    'dora': {'method': 'dora'},
    'pissa': {'method': 'pissa'},
    'ia3': {'method': 'ia3'},
    'adapter': {'method': 'adapter', 'adapter.size': 8},
    'prompt': {'method': 'prompt', 'prompt.length': 5},
    'prefix': {'method': 'prefix', 'prefix.length': 3, 'prefix.hidden': 16},
    'prefix_direct': {'method': 'prefix', 'prefix.length': 3, 'prefix.reparam': False},
    'full': {'method': 'full'},
}
IDENTITY = ('lora', 'rslora', 'dora', 'pissa', 'ia3', 'adapter', 'full')  # unchanged at init
MERGEABLE = ('lora', 'rslora', 'dora', 'pissa', 'ia3', 'full')


def _config(peft_overrides=None, **sections):
  from configs import lm_tiny
  c = lm_tiny.get_config()
  c.data.packing = 'pack'  # several sequences per row: the hooks must respect the segments
  c.data.max_length = 256
  for key, value in (peft_overrides or {}).items():
    *parents, leaf = key.split('.')
    section = c.peft
    for p in parents:
      section = section[p]
    section[leaf] = value
  for key, value in sections.items():
    section, leaf = key.split('__')
    c[section][leaf] = value
  return c


@pytest.fixture(scope='module')
def tiny():
  """The LoRA setup of configs/lm_tiny.py (its data and model serve every method) and a packed
  training batch of it."""
  setup = run_lib.build_setup(_config())
  batch = next(iter(setup.data.train_batches(4, seed=0)))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return setup, batch


class M:
  """One method on the tiny LM: its method, trainable/frozen partition and forward."""

  def __init__(self, tiny, name):
    setup, self.batch = tiny
    self.name, self.config = name, _config(METHODS[name])
    self.module, self.data = setup.built.module, setup.data
    self.base0 = setup.built.params
    self.method = peft.build(self.config.peft)
    inputs = setup.task.sample_inputs(setup.built, setup.data)
    p = self.method.init(jax.random.key(1), self.module, self.base0, inputs)
    base = self.method.prepare_base(self.base0, p, module=self.module, inputs=inputs)
    base_trainable, self.frozen = tree_lib.partition(base, self.method.trainable_base)
    self.trainable = {'base': base_trainable, 'peft': p}
    self.forward = jax.jit(run_lib.make_forward(setup.built, self.method))
    self.task = setup.task

  def perturbed(self, scale=0.05):
    """The trainable tree moved off its initialisation (every leaf), so no update is zero."""
    leaves, tree = jax.tree.flatten(self.trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return tree.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype)
                           for x, k in zip(leaves, keys)])

  def logits(self, trainable, ids, segments=None):
    b, t = ids.shape
    inputs = {'input_ids': ids, 'attention_mask': jnp.ones_like(ids) if segments is None
              else segments, 'positions': jnp.broadcast_to(jnp.arange(t), (b, t))}
    return self.forward(trainable, self.frozen, inputs)

  def step_and_cache(self, trainable):
    base = tree_lib.combine(self.frozen, trainable['base'])
    step = generation.method_step(self.module, self.method, base, trainable['peft'])
    make = generation.method_cache(functools.partial(init_cache, self.module.cfg), self.module,
                                   self.method, base, trainable['peft'])
    return step, make


@pytest.fixture(scope='module')
def methods(tiny):
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = M(tiny, name)
    return cache[name]
  return get


def _expected_count(name, cfg) -> int:
  """Trainable parameters of each method from the architecture alone."""
  a = cfg.model.llama
  d, f, v, n = a.hidden_size, a.intermediate_size, a.vocab_size, a.num_layers
  q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
  sites = ((d, q), (d, kv), (d, kv), (q, d))  # q, k, v, o: (in, out)
  r = cfg.peft.lora.rank
  lora = n * sum(r * (i + o) for i, o in sites)
  if name in ('lora', 'rslora', 'pissa'):
    return lora
  if name == 'dora':  # + one magnitude per output column
    return lora + n * sum(o for _, o in sites)
  if name == 'ia3':  # k and v outputs, the down-projection input
    return n * (2 * kv + f)
  if name == 'adapter':  # after o_proj and after down_proj: down (d, m) + m, up (m, d) + d
    m = cfg.peft.adapter.size
    return n * 2 * (2 * d * m + m + d)
  if name == 'prompt':
    return cfg.peft.prompt.length * d
  if name in ('prefix', 'prefix_direct'):
    p = cfg.peft.prefix
    out = n * 2 * kv  # per prefix token: every layer's key and value, kv heads only (GQA)
    if not p.reparam:
      return p.length * out
    return p.length * d + d * p.hidden + p.hidden + p.hidden * out + out
  assert name == 'full'
  layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
  return v * d + n * layer + d


@pytest.mark.parametrize('name', list(METHODS))
def test_trainable_count_is_exact(methods, name):
  m = methods(name)
  assert tree_lib.count(m.trainable) == _expected_count(name, m.config)
  if name != 'full':
    assert tree_lib.count(m.trainable['base']) == 0  # nothing of the base trains


def test_prefix_has_one_key_value_per_kv_head(methods):
  cfg = methods('prefix').module.cfg
  assert cfg.num_kv_heads < cfg.num_heads  # grouped-query attention
  p = methods('prefix_direct').trainable['peft']['prefix']
  assert p.shape == (cfg.num_layers, 2, 3, cfg.num_kv_heads, cfg.head_dim)
  # The MLP's prefixes and a direct method's are the same tensor at init (same rng).
  m = methods('prefix')
  np.testing.assert_allclose(m.method.materialize(m.trainable['peft'], m.base0)['prefix'], p,
                             atol=1e-4)


@pytest.mark.parametrize('name', IDENTITY)
def test_identity_at_init(methods, name):
  """On a packed batch (several sequences per row), the method at init is the base model."""
  m = methods(name)
  ids, seg = m.batch['input_ids'], m.batch['attention_mask']
  assert int(seg.max()) >= 2  # packed: the hooks must respect the segments too
  want = m.module.apply({'params': m.base0}, ids, attention_mask=seg)
  np.testing.assert_allclose(m.logits(m.trainable, ids, seg), want, atol=2e-5)


@pytest.mark.parametrize('name', ['prompt', 'prefix'])
def test_prompt_and_prefix_change_the_model(methods, name):
  m = methods(name)
  ids = m.batch['input_ids'][:2, :12]
  base = m.module.apply({'params': m.base0}, ids)
  assert float(jnp.abs(m.logits(m.trainable, ids) - base).max()) > 1e-3


def test_prompt_equals_its_tokens_prepended(methods):
  """Soft prompts that are rows of the embedding table are exactly those tokens put before
  the text: the text's logits equal the base model's on [tokens; text]."""
  m = methods('prompt')
  rows = jnp.array([11, 230, 4000, 17, 9])
  table = m.base0['embed']['embedding']
  trainable = {'base': {}, 'peft': {'prompt': table[rows]}}
  ids = m.batch['input_ids'][:2, :10]
  got = m.logits(trainable, ids)
  joined = jnp.concatenate([jnp.broadcast_to(rows, (2, 5)), ids], axis=1)
  want = m.module.apply({'params': m.base0}, joined)[:, 5:]
  np.testing.assert_allclose(got, want, atol=2e-5)


def _decode_logits(m, trainable, ids, split):
  """Logits of ``ids`` (B, T) through the step function: prefill ``[:split]``, then one token
  per decode step, the prefix (if any) from the cache."""
  step, make = m.step_and_cache(trainable)
  b, t = ids.shape
  cache = make(b, t + 2)
  out, cache = step(ids[:, :split], jnp.broadcast_to(jnp.arange(split), (b, split)), cache)
  outs = [out]
  for i in range(split, t):
    out, cache = step(ids[:, i:i + 1], jnp.full((b, 1), i, jnp.int32), cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize('name', list(METHODS))
def test_cached_decoding_equals_the_full_forward(methods, name):
  """Off its initialisation, each method's prefill + cached decode equals its full forward;
  a mergeable method's full forward equals its merged model's too."""
  m = methods(name)
  trainable = m.perturbed()
  ids = m.batch['input_ids'][:2, :9]
  implicit = m.logits(trainable, ids)
  decoded, cache = _decode_logits(m, trainable, ids, split=6)
  np.testing.assert_allclose(decoded, implicit, atol=3e-5)
  assert ('prefix_k' in cache) == (name in ('prompt', 'prefix', 'prefix_direct'))
  if name in MERGEABLE:
    base = tree_lib.combine(m.frozen, trainable['base'])
    merged = m.method.merge(base, trainable['peft'])
    np.testing.assert_allclose(m.module.apply({'params': merged}, ids), implicit, atol=3e-5)
    step = generation.model_step(m.module, merged)
    cache = init_cache(m.module.cfg, 2, 11)
    out, cache = step(ids[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), cache)
    np.testing.assert_allclose(out, implicit[:, :6], atol=3e-5)
  else:
    with pytest.raises(NotImplementedError):
      m.method.merge(tree_lib.combine(m.frozen, trainable['base']), trainable['peft'])


@pytest.mark.parametrize('name', ['prompt', 'prefix'])
def test_generation_with_a_cached_prefix_is_greedy_full_forwards(methods, name):
  """generate() (shared-prefix prefill at batch 1, then per row, the prefix in the cache)
  yields the tokens of greedy argmax over full forwards of the method's model."""
  m = methods(name)
  trainable = m.perturbed(0.5)
  batch = next(iter(m.data.eval_prompts('test', 3)))
  ids, lengths = np.asarray(batch['prompt_ids']), np.asarray(batch['prompt_lengths'])
  assert generation.shared_prefix(ids, lengths) >= 16  # the chat template is shared
  step, make = m.step_and_cache(trainable)
  out = generation.generate(step, make, ids, lengths, max_new_tokens=4)
  width = ids.shape[1] + 4  # one padded length: one compile (causal: the padding is unread)
  for row in range(ids.shape[0]):
    seq = list(ids[row, :lengths[row]])
    for t in range(4):
      logits = m.logits(trainable, jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32))
      tok = int(jnp.argmax(logits[0, len(seq) - 1]))
      assert tok == int(out.ids[row, t]), (row, t)
      seq.append(tok)


@pytest.mark.parametrize('name', list(METHODS))
def test_gradients_reach_every_trainable_leaf_and_nothing_else(methods, name):
  """The loss's gradient is nonzero on every trainable leaf (the method is wired in), and a
  training step's parameters are exactly the trainable partition."""
  m = methods(name)
  trainable = m.perturbed()

  def loss(params):
    return m.task.loss(m.forward(params, m.frozen, m.batch), m.batch)[0]

  grads = tree_lib.flatten(jax.grad(loss)(trainable))
  assert set(grads) == set(tree_lib.flatten(trainable))
  dead = [p for p, g in grads.items() if not np.any(np.asarray(g))]
  assert not dead, f'{name}: zero gradient on {dead}'
  frozen = set(tree_lib.flatten(m.frozen))
  assert not frozen & set(grads)
  if name != 'full':
    assert set(tree_lib.flatten(m.base0)) == frozen


def test_bitfit_is_refused_on_a_model_without_biases(tiny):
  setup, _ = tiny
  method = peft.build(_config({'method': 'bitfit'}).peft)
  inputs = setup.task.sample_inputs(setup.built, setup.data)
  with pytest.raises(ConfigError, match=r'bitfit.*LlamaForCausalLM has none.*embedding, kernel'
                                        r', scale'):
    method.init(jax.random.key(0), setup.built.module, setup.built.params, inputs)


def test_text_prompt_init_is_refused_with_another_vocabulary(tiny):
  setup, _ = tiny
  c = _config({'method': 'prompt', 'prompt.init': 'text', 'prompt.init_text': 'sentiment'})
  inputs = setup.task.sample_inputs(setup.built, setup.data)
  with pytest.raises(ConfigError, match=r"init='text'.*MiniLM.*49152 rows.*init='vocab'"):
    peft.build(c.peft).init(jax.random.key(0), setup.built.module, setup.built.params, inputs)


def test_hook_values_with_a_cache_without_prefix_are_refused(methods):
  m = methods('prompt')
  base = tree_lib.combine(m.frozen, m.trainable['base'])
  step = generation.method_step(m.module, m.method, base, m.trainable['peft'])
  ids = m.batch['input_ids'][:1, :4]
  with pytest.raises(ValueError, match='the prefix lives in the cache'):
    step(ids, jnp.arange(4)[None], init_cache(m.module.cfg, 1, 8))


# ---------------------------------------------------------------------------- optimizer


def _one_update(config, trainable, grads):
  tx = optim.make_optimizer(config.optim, config.train.steps,
                            num_layers=config.model.llama.num_layers)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  return tree_lib.flatten(updates)


def _grads_like(trainable):
  leaves, tree = jax.tree.flatten(trainable)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return tree.unflatten([jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_lora_plus_scales_the_b_updates(methods):
  m = methods('lora')
  grads = _grads_like(m.trainable)
  plain = _one_update(_config(optim__clip_norm=0.0), m.trainable, grads)
  plus = _one_update(_config(optim__clip_norm=0.0, optim__lr_multipliers=(('lora_b$', 16.0),)),
                     m.trainable, grads)
  assert any(p.endswith('lora_b') for p in plain) and any(p.endswith('lora_a') for p in plain)
  for p in plain:
    want = plain[p] * (16.0 if p.endswith('lora_b') else 1.0)
    np.testing.assert_allclose(plus[p], want, rtol=1e-6)


def test_layer_decay_scales_each_layer_of_the_scanned_stack(methods):
  """Full fine-tuning with layer_decay 0.5 on 2 scanned layers: layer i's slice of every
  stacked leaf moves at 0.5 ** (2 - i), the (tied) embedding at 0.5 ** 3, the final norm at 1."""
  m = methods('full')
  grads = _grads_like(m.trainable)
  cfg = dict(optim__clip_norm=0.0, optim__weight_decay=0.0, optim__warmup_steps=0)
  plain = _one_update(_config(**cfg), m.trainable, grads)
  decayed = _one_update(_config(optim__layer_decay=0.5, **cfg), m.trainable, grads)
  stacked = [p for p in plain if p.startswith('base/layers/')]
  assert len(stacked) == 9  # 4 attention kernels, 3 MLP kernels, 2 norms
  for p in stacked:
    for i in range(2):
      np.testing.assert_allclose(decayed[p][i], plain[p][i] * 0.5 ** (2 - i), rtol=1e-6)
  np.testing.assert_allclose(decayed['base/embed/embedding'],
                             plain['base/embed/embedding'] * 0.5 ** 3, rtol=1e-6)
  np.testing.assert_allclose(decayed['base/norm/scale'], plain['base/norm/scale'], rtol=1e-6)


def test_layer_decay_is_the_same_scanned_or_unrolled():
  """The per-layer factors of a scanned stack are the unrolled layer_<i>/ factors."""
  scanned = optim.path_factors(layer_decay=0.8, num_layers=3)
  stack = scanned('peft/layers/attn/q_proj/kernel/lora_a')
  for i in range(3):
    assert stack[i] == pytest.approx(scanned(f'peft/layer_{i}/attn/q_proj/kernel/lora_a'))


def test_gradual_unfreezing_on_the_lm(tmp_path):
  """LoRA on the unrolled LM with train.unfreeze: layer_1's MLP trains from update 0, layer_0's
  from update 2; the rest of the base stays bit-identical; a per-layer group on the scanned
  stack is refused with the hint to unroll it."""
  from peftjax import train
  c = _config(train__unfreeze=((0, 'layer_1/mlp/'), (2, 'layer_0/mlp/')), train__steps=4,
              train__eval_every=0, train__eval_before=False, train__checkpoint_every=4,
              model__scan_layers=False)
  c.data.max_eval_examples = 4
  c.generate.max_new_tokens = 1
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  _, params = run_lib.restore_trained(c, str(tmp_path / 'run'))
  fresh = run_lib.build_setup(c).built.params
  got, want = tree_lib.flatten(jax.device_get(params['base'])), tree_lib.flatten(fresh)
  moved = sorted(p for p in want if np.asarray(got[p]).tobytes() != np.asarray(want[p]).tobytes())
  mlp = sorted(p for p in want if '/mlp/' in p)
  assert moved == mlp and len(mlp) == 6
  with pytest.raises(ConfigError, match='scan_layers=False'):
    run_lib.build_setup(_config(train__unfreeze=((0, 'layer_1/'),)))


def test_rows_with_different_cached_prefixes_do_not_share_their_prompt(methods):
  """generate() runs a shared prompt prefix once only when every row's cache starts alike:
  rows with their own prefixes (a multi-adapter batch) each get their own prefix's tokens."""
  m = methods('lora')
  cfg = m.module.cfg
  prefixes = 3.0 * jax.random.normal(jax.random.key(9), (cfg.num_layers, 2, 2, 4,
                                                         cfg.num_kv_heads, cfg.head_dim))
  step = generation.model_step(m.module, m.base0)
  prompt = np.asarray(m.batch['input_ids'][0, :24])
  ids, lengths = np.stack([prompt, prompt]), np.array([24, 24])
  assert generation.shared_prefix(ids, lengths) >= 16

  def per_row(b, n, rows=(0, 1)):
    return init_cache(cfg, b, n, prefix_kv=jnp.stack([prefixes[:, r] for r in rows][:b], 1))

  both = generation.generate(step, per_row, ids, lengths, max_new_tokens=5)
  for r in range(2):
    alone = generation.generate(step, functools.partial(per_row, rows=(r,)), ids[r:r + 1],
                                lengths[r:r + 1], max_new_tokens=5)
    np.testing.assert_array_equal(both.ids[r], alone.ids[0])
  assert not np.array_equal(both.ids[0], both.ids[1])  # the prefixes matter
