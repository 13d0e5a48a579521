"""Expert parallelism: the MoE layer inside ``shard_map`` with ``all_to_all`` equals the
single-device layer (outputs, routing statistics, gradients) on 8 fake CPU devices, alone and in
a BERT train step with LoRA on the experts and the router; bad expert meshes are rejected.

Each multi-device check is one subprocess (``XLA_FLAGS`` must be set before jax starts).
"""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_8_devices(script: str) -> str:
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  out = subprocess.run([sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  assert 'OK' in out.stdout, out.stdout
  return out.stdout


LAYER_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    assert jax.device_count() == 8, jax.devices()
    from configs import common
    from peftjax import sharding, tree
    from peftjax.moe import MoeConfig, MoeFFN, parallel

    c = common.get_config()
    rules = sharding.rules(c.mesh)  # the defaults: 'batch' over data/fsdp/expert, 'expert'
    G, S, D, F, E, R = 16, 12, 16, 32, 8, 3  # 16 groups: 2 per device on data2 x expert4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    mask = jnp.asarray(np.arange(S)[None, :] < rng.integers(4, S + 1, (G, 1)))  # padded rows
    assert not bool(mask.all())
    lora = {k: (jnp.asarray(rng.normal(size=(E, i, R)) * 0.2, jnp.float32),
                jnp.asarray(rng.normal(size=(E, R, o)) * 0.2, jnp.float32))
            for k, (i, o) in {'intermediate': (D, F), 'output': (F, D)}.items()}

    def mesh_of(data, expert):
      c.mesh.data, c.mesh.expert = data, expert
      return sharding.make_mesh(c.mesh, jax.devices()[:data * expert])

    def check(cfg, use_lora, meshes):
      layer = MoeFFN(cfg, hidden_size=D, intermediate_size=F)
      # Shapes without compiling the init; N(0, 0.1) values (non-zero biases, a sharper router).
      shapes = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x, mask)['params'])
      params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype),
                            shapes)

      def loss(params, x, lora):
        y, st = layer.apply({'params': params}, x, mask, expert_lora=lora if use_lora else None,
                            mutable=['moe'])
        st = {k: v[0] for k, v in st['moe'].items()}
        l = jnp.sum(jnp.sin(y) * y) + st['balance_loss'] + st['z_loss']
        return l, (y, st)

      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

      def run():
        compiled = fn.lower(params, x, lora).compile()
        (_, (y, st)), grads = compiled(params, x, lora)
        return {'y': y, 'stats': st, 'grads': grads}, compiled.as_text()

      ref, hlo = run()
      assert 'all-to-all' not in hlo
      if cfg.router == 'topk':
        assert float(ref['stats']['dropped_fraction']) > 0.05, ref['stats']  # capacity binds
      if use_lora:
        assert float(jnp.abs(ref['grads'][2]['output'][1]).max()) > 0
      ref = tree.flatten(ref)
      for data, expert in meshes:
        with jax.set_mesh(mesh_of(data, expert)), nn.logical_axis_rules(rules):
          assert parallel.expert_mesh(E).size == expert
          got, hlo = run()
        where = f'{cfg.router} lora={use_lora} data{data} x expert{expert}'
        assert 'all-to-all' in hlo, where  # really the shard_map path, not the 1-device one
        got = tree.flatten(got)
        assert got.keys() == ref.keys(), where
        for p in ref:
          np.testing.assert_allclose(got[p], ref[p], atol=1e-5, rtol=1e-5,
                                     err_msg=f'{where}: {p}')
        print(where, 'ok', flush=True)

    top2 = MoeConfig(num_experts=E, top_k=2, capacity_factor=1.0)
    check(top2, use_lora=False, meshes=((2, 4), (1, 8)))
    check(MoeConfig(num_experts=E, top_k=2, capacity_factor=1.0, router='expert_choice'),
          use_lora=False, meshes=((2, 4),))
    check(top2, use_lora=True, meshes=((1, 8),))
    print('OK')
