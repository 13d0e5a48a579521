"""Mixed precision (``config.dtype``) and per-layer rematerialization (``config.model.remat``)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tinybert as tb
from configs import common
from peftjax import optim
from peftjax import run
from peftjax import step as step_lib
from peftjax import timing
from peftjax import tree
from peftjax import validate
from peftjax.errors import ConfigError
from peftjax.models import BertClassifier
from peftjax.models.bert import REMAT_POLICIES
from peftjax.moe.layer import MoeConfig
from peftjax.tasks.classification import Classification


def _built(**cfg):
  """The tiny classifier with its (float32) parameters, under a different BertConfig."""
  b = tb.built()
  return dataclasses.replace(b, module=BertClassifier(dataclasses.replace(tb.BERT, **cfg),
                                                      num_classes=3))


def _dtypes(t) -> set:
  return {str(x.dtype) for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_step_keeps_float32_master_weights_and_loss():
  m, p, c = tb.init('lora')
  b = _built(dtype='bfloat16')
  c.optim.warmup_steps = 0
  base_tr, frozen = tree.partition(b.params, m.trainable_base)
  trainable = {'base': base_tr, 'peft': p}
  tx = optim.make_optimizer(c.optim, 10)
  state = run.TrainState.create(tx, trainable, seed=0)
  step = jax.jit(step_lib.make_train_step(run.make_forward(b, m), tx, Classification(None)))
  new, metrics = step(state, frozen, tb.batch())
  assert _dtypes(new.params) == {'float32'}
  assert _dtypes(new.opt_state) == {'float32'}
  assert metrics['loss'].dtype == jnp.float32 and np.isfinite(metrics['loss'])
  # The step really trained: B moved off zero (in float32).
  lora_b = tree.flatten(new.params)['peft/encoder/layer_0/attention/query/lora_b']
  assert lora_b.dtype == jnp.float32 and float(jnp.abs(lora_b).max()) > 0


def test_bf16_logits_close_to_f32():
  b32, b16 = tb.built(), _built(dtype='bfloat16')
  x = tb.inputs()
  f32 = b32.module.apply({'params': b32.params}, **x)
  bf16 = b16.module.apply({'params': b16.params}, **x)
  assert bf16.dtype == jnp.float32  # the head computes in float32
  # bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%); two layers of rounding on logits
  # of size ~0.1-1: absolute 2e-2 is a few bf16 ulps, and bf16 must not be exact.
  np.testing.assert_allclose(bf16, f32, atol=2e-2, rtol=0)
  assert not np.array_equal(np.asarray(bf16), np.asarray(f32))


def _loss_and_grads(b, m, p, frozen, base_tr):
  fwd = run.make_forward(b, m)

  def loss(trainable):
    logits = fwd(trainable, frozen, tb.inputs(), jax.random.key(3), deterministic=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tb.batch()['label']).mean()

  return jax.jit(jax.value_and_grad(loss))({'base': base_tr, 'peft': p})


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_same_loss_and_grads(policy):
  m, p, _ = tb.init('lora')
  # B != 0, so the gradient reaches A and the layers below through the LoRA branch too.
  p = jax.tree.map(lambda x: x + 0.05, p)
  base_tr, frozen = tree.partition(tb.built().params, m.trainable_base)
  ref_b, rem_b = _built(grad_barrier=True), _built(grad_barrier=True, remat=policy)
  l0, g0 = _loss_and_grads(ref_b, m, p, frozen, base_tr)
  l1, g1 = _loss_and_grads(rem_b, m, p, frozen, base_tr)  # dropout on: same rng, same masks
  np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-6)
  f0, f1 = tree.flatten(g0), tree.flatten(g1)
  assert f0.keys() == f1.keys()
  for k in f0:
    np.testing.assert_allclose(f1[k], f0[k], rtol=0, atol=1e-6, err_msg=k)
  assert float(jnp.abs(f0['peft/encoder/layer_0/attention/query/lora_a']).max()) > 0


def test_remat_recomputes_the_layers_in_the_compiled_step():
  """Deterministic (XLA's cost analysis, not a timing): with 'full' the compiled step does more
  FLOPs, the recomputed forward of every layer."""
  m, p, _ = tb.init('lora')
  base_tr, frozen = tree.partition(tb.built().params, m.trainable_base)
  ids = jnp.ones((8, 16), jnp.int32)
  x = {'input_ids': ids, 'attention_mask': ids, 'token_type_ids': jnp.zeros_like(ids)}
  flops = {}
  for policy in ('none', 'full'):
    b = _built(remat=policy)
    fwd = run.make_forward(b, m)
    g = jax.jit(jax.grad(lambda t: fwd(t, frozen, x).sum()))
    flops[policy] = timing.cost_flops(timing.compile_fn(g, {'base': base_tr, 'peft': p}))
  assert flops['full'] > flops['none'] * 1.1


def test_remat_keeps_moe_sow():
  """An MoE layer under remat still sows its routing statistics into the 'moe' collection."""
  cfg = dict(moe=MoeConfig(num_experts=2, top_k=1), moe_layers=(1,))
  ref = BertClassifier(dataclasses.replace(tb.BERT, **cfg), num_classes=3)
  rem = BertClassifier(dataclasses.replace(tb.BERT, remat='full', **cfg), num_classes=3)
  params = jax.jit(ref.init)(jax.random.key(0), **tb.inputs())['params']
  run = lambda mod: jax.jit(lambda p: mod.apply({'params': p}, **tb.inputs(), mutable=['moe']))
  out0, aux0 = run(ref)(params)
  out1, aux1 = run(rem)(params)
  np.testing.assert_allclose(out1, out0, atol=1e-6)
  f0, f1 = tree.flatten(aux0['moe']), tree.flatten(aux1['moe'])
  assert f0 and f0.keys() == f1.keys()
  for k in f0:
    np.testing.assert_allclose(f1[k], f0[k], atol=1e-6, err_msg=k)


@pytest.mark.parametrize('field,value', [('dtype', 'float16'), ('model.remat', 'everything')])
def test_validation_names_the_field(field, value):
  c = common.get_config()
  if field == 'dtype':
    c.dtype = value
  else:
    c.model.remat = value
  with pytest.raises(ConfigError, match=rf'config\.{field}=.{value}.'):
    validate.validate(c)


def test_remat_policies_are_the_documented_ones():
  assert set(REMAT_POLICIES) == {'none', 'full', 'dots'}
  c = common.get_config()
  assert c.dtype == 'float32' and c.model.remat == 'none' and 'dtype' not in c.model
