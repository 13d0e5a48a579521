"""The LM method study: PEFT methods on SmolLM2-135M-Instruct (bundled), equal budgets, 3 seeds,
two tasks scored by exact match of the generated answer.

  python -m experiments.sweep --config=experiments/lm_methods/config.py \\
      --workdir=experiments/lm_methods/runs                       # the study (resumable)
  python -m experiments.sweep --config=experiments/lm_methods/config.py:pilot=1 \\
      --workdir=experiments/lm_methods/pilot                       # the learning-rate pilot
  python -m experiments.lm_methods.report --workdir=experiments/lm_methods/runs

Tasks: ``rt`` -- the Rotten Tomatoes reviews as instructions (answer 'positive'/'negative');
``reverse`` -- four words of a review written back in reverse order (several answer tokens;
zero-shot 0 of 32). Every method gets the same steps, batch, packing and schedule shape;
learning rates are each method's own, from a seed-0 pilot on the validation split (``pilot=1``
runs each method at the rates of ``PILOT`` on ``rt``; the chosen rates are in ``METHODS``).
Generation is scored on the first ``eval=N`` test prompts (the whole RT test split takes
70-100 s per evaluation on 2 cores; ``eval=-1`` scores all). ``steps=N`` changes the budget.
"""
from configs import common
from configs import lm_quickstart

SEEDS = (0, 1, 2)
TASKS = {'rt': 'rt_instructions', 'reverse': 'word_reverse'}
# label -> overrides (the learning rates chosen by the pilot; see results.md for its table)
METHODS = {
    'full FT': {'peft.method': 'full', 'optim.learning_rate': 2e-5,
                'optim.weight_decay': 0.01},
    'LoRA': {'peft.method': 'lora', 'optim.learning_rate': 1e-3},
    'rsLoRA': {'peft.method': 'lora', 'peft.lora.rslora': True, 'optim.learning_rate': 3.5e-4},
    'DoRA': {'peft.method': 'dora', 'optim.learning_rate': 1e-3},
    'PiSSA': {'peft.method': 'pissa', 'optim.learning_rate': 3e-4},
    'LoRA+': {'peft.method': 'lora', 'optim.learning_rate': 3e-4,
              'optim.lr_multipliers': (('lora_b$', 16.0),)},
    'IA3': {'peft.method': 'ia3', 'optim.learning_rate': 3e-3},
    'adapter': {'peft.method': 'adapter', 'optim.learning_rate': 1e-3},
    'prompt tuning': {'peft.method': 'prompt', 'optim.learning_rate': 3e-2},
    'prefix tuning': {'peft.method': 'prefix', 'optim.learning_rate': 1e-3},
}
# label -> learning rates the pilot tries (seed 0, rt, validation exact match)
PILOT = {
    'full FT': (2e-5, 6e-5), 'LoRA': (1e-3, 3e-3), 'rsLoRA': (3.5e-4, 1e-3),
    'DoRA': (1e-3, 3e-3), 'PiSSA': (1e-4, 3e-4), 'LoRA+': (1e-4, 3e-4), 'IA3': (3e-3, 1e-2),
    'adapter': (1e-3, 3e-3), 'prompt tuning': (1e-2, 3e-2), 'prefix tuning': (3e-4, 1e-3),
}
DEFAULTS = dict(steps=40, eval=256, pilot=0, tasks='rt,reverse')


def get_config(arg=None):
  s = common.settings(arg, **DEFAULTS)
  c = lm_quickstart.get_config('lora')
  c.train.steps = s['steps']
  c.optim.warmup_steps = max(s['steps'] // 10, 1)
  c.optim.weight_decay = 0.0
  c.train.eval_before = False  # the zero-shot score is the same for every method: run once
  c.train.checkpoint_every = s['steps']  # one checkpoint at the end (a resumable sweep)
  c.train.log_every = 5
  c.generate.max_eval_examples = s['eval']
  if s['pilot']:
    c.data.eval_split = 'validation'  # the pilot chooses on validation, never on test
  return c  # the methods' LM settings (adapter targets, prompt/prefix lengths): lm_quickstart's


def sweep(add, arg=None):
  """Every method x seed x task; ``pilot=1``: seed 0 on rt at each rate of ``PILOT``."""
  s = common.settings(arg, **DEFAULTS)
  if s['pilot']:
    for label, rates in PILOT.items():
      for lr in rates:
        add(**{**METHODS[label], 'optim.learning_rate': lr}, seed=0)
    return
  tasks = [t.strip() for t in s['tasks'].split(',') if t.strip()]
  bad = [t for t in tasks if t not in TASKS]
  if bad or not tasks:
    from peftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'tasks={s["tasks"]!r}; valid: a comma-separated subset of '
                      f'{", ".join(TASKS)}')
  for task in tasks:
    for overrides in METHODS.values():
      for seed in SEEDS:
        add(**overrides, **{'data.name': TASKS[task]}, seed=seed)
