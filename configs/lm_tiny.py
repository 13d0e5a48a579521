"""A tiny causal-LM smoke test: a random 2-layer Llama (SmolLM2's tokenizer), Rotten Tomatoes
as instructions, a few LoRA steps (seconds on CPU).

  python -m peftjax.main --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny
"""
from configs import common


def get_config(arg=None):
  common.no_variant(arg)
  c = common.get_config()
  c.task = 'causal_lm'
  c.model.name = 'llama'
  c.model.pretrained = 'random'
  c.data.name = 'rt_instructions'
  c.data.max_length = 128
  c.data.max_train_examples = 64
  c.data.max_eval_examples = 16
  c.peft.method = 'lora'
  c.peft.head = ''  # a causal LM has no new head: its output layer is pretrained
  c.peft.lora.targets = r'attn/(q|k|v|o)_proj/kernel$'
  c.peft.ia3.targets = r'attn/(k_proj|v_proj)$'
  c.peft.ia3.ffn_targets = r'mlp/down_proj$'
  c.peft.adapter.attn_targets = r'attn/o_proj$'
  c.peft.adapter.ffn_targets = r'mlp/down_proj$'
  c.generate.max_new_tokens = 4
  c.generate.batch_size = 8
  c.optim.warmup_steps = 2
  c.train.steps = 6
  c.train.batch_size = 4
  c.train.eval_batch_size = 8
  c.train.eval_every = 3
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.progress = False
  return c
