"""The ``compress`` config section turned into a compressed model and the training-loop hooks.

:func:`prepare` runs once, after the model is built and before the PEFT method sees it:

1. ``init_from``: the base becomes a finished run's trained model (its method merged in).
2. ``distill``: a finished run becomes the teacher (or, for a causal LM, ``'pretrained'``: the
   model the run starts from); the student is built from its layers (``student_layers``: BERT's
   or a Llama LM's, see :mod:`peftjax.compress.lm_distill`) or is the configured model.
3. ``prune.kind = heads | ffn``: attention heads / FFN channels are removed (a smaller model).
4. ``lowrank``: selected kernels become two SVD factors (two matmuls, fewer parameters).
5. ``prune.kind = magnitude | nm``: the masks at step 0.

What the loop needs back is a :class:`Plan`: the teacher (run inside the jitted step, without
gradients), the masks and how to update them (:func:`mask_update`), and whether the forward
runs factored layers (:func:`peftjax.compress.lowrank.scope`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import tree as tree_lib
from peftjax.compress import distill as distill_lib
from peftjax.compress import lm_distill
from peftjax.compress import lowrank
from peftjax.compress import prune as prune_lib
from peftjax.compress import structured
from peftjax.compress import wanda
from peftjax.errors import ConfigError
from peftjax.models.bert import BertClassifier
from peftjax.models.build import Built
from peftjax.models.build import sample_inputs
from peftjax.models.llama import LlamaForCausalLM

PRUNE_KINDS = ('none', 'magnitude', 'nm', 'heads', 'ffn')
SCORES = ('magnitude', 'first_order')  # heads/ffn
MASK_SCORES = ('magnitude', 'wanda')  # magnitude/nm: |w|, or |w| times its input's norm


@dataclasses.dataclass
class Plan:
  """What the training loop needs from the compression config (see the module docstring)."""
  masks: dict | None = None  # magnitude/nm masks of the base at step 0 (targeted leaves only)
  gradual: bool = False  # masks recomputed during training (Zhu & Gupta)
  factored: bool = False  # the forward runs factored layers (lowrank.scope)
  teacher: Built | None = None  # the teacher model with its (merged) parameters
  layer_map: tuple | None = None  # student layer -> teacher layer (for reports)
  report: dict = dataclasses.field(default_factory=dict)  # what was done, for summary.json


def validate(cc) -> None:
  """ConfigErrors for the ``compress`` section, before any work (each names field and range)."""
  p = cc.prune
  if p.kind not in PRUNE_KINDS:
    raise ConfigError(f'compress.prune.kind={p.kind!r}; valid: {", ".join(PRUNE_KINDS)}')
  if p.kind == 'magnitude':
    for f in ('sparsity', 'initial_sparsity'):
      v = p[f]
      if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
        raise ConfigError(f'compress.prune.{f}={v!r}; valid: a fraction in [0, 1)')
    if p.scope not in prune_lib.SCOPES:
      raise ConfigError(f'compress.prune.scope={p.scope!r}; valid: {", ".join(prune_lib.SCOPES)}')
    if p.end_step and not (0 <= p.begin_step < p.end_step and p.every >= 1):
      raise ConfigError(
          f'compress.prune begin_step={p.begin_step}, end_step={p.end_step}, every={p.every}; '
          'valid: 0 <= begin_step < end_step and every >= 1 (or end_step=0: one shot)')
  if p.kind == 'nm' and not (1 <= p.n <= p.m):
    raise ConfigError(f'compress.prune.n={p.n}, m={p.m}; valid: 1 <= n <= m (2:4 keeps 2 of 4)')
  if p.kind in ('magnitude', 'nm'):
    if p.score not in MASK_SCORES:
      raise ConfigError(f'compress.prune.score={p.score!r} with kind={p.kind!r}; valid: '
                        f'{", ".join(map(repr, MASK_SCORES))} (wanda: |w| times the norm of '
                        'its input over compress.prune.score_batches train batches)')
    if p.score == 'wanda' and p.kind == 'magnitude' and p.end_step:
      raise ConfigError(f"compress.prune.score='wanda' with end_step={p.end_step}: gradual "
                        "pruning re-ranks the trained weights by magnitude; valid: end_step=0 "
                        "(one shot) or score='magnitude'")
    if p.score == 'wanda' and p.score_batches < 1:
      raise ConfigError(f'compress.prune.score_batches={p.score_batches}; valid: >= 1')
  if p.kind in ('heads', 'ffn') and p.score not in SCORES:
    raise ConfigError(f'compress.prune.score={p.score!r}; valid: {", ".join(SCORES)}')
  d = cc.distill
  if d.teacher:
    distill_lib.check_hparams(d.temperature, d.alpha, d.hidden_weight, d.attention_weight)
  lr = cc.lowrank
  if lr.targets and not ((lr.rank > 0) != (lr.energy > 0)):
    raise ConfigError(f'compress.lowrank rank={lr.rank}, energy={lr.energy}; valid: exactly one '
                      'of rank >= 1 or energy in (0, 1]')
  if lr.targets and lr.energy > 1.0:
    raise ConfigError(f'compress.lowrank.energy={lr.energy}; valid: (0, 1]')
  from peftjax.compress import huffman, share  # pylint: disable=g-import-not-at-top
  share.check_bits(cc.share.bits, 'compress.share.bits')
  huffman.check_gap_bits(cc.share.gap_bits, 'compress.share.gap_bits')


# compress.distill.teacher: the model the run starts from is the teacher (a causal LM's
# pretrained model is a teacher as it is; a classifier's would have an untrained head).
PRETRAINED_TEACHER = 'pretrained'


def _sample(built: Built, image_shape=None) -> dict:
  """Dummy inputs of the keys ``built`` reads (a causal LM reads no token types)."""
  inputs = sample_inputs(built.input_keys, image_shape=image_shape)
  return {k: v for k, v in inputs.items() if k in built.input_keys} or inputs


def rebuild(built: Built, module: nn.Module, params: dict, image_shape=None) -> Built:
  """``built`` with another module and parameters; logical specs from the module's shapes."""
  inputs = _sample(built, image_shape)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs)['params'])
  return dataclasses.replace(built, module=module, params=params,
                             logical_specs=nn.get_partition_spec(boxed))


