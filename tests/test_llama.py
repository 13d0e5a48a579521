"""The Llama-family LM: an independent numpy reference, scan == unrolled, the KV cache, packed
segments, RoPE scaling, remat, the HF mapping, and sharded steps on 8 fake devices."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import tree as tree_lib
from peftjax.models import llama_convert
from peftjax.models.llama import LlamaConfig
from peftjax.models.llama import LlamaForCausalLM
from peftjax.models.llama import init_cache
from peftjax.models.llama import inv_frequencies
from peftjax.models.llama import rope

TINY = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=500.0, max_position=64)


def _init(cfg, seed=0, length=8):
  ids = jnp.ones((2, length), jnp.int32)
  boxed = LlamaForCausalLM(cfg).init(jax.random.key(seed), ids)['params']
  params = nn.meta.unbox(boxed)
  # Norm scales start at one; make them random so a mix-up of the two norms would show.
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if 'scale' in str(p) else x, params), nn.get_partition_spec(boxed)


def _state(cfg, params):
  return llama_convert.hf_from_params(cfg, jax.device_get(params))


def _reference(cfg, state, ids):
  """Llama's forward in plain numpy from the HF state dict: no code shared with the model."""
  def norm(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

  def rot(x, pos):  # x (T, H, D)
    d = x.shape[-1]
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos[:, None] * inv] * 2, -1)[:, None, :]
    half = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * np.cos(ang) + half * np.sin(ang)

  out = []
  for row in np.asarray(ids):
    t = len(row)
    x = state['model.embed_tokens.weight'][row].astype(np.float64)
    pos = np.arange(t, dtype=np.float64)
    for i in range(cfg.num_layers):
      w = lambda n: state[f'model.layers.{i}.{n}'].astype(np.float64)
      h = norm(x, w('input_layernorm.weight'))
      q = (h @ w('self_attn.q_proj.weight').T).reshape(t, cfg.num_heads, cfg.head_dim)
      k = (h @ w('self_attn.k_proj.weight').T).reshape(t, cfg.num_kv_heads, cfg.head_dim)
      v = (h @ w('self_attn.v_proj.weight').T).reshape(t, cfg.num_kv_heads, cfg.head_dim)
      q, k = rot(q, pos), rot(k, pos)
      heads = []
      for head in range(cfg.num_heads):
        g = head // (cfg.num_heads // cfg.num_kv_heads)
        s = q[:, head] @ k[:, g].T / np.sqrt(cfg.head_dim)
        s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        heads.append((p / p.sum(-1, keepdims=True)) @ v[:, g])
      x = x + np.concatenate(heads, -1) @ w('self_attn.o_proj.weight').T
      h = norm(x, w('post_attention_layernorm.weight'))
      gate = h @ w('mlp.gate_proj.weight').T
      x = x + ((gate / (1 + np.exp(-gate))) * (h @ w('mlp.up_proj.weight').T)) @ \
          w('mlp.down_proj.weight').T
    x = norm(x, state['model.norm.weight'])
    out.append(x @ state['model.embed_tokens.weight'].T)
  return np.stack(out)


def _ids(shape, seed=0, vocab=97):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_matches_numpy_reference():
  params, _ = _init(TINY)
  ids = _ids((2, 11))
  got = LlamaForCausalLM(TINY).apply({'params': params}, ids)
  np.testing.assert_allclose(got, _reference(TINY, _state(TINY, params), ids), atol=2e-5)


