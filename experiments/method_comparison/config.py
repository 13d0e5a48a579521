"""The method-comparison study: every PEFT method on MiniLM-L6 + Rotten Tomatoes, equal budgets.

  python -m experiments.sweep --config=experiments/method_comparison/config.py \\
      --workdir=/tmp/method_comparison --parallel=2
  python -m experiments.method_comparison.report --workdir=/tmp/method_comparison

Every method gets the same number of steps, batch and schedule shape, and 3 seeds; learning rates
are each method's usual range (PEFT parameters want larger ones than full fine-tuning).
``get_config('steps=N')`` changes the budget.
"""
from configs import common

SEEDS = (0, 1, 2)
# label -> overrides. Learning rates follow each method's paper / common practice for Adam.
METHODS = {
    'full FT': {'peft.method': 'full', 'optim.learning_rate': 5e-5},
    'linear probe': {'peft.method': 'linear_probe', 'optim.learning_rate': 1e-2},
    'BitFit': {'peft.method': 'bitfit', 'optim.learning_rate': 2e-3},
    'LoRA': {'peft.method': 'lora', 'optim.learning_rate': 1e-3},
    'rsLoRA': {'peft.method': 'lora', 'peft.rslora': True, 'optim.learning_rate': 5e-4},
    'DoRA': {'peft.method': 'dora', 'optim.learning_rate': 1e-3},
    'PiSSA': {'peft.method': 'pissa', 'optim.learning_rate': 2e-4},
    'LoRA+': {'peft.method': 'lora', 'optim.learning_rate': 5e-4,
              'optim.lr_multipliers': (('lora_b$', 16.0),)},
    'IA3': {'peft.method': 'ia3', 'optim.learning_rate': 5e-3},
    'Houlsby': {'peft.method': 'adapter', 'peft.adapter_kind': 'houlsby',
                'optim.learning_rate': 1e-3},
    'Pfeiffer': {'peft.method': 'adapter', 'peft.adapter_kind': 'pfeiffer',
                 'optim.learning_rate': 1e-3},
    'prompt tuning': {'peft.method': 'prompt', 'optim.learning_rate': 1e-2},
    'prefix tuning': {'peft.method': 'prefix', 'optim.learning_rate': 5e-3},
}


def get_config(arg=None):
  steps = int(arg.split('=')[1]) if arg else 120
  c = common.get_config()
  c.train.steps = steps
  c.optim.warmup_steps = max(steps // 10, 1)
  c.train.eval_every = 0  # validation only at the end: the budget goes to training
  c.train.eval_before = False
  c.train.checkpoint_every = steps  # one checkpoint at the end (resumable sweep)
  return c


def sweep(add, arg=None):
  """Every method x seed; ``arg='seeds=1'`` keeps the first seed only (a pilot)."""
  seeds = SEEDS[:int(arg.split('=')[1])] if arg else SEEDS
  for overrides in METHODS.values():
    for seed in seeds:
      add(**overrides, seed=seed)