def _check_same_shapes(field: str, want: dict, have: dict) -> None:
  w, h = tree_lib.flatten(want), tree_lib.flatten(have)
  bad = sorted(set(w) ^ set(h)) or [k for k in w if np.shape(w[k]) != np.shape(h[k])]
  if bad:
    raise ConfigError(f'{field}: the run\'s model does not fit this config\'s model (first '
                      f'difference: {bad[0]}); use the same model section as that run')


def _check_teacher_fits(teacher: Built, student: Built, path: str, image_shape=None) -> None:
  """A ConfigError unless the teacher reads the student's inputs and gives logits of the
  student's shape (shapes only: nothing is computed)."""
  if tuple(teacher.input_keys) != tuple(student.input_keys):
    raise ConfigError(f'compress.distill.teacher={path!r} reads {teacher.input_keys}; the '
                      f'student reads {student.input_keys}: a teacher must take the same inputs')
  inputs = _sample(student, image_shape)
  shape = lambda b: jax.eval_shape(
      lambda p: _apply(b, p, inputs), b.params).shape
  t, s = shape(teacher), shape(student)
  if t != s:
    raise ConfigError(f'compress.distill.teacher={path!r} outputs logits of shape {t}; the '
                      f'student outputs {s}: the teacher must be trained on the same classes')


def _apply(built: Built, params, inputs):
  with lowrank.scope_if(bool(lowrank.factored_paths(params))):
    return built.module.apply({'params': params}, **inputs)


def _bert_cfg(built: Built, what: str):
  if not isinstance(built.module, BertClassifier):
    raise ConfigError(f'{what} needs a BERT classifier; model is {type(built.module).__name__}')
  return built.module.cfg


