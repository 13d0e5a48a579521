"""Sparse upcycling: MiniLM-L6 with an MoE FFN (8 experts, top-2) in every other layer, each
expert a copy of the pretrained FFN, fully fine-tuned on Rotten Tomatoes.

  python -m peftjax.main --config=configs/moe.py --workdir=/tmp/moe
  python -m peftjax.main --config=configs/moe.py:lora --workdir=/tmp/moe_lora   # LoRA on experts

``arg='lora'``: LoRA (per expert, batched over experts) on the routed experts' kernels and on the
router, everything else frozen but the head.
"""
from configs import common


def get_config(arg=None):
  c = common.get_config()
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.every = 2
  c.moe.capacity_factor = 1.25
  c.train.steps = 300
  c.train.eval_every = 150
  c.train.checkpoint_every = 150
  c.optim.warmup_steps = 30
  if common.variant(arg, ('full', 'lora'), default='full') == 'lora':
    c.peft.method = 'lora'
    c.peft.lora.targets = r'moe/(intermediate|output|router)/kernel$'
    c.optim.learning_rate = 1e-3
  else:
    c.peft.method = 'full'
    c.optim.learning_rate = 5e-5
  return c