''')


def test_moe_layer_expert_parallel_equals_single_device():
  """Top-2 (tokens dropped, padding) on data2 x expert4 and expert8, expert choice on
  data2 x expert4, the ``expert_lora`` hook on expert8: output, sown stats and the gradients
  w.r.t. params, input and LoRA factors equal the no-mesh layer's."""
  _run_8_devices(LAYER_SCRIPT)


BERT_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    assert jax.device_count() == 8, jax.devices()
    from configs import common
    from peftjax import optim, peft, sharding, tree
    from peftjax import run as run_lib, step as step_lib
    from peftjax.components import moe_aux
    from peftjax.tasks.classification import Classification
    from peftjax.models import BertClassifier, BertConfig
    from peftjax.models.build import Built
    from peftjax.moe import MoeConfig

    E, B, S = 8, 16, 8
    c = common.get_config()
    c.optim.warmup_steps = 0
    c.peft.method = 'lora'
    c.peft.lora.rank = 2
    c.peft.lora.targets = r'moe/(intermediate|output|router)/kernel$'
    bert = BertConfig(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2,
                      intermediate_size=32, max_position=16,
                      moe=MoeConfig(num_experts=E, top_k=2, capacity_factor=1.0),
                      moe_layers=(1,))
    module = BertClassifier(bert, num_classes=3)
    ids = jnp.ones((B, S), jnp.int32)
    # Shapes and logical axes without compiling the init; random values from numpy.
    boxed = jax.eval_shape(module.init, jax.random.key(0), ids, ids)['params']
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.1).astype(s.dtype),
                          nn.meta.unbox(boxed))
    built = Built(module, params, ('input_ids', 'attention_mask', 'token_type_ids'),
                  nn.get_partition_spec(boxed), 'random')
    method = peft.build(c.peft)
    lora = method.init(jax.random.key(1), module, built.params,
                       {'input_ids': ids, 'attention_mask': ids})
    sites = method.sites(built.params, lora)
    # From the trees, the experts' kernels are sites with one leading (expert) axis.
    assert sorted(s.lead for s in sites) == [(), (E,), (E,)], sites
    base_tr, frozen = tree.partition(built.params, method.trainable_base)
    base_tr_specs, frozen_specs = tree.partition(
        method.base_logical_specs(built.logical_specs), method.trainable_base)
    specs = {'base': base_tr_specs, 'peft': method.logical_specs(built.logical_specs, lora)}
    trainable = {'base': base_tr, 'peft': lora}
    tx = optim.make_optimizer(c.optim, 10)
    step = jax.jit(step_lib.make_train_step(run_lib.make_forward(built, method), tx,
                                            Classification(None), [moe_aux.component(0.1, 0.01)]))
    batches = []
    for _ in range(3):
      mask = (np.arange(S)[None] < rng.integers(3, S + 1, (B, 1))).astype(np.int32)
      batches.append({'input_ids': rng.integers(1, 100, (B, S)).astype(np.int32),
                      'attention_mask': mask, 'token_type_ids': np.zeros((B, S), np.int32),
                      'label': rng.integers(0, 3, B).astype(np.int32)})

    def run(data, expert):
      c.mesh.data, c.mesh.expert = data, expert
      mesh = sharding.make_mesh(c.mesh, jax.devices()[:data * expert])
      rules = sharding.rules(c.mesh)
      placed = jax.tree.map(jax.device_put, trainable,
                            sharding.logical_to_sharding(specs, mesh, rules))
      state = run_lib.TrainState.create(tx, placed, seed=0)
      fz = jax.tree.map(jax.device_put, frozen,
                        sharding.logical_to_sharding(frozen_specs, mesh, rules))
      bsh = sharding.batch_sharding(mesh, rules)
      metrics = []
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        bs = [sharding.shard_batch(b, bsh) for b in batches]
        compiled = step.lower(state, fz, bs[0]).compile()
        for b in bs:  # dropout on: its masks must not depend on the sharding either
          state, m = compiled(state, fz, b)
          metrics.append(jax.device_get(m))
      return state, metrics, compiled.as_text()

    one, m1, hlo1 = run(1, 1)
    ep, m8, hlo8 = run(2, 4)
    assert 'all-to-all' in hlo8 and 'all-to-all' not in hlo1
    assert max(float(m['dropped_fraction']) for m in m1) > 0.05, m1
    for i, (a, b) in enumerate(zip(m1, m8)):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-5, err_msg=f'step {i}: {k}')
    p1, p8 = tree.flatten(jax.device_get(one.params)), tree.flatten(ep.params)
    for p in p1:
      np.testing.assert_allclose(np.asarray(p8[p]), p1[p], atol=2e-6, rtol=1e-5, err_msg=p)
    moe = 'peft/encoder/layer_1/moe'
    for name in ('intermediate', 'output'):
      for f in ('lora_a', 'lora_b'):
        arr = p8[f'{moe}/{name}/{f}']
        assert arr.sharding.spec[0] == 'expert', (name, f, arr.sharding)
        assert arr.sharding.shard_shape(arr.shape)[0] == E // 4, (name, f, arr.sharding)
        assert len(arr.sharding.device_set) == 8
      # LoRA B starts at 0: the expert update really trained (and matched).
      assert np.abs(p1[f'{moe}/{name}/lora_b']).max() > 1e-4
    # The router's LoRA B (rank, E) follows the router kernel's ('embed', 'expert') axes.
    router_b = p8[f'{moe}/router/lora_b']
    assert router_b.sharding.shard_shape(router_b.shape) == (router_b.shape[0], E // 4)
    assert np.abs(p1[f'{moe}/router/lora_b']).max() > 1e-4
    print('OK', len(p1))
''')