def _first_order_grads(built: Built, batches: list[dict]) -> dict:
  """Gradients of the label loss w.r.t. every parameter, summed over ``batches``."""
  def loss(params, batch):
    logits = built.module.apply({'params': params}, **{k: batch[k] for k in built.input_keys})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  grad = jax.jit(jax.grad(loss))
  total = None
  for b in batches:
    g = grad(built.params, {k: jnp.asarray(v) for k, v in b.items()})
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return total


def _structured(p, built: Built, data, batch_size: int, seed: int) -> tuple[Built, dict]:
  cfg = _bert_cfg(built, f'compress.prune.kind={p.kind!r}')
  grads = None
  if p.score == 'first_order':
    batches = data.train_batches(batch_size, seed)
    grads = _first_order_grads(built, [batches[i] for i in range(p.score_batches)])
  if p.kind == 'heads':
    if not 1 <= p.keep_heads <= cfg.num_heads:
      raise ConfigError(f'compress.prune.keep_heads={p.keep_heads}; valid: 1..{cfg.num_heads}')
    scores = structured.head_scores(built.params, cfg, grads)
    params, new_cfg = structured.prune_heads(built.params, cfg, p.keep_heads, scores)
  else:
    if not 1 <= p.keep_ffn <= cfg.intermediate_size:
      raise ConfigError(f'compress.prune.keep_ffn={p.keep_ffn}; valid: '
                        f'1..{cfg.intermediate_size}')
    scores = structured.ffn_scores(built.params, cfg, grads)
    params, new_cfg = structured.prune_ffn(built.params, cfg, p.keep_ffn, scores)
  module = built.module.clone(cfg=new_cfg)
  before = tree_lib.count(built.params)
  return rebuild(built, module, params), {'params_before': before,
                                          'params_after': tree_lib.count(params)}


def _factored_specs(specs: dict, params: dict) -> dict:
  """Logical axes of factored leaves: U keeps the kernel's input axes, V its output axes."""
  flat_specs = tree_lib.flatten(specs)
  out = {}
  for path, leaf in tree_lib.flatten(params).items():
    if path.endswith((lowrank.U_NAME, lowrank.V_NAME)):
      kernel = flat_specs.get(path.rsplit('/', 1)[0] + '/kernel')
      names = tuple(kernel) if kernel is not None else (None,) * (np.ndim(leaf) + 1)
      if path.endswith(lowrank.U_NAME):
        n_in = np.ndim(leaf) - 1
        out[path] = jax.sharding.PartitionSpec(*names[:n_in], None)
      else:
        n_out = np.ndim(leaf) - 1
        out[path] = jax.sharding.PartitionSpec(None, *names[len(names) - n_out:])
    else:
      out[path] = flat_specs[path]
  return tree_lib.unflatten(out)


