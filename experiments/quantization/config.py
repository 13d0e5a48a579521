"""The int8 accuracy study: float32, PTQ, QAT, QLoRA and LoRA+QAT, 3 seeds each.

  python -m experiments.quantization.study --workdir=/tmp/quantization

Two models, each with its own equal budget:

* MiniLM-L6 on Rotten Tomatoes — the method-comparison study's budget (120 steps x 32 reviews x
  48 tokens) and learning rates (full FT 1e-4, LoRA 4e-3); quantized: every encoder matmul
  (weights per output channel, activations per tensor, 8 bits);
* a small CNN on MNIST-5k from scratch — 200 steps x 64 images (3 epochs); quantized: both
  convolutions and both dense layers.

The trained runs come from this sweep; PTQ variants are conversions of the float32 runs
(:mod:`experiments.quantization.study`).
"""
from configs import common
from experiments.method_comparison import config as text_study

SEEDS = (0, 1, 2)
TEXT = {
    'float32': {'peft.method': 'full', 'optim.learning_rate': 1e-4},
    'QAT int8': {'peft.method': 'full', 'optim.learning_rate': 1e-4, 'quant.qat': True},
    'QLoRA': {'peft.method': 'lora', 'optim.learning_rate': 4e-3, 'quant.qlora': True,
              'quant.embeddings': True},
    'LoRA+QAT': {'peft.method': 'lora', 'optim.learning_rate': 4e-3, 'quant.qat': True},
}
_CNN = {'model.name': 'cnn', 'data.name': 'mnist5k', 'peft.method': 'full',
        'optim.learning_rate': 2e-3, 'train.steps': 200, 'train.batch_size': 64,
        'optim.warmup_steps': 20, 'train.checkpoint_every': 200, 'quant.targets': 'kernel$'}
MNIST = {
    'float32': dict(_CNN),
    'QAT int8': {**_CNN, 'quant.qat': True},
}
MODELS = {'MiniLM-L6 / Rotten Tomatoes': TEXT, 'CNN / MNIST-5k': MNIST}


def get_config(arg=None):
  """The text study's base config (the CNN runs override model, data and budget)."""
  return text_study.get_config(arg)


def sweep(add, arg=None):
  """Every trained variant x seed; ``arg='seeds=1'`` keeps the first seed only (a pilot)."""
  seeds = SEEDS[:common.settings(arg, seeds=len(SEEDS))['seeds']]
  for variants in MODELS.values():
    for overrides in variants.values():
      for seed in seeds:
        add(**overrides, seed=seed)
