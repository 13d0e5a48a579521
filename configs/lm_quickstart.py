"""LM quickstart: LoRA r=8 on q/k/v/o of SmolLM2-135M-Instruct (bundled), Rotten Tomatoes
reviews as instructions ("positive" / "negative"), scored by exact match of the generated answer
on the test split before (zero-shot) and after fine-tuning.

  python -m peftjax.main --config=configs/lm_quickstart.py --workdir=/tmp/lm_run
  python -m peftjax.main --config=configs/lm_quickstart.py:full ...   # full fine-tuning
  python -m peftjax.main --config=configs/lm_quickstart.py:ia3 ...    # IA3
  ... :dora, :pissa, :adapter (Houlsby), :prompt (16 soft tokens), :prefix (16 per-layer KV)
"""
from configs import common

VARIANTS = ('lora', 'full', 'ia3', 'dora', 'pissa', 'adapter', 'prompt', 'prefix')
# Peak learning rates (the LM study's pilot: experiments/lm_methods/config.py).
RATES = {'lora': 1e-3, 'full': 2e-5, 'ia3': 3e-3, 'dora': 1e-3, 'pissa': 3e-4, 'adapter': 1e-3,
         'prompt': 3e-2, 'prefix': 1e-3}


def get_config(arg=None):
  method = common.variant(arg, VARIANTS, default='lora')
  c = common.get_config()
  c.task = 'causal_lm'
  c.model.name = 'llama'
  c.model.pretrained = ''  # the bundled SmolLM2-135M-Instruct
  c.data.name = 'rt_instructions'
  c.data.max_length = 160  # the longest example is 133 tokens; two reviews pack per row
  c.data.packing = 'pack'
  c.peft.method = method
  c.peft.head = ''  # the output layer is the pretrained (tied) embedding: no new head
  c.peft.lora.rank = 8
  c.peft.lora.alpha = 16.0
  c.peft.lora.targets = r'attn/(q|k|v|o)_proj/kernel$'
  c.peft.ia3.targets = r'attn/(k_proj|v_proj)$'
  c.peft.ia3.ffn_targets = r'mlp/down_proj$'
  c.peft.adapter.attn_targets = r'attn/o_proj$'  # after attention and after the MLP
  c.peft.adapter.ffn_targets = r'mlp/down_proj$'
  c.peft.adapter.size = 16
  c.peft.prompt.length = 16  # soft tokens before the chat-templated prompt
  c.peft.prefix.length = 16  # per-layer keys/values, one per key-value head (GQA)
  c.peft.prefix.hidden = 256
  c.data.eval_split = ''  # the test split is scored before and after training; nothing between
  c.generate.max_new_tokens = 8
  c.generate.teacher_forced = False  # exact match only: the loss pass would double the eval time
  c.generate.batch_size = 64
  c.optim.learning_rate = RATES[method]
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0 if method != 'full' else 0.01
  c.train.steps = 100
  c.train.batch_size = 8
  c.train.eval_batch_size = 32
  c.train.eval_every = 0
  c.train.checkpoint_every = 50
  c.train.log_every = 10
  return c
