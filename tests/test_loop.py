"""The loop knows no feature by name: a task defined only here trains through
``train_and_evaluate``, L2-SP is one component whose gradient is the analytic one, components
compose in one jitted step, and the package structure keeps the loop on top."""
import ast
import dataclasses
import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tinybert
from configs import common
from peftjax import components
from peftjax import quant
from peftjax import run
from peftjax import step as step_lib
from peftjax import tasks
from peftjax import train
from peftjax import tree
from peftjax.components import distill as distill_comp
from peftjax.components import l2sp
from peftjax.components import prune as prune_comp
from peftjax.compress import distill
from peftjax.compress import prune
from peftjax.data.pipeline import DataInfo
from peftjax.models.build import Built
from peftjax.tasks.classification import Classification

ROOT = pathlib.Path(__file__).resolve().parents[1]
W_TRUE = np.array([1.5, -2.0, 0.5, 1.0], np.float32)


# ------------------------------------------------------------------ a task defined only here
class _Regressor(nn.Module):
  """y = MLP(x); its ``__call__`` takes no ``deterministic`` argument."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16, name='hidden')(x)
    return nn.Dense(1, name='out')(nn.gelu(h))[:, 0]


class _Batches:
  """Random-access batches of y = x . w + noise, a pure function of (seed, index)."""

  def __init__(self, n_rows, batch_size, seed, weight=False):
    self.n, self.bs, self.seed, self.weight = n_rows, batch_size, seed, weight

  def __len__(self):
    return -(-self.n // self.bs)

  def __getitem__(self, i):
    if self.weight and i >= len(self):
      raise IndexError(i)
    rng = np.random.default_rng((self.seed, i))
    x = rng.normal(size=(self.bs, 4)).astype(np.float32)
    out = {'x': x, 'y': (x @ W_TRUE + 0.05 * rng.normal(size=self.bs)).astype(np.float32)}
    if self.weight:
      out['weight'] = np.ones(self.bs, np.float32)
    return out

  def __iter__(self):
    return (self[i] for i in range(len(self)))


class _RegressionData:
  info = DataInfo(name='synthetic_regression', kind='vector', num_classes=0, class_names=(),
                  splits={'train': 1024, 'validation': 64, 'test': 64}, image_shape=None)

  def train_batches(self, batch_size, seed):
    return _Batches(10**9, batch_size, seed)

  def eval_batches(self, split, batch_size):
    return _Batches(64, batch_size, {'validation': 1, 'test': 2}[split], weight=True)


class Regression:
  """Mean squared error; ``mse`` is what before/after report."""
  name = 'regression_test'
  headline = 'mse'

  def __init__(self, config):
    self.config = config

  def build_data(self, config):
    return _RegressionData()

  def build_model(self, config, data):
    module = _Regressor()
    boxed = module.init(jax.random.key(config.seed), jnp.zeros((2, 4)))['params']
    return Built(module, nn.meta.unbox(boxed), ('x',), nn.get_partition_spec(boxed), 'random')

  def sample_inputs(self, built, data):
    return {'x': jnp.zeros((2, 4), jnp.float32)}

  def loss(self, y_hat, batch):
    mse = jnp.mean(jnp.square(y_hat - batch['y']))
    return mse, {'mse': mse}

  def eval_stats(self, y_hat, batch):
    return {'se': jnp.square(y_hat - batch['y']) * batch['weight'], 'weight': batch['weight']}

  def eval_reduce(self, stats):
    n = stats['weight'].sum()
    return {'mse': float(stats['se'].sum() / n), 'loss': float(stats['se'].sum() / n),
            'examples': int(n)}

  def summary(self, before, after):
    return {'mse_before': None if before is None else before['mse'], 'mse_after': after['mse']}

  def progress(self, logged):
    return {'mse': f"{logged['mse']:.4f}"}


tasks.register('regression_test', Regression)


def _regression_config(**overrides):
  c = common.get_config()
  c.task = 'regression_test'
  c.model.name = 'mlp'
  c.data.name = 'synthetic_regression'
  c.peft.method = 'lora'
  c.peft.lora.targets = r'hidden/kernel$'
  c.peft.lora.rank = 2
  c.peft.head = r'^out/'
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.weight_decay = 3e-2, 0, 0.0
  c.train.steps, c.train.batch_size, c.train.eval_batch_size = 60, 32, 32
  c.train.eval_every, c.train.log_every, c.train.checkpoint_every = 30, 10, 30
  c.train.progress = False
  c.update_from_flattened_dict(overrides)
  return c


def test_a_task_defined_in_a_test_trains_through_train_and_evaluate(tmp_path):
  summary = train.train_and_evaluate(_regression_config(**{'l2sp.beta': 1e-3}), str(tmp_path))
  # The task's own before/after entries, no classification keys.
  assert 'accuracy_after' not in summary
  assert summary['mse_after'] < 0.25 * summary['mse_before'], summary
  # LoRA A (4 x 2) and B (2 x 16) on hidden/kernel, and the head out/{kernel 16x1, bias 1}.
  assert summary['trainable_params'] == 4 * 2 + 2 * 16 + 16 + 1
  logged = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train_rows = [r for r in logged if r['split'] == 'train']
  assert [r['step'] for r in train_rows] == [10, 20, 30, 40, 50, 60]
  # The L2-SP component's metric (beta: the head only) is logged with the task's.
  assert all(r['l2sp'] > 0 and 'mse' in r for r in train_rows)
  # Checkpoints hold the typed train state: a second call resumes the finished run's last one.
  again = train.train_and_evaluate(_regression_config(**{'l2sp.beta': 1e-3}), str(tmp_path))
  assert again['trainable_sha256'] == summary['trainable_sha256']


def test_unknown_task_names_the_registered_ones():
  c = _regression_config()
  c.task = 'regresion'
  with pytest.raises(Exception, match=r"config.task='regresion' is invalid; valid: "
                                      r".*'classification'.*'regression_test'"):
    run.build_setup(c)


# ------------------------------------------------------------------ L2-SP
def test_l2sp_gradient_is_the_analytic_one():
  b = tinybert.built()
  m, c = tinybert.method('full')
  base_tr, frozen = tree.partition(b.params, m.trainable_base)
  head = c.peft.head
  is_head = tree.make_selector(head)
  # Start away from the reference so that w - w0 is not zero.
  w0 = {p: np.asarray(v) for p, v in tree.flatten(base_tr).items() if not is_head(p, v)}
  start = tree.map_with_path(lambda p, v: v + 0.01 * jnp.cos(jnp.arange(v.size).reshape(v.shape))
                             if not is_head(p, v) else v, base_tr)
  alpha, beta = 0.3, 0.05
  comp = l2sp.component(w0, head, alpha=alpha, beta=beta)
  task = Classification(None)
  fwd = run.make_forward(b, m)
  tx = optax.sgd(1.0)  # the update is minus the gradient

  def one_step(comps, consts):
    state = run.TrainState.create(tx, {'base': start, 'peft': {}}, seed=0)
    step = jax.jit(step_lib.make_train_step(fwd, tx, task, comps))
    return step(state, frozen, tinybert.batch(), consts)

  plain, _ = one_step((), None)
  reg, metrics = one_step((comp,), {'l2sp': w0})
  extra_grad = jax.tree.map(lambda a, r: np.asarray(a) - np.asarray(r),
                            plain.params['base'], reg.params['base'])
  for p, g in tree.flatten(extra_grad).items():
    w = np.asarray(tree.flatten(start)[p])
    want = beta * w if is_head(p, w) else alpha * (w - w0[p])
    np.testing.assert_allclose(g, want, rtol=2e-4, atol=2e-7, err_msg=p)
  want_penalty = (0.5 * alpha * sum(np.sum((np.asarray(tree.flatten(start)[p]) - w0[p]) ** 2)
                                    for p in w0)
                  + 0.5 * beta * sum(np.sum(np.asarray(v) ** 2)
                                     for p, v in tree.flatten(start).items() if is_head(p, v)))
  np.testing.assert_allclose(metrics['l2sp'], want_penalty, rtol=1e-5)
  # The reported loss is the task's alone; the penalty is only added to what is optimised.
  np.testing.assert_allclose(metrics['loss'], one_step((), None)[1]['loss'], rtol=1e-6)


def test_l2sp_bad_weight_names_the_field():
  c = common.get_config()
  c.l2sp.alpha = -1.0
  with pytest.raises(Exception, match=r'config.l2sp.alpha=-1.0 is invalid; valid: a number >= 0'):
    l2sp.from_config(c, None)


# ------------------------------------------------------------------ composition
def test_lora_qat_pruning_and_distillation_compose_in_one_jitted_step():
  b = tinybert.built()
  _, c = tinybert.method('lora', targets=r'attention/(query|value)/kernel$')
  c.quant.qat, c.quant.targets = True, r'encoder/.*kernel$'
  m = quant.wrap(tinybert.method('lora', targets=r'attention/(query|value)/kernel$')[0], c.quant)
  peft_params = m.init(jax.random.key(1), b.module, b.params, tinybert.inputs())
  base = m.prepare_base(b.params, peft_params, module=b.module, inputs=tinybert.inputs())
  # Prune the (trainable) head and a frozen kernel: the frozen one once, the head every step.
  masks = prune.magnitude_masks(base, 0.5, targets=r'(classifier|layer_0/output/dense)/kernel$')
  base = prune.apply_masks(base, masks)
  base_tr, frozen = tree.partition(base, m.trainable_base)
  trainable = {'base': base_tr, 'peft': peft_params}
  teacher = dataclasses.replace(b, params=jax.tree.map(lambda x: 1.5 * x, b.params))
  d = c.compress.distill
  comps = (prune_comp.component(masks, c.compress.prune),
           distill_comp.component(teacher, temperature=d.temperature, alpha=d.alpha))
  tx = optax.adam(1e-2)
  extra = {}
  for comp in comps:
    if comp.init is not None and comp.init(trainable) is not None:
      extra[comp.name] = comp.init(trainable)
  assert set(extra) == {'prune'} and set(tree.flatten(extra['prune'])) == {'classifier/kernel'}
  state = run.TrainState.create(tx, trainable, seed=0, extra=extra)
  fwd = run.make_forward(b, m)
  step = jax.jit(step_lib.make_train_step(fwd, tx, Classification(None), comps))
  new, metrics = step(state, frozen, tinybert.batch(), {'distill': teacher.params})
  # The loss is distillation's objective of the (fake-quantized, LoRA) student's logits.
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  student = fwd(state.params, frozen, tinybert.batch(), rng, deterministic=False)
  t_logits = distill_comp.teacher_forward(teacher)(teacher.params, tinybert.inputs())
  want, _ = distill.objective(distill.Taps(student), distill.Taps(t_logits), tinybert.batch(),
                              temperature=d.temperature, alpha=d.alpha)
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-5, atol=1e-6)
  assert tinybert.moved(state.params['peft'], new.params['peft'])  # LoRA trains
  head = np.asarray(new.params['base']['classifier']['kernel'])
  mask = np.asarray(masks['classifier']['kernel']) != 0
  assert np.all(head[~mask] == 0) and np.any(head[mask] != np.asarray(
      state.params['base']['classifier']['kernel'])[mask])
  assert int(new.micro_step) == 1


# ------------------------------------------------------------------ structure
def _imports(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return out


@pytest.mark.parametrize('package', ['compress', 'quant', 'serving', 'hf', 'peft', 'moe',
                                     'components', 'tasks', 'models', 'data'])
def test_library_packages_never_import_the_loop(package):
  for path in sorted((ROOT / 'peftjax' / package).glob('*.py')):
    assert 'peftjax.train' not in _imports(path), path
  assert 'peftjax.train' not in _imports(ROOT / 'peftjax' / 'run.py')


def test_the_loop_names_no_feature():
  text = (ROOT / 'peftjax' / 'train.py').read_text()
  found = re.findall(r'distill|prune|lowrank|moe|quant', text, flags=re.IGNORECASE)
  assert not found, found


def test_components_registry_is_the_only_place_a_component_is_named():
  names = [n for n, _ in components.REGISTRY]
  assert len(names) == len(set(names)) and 'l2sp' in names
  with pytest.raises(ValueError, match='registered twice'):
    components.register('l2sp', lambda config, setup: None)
