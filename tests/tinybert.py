"""A tiny BERT classifier and a one-step trainer, shared by the method tests."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import common
from peftjax import optim
from peftjax import peft
from peftjax.peft import sections
from peftjax import run
from peftjax import step as step_lib
from peftjax import tree
from peftjax.models import BertClassifier
from peftjax.models import BertConfig
from peftjax.models.build import Built
from peftjax.tasks.classification import Classification

D, F, L, H = 16, 32, 2, 2  # hidden, FFN, layers, heads
BERT = BertConfig(vocab_size=100, hidden_size=D, num_layers=L, num_heads=H, intermediate_size=F,
                  max_position=16)


@functools.cache
def built() -> Built:
  """A randomly initialised 3-class classifier (cached: every test reads, none writes)."""
  module = BertClassifier(BERT, num_classes=3)
  ids = jnp.ones((4, 8), jnp.int32)
  boxed = jax.jit(module.init)(jax.random.key(0), ids, ids)['params']  # jit: 2x faster than eager
  return Built(module, nn.meta.unbox(boxed), ('input_ids', 'attention_mask', 'token_type_ids'),
               nn.get_partition_spec(boxed), 'random')


def batch() -> dict:
  """4 x 8 tokens, one row padded, 3 labels."""
  ids = jnp.arange(32, dtype=jnp.int32).reshape(4, 8) % 100
  return {'input_ids': ids, 'attention_mask': jnp.ones_like(ids).at[0, 6:].set(0),
          'token_type_ids': jnp.zeros_like(ids), 'label': jnp.array([0, 1, 2, 1])}


def inputs() -> dict:
  return {k: v for k, v in batch().items() if k in built().input_keys}


def method(name: str, **overrides):
  """``(method, config)`` for ``peft.method=name``; ``overrides`` set fields of the methods'
  sections (``kind='parallel'`` is ``peft.adapter.kind`` for 'adapter'; for 'lora+ia3' the first
  section holding the field), ``head`` the shared one."""
  c = common.get_config()
  c.peft.method = name
  used = [sections.SECTION_OF[n] for n in name.split('+') if n in sections.SECTION_OF]
  for k, v in overrides.items():
    if k == 'head':
      c.peft.head = v
      continue
    (section,) = [s for s in used if k in c.peft[s]][:1] or [None]
    assert section is not None, f'no section of {name!r} has a field {k!r}'
    c.peft[section][k] = v
  return peft.build(c.peft), c


def init(name: str, **peft_overrides):
  """``(method, its params, config)`` initialised on the tiny model."""
  m, c = method(name, **peft_overrides)
  b = built()
  return m, m.init(jax.random.key(1), b.module, b.params, inputs()), c


def steps(m, peft_params, c, n: int = 1, *, weight_decay: float | None = None, base=None):
  """Runs ``n`` jitted trainer steps; returns the trainable tree before and after each step.

  ``base`` replaces the built params (e.g. a method's ``prepare_base`` output, as in PiSSA).
  """
  b = built()
  c.optim.warmup_steps = 0
  if weight_decay is not None:
    c.optim.weight_decay = weight_decay
  base_tr, frozen = tree.partition(b.params if base is None else base, m.trainable_base)
  trainable = {'base': base_tr, 'peft': peft_params}
  tx = optim.make_optimizer(c.optim, 10)
  state = run.TrainState.create(tx, trainable, seed=0)
  step = jax.jit(step_lib.make_train_step(run.make_forward(b, m), tx, Classification(None)))
  history = [trainable]
  for _ in range(n):
    state, metrics = step(state, frozen, batch())
    assert jnp.isfinite(metrics['loss'])
    history.append(state.params)
  return history, state


def moved(a, b) -> list[str]:
  """Paths whose values differ between two trees of the same structure."""
  fa, fb = tree.flatten(a), tree.flatten(b)
  return sorted(p for p in fa if not bool(jnp.array_equal(fa[p], fb[p])))