def test_bert_moe_lora_train_step_expert_parallel():
  """3 jitted train steps of a tiny BERT with an MoE layer and LoRA on experts + router:
  data2 x expert4 equals one device (metrics, all trainable params), and the expert LoRA
  factors placed from ``method.logical_specs`` are split 4-way over the expert axis."""
  _run_8_devices(BERT_SCRIPT)


# ------------------------------------------------------------------ bad meshes (no devices needed)


def _abstract_mesh(expert: int):
  from peftjax import sharding
  return jax.sharding.AbstractMesh((1, 1, expert, 1), sharding.MESH_AXES)


def _moe_apply(moe_cfg, rules, expert: int = 4):
  from peftjax.moe import MoeFFN
  layer = MoeFFN(moe_cfg, hidden_size=8, intermediate_size=16)
  x = jnp.ones((4, 4, 8))
  params = jax.eval_shape(layer.init, jax.random.key(0), x)['params']
  with jax.sharding.use_abstract_mesh(_abstract_mesh(expert)), nn.logical_axis_rules(rules):
    return jax.eval_shape(lambda p: layer.apply({'params': p}, x), params)


def _default_rules():
  from configs import common
  from peftjax import sharding
  return sharding.rules(common.get_config().mesh)


def test_num_experts_not_divisible_by_expert_axis():
  from peftjax.moe import MoeConfig
  with pytest.raises(ValueError, match=r'moe\.num_experts=6 .*expert.* 4'):
    _moe_apply(MoeConfig(num_experts=6), _default_rules())
  _moe_apply(MoeConfig(num_experts=8), _default_rules())  # a multiple of 4 is fine


@pytest.mark.parametrize('kind,msg', [
    ('batch_rule', r"'batch' rule to include it"),
    ('ragged', r"moe\.dispatch='ragged'"),
])
def test_bad_expert_parallel_settings(kind, msg):
  from peftjax.moe import MoeConfig
  rules = _default_rules()
  cfg = MoeConfig(num_experts=8)
  if kind == 'batch_rule':  # the expert devices must also split the batch
    rules = tuple((k, ('data', 'fsdp')) if k == 'batch' else (k, v) for k, v in rules)
  else:
    cfg = MoeConfig(num_experts=8, dispatch='ragged')
  with pytest.raises(ValueError, match=msg):
    _moe_apply(cfg, rules)
