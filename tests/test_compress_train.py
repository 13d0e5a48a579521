"""Compression inside the training loop: masks in the step, the teacher in the step, bad input,
the Deep Compression coding round trip, and a pruned run that resumes exactly."""
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tinybert
from configs import common
from configs import tiny
from peftjax import optim
from peftjax import run
from peftjax import step as step_lib
from peftjax import train
from peftjax import tree
from peftjax import validate
from peftjax.compress import deep
from peftjax.compress import distill
from peftjax.compress import huffman
from peftjax.compress import plan
from peftjax.compress import prune
from peftjax.compress import share
from peftjax.components import distill as distill_comp
from peftjax.components import lowrank as lowrank_comp
from peftjax.components import prune as prune_comp
from peftjax.errors import ConfigError
from peftjax.tasks.classification import Classification

KERNELS = r'encoder/.*/(query|key|value|out|intermediate|output)/kernel$'


def _full_ft_state(c):
  b = tinybert.built()
  m, _ = tinybert.method('full')
  base_tr, frozen = tree.partition(b.params, m.trainable_base)
  trainable = {'base': base_tr, 'peft': {}}
  tx = optim.make_optimizer(c.optim, 20)
  state = run.TrainState.create(tx, trainable, seed=0)
  return b, m, tx, state, frozen


def test_gradual_pruning_in_the_step_follows_the_cubic_schedule():
  c = common.get_config()
  c.optim.warmup_steps, c.optim.learning_rate = 0, 1e-2
  p = c.compress.prune
  p.kind, p.targets, p.sparsity, p.begin_step, p.end_step, p.every = 'magnitude', KERNELS, 0.8, 0, 6, 2
  b, m, tx, state, frozen = _full_ft_state(c)
  masks = prune.magnitude_masks(state.params['base'], 0.0, targets=KERNELS)
  comp = prune_comp.component(masks, p, gradual=True)
  state = state.replace(extra={'prune': comp.init(state.params)})
  step = jax.jit(step_lib.make_train_step(run.make_forward(b, m), tx, Classification(None),
                                          [comp]))
  pruned_before = None
  for i in range(1, 9):
    state, _ = step(state, frozen, tinybert.batch())
    flat = tree.flatten(state.params['base'])
    kernels = tree.select(state.params['base'], KERNELS)
    zeros = sum(int(jnp.sum(flat[k] == 0)) for k in kernels)
    # Masks change only at updates 0, 2, 4, 6 (every=2, end=6); each leaf holds exactly its count.
    s = prune.cubic_sparsity(i - i % 2 if i <= 6 else 6, initial=0.0, final=0.8, begin=0, end=6,
                             every=2)
    assert zeros == sum(round(s * flat[k].size) for k in kernels), i
    pruned = {k: np.asarray(flat[k] == 0) for k in kernels}
    if pruned_before is not None:  # a pruned weight stays pruned: the set only grows
      assert all((pruned[k] | ~pruned_before[k]).all() for k in kernels)
    pruned_before = pruned
    # The masks in the state are exactly the zero pattern.
    fm = tree.flatten(state.extra['prune'])
    assert all(np.array_equal(np.asarray(fm[k]) == 0, pruned[k]) for k in kernels)
  assert zeros / sum(flat[k].size for k in kernels) == pytest.approx(0.8, abs=1e-3)