def prepare(config, built: Built, data, load_run: Callable[[str], tuple[Any, Built]]
            ) -> tuple[Built, Plan]:
  """The compressed model and the loop's :class:`Plan` (see the module docstring).

  ``load_run(workdir) -> (its config, Built with its trained, merged parameters)`` reads a
  finished run (``run.load_finished``; passed in so this package never imports the run library).

  >>> built, plan = prepare(config, built, data, run.load_finished)  # doctest: +SKIP
  """
  cc = config.compress
  plan = Plan()
  if cc.init_from:
    _, src = load_run(cc.init_from)
    _check_same_shapes('compress.init_from', built.params, src.params)
    built = dataclasses.replace(built, params=src.params, source=f'{cc.init_from} (trained)')
    plan.report['init_from'] = cc.init_from

  if cc.distill.teacher:
    d = cc.distill
    causal = isinstance(built.module, LlamaForCausalLM)
    if d.teacher == PRETRAINED_TEACHER:
      if not causal:
        raise ConfigError(f"compress.distill.teacher='{PRETRAINED_TEACHER}' is for a causal LM "
                          f'(its pretrained model is a teacher as it is); this model is '
                          f'{type(built.module).__name__}, whose head is untrained; valid: the '
                          'workdir of a finished run')
      teacher = built
    else:
      _, teacher = load_run(d.teacher)
    _check_teacher_fits(teacher, built, d.teacher, data.info.image_shape)
    if causal and (d.hidden_weight or d.attention_weight):
      raise ConfigError(f'compress.distill.hidden_weight={d.hidden_weight}, attention_weight='
                        f'{d.attention_weight}: layer matching is for BERT; valid for a causal '
                        'LM: 0 (its KD matches the logits of the completion tokens)')
    plan.teacher = teacher
    layers = d.student_layers
    if layers:
      layers = layers if isinstance(layers, str) else tuple(layers)
      if isinstance(teacher.module, LlamaForCausalLM):
        student = lm_distill.student_from_teacher(teacher.module.cfg, teacher.params, layers)
      else:
        t_cfg = _bert_cfg(teacher, 'compress.distill.student_layers')
        student = distill_lib.student_from_teacher(t_cfg, teacher.params, layers)
      built = rebuild(built, teacher.module.clone(cfg=student.cfg), student.params)
      origin = teacher.source if d.teacher == PRETRAINED_TEACHER else d.teacher
      built = dataclasses.replace(built, source=f'{origin} (layers {layers})')
      plan.layer_map = student.layer_map
    plan.report['distill'] = {'teacher': cc.distill.teacher,
                              'teacher_params': tree_lib.count(teacher.params),
                              'student_params': tree_lib.count(built.params),
                              'layer_map': plan.layer_map}

  p = cc.prune
  if p.kind in ('heads', 'ffn'):
    built, plan.report['prune'] = _structured(p, built, data, config.train.batch_size,
                                              config.seed)
    plan.report['prune']['kind'] = p.kind

  if cc.lowrank.targets:
    params = lowrank.factorize(built.params, targets=cc.lowrank.targets,
                               rank=cc.lowrank.rank or None, energy=cc.lowrank.energy or None)
    rep = lowrank.report(built.params, params)
    built = dataclasses.replace(built, params=params,
                                logical_specs=_factored_specs(built.logical_specs, params))
    plan.factored = True
    plan.report['lowrank'] = {k: rep[k] for k in rep if k != 'kernels'}
    plan.report['lowrank']['ranks'] = {k: v['rank'] for k, v in rep['kernels'].items()}

  if p.kind in ('magnitude', 'nm'):
    ranked = built.params
    if p.score == 'wanda':  # |w| times its input's norm on calibration batches
      batches = data.train_batches(config.train.batch_size, config.seed)
      ranked = wanda.wanda_scores(built.module, built.params, p.targets,
                                  [batches[i] for i in range(p.score_batches)], built.input_keys)
  if p.kind == 'magnitude':
    plan.gradual = p.end_step > 0
    s0 = _schedule(p, 0) if plan.gradual else p.sparsity
    plan.masks = prune_lib.magnitude_masks(ranked, s0, targets=p.targets, scope=p.scope)
  elif p.kind == 'nm':
    plan.masks = prune_lib.nm_masks(ranked, n=p.n, m=p.m, targets=p.targets)
  if plan.masks is not None:
    plan.report['prune'] = {'kind': p.kind, 'targets': p.targets, 'score': p.score,
                            'leaves': len(tree_lib.flatten(plan.masks))}
    # Pruned before the method sees the base (e.g. PiSSA's SVD of the pruned weight).
    built = dataclasses.replace(built, params=prune_lib.apply_masks(built.params, plan.masks))
  return built, plan


def _schedule(p, update):
  return prune_lib.cubic_sparsity(update, initial=p.initial_sparsity, final=p.sparsity,
                                  begin=p.begin_step, end=p.end_step, every=p.every)


