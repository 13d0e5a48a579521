"""Deep Compression (prune -> retrain -> share -> Huffman), run by peftjax.compress.deep.

  python -m peftjax.compress.deep --config=configs/deep_compression.py --workdir=/tmp/dc
  python -m peftjax.compress.deep --config=configs/deep_compression.py:minilm \\
      --config.compress.init_from=/tmp/teacher --workdir=/tmp/dc_minilm

Default: LeNet-300-100 (Han et al.'s fully connected MNIST model) on MNIST-5k, trained here.
``:minilm``: the fine-tuned MiniLM-L6 classifier of ``compress.init_from`` (a finished
full fine-tuning run), pruned in its encoder matmuls and shared everywhere but the norms.
"""
from configs import common


def get_config(arg=None):
  c = common.get_config()
  c.peft.method = 'full'
  c.train.eval_before = False
  p, s = c.compress.prune, c.compress.share
  p.kind = 'magnitude'
  p.every = 10
  if common.variant(arg, ('mnist', 'minilm'), default='mnist') == 'minilm':
    # The encoder's matmuls are pruned to 70% over the first half of retraining; sharing then
    # covers them, the embeddings and the head (everything but biases and norms).
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 10
    c.train.steps = 150
    c.train.eval_every = 150
    c.train.checkpoint_every = 150
    p.sparsity = 0.7
    p.end_step = 75
    s.bits = 5
    s.targets = r'(kernel|embedding)$'
    s.finetune_steps = 50
    s.learning_rate = 1e-5
    return c
  c.model.name = 'mlp'
  c.model.hidden = (300, 100)  # LeNet-300-100
  c.model.dropout_rate = 0.0
  c.data.name = 'mnist5k'
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.train.batch_size = 64
  c.train.steps = 600
  c.train.eval_every = 300
  c.train.checkpoint_every = 300
  # 92% of the weights pruned (Han et al. keep 8% of LeNet-300-100) over 2/3 of retraining.
  p.targets = r'kernel$'
  p.sparsity = 0.92
  p.end_step = 400
  s.bits = 5
  s.targets = r'kernel$'
  s.finetune_steps = 200
  s.learning_rate = 1e-4
  return c