def test_parameter_count_and_logical_axes():
  for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=False),
              dataclasses.replace(TINY, qkv_bias=True, scan_layers=False)):
    params, _ = _init(cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params
  params, specs = _init(TINY)
  assert tuple(specs['layers']['attn']['q_proj']['kernel']) == ('layers', 'embed', 'heads')
  assert tuple(specs['layers']['mlp']['down_proj']['kernel']) == ('layers', 'mlp', 'embed')
  assert tuple(specs['embed']['embedding']) == ('vocab', 'embed')
  assert params['layers']['attn']['k_proj']['kernel'].shape == (3, 32, 16)


def test_scan_equals_unrolled_forward_and_gradients():
  unrolled = dataclasses.replace(TINY, scan_layers=False)
  params, _ = _init(TINY)
  params_u = llama_convert.params_from_hf(unrolled, _state(TINY, params))
  ids = _ids((2, 9), seed=1)

  def loss(cfg, p):
    return LlamaForCausalLM(cfg).apply({'params': p}, ids).std()

  np.testing.assert_allclose(LlamaForCausalLM(TINY).apply({'params': params}, ids),
                             LlamaForCausalLM(unrolled).apply({'params': params_u}, ids),
                             atol=2e-5)
  g_scan = _state(TINY, jax.grad(lambda p: loss(TINY, p))(params))
  g_unrolled = _state(unrolled, jax.grad(lambda p: loss(unrolled, p))(params_u))
  for name in g_scan:
    np.testing.assert_allclose(g_scan[name], g_unrolled[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_gradients(remat):
  params, _ = _init(TINY)
  ids = _ids((2, 9), seed=2)
  grad = lambda cfg: jax.grad(
      lambda p: LlamaForCausalLM(cfg).apply({'params': p}, ids).std())(params)
  for a, b in zip(jax.tree.leaves(grad(TINY)),
                  jax.tree.leaves(grad(dataclasses.replace(TINY, remat=remat)))):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('scan', [True, False])
def test_cache_decode_equals_full_forward(scan):
  """Right-padded prompts of different lengths, then one token per step: every logit equals
  the no-cache forward of that row's own sequence."""
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  params, _ = _init(TINY)
  if not scan:
    params = llama_convert.params_from_hf(cfg, _state(TINY, params))
  model = LlamaForCausalLM(cfg)
  seqs = [np.asarray(_ids((12,), seed=3)), np.asarray(_ids((12,), seed=4))]
  lengths = [5, 3]
  prompt = np.zeros((2, 5), np.int32)
  for r, n in enumerate(lengths):
    prompt[r, :n] = seqs[r][:n]
  cache = init_cache(cfg, 2, 16)
  logits, cache = model.apply({'params': params}, jnp.asarray(prompt),
                              positions=jnp.broadcast_to(jnp.arange(5), (2, 5)), cache=cache)
  full = [model.apply({'params': params}, jnp.asarray(s[None]))[0] for s in seqs]
  for r, n in enumerate(lengths):
    np.testing.assert_allclose(logits[r, :n], full[r][:n], atol=2e-5)
  for t in range(6):
    pos = np.array([n + t for n in lengths])
    tok = np.array([seqs[r][p] for r, p in enumerate(pos)], np.int32)
    logits, cache = model.apply({'params': params}, jnp.asarray(tok[:, None]),
                                positions=jnp.asarray(pos[:, None]), cache=cache)
    for r in range(2):
      np.testing.assert_allclose(logits[r, 0], full[r][pos[r]], atol=2e-5)


def test_packed_segments_equal_separate_sequences():
  params, _ = _init(TINY)
  model = LlamaForCausalLM(TINY)
  a, b = np.asarray(_ids((5,), seed=5)), np.asarray(_ids((4,), seed=6))
  packed = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0, 0]], np.int32)
  positions = np.array([list(range(5)) + list(range(4)) + [0, 0]], np.int32)
  got = model.apply({'params': params}, jnp.asarray(packed), attention_mask=segments,
                    positions=positions)[0]
  np.testing.assert_allclose(got[:5], model.apply({'params': params}, a[None])[0], atol=2e-5)
  np.testing.assert_allclose(got[5:9], model.apply({'params': params}, b[None])[0], atol=2e-5)


def test_rope_scaling():
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  pos = jnp.arange(6)[None] * 4
  linear = dataclasses.replace(TINY, rope_scaling=(('factor', 4.0), ('rope_type', 'linear')))
  # Linear scaling is position interpolation: position p acts as p / factor.
  np.testing.assert_allclose(rope(x, pos, inv_frequencies(linear)),
                             rope(x, pos / 4, inv_frequencies(TINY)), atol=1e-5)
  base = inv_frequencies(dataclasses.replace(TINY, rope_theta=500000.0, head_dim=64))
  l3 = inv_frequencies(dataclasses.replace(
      TINY, rope_theta=500000.0, head_dim=64, rope_scaling=(
          ('factor', 8.0), ('high_freq_factor', 4.0), ('low_freq_factor', 1.0),
          ('original_max_position_embeddings', 8192), ('rope_type', 'llama3'))))
  wavelen = 2 * np.pi / np.asarray(base)
  short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
  np.testing.assert_allclose(l3[short], base[short])  # high frequencies kept
  np.testing.assert_allclose(l3[long], base[long] / 8.0, rtol=1e-6)  # low ones slowed 8x
  with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
    LlamaConfig(rope_scaling=(('rope_type', 'yarn'),))


def test_hf_mapping_round_trip_and_errors():
  for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=False, qkv_bias=True)):
    params, _ = _init(cfg)
    state = _state(cfg, params)
    assert set(state) == set(llama_convert.expected_shapes(cfg))
    back = llama_convert.params_from_hf(cfg, state)
    for (p, a), b in zip(tree_lib.flatten(params).items(), tree_lib.flatten(back).values()):
      np.testing.assert_array_equal(np.asarray(a), b, err_msg=p)
  state = _state(TINY, _init(TINY)[0])
  del state['model.layers.2.mlp.up_proj.weight']
  with pytest.raises(llama_convert.WeightsError, match="'model.layers.2.mlp.up_proj.weight' is "
                     'missing'):
    llama_convert.params_from_hf(TINY, state, source='ckpt')
  state = _state(TINY, _init(TINY)[0])
  state['model.norm.weight'] = state['model.norm.weight'][:5]
  with pytest.raises(llama_convert.WeightsError, match=r'has shape \(5,\); the config says '
                     r'\(32,\)'):
    llama_convert.params_from_hf(TINY, state)