def mask_update(p, accum: int = 1) -> Callable:
  """``update(step, params, masks) -> (params, masks)`` run after each optimizer update.

  ``params`` is the trainable base partition and ``masks`` its pruned leaves' masks. Gradual
  pruning (``end_step > 0``) recomputes the masks from the current weights at every
  ``every``-th update between ``begin_step`` and ``end_step``, at the cubic schedule's sparsity;
  already-pruned weights rank first, so the pruned set only grows. The masks are then applied,
  so pruned weights are exactly zero after every update.
  """
  gradual = p.kind == 'magnitude' and p.end_step > 0

  def update(step, params, masks):
    if gradual:
      u = step // accum  # completed optimizer updates
      due = ((step % accum == 0) & (u >= p.begin_step) & (u <= p.end_step)
             & ((u - p.begin_step) % p.every == 0))
      pruned = tree_lib.flatten(masks).keys()
      sub = {k: v for k, v in tree_lib.flatten(params).items() if k in pruned}
      masks = jax.lax.cond(
          due, lambda: prune_lib.magnitude_masks(tree_lib.unflatten(sub), _schedule(p, u),
                                                 targets=p.targets, scope=p.scope),
          lambda: masks)
    return prune_lib.apply_masks(params, masks), masks

  return update


def split_masks(masks: dict | None, trainable_base: dict) -> tuple[dict, dict]:
  """``(masks of trainable leaves, masks of frozen leaves)``."""
  if not masks:
    return {}, {}
  flat, train = tree_lib.flatten(masks), set(tree_lib.flatten(trainable_base))
  return (tree_lib.unflatten({k: v for k, v in flat.items() if k in train}),
          tree_lib.unflatten({k: v for k, v in flat.items() if k not in train}))


def size_summary(params: dict, cc) -> dict:
  """Parameter count, zeros in the prune targets, and storage bytes of a (pruned) model.

  ``float32_bytes`` stores every weight; ``sparse_bytes`` stores the nonzero weights of pruned
  targets as float32 values plus ``share.gap_bits``-bit relative indices (Deep Compression's
  sparse format, before sharing and Huffman coding); with N:M pruning ``nm_bytes`` stores them
  in the N:M format (:func:`nm_bytes`).
  """
  from peftjax.compress import huffman  # pylint: disable=g-import-not-at-top
  params = jax.device_get(params)
  out = {'params': tree_lib.count(params), 'float32_bytes': 4 * tree_lib.count(params)}
  if cc.prune.kind in ('magnitude', 'nm'):
    flat = tree_lib.flatten(params)
    targets = tree_lib.select(params, cc.prune.targets)
    zeros = sum(int(np.sum(np.asarray(flat[k]) == 0)) for k in targets)
    size = sum(int(np.size(flat[k])) for k in targets)
    masks = tree_lib.unflatten({k: np.asarray(flat[k]) != 0 for k in targets})
    out.update(target_sparsity=zeros / max(size, 1), nonzero_params=out['params'] - zeros,
               sparse_bytes=huffman.compressed_size(params, masks=masks, huffman=False,
                                                    gap_bits=cc.share.gap_bits)['total']['bytes'])
    if cc.prune.kind == 'nm':
      out['nm_bytes'] = nm_bytes(out['params'], size, cc.prune.n, cc.prune.m)
  return out


def nm_bytes(params: int, target_size: int, n: int, m: int) -> int:
  """Bytes of a model whose ``target_size`` pruned weights are stored in the N:M format (the
  ``n`` kept float32 values of every group of ``m``, each with a ``ceil(log2 m)``-bit index in
  its group: 2:4 is 2 values and 4 bits per 4 weights) and its other weights as float32.

  >>> nm_bytes(params=16, target_size=8, n=2, m=4)  # 8 float32 + 4 kept values + 4 x 2 bits
  49
  """
  kept = target_size * n // m
  index_bits = kept * max(int(np.ceil(np.log2(m))), 1)
  return 4 * (params - target_size) + 4 * kept + -(-index_bits // 8)
