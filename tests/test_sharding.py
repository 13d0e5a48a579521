"""Meshes from config; data, data x fsdp and data x tensor steps on 8 fake CPU devices equal the
1-device step."""
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from peftjax import sharding


def _mesh_cfg(**kw):
  return ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1, **kw})


def test_mesh_shape_resolves_rest():
  assert sharding.mesh_shape(_mesh_cfg(), 8) == {'data': 8, 'fsdp': 1, 'expert': 1, 'tensor': 1}
  assert sharding.mesh_shape(_mesh_cfg(fsdp=2), 8) == {'data': 4, 'fsdp': 2, 'expert': 1,
                                                       'tensor': 1}
  assert sharding.mesh_shape(_mesh_cfg(data=2, tensor=-1), 8) == {'data': 2, 'fsdp': 1,
                                                                  'expert': 1, 'tensor': 4}
  assert sharding.mesh_shape(_mesh_cfg(data=2, expert=-1), 8) == {'data': 2, 'fsdp': 1,
                                                                  'expert': 4, 'tensor': 1}


def test_data_parallel_size_follows_batch_rule():
  import jax
  mesh_cfg = _mesh_cfg(data=1)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
  rules = (('batch', ('data', 'fsdp', 'expert')),)
  assert sharding.data_parallel_size(mesh, rules) == 1
  assert mesh.axis_names == ('data', 'fsdp', 'expert', 'tensor')


@pytest.mark.parametrize('kw,msg', [
    (dict(fsdp=3), 'not divisible'),
    (dict(data=2), 'needs 2 devices'),
    (dict(fsdp=-1), 'only one axis may be -1'),
    (dict(tensor=0), 'mesh.tensor=0'),
])
def test_mesh_shape_errors(kw, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.mesh_shape(_mesh_cfg(**kw), 8)


SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, ml_collections
    assert jax.device_count() == 8, jax.devices()
    from configs import common
    from peftjax import optim, peft, sharding, tree
    from peftjax import run as run_lib, step as step_lib
    from peftjax.tasks.classification import Classification
    from peftjax.models import BertClassifier, BertConfig
    from peftjax.models.build import Built

    c = common.get_config()
    c.optim.warmup_steps = 0
    bert = BertConfig(vocab_size=200, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position=32)
    module = BertClassifier(bert, num_classes=2)
    ids = jnp.ones((16, 16), jnp.int32)
    boxed = module.init(jax.random.key(0), ids, ids)['params']
    built = Built(module, nn.meta.unbox(boxed), ('input_ids', 'attention_mask', 'token_type_ids'),
                  nn.get_partition_spec(boxed), 'random')
    method = peft.build(c.peft)
    inputs = {'input_ids': ids, 'attention_mask': ids}
    lora = method.init(jax.random.key(1), module, built.params, inputs)
    base_tr, frozen = tree.partition(built.params, method.trainable_base)
    trainable = {'base': base_tr, 'peft': lora}
    tx = optim.make_optimizer(c.optim, 10)
    step = jax.jit(step_lib.make_train_step(run_lib.make_forward(built, method), tx,
                                            Classification(None)))
    rng = np.random.default_rng(0)
    batches = [{'input_ids': rng.integers(1, 200, (16, 16)).astype(np.int32),
                'attention_mask': (rng.random((16, 16)) > 0.2).astype(np.int32),
                'token_type_ids': np.zeros((16, 16), np.int32),
                'label': rng.integers(0, 2, 16).astype(np.int32)} for _ in range(3)]

    def run(devices, **axes):
      """3 steps on a mesh; params and frozen base placed by their logical axes and the rules."""
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = axes.get('data', -1), axes.get('fsdp', 1), \
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
      lora_a = st.params['peft']['encoder']['layer_0']['attention']['query']['lora_a']
      kernel = fz['encoder']['layer_0']['attention']['query']['kernel']
      assert len(lora_a.sharding.device_set) == 8, lora_a.sharding
      if 'fsdp' in axes:  # the frozen base is split over fsdp; LoRA A like the kernel's input
        assert kernel.sharding.spec[0] == 'fsdp' and lora_a.sharding.spec[0] == 'fsdp', (
            kernel.sharding, lora_a.sharding)
        assert kernel.addressable_shards[0].data.shape[0] == 32 // 4
      if 'tensor' in axes:  # heads split over tensor; LoRA B takes the kernel's output axes
        lora_b = st.params['peft']['encoder']['layer_0']['attention']['query']['lora_b']
        assert kernel.sharding.spec[1] == 'tensor' and lora_b.sharding.spec[1] == 'tensor', (
            kernel.sharding, lora_b.sharding)
      for (p, a), b in zip(tree.flatten(one).items(), tree.flatten(got).values()):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5, err_msg=f'{axes} {p}')
    print('OK', len(tree.flatten(one)))
''')


def test_sharded_steps_equal_single_device():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': root}
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('OK'), out.stdout