def test_config_from_hf_types():
  base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256)
  llama = LlamaConfig.from_hf({**base, 'model_type': 'llama', 'num_key_value_heads': 2,
                               'tie_word_embeddings': True, 'rope_theta': 1e4})
  assert (llama.num_kv_heads, llama.head_dim, llama.tie_embeddings, llama.qkv_bias,
          llama.sliding_window) == (2, 16, True, False, 0)
  qwen = LlamaConfig.from_hf({**base, 'model_type': 'qwen2', 'use_sliding_window': False,
                              'sliding_window': 4096})
  assert (qwen.qkv_bias, qwen.sliding_window, qwen.num_kv_heads) == (True, 0, 4)
  mistral = LlamaConfig.from_hf({**base, 'model_type': 'mistral', 'sliding_window': 4096})
  assert (mistral.sliding_window, mistral.qkv_bias) == (4096, False)
  assert LlamaConfig.from_hf(llama.to_hf()) == llama


SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, optax
    assert jax.device_count() == 8, jax.devices()
    from configs import common
    from peftjax import optim, peft, sharding, tree
    from peftjax import run as run_lib, step as step_lib
    from peftjax.models.build import Built
    from peftjax.models.llama import LlamaConfig, LlamaForCausalLM

    class LM:  # next-token cross-entropy over the real tokens
      def loss(self, logits, batch):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                             batch['input_ids'][:, 1:])
        w = (batch['attention_mask'][:, 1:] > 0).astype(jnp.float32)
        return (ce * w).sum() / w.sum(), {}

    c = common.get_config()
    c.optim.warmup_steps = 0
    c.peft.lora.targets = r'attn/(q|k|v|o)_proj/kernel$'
    c.peft.head = ''
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position=64)
    module = LlamaForCausalLM(cfg)
    ids = jnp.ones((16, 16), jnp.int32)
    boxed = module.init(jax.random.key(0), ids)['params']
    keys = ('input_ids', 'attention_mask', 'positions')
    built = Built(module, nn.meta.unbox(boxed), keys, nn.get_partition_spec(boxed), 'random')
    method = peft.build(c.peft)
    lora = method.init(jax.random.key(1), module, built.params, {'input_ids': ids})
    base_tr, frozen = tree.partition(built.params, method.trainable_base)
    trainable = {'base': base_tr, 'peft': lora}
    tx = optim.make_optimizer(c.optim, 10)
    step = jax.jit(step_lib.make_train_step(run_lib.make_forward(built, method), tx, LM()))
    rng = np.random.default_rng(0)
    batches = [{'input_ids': rng.integers(1, 96, (16, 16)).astype(np.int32),
                'attention_mask': np.repeat([[1] * 10 + [2] * 4 + [0] * 2], 16, 0).astype(np.int32),
                'positions': np.repeat([list(range(10)) + list(range(4)) + [0, 0]], 16,
                                       0).astype(np.int32)} for _ in range(3)]

    def run(devices, **axes):
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = axes.get('data', -1), axes.get('fsdp', 1), \\
          axes.get('tensor', 1)
      mesh = sharding.make_mesh(c.mesh, devices)
      rules = sharding.rules(c.mesh)
      bsh = sharding.batch_sharding(mesh, rules)
      base_specs, frozen_specs = tree.partition(built.logical_specs, method.trainable_base)
      train_sh = sharding.logical_to_sharding(
          {'base': base_specs, 'peft': method.logical_specs(built.logical_specs, lora)}, mesh, rules)
      frozen_sh = sharding.logical_to_sharding(frozen_specs, mesh, rules)
      params = jax.device_put(trainable, sharding.fit(train_sh, trainable))
      state = run_lib.TrainState.create(tx, params, seed=0)
      fz = jax.device_put(frozen, sharding.fit(frozen_sh, frozen))
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for b in batches:
          b = {k: jax.device_put(v, bsh) for k, v in b.items()}
          state, m = step(state, fz, b)
      return jax.device_get(state.params), state, fz

    one, _, _ = run(jax.devices()[:1], data=1)
    for axes in (dict(data=8), dict(data=2, fsdp=4), dict(data=2, tensor=4)):
      got, st, fz = run(jax.devices(), **axes)
      kernel = fz['layers']['attn']['q_proj']['kernel']
      if 'fsdp' in axes:  # (layers, embed, heads): embed split over fsdp
        assert kernel.sharding.spec[1] == 'fsdp', kernel.sharding
      if 'tensor' in axes:
        assert kernel.sharding.spec[2] == 'tensor', kernel.sharding
        lora_b = st.params['peft']['layers']['attn']['q_proj']['lora_b']
        assert lora_b.sharding.spec[2] == 'tensor', lora_b.sharding
      for (p, a), b in zip(tree.flatten(one).items(), tree.flatten(got).values()):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5, err_msg=f'{axes} {p}')
    print('OK', len(tree.flatten(one)))
''')


def test_sharded_lora_steps_equal_single_device():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': root}
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('OK'), out.stdout