def test_distillation_step_uses_the_kd_loss_and_never_moves_the_teacher():
  c = common.get_config()
  c.optim.warmup_steps = 0
  b, m, tx, state, frozen = _full_ft_state(c)
  teacher_params = jax.tree.map(lambda x: x * 1.5, b.params)  # another model of the same shape
  before = jax.tree.map(np.asarray, teacher_params)
  t_fwd = distill_comp.teacher_forward(b)
  dcfg = c.compress.distill
  comp = distill_comp.component(b, temperature=dcfg.temperature, alpha=dcfg.alpha)
  step = jax.jit(step_lib.make_train_step(run.make_forward(b, m), tx, Classification(None),
                                          [comp]))
  new_state, metrics = step(state, frozen, tinybert.batch(), {'distill': teacher_params})
  # The reported loss is kd_loss of the student's (dropout) logits against the teacher's.
  inputs = tinybert.inputs()
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  student = run.make_forward(b, m)(state.params, frozen, inputs, rng, deterministic=False)
  want, parts = distill.kd_loss(student, t_fwd(teacher_params, inputs), tinybert.batch()['label'],
                                temperature=dcfg.temperature, alpha=dcfg.alpha)
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['soft_loss'], parts['soft'], rtol=1e-5, atol=1e-6)
  assert tinybert.moved(state.params, new_state.params)  # the student learns
  assert not tinybert.moved(before, jax.tree.map(np.asarray, teacher_params))


@pytest.mark.parametrize('field, value, expect', [
    ('prune.kind', 'magnitude:1.0', "compress.prune.sparsity=1.0; valid: a fraction in [0, 1)"),
    ('prune.kind', 'nm:3:2', 'compress.prune.n=3, m=2; valid: 1 <= n <= m'),
    ('share.bits', 9, 'compress.share.bits'),
    ('lowrank.targets', 'kernel$', 'compress.lowrank rank=0, energy=0.0; valid: exactly one'),
    ('prune.kind', 'sparsify', "compress.prune.kind='sparsify'; valid: none, magnitude"),
])
def test_bad_compress_config_fails_validation(field, value, expect):
  c = common.get_config()
  if field == 'prune.kind' and ':' in value:
    kind, *rest = value.split(':')
    c.compress.prune.kind = kind
    if kind == 'magnitude':
      c.compress.prune.sparsity = float(rest[0])
    else:
      c.compress.prune.n, c.compress.prune.m = int(rest[0]), int(rest[1])
  else:
    group, key = field.split('.')
    c.compress[group][key] = value
  with pytest.raises(ConfigError, match=re.escape(expect)):
    validate.validate(c)


def test_nm_input_not_divisible_and_svd_rank_too_big_name_the_leaf():
  params = tinybert.built().params  # hidden 16, FFN 32
  with pytest.raises(prune.PruneError, match=r'input size 16 .* not divisible by m=5'):
    prune.nm_masks(params, n=2, m=5, targets=KERNELS)
  from peftjax.compress import lowrank
  with pytest.raises(ValueError, match=r'rank=17 is invalid for .*intermediate/kernel.*1\.\.16'):
    lowrank.factorize(params, targets=r'intermediate/kernel$', rank=17)


def test_teacher_with_other_outputs_is_refused_before_compute():
  from peftjax.models import BertClassifier
  b = tinybert.built()
  other = BertClassifier(tinybert.BERT, num_classes=5)
  ids = jnp.ones((2, 4), jnp.int32)
  teacher = plan.rebuild(b, other, jax.jit(other.init)(jax.random.key(0), ids, ids)['params'])
  c = common.get_config()
  c.compress.distill.teacher = '/runs/five-classes'
  c.compress.distill.student_layers = ''
  with pytest.raises(ConfigError, match=r"logits of shape \(2, 5\); the student outputs \(2, 3\)"):
    plan.prepare(c, b, _NoImages, lambda path: (None, teacher))


