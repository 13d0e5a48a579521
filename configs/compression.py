"""The compression study's runs on MiniLM-L6 / Rotten Tomatoes (experiments/compression/).

  python -m peftjax.main --config=configs/compression.py:teacher --workdir=/tmp/cs/teacher
  python -m peftjax.main --config=configs/compression.py:magnitude70 \\
      --config.compress.init_from=/tmp/cs/teacher --workdir=/tmp/cs/magnitude70
  python -m peftjax.main --config=configs/compression.py:student3 \\
      --config.compress.distill.teacher=/tmp/cs/teacher --workdir=/tmp/cs/student3

``teacher`` is full fine-tuning (the model every other run compresses). The others start from
it (``compress.init_from``) or learn from it (``compress.distill.teacher``) and retrain in full
for ``RETRAIN_STEPS``; their compression is applied first (one shot) or during the first half
of retraining (gradual magnitude pruning).
"""
from configs import common

TEACHER_STEPS = 300
RETRAIN_STEPS = 150
_FFN = r'encoder/.*/(intermediate|output)/kernel$'

# name -> overrides of the retraining config; the study's rows (experiments/compression).
VARIANTS = {
    'magnitude50': {'compress.prune.kind': 'magnitude', 'compress.prune.sparsity': 0.5},
    'magnitude70': {'compress.prune.kind': 'magnitude', 'compress.prune.sparsity': 0.7},
    'magnitude90': {'compress.prune.kind': 'magnitude', 'compress.prune.sparsity': 0.9},
    'nm24': {'compress.prune.kind': 'nm', 'compress.prune.n': 2, 'compress.prune.m': 4},
    'heads50': {'compress.prune.kind': 'heads', 'compress.prune.keep_heads': 6,
                'compress.prune.score': 'first_order'},
    'student3': {'compress.distill.student_layers': 'every_other', 'train.steps': TEACHER_STEPS,
                 'optim.learning_rate': 5e-5},
    'svd_half': {'compress.lowrank.targets': _FFN, 'compress.lowrank.rank': 192},
    'svd_quarter': {'compress.lowrank.targets': _FFN, 'compress.lowrank.rank': 96},
}


def get_config(arg=None):
  c = common.get_config()
  c.peft.method = 'full'
  c.optim.learning_rate = 5e-5
  c.optim.warmup_steps = 30
  c.train.steps = TEACHER_STEPS
  c.train.eval_every = 150
  c.train.checkpoint_every = 150
  arg = common.variant(arg, ('teacher', *VARIANTS), default='teacher')
  if arg == 'teacher':
    return c
  c.optim.learning_rate = 3e-5
  c.optim.warmup_steps = 10
  c.train.steps = RETRAIN_STEPS
  c.train.eval_every = RETRAIN_STEPS
  c.train.checkpoint_every = RETRAIN_STEPS
  p = c.compress.prune
  p.end_step = RETRAIN_STEPS // 2  # gradual magnitude pruning over the first half
  p.every = 10
  c.update_from_flattened_dict(VARIANTS[arg])
  if p.kind != 'magnitude':
    p.end_step = 0
  return c
