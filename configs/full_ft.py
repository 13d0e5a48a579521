"""Full fine-tuning of MiniLM-L6 on Rotten Tomatoes (the baseline LoRA is compared to)."""
from configs import common


def get_config():
  c = common.get_config()
  c.peft.method = 'full'
  c.optim.learning_rate = 5e-5
  c.optim.warmup_steps = 40
  c.train.steps = 400  # the quickstart's budget, for a like-for-like comparison
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  return c
