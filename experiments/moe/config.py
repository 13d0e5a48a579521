"""The MoE study: sparse upcycling of MiniLM-L6 on Rotten Tomatoes vs the dense model.

  python -m experiments.sweep --config=experiments/moe/config.py --workdir=/tmp/moe_study
  python -m experiments.moe.report --workdir=/tmp/moe_study

Every run has the method-comparison study's budget (120 steps x 32 reviews x 48 tokens, warmup
12 + cosine, AdamW), so its dense rows are comparable with that study's. The MoE models replace
the FFN of every other layer (layers 1, 3, 5) by E experts, each a copy of the pretrained FFN,
with a small random router (sparse upcycling); capacity factor 1.25, balance-loss weight 0.01,
z-loss weight 0.001. Learning rates: full fine-tuning 1e-4 and LoRA 4e-3, the method-comparison
pilot's choices for the dense model, used unchanged for the MoE models.
"""
from configs import common
from experiments.method_comparison import config as method_comparison

SEEDS = (0, 1, 2)
_FULL = {'peft.method': 'full', 'optim.learning_rate': 1e-4}
_LORA_EXPERTS = {'peft.method': 'lora', 'optim.learning_rate': 4e-3,
                 'peft.lora.targets': 'moe/(intermediate|output|router)/kernel$'}
# label -> overrides
RUNS = {
    'dense, full FT': {**_FULL, 'moe.num_experts': 0},
    'dense, LoRA (q, v)': {'peft.method': 'lora', 'optim.learning_rate': 4e-3,
                           'moe.num_experts': 0},
    'MoE E=4 k=1, full FT': {**_FULL, 'moe.num_experts': 4, 'moe.top_k': 1},
    'MoE E=4 k=2, full FT': {**_FULL, 'moe.num_experts': 4, 'moe.top_k': 2},
    'MoE E=8 k=1, full FT': {**_FULL, 'moe.num_experts': 8, 'moe.top_k': 1},
    'MoE E=8 k=2, full FT': {**_FULL, 'moe.num_experts': 8, 'moe.top_k': 2},
    'MoE E=8 k=2, LoRA on experts + router': {**_LORA_EXPERTS, 'moe.num_experts': 8,
                                              'moe.top_k': 2},
}


def get_config(arg=None):
  """The method-comparison study's budget (``arg='steps=N'`` changes it) + the MoE settings."""
  c = method_comparison.get_config(arg)
  c.train.keep_checkpoints = 1  # the final checkpoint: the report measures utilisation on it
  c.moe.every = 2
  c.moe.capacity_factor = 1.25
  return c


def sweep(add, arg=None):
  """Every run x seed, seed-major (a cut-short sweep still has every run once);
  ``arg='seeds=1'`` keeps the first seed only (a pilot)."""
  seeds = SEEDS[:common.settings(arg, seeds=len(SEEDS))['seeds']]
  for seed in seeds:
    for overrides in RUNS.values():
      add(**overrides, seed=seed)
