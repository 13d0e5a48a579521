"""A tiny smoke-test config: the first MiniLM layer, short reviews, a few steps (seconds on CPU).

  python -m peftjax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""
from configs import common


def get_config(arg=None):
  common.no_variant(arg)
  c = common.get_config()
  c.model.num_layers = 1
  c.data.max_length = 16
  c.data.max_train_examples = 256
  c.data.max_eval_examples = 64
  c.optim.warmup_steps = 2
  c.train.steps = 8
  c.train.batch_size = 8
  c.train.eval_batch_size = 32
  c.train.eval_every = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.progress = False
  return c


def sweep(add, arg=None):
  """Two ranks x two seeds: a sweep small enough for tests."""
  common.no_variant(arg)
  for rank in (2, 4):
    for seed in (0, 1):
      add(**{'peft.method': 'lora', 'peft.lora.rank': rank, 'seed': seed})  # a str, an int
