"""LoRA on the dense layers of a small MLP for MNIST-5k.

The MLP starts from random weights, so its first layer's kernel trains in full (``peft.head``
covers it and the classifier) while LoRA adapts the second layer; a realistic use is LoRA on a
model pre-trained elsewhere, via ``--config.model.pretrained``.
"""
from configs import common


def get_config():
  c = common.get_config()
  c.model.name = 'mlp'
  c.model.hidden = (256, 128)
  c.model.dropout_rate = 0.1
  c.data.name = 'mnist5k'
  c.peft.method = 'lora'
  c.peft.lora.rank = 8
  c.peft.lora.alpha = 16.0
  c.peft.lora.targets = r'dense_1/kernel$'
  c.peft.head = r'(dense_0|classifier)/'
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 20
  c.train.steps = 500
  c.train.batch_size = 64
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  return c
