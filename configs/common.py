"""The full set of config fields with their defaults; experiment configs start from here.

Every field has a comment. Override any of them on the command line, e.g.
``--config.peft.lora.rank=16 --config.train.steps=300``; a misspelled key fails with its name.
``python -m peftjax.main --config=<file> --config_help`` lists every field with its value and
comment (the comments are read from this file: the comment on a field's line, and a comment
block right above it).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds init, dropout and data order; the same seed gives the same run
  # Compute dtype: 'float32' | 'bfloat16'. Parameters, the trainable partition and the optimizer
  # state stay float32 (master weights); matmuls run in this dtype, the loss in float32.
  c.dtype = 'float32'
  # What is learned (peftjax/tasks/): 'classification' (text or images; accuracy, NLL, ECE) |
  # 'causal_lm' (a decoder LM: instructions with a completion-only loss and exact match by
  # generation, or plain text and perplexity).
  c.task = 'classification'

  c.model = ml_collections.ConfigDict()  # the network (peftjax/models/)
  c.model.name = 'bert'  # 'bert' | 'mlp' | 'cnn' | 'llama' (Llama-family causal LM: Llama, Mistral, Qwen2, SmolLM)
  # bert: an HF BERT dir (config.json, model.safetensors, tokenizer.json); '' = bundled MiniLM-L6.
  # llama: a .gguf file or an HF llama/mistral/qwen2 dir; '' = bundled SmolLM2-135M-Instruct.
  # 'random': random weights (llama: the architecture in model.llama).
  c.model.pretrained = ''
  c.model.num_layers = 0  # keep only the first N encoder layers; 0 = all
  c.model.pooling = 'mean'  # 'mean' (sentence-transformers) | 'cls' | 'cls_pooler' (HF BERT's tanh pooler)
  c.model.dropout_rate = 0.1  # hidden and attention dropout in training
  c.model.grad_barrier = True  # materialize residual-stream grads per layer (XLA CPU speed-up)
  # Rematerialization per encoder layer (jax.checkpoint): 'none' | 'full' (save only each
  # layer's input, recompute the rest in the backward) | 'dots' (also save the matmul outputs
  # without batch dims, i.e. the dense projections).
  c.model.remat = 'none'
  c.model.hidden = (256, 128)  # hidden sizes of the 'mlp' model
  c.model.scan_layers = True  # llama: the layers under one nn.scan (one compile) or unrolled
  # llama with pretrained='random': the architecture (HF names in peftjax/models/llama.py).
  c.model.llama = ml_collections.ConfigDict()
  c.model.llama.vocab_size = 49152  # token ids (the bundled SmolLM2 tokenizer's 49152)
  c.model.llama.hidden_size = 64  # model width
  c.model.llama.intermediate_size = 128  # SwiGLU width
  c.model.llama.num_layers = 2  # decoder layers
  c.model.llama.num_heads = 4  # query heads
  c.model.llama.num_kv_heads = 2  # key/value heads (grouped-query attention)
  c.model.llama.head_dim = 16  # per-head size
  c.model.llama.rope_theta = 10000.0  # RoPE base
  c.model.llama.max_position = 2048  # longest sequence
  c.model.llama.tie_embeddings = True  # the output layer is the embedding table

  c.data = ml_collections.ConfigDict()  # the data set and its splits (peftjax/data/)
  c.data.name = 'rotten_tomatoes'  # 'rotten_tomatoes' | 'mnist5k' | 'digits' | any prepared TFDS name
  c.data.data_dir = ''  # TFDS data_dir; '' = $PEFTJAX_DATA_DIR or ~/.cache/peftjax/tfds
  c.data.max_length = 64  # tokens per example (text)
  c.data.padding = 'max_length'  # 'max_length' (static shapes) | 'longest'
  c.data.text_key = 'text'  # feature holding the text
  c.data.image_key = 'image'  # feature holding the image
  c.data.label_key = 'label'  # feature holding the class label
  c.data.train_split = 'train'  # the split trained on
  c.data.eval_split = 'validation'  # evaluated during training; '' = none
  c.data.test_split = 'test'  # evaluated before and after training (the reported accuracy)
  c.data.max_train_examples = -1  # -1 = all; N = the first N (tiny test configs)
  c.data.max_eval_examples = -1  # -1 = all
  # causal_lm: rows of max_length tokens, made by 'pack' (several examples per row, each attending
  # only to itself) | 'bucket' (one example per row, batches of similar lengths) | 'none'.
  c.data.packing = 'pack'
  c.data.chat_template = True  # causal_lm: render instructions with the tokenizer's chat template
  # causal_lm: an example longer than max_length is an 'error' | cut on the prompt's 'left'
  c.data.truncation = 'error'

  # PEFT (peftjax/peft/): the method, the head every method trains, and one sub-section per
  # method family (checked only when a method in peft.method reads it: peftjax/peft/sections.py).
  c.peft = ml_collections.ConfigDict()
  # lora | pissa | dora | ia3 | adapter | prompt | prefix | full | linear_probe | bitfit;
  # 'lora+ia3' composes methods.
  c.peft.method = 'lora'
  c.peft.head = 'classifier/'  # regex of base leaves that train with every method (the new head)
  c.peft.lora = ml_collections.ConfigDict()  # LoRA and its variants (lora, pissa, dora)
  c.peft.lora.rank = 8  # LoRA rank r
  c.peft.lora.alpha = 16.0  # LoRA scale is alpha / r
  c.peft.lora.rslora = False  # rank-stabilized LoRA: scale alpha / sqrt(r) (Kalajdzievski, 2023)
  c.peft.lora.dropout = 0.0  # dropout on the LoRA branch input
  c.peft.lora.targets = r'attention/(query|value)/kernel$'  # regex over weight paths LoRA adapts
  c.peft.ia3 = ml_collections.ConfigDict()  # IA3: learned scaling vectors
  c.peft.ia3.targets = r'attention/(key|value)$'  # module paths whose OUTPUT is scaled
  c.peft.ia3.ffn_targets = r'/output$'  # module paths whose INPUT is scaled (FFN down-proj)
  c.peft.adapter = ml_collections.ConfigDict()  # bottleneck adapters
  c.peft.adapter.kind = 'houlsby'  # placement: 'houlsby' | 'pfeiffer' | 'parallel'
  c.peft.adapter.size = 64  # bottleneck width
  c.peft.adapter.activation = 'gelu'  # nonlinearity: 'relu' | 'gelu'
  c.peft.adapter.attn_targets = r'attention/out$'  # adapter on these modules' output (houlsby)
  c.peft.adapter.ffn_targets = r'/output$'  # adapter on these modules' output (FFN; all kinds)
  c.peft.adapter.ffn_inputs = r'/intermediate$'  # parallel: adapter reads this sibling's input
  c.peft.prompt = ml_collections.ConfigDict()  # prompt tuning
  c.peft.prompt.length = 20  # soft-prompt vectors prepended to the embeddings
  c.peft.prompt.init = 'vocab'  # 'vocab' (random word-embedding rows) | 'text'
  c.peft.prompt.init_text = ''  # init='text': its tokens' embeddings, repeated/cut to length
  c.peft.prefix = ml_collections.ConfigDict()  # prefix tuning
  c.peft.prefix.length = 10  # key/value prefix length per layer
  c.peft.prefix.reparam = True  # train an (n, D) embedding + MLP (Li & Liang)
  c.peft.prefix.hidden = 512  # hidden width of the reparameterization MLP

  c.moe = ml_collections.ConfigDict()  # Mixture-of-Experts FFNs (peftjax/moe/)
  c.moe.num_experts = 0  # E > 0: Mixture-of-Experts FFNs (upcycled from the pretrained FFN); 0 = dense
  c.moe.every = 2  # the FFN of every N-th layer is an MoE layer (layers N-1, 2N-1, ...)
  c.moe.top_k = 2  # experts per token (router='topk'); average experts per token (expert_choice)
  c.moe.capacity_factor = 1.25  # slots per expert and sequence: ceil(k * length * cf / E)
  c.moe.dropless = False  # capacity = sequence length: no token is ever dropped
  c.moe.router = 'topk'  # 'topk' (tokens choose experts) | 'expert_choice' (experts choose tokens)
  # Top-k weights sum to 1 (an upcycled model starts equal to the dense one); with top_k=1 the
  # weight is then always 1 and the router learns from the auxiliary losses only. False = the
  # raw softmax probabilities (Switch's top-1 gate: the task loss reaches the router).
  c.moe.renormalize = True
  c.moe.jitter = 0.0  # multiplicative router-input noise U(1-j, 1+j) in training (Switch)
  c.moe.shared_experts = 0  # dense experts every token passes through (DeepSeek-MoE)
  c.moe.dispatch = 'sorted'  # 'sorted' (gather/scatter, default) | 'onehot' (GShard einsums) | 'ragged'
  c.moe.router_init_std = 0.02  # std of the router's initial (random) kernel
  c.moe.balance_coef = 0.01  # weight of the Switch load-balancing loss
  c.moe.z_coef = 1e-3  # weight of the ST-MoE router z-loss

  c.quant = ml_collections.ConfigDict()  # int8 quantization (peftjax/quant/)
  c.quant.qat = False  # quantization-aware training: fake-quant (STE) of the matched matmuls
  c.quant.qlora = False  # hold the frozen base in int8 (weight-only) while the method trains
  # post-training quantization at the end of a causal-LM run: the trained model (LoRA merged)
  # converted to int8 and its exact match generated in int8 (peftjax/components/quant_report.py)
  c.quant.ptq = False
  c.quant.bits = 8  # weight bits, 2..8
  c.quant.act_bits = 8  # activation bits, 2..8
  c.quant.targets = r'encoder/.*kernel$'  # regex over weight paths whose matmuls are quantized
  c.quant.embeddings = False  # also quantize the embedding tables (weight-only, one scale per row)
  c.quant.per_channel = True  # one weight scale per output channel; False = one per tensor
  c.quant.symmetric = True  # weights: symmetric (zero point 0) or asymmetric
  c.quant.act_symmetric = True  # activations: symmetric, or asymmetric with a zero point
  # Activation scales: 'dynamic' (per batch, from its min/max), 'static' (calibrated before
  # training/conversion), 'lsq' (learned step size, QAT only), 'none' (weight-only), 'per_token'
  # (one scale per token: a row's result does not depend on the rest of its batch).
  c.quant.activations = 'dynamic'
  # With a PEFT method, QAT quantizes 'base' (the frozen base; the method stays float on top) or
  # 'effective' (the merged weight, e.g. W + s·A·B; needs a mergeable method).
  c.quant.of = 'base'
  c.quant.observer = 'minmax'  # static calibration: 'minmax' | 'moving_average' | 'percentile'
  c.quant.percentile = 99.99  # observer='percentile': the |x| percentile taken as the range
  c.quant.calibration_batches = 8  # train batches run through the model to calibrate

  # Compression (peftjax/compress/): applied to the model before the method, composed with it.
  c.compress = ml_collections.ConfigDict()
  # Start from a finished run's trained model (its workdir; the method merged into the weights)
  # instead of the pretrained one: retrain after pruning, compress a fine-tuned classifier.
  c.compress.init_from = ''
  c.compress.prune = ml_collections.ConfigDict()  # pruning (peftjax/compress/prune.py)
  # 'none' | 'magnitude' (unstructured) | 'nm' (N:M along the input dim) | 'heads' (attention
  # heads removed) | 'ffn' (FFN channels removed). heads/ffn return a smaller model.
  c.compress.prune.kind = 'none'
  # Regex over the weight paths that are pruned.
  c.compress.prune.targets = r'encoder/.*/(query|key|value|out|intermediate|output)/kernel$'
  c.compress.prune.sparsity = 0.5  # magnitude: the final fraction of targeted weights pruned
  c.compress.prune.scope = 'layer'  # magnitude: 'layer' (each leaf) | 'global' (all targets ranked)
  # Gradual pruning (Zhu & Gupta): the sparsity ramps cubically from initial_sparsity at
  # begin_step to sparsity at end_step, masks recomputed every `every` updates. end_step = 0:
  # one shot before training (the mask then stays fixed: pruned weights stay zero).
  c.compress.prune.initial_sparsity = 0.0
  c.compress.prune.begin_step = 0  # gradual pruning: the update where the ramp starts
  c.compress.prune.end_step = 0  # gradual pruning: the update reaching sparsity; 0 = one shot
  c.compress.prune.every = 10  # gradual pruning: masks recomputed every N updates
  c.compress.prune.n = 2  # nm: keep n of every m consecutive input weights (2:4)
  c.compress.prune.m = 4  # nm: ... of every m (the group size)
  c.compress.prune.keep_heads = 6  # heads: heads kept in every layer
  c.compress.prune.keep_ffn = 768  # ffn: FFN channels kept in every layer
  # heads/ffn: 'magnitude' | 'first_order' (|sum w*grad|); nm and one-shot magnitude masks:
  # 'magnitude' | 'wanda' (|w| times its input's norm over score_batches train batches)
  c.compress.prune.score = 'magnitude'
  c.compress.prune.score_batches = 4  # first_order / wanda: train batches scored
  c.compress.distill = ml_collections.ConfigDict()  # knowledge distillation from a teacher run
  # workdir of a finished run: its model is the teacher; 'pretrained' (causal LMs): the model
  # the run starts from; '' = off
  c.compress.distill.teacher = ''
  # The student: 'every_other' (the teacher's layers 0, 2, 4, ... with its head: DistilBERT's
  # init), a tuple of teacher layer indices, or '' (the model section: e.g. model.num_layers=3).
  c.compress.distill.student_layers = 'every_other'
  c.compress.distill.temperature = 2.0  # softmax temperature T of the soft targets
  c.compress.distill.alpha = 0.5  # weight of the soft (T^2-scaled KL) term; 1 - alpha: labels
  # Also match layer outputs (mean squared error over real tokens) and attention distributions
  # (KL over real keys) of student layer i with the teacher layer it replaces (BERT only).
  c.compress.distill.hidden_weight = 0.0  # weight of the layer-output MSE term
  c.compress.distill.attention_weight = 0.0  # weight of the attention-distribution KL term
  c.compress.lowrank = ml_collections.ConfigDict()  # low-rank factorization (SVD) of kernels
  c.compress.lowrank.targets = ''  # regex of kernels replaced by two SVD factors; '' = off
  c.compress.lowrank.rank = 0  # one rank for every target; 0 = use energy
  c.compress.lowrank.energy = 0.0  # per kernel, the smallest rank keeping this share of sum(S^2)
  # Weight sharing (the Deep Compression pipeline, peftjax/compress/deep.py): k-means into
  # 2^bits shared values per layer, centroids fine-tuned, indices Huffman-coded.
  c.compress.share = ml_collections.ConfigDict()
  c.compress.share.bits = 5  # 2^bits shared values (centroids) per layer
  c.compress.share.targets = r'(kernel|embedding)$'  # regex over the weight paths clustered
  c.compress.share.finetune_steps = 100  # centroid fine-tuning updates after clustering
  c.compress.share.learning_rate = 1e-4  # of the centroid fine-tuning
  c.compress.share.gap_bits = 5  # bits of a relative sparse index (Han et al.: 5 fc, 8 conv)

  c.optim = ml_collections.ConfigDict()  # the optimizer: AdamW + schedule (peftjax/optim.py)
  c.optim.learning_rate = 5e-4  # peak learning rate
  c.optim.schedule = 'cosine'  # 'cosine' | 'linear' | 'constant' (after warmup)
  c.optim.warmup_steps = 20  # linear warmup from 0
  c.optim.end_lr_fraction = 0.0  # final lr as a fraction of the peak (cosine/linear)
  c.optim.weight_decay = 0.01  # AdamW decoupled decay (not on biases and norms)
  c.optim.b1 = 0.9  # Adam first-moment decay
  c.optim.b2 = 0.999  # Adam second-moment decay
  c.optim.eps = 1e-8  # Adam denominator epsilon
  c.optim.clip_norm = 1.0  # global gradient-norm clipping; 0 = off
  c.optim.grad_accum_steps = 1  # optax.MultiSteps: one update every k micro-batches
  # Per-group learning-rate factors: ((regex over trainable paths, factor), ...); first match
  # wins. LoRA+ (a larger learning rate for B): (('lora_b$', 16.0),).
  c.optim.lr_multipliers = ()
  # Discriminative (layer-wise) learning rates: layer i of N trains at lr * decay**(N - i), the
  # embeddings at lr * decay**(N + 1), everything else (head, PEFT params outside layers) at lr.
  c.optim.layer_decay = 1.0  # 1.0 = off; e.g. 0.8

  # Decoding (peftjax/generation/): exact-match evaluation of causal_lm and python -m peftjax.generate
  c.generate = ml_collections.ConfigDict()
  c.generate.max_new_tokens = 16  # tokens generated per prompt (a stop token ends a row sooner)
  c.generate.temperature = 0.0  # 0 = greedy; > 0 samples from softmax(logits / T)
  c.generate.top_k = 0  # sample among the k most likely tokens; 0 = all
  c.generate.top_p = 1.0  # nucleus sampling: the smallest set with this much probability
  c.generate.batch_size = 32  # prompts decoded together in evaluation
  c.generate.max_eval_examples = -1  # prompts scored by exact match per evaluation; -1 = all
  # Also the teacher-forced pass on exact-match data (completion loss, perplexity, token
  # accuracy). False skips it: on the RT instructions it costs twice the generation itself.
  c.generate.teacher_forced = True

  c.train = ml_collections.ConfigDict()  # the loop: steps, batches, evaluation, checkpoints
  c.train.steps = 300  # optimizer updates (micro-batches = steps * grad_accum_steps)
  c.train.batch_size = 32  # global batch
  c.train.eval_batch_size = 128  # global batch of evaluation
  c.train.eval_every = 100  # validation every N steps (and at the end); 0 = only at the end
  c.train.log_every = 10  # metrics to JSONL / TensorBoard every N steps
  c.train.checkpoint_every = 100  # 0 = no checkpoints
  c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
  c.train.eval_before = True  # test accuracy of the untrained model (accuracy_before)
  c.train.progress = True  # progress bar
  # At the end, write <workdir>/adapter.safetensors: the trainable partition + a manifest (method,
  # base hash, data, metrics, versions); see peftjax/delta.py.
  c.train.save_adapter = False
  c.train.save_adapter_opt_state = False  # also store the optimizer state in the adapter file
  # Start from this adapter (a delta checkpoint of the same method and base): its parameters, and
  # its optimizer state if it has one; it is recorded as the new adapter's parent. '' = fresh.
  c.train.init_adapter = ''
  # Gradual unfreezing: ((step, regex over base paths), ...); from `step` on, matching base
  # leaves train too, e.g. ((100, 'layer_5/'), (200, 'layer_4/')). () = off.
  c.train.unfreeze = ()

  # L2-SP (Li et al., 2018; peftjax/components/l2sp.py): alpha/2 * ||w - w_pretrained||^2 over
  # the trainable base leaves that start pretrained, beta/2 * ||w||^2 over the new head. 0 = off.
  c.l2sp = ml_collections.ConfigDict()
  c.l2sp.alpha = 0.0  # weight of the pull towards the pretrained values (trainable base leaves)
  c.l2sp.beta = 0.0  # weight of the plain L2 penalty on the new head

  c.mesh = ml_collections.ConfigDict()  # the device mesh (peftjax/sharding.py)
  c.mesh.data = -1  # -1 = all remaining devices
  c.mesh.fsdp = 1  # fully sharded data parallelism: parameters split over N devices
  c.mesh.expert = 1  # expert parallelism: MoE experts split over this many devices
  c.mesh.tensor = 1  # tensor parallelism: heads and FFN channels split over N devices
  # logical axis -> mesh axes; unlisted logical axes are replicated. The expert devices also
  # split the batch (GShard/MaxText), so 'batch' includes 'expert'.
  c.mesh.rules = (('batch', ('data', 'fsdp', 'expert')), ('embed', 'fsdp'), ('heads', 'tensor'),
                  ('mlp', 'tensor'), ('vocab', 'tensor'), ('expert', 'expert'))
  # With fsdp/tensor/expert > 1, parameters of at least this many MiB that the rules leave fully
  # replicated are listed at start-up (they cost memory on every device).
  c.mesh.replicated_report_mb = 1.0
  # ... and the run refuses to start when such parameters total more than this; -1 = never.
  c.mesh.max_replicated_mb = -1.0
  return c


# ------------------------------------------------------------------------------- variants
# ``--config=configs/x.py:<arg>`` passes ``<arg>`` to ``get_config(arg)`` (and a sweep's
# ``sweep(add, arg)``). A config with variants picks one with :func:`variant`, a config with
# ``key=value`` settings reads them with :func:`settings`, a config without either refuses any
# arg with :func:`no_variant`: an unknown one is an error that lists the valid ones.


def variant(arg, names, *, default: str) -> str:
  """The variant ``arg`` selects among ``names``; ``None`` or ``''`` give ``default``.

  >>> variant('lora', ('full', 'lora'), default='full')
  'lora'
  >>> variant('lroa', ('full', 'lora'), default='full')
  Traceback (most recent call last):
  ...
  peftjax.errors.ConfigError: unknown variant 'lroa' (did you mean 'lora'?); valid: 'full' (the default, also without ':variant'), 'lora'
  """
  from peftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  names = tuple(names)
  if arg in (None, ''):
    return default
  if arg not in names:
    valid = ', '.join(f'{n!r} (the default, also without \':variant\')' if n == default
                      else repr(n) for n in names)
    raise ConfigError(f'unknown variant {arg!r}{_did_you_mean(arg, names)}; valid: {valid}')
  return arg


def no_variant(arg) -> None:
  """Refuses any ``arg``: for configs that have no variants (``get_config(arg=None)``)."""
  from peftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if arg not in (None, ''):
    raise ConfigError(f"unknown variant {arg!r}: this config has no variants; valid: the file "
                      "alone, without ':variant'")


def settings(arg, **defaults) -> dict:
  """``key=value`` settings from ``arg`` (``'steps=60'``, ``'steps=60,seeds=1'``), typed like
  their ``defaults``; unknown keys and values of the wrong type are refused.

  >>> settings('steps=60', steps=120)
  {'steps': 60}
  >>> settings(None, steps=120)
  {'steps': 120}
  """
  from peftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  out = dict(defaults)
  valid = ', '.join(f'{k}=<{type(v).__name__}> (default {v!r})' for k, v in defaults.items())
  for item in ([] if arg in (None, '') else str(arg).split(',')):
    key, eq, value = item.partition('=')
    key = key.strip()
    if key not in defaults or not eq:
      what = f'setting {key!r}' if eq else f'{item!r} (not key=value)'
      raise ConfigError(f'unknown {what} in variant {arg!r}'
                        f'{_did_you_mean(key, defaults) if eq else ""}; valid: {valid}')
    kind = type(defaults[key])
    try:
      out[key] = kind(value.strip())
    except ValueError:
      word = {int: 'an integer', float: 'a number'}.get(kind, f'a {kind.__name__}')
      raise ConfigError(f'variant {arg!r}: {key}={value!r} is not {word}; valid: {valid}'
                        ) from None
  return out


def _did_you_mean(word: str, names) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(str(word), [str(n) for n in names], n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''