def test_huffman_roundtrip_rebuilds_a_pruned_shared_tree_exactly():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64, 48)).astype(np.float32)
  params = {'d': {'kernel': w, 'bias': np.zeros(48, np.float32)},
            'e': {'kernel': rng.normal(size=(48, 10)).astype(np.float32)}}
  masks = prune.magnitude_masks(params, 0.9, targets=r'd/kernel$')
  shared = share.share(params, bits=4, targets='kernel$', masks={'d': {'kernel': masks['d']['kernel']}})
  decoded, nbytes = deep.huffman_roundtrip(shared, gap_bits=3)  # 3 bits: gaps need fillers
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(decoded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  size = huffman.compressed_size(shared, gap_bits=3)['leaves']
  # The bytes really written equal the size report's coded streams, whole bytes per stream.
  coded = sum(-(-size[p]['index_bits'] // 8) - 0 + -(-size[p]['relative_index_bits'] // 8)
              for p in ('d/kernel', 'e/kernel'))
  assert nbytes == coded
  assert size['d/kernel']['n_fillers'] > 0


def test_pruned_run_resumes_to_the_uninterrupted_result(tmp_path):
  c = tiny.get_config()
  c.train.eval_before = False
  c.train.steps, c.train.checkpoint_every, c.train.keep_checkpoints = 4, 2, 2
  c.peft.method = 'full'
  p = c.compress.prune
  p.kind, p.sparsity, p.end_step, p.every = 'magnitude', 0.6, 4, 1
  full = train.train_and_evaluate(c, str(tmp_path / 'full'))
  # The same run stopped after step 2: its step-2 checkpoint, resumed to step 4.
  shutil.copytree(tmp_path / 'full', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '4')
  (tmp_path / 'resumed' / 'summary.json').unlink()
  resumed = train.train_and_evaluate(c, str(tmp_path / 'resumed'))
  assert resumed['trainable_sha256'] == full['trainable_sha256']
  comp = json.loads((tmp_path / 'full' / 'summary.json').read_text())['compression']
  assert comp['target_sparsity'] == pytest.approx(0.6, abs=1e-4)
  assert comp['nonzero_params'] < comp['params']


class _NoImages:  # what plan.prepare reads of the data for text models
  class info:  # noqa: N801
    image_shape = None


def test_prepare_returns_smaller_models_with_matching_sharding_specs():
  from jax.sharding import PartitionSpec as P
  from peftjax.compress import lowrank
  b = tinybert.built()
  c = common.get_config()
  c.compress.prune.kind, c.compress.prune.keep_heads = 'heads', 1
  c.compress.lowrank.targets, c.compress.lowrank.rank = r'intermediate/kernel$', 4
  small, p = plan.prepare(c, b, _NoImages, None)
  assert small.module.cfg.num_heads == 1 and small.module.cfg.head_dim == b.module.cfg.head_dim
  assert p.factored and not p.masks
  # Every parameter has logical axes; the factors take the kernel's input / output axes.
  assert (jax.tree.structure(tree.flatten(small.params)) ==
          jax.tree.structure(tree.flatten(small.logical_specs)))
  specs = tree.flatten(small.logical_specs)
  assert specs['encoder/layer_0/intermediate/kernel_u'] == P('embed', None)
  assert specs['encoder/layer_0/intermediate/kernel_v'] == P(None, 'mlp')
  m, _ = tinybert.method('full')
  base_tr, frozen = tree.partition(small.params, m.trainable_base)
  forward = run.make_forward(small, m, scopes=[lowrank_comp.component().scope])
  logits = forward({'base': base_tr, 'peft': {}}, frozen, tinybert.inputs())
  np.testing.assert_allclose(logits, lowrank.apply(small.module, small.params, tinybert.inputs()),
                             rtol=1e-6)
  assert p.report['prune']['params_after'] < p.report['prune']['params_before']
  assert p.report['lowrank']['ranks'] == {f'encoder/layer_{i}/intermediate/kernel': 4
                                          for i in range(2)}


def test_distillation_step_adds_hidden_and_attention_matching():
  c = common.get_config()
  c.optim.warmup_steps = 0
  d = c.compress.distill
  d.hidden_weight, d.attention_weight = 0.5, 2.0
  b, m, tx, state, frozen = _full_ft_state(c)
  teacher_params = jax.tree.map(lambda x: x * 1.5, b.params)
  comp = distill_comp.component(b, temperature=d.temperature, alpha=d.alpha,
                                hidden_weight=d.hidden_weight,
                                attention_weight=d.attention_weight, layer_map=(0, 1))
  step = jax.jit(step_lib.make_train_step(run.make_forward(b, m), tx, Classification(None),
                                          [comp]))
  _, metrics = step(state, frozen, tinybert.batch(), {'distill': teacher_params})
  assert metrics['hidden_loss'] > 0 and metrics['attention_loss'] > 0
  kd = d.alpha * metrics['soft_loss'] + (1 - d.alpha) * metrics['hard_loss']
  np.testing.assert_allclose(
      metrics['loss'], kd + 0.5 * metrics['hidden_loss'] + 2.0 * metrics['attention_loss'],
      rtol=1e-5)


def test_centroid_finetuning_moves_only_centroids_and_lowers_the_loss():
  from peftjax.models.build import Built
  from peftjax.models.vision import MLP
  rng = np.random.default_rng(0)
  module = MLP(hidden=(32,), num_classes=3, dropout_rate=0.0)
  x = rng.normal(size=(64, 4, 4, 1)).astype(np.float32)
  y = (x.reshape(64, -1)[:, :3].argmax(-1)).astype(np.int32)  # learnable labels
  params = jax.tree.map(np.asarray, module.init(jax.random.key(0), x[:1])['params'])
  params = jax.tree.map(lambda v: v.unbox() if hasattr(v, 'unbox') else v, params,
                        is_leaf=lambda v: hasattr(v, 'unbox'))
  built = Built(module, params, ('image',), None, 'random')

  class Data:
    @staticmethod
    def train_batches(batch_size, seed):
      return [{'image': x, 'label': y, 'weight': np.ones(64, np.float32)}] * 40

  masks = prune.magnitude_masks(params, 0.5, targets='dense_0/kernel$')
  shared = share.share(params, bits=2, targets='kernel$', masks=masks)
  loss = lambda s: float(optax.softmax_cross_entropy_with_integer_labels(
      module.apply({'params': share.expand(s)}, x), y).mean())
  tuned = deep.finetune_centroids(built, Data, shared, steps=40, learning_rate=3e-2,
                                  batch_size=64, seed=0)
  for path in share.shared_paths(shared):
    a, b = tree.flatten(shared)[path + '/indices'], tree.flatten(tuned)[path + '/indices']
    np.testing.assert_array_equal(a, b)  # the clustering is fixed
    assert not np.array_equal(tree.flatten(shared)[path + '/centroids'],
                              tree.flatten(tuned)[path + '/centroids'])
  np.testing.assert_array_equal(tuned['dense_0']['kernel']['mask'], shared['dense_0']['kernel']['mask'])
  expanded = share.expand(tuned)['dense_0']['kernel']
  assert np.all(np.asarray(expanded)[~np.asarray(shared['dense_0']['kernel']['mask'])] == 0)
  assert len(np.unique(np.asarray(expanded))) <= 4 + 1  # 2^2 shared values and the pruned zeros
  assert loss(tuned) < loss(shared)


def test_pruned_frozen_base_under_lora_keeps_exact_zeros():
  c = tiny.get_config()  # LoRA r=8 on query/value over MiniLM's first layer
  c.compress.prune.kind, c.compress.prune.sparsity = 'magnitude', 0.5
  setup = run.build_setup(c)
  assert setup.plan.masks is not None and not setup.plan.gradual
  flat = tree.flatten(setup.frozen)
  kernels = tree.select(setup.frozen, c.compress.prune.targets)
  assert len(kernels) == 6  # the layer's 6 matmuls, all frozen: pruned once, never trained
  for k in kernels:
    assert int(jnp.sum(flat[k] == 0)) == round(0.5 * flat[k].size), k
  # The masks of frozen leaves do not enter the train state (nothing there could move them).
  trainable, frozen = plan.split_masks(setup.plan.masks, setup.trainable['base'])
  assert not trainable and len(tree.flatten(frozen)) == 6
