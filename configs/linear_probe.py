"""Linear probe: the frozen MiniLM-L6 encoder, only the classifier head trains."""
from configs import common


def get_config():
  c = common.get_config()
  c.peft.method = 'linear_probe'
  c.model.dropout_rate = 0.0
  c.optim.learning_rate = 1e-2
  c.optim.weight_decay = 0.0
  c.train.steps = 600
  return c
