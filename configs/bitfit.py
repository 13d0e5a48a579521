"""BitFit: biases (and the head) of MiniLM-L6 train, everything else frozen."""
from configs import common


def get_config():
  c = common.get_config()
  c.peft.method = 'bitfit'
  c.optim.learning_rate = 2e-3
  c.optim.weight_decay = 0.0
  c.train.steps = 600
  return c
