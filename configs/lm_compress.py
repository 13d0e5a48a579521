"""Compression and quantization of the decoder LM: SmolLM2-135M-Instruct (bundled) on the Rotten
Tomatoes instructions, as configs/lm_quickstart.py, scored by exact match of the generated
answer; each run reports what it serves (``served_bytes``, ``served``) in summary.json.

  python -m peftjax.main --config=configs/lm_compress.py:qat --workdir=/tmp/lm_qat
  python -m peftjax.main --config=configs/lm_compress.py:qat,tiny ...   # a random 2-layer LM

Variants (``,tiny``: the same method on configs/lm_tiny.py's random model, seconds end to end):

* ``qat`` -- full fine-tuning with int8 QAT (weights per layer and output channel, activations
  per token, the tied embedding/output layer included); the final model converted to real int8
  and its exact match *generated in int8* (``quant.int8_exact_match``).
* ``qat_lora`` -- LoRA with QAT of the merged weights (``quant.of='effective'``).
* ``ptq`` -- full fine-tuning, then post-training quantization (``quant.ptq``): weights per
  layer and channel from their min/max, activations per token; the int8 model's exact match
  generated.
* ``ptq_static`` -- the same with static per-layer activation ranges calibrated (min/max) on 8
  train batches. SmolLM2's FFN inputs have outliers (|x| up to 3065 in layer 11's down_proj
  input, ~5 elsewhere): one static scale per tensor zeroes the rest of them, and the int8 model
  answers nothing right (0.0 exact match zero-shot on 128 test reviews, vs 0.55 in float and
  0.52 with per-token activations); a measured negative result, kept as a row.
* ``qlora`` -- LoRA on a frozen int8 base (every layer kernel and the tied embedding stored in
  int8, dequantized in the step).
* ``prune24_lora`` -- 2:4 pruning of every frozen layer kernel, once before training (the
  masked weights stay zero), ranked by Wanda's ``|w| · ||x||`` on 4 train batches, and LoRA on
  every layer kernel (the pruned FFNs too) to recover. One-shot 2:4 is hard on a 135M model:
  the completion loss of a train batch goes from 1.27 to 16.4 with magnitudes, 7.3 with Wanda
  (0.0 exact match either way before LoRA trains).
* ``distill15`` -- SmolLM2's 30 layers distilled into a 15-layer student initialised from the
  teacher's layers 0, 2, ..., 28, trained in full with KD (T=2) on the completion tokens. The
  teacher is the pretrained model; ``--config.compress.distill.teacher=<workdir>`` distills a
  finished run instead (e.g. an lm_quickstart LoRA run, merged).

The learning rates and budgets are the quickstart's (distill15: untuned, a longer budget for
the student to recover); the measured runs are the study's (experiments/lm_methods).
"""
from configs import lm_quickstart
from configs import lm_tiny
from configs import common

# The quantized matmuls: every projection of every layer (the stacked `layers/...` kernels).
LAYER_KERNELS = r'layers/(attn|mlp)/.*kernel$'
_QUANT = {'quant.targets': LAYER_KERNELS, 'quant.embeddings': True,
          'quant.activations': 'per_token'}

# name -> (the quickstart method it starts from, overrides)
VARIANTS = {
    'qat': ('full', {**_QUANT, 'quant.qat': True}),
    'qat_lora': ('lora', {**_QUANT, 'quant.qat': True, 'quant.of': 'effective'}),
    'ptq': ('full', {**_QUANT, 'quant.ptq': True}),
    'ptq_static': ('full', {**_QUANT, 'quant.ptq': True, 'quant.activations': 'static',
                            'quant.observer': 'minmax'}),
    'qlora': ('lora', {**_QUANT, 'quant.qlora': True}),
    'prune24_lora': ('lora', {'compress.prune.kind': 'nm', 'compress.prune.n': 2,
                              'compress.prune.m': 4, 'compress.prune.targets': LAYER_KERNELS,
                              'compress.prune.score': 'wanda',
                              'peft.lora.targets': LAYER_KERNELS}),
    'distill15': ('full', {'compress.distill.teacher': 'pretrained',
                           'compress.distill.student_layers': 'every_other',
                           'compress.distill.temperature': 2.0, 'compress.distill.alpha': 0.5,
                           'optim.learning_rate': 1e-4, 'train.steps': 300,
                           'train.checkpoint_every': 100}),
}
SIZES = ('tiny',)


def get_config(arg=None):
  name, *rest = str(arg or '').split(',')
  name = common.variant(name, VARIANTS, default='qat')
  if rest and (len(rest) > 1 or rest[0] not in SIZES):
    from peftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'unknown size {",".join(rest)!r} in variant {arg!r}; valid: '
                      f'<variant> or <variant>,tiny (e.g. qat,tiny)')
  method, overrides = VARIANTS[name]
  if rest:
    c = lm_tiny.get_config()
    c.peft.method = method
    if name == 'distill15':
      c.model.llama.num_layers = 4  # a 4-layer teacher, every other layer: a 2-layer student
      overrides = {k: v for k, v in overrides.items() if k.startswith('compress.')}
  else:
    c = lm_quickstart.get_config(method)
  c.update_from_flattened_dict(overrides)
  return c
