"""Knowledge distillation: a student learns from a frozen teacher's outputs.

Three losses, each a pure function of model outputs (the teacher side is a target: its gradient
is always stopped):

* :func:`kd_loss` -- Hinton et al. (2015): ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) *
  CE(s, y)`` on the logits, with ``p^T = softmax(z / T)``.
* :func:`hidden_loss` -- mean squared error between matched layers' hidden states, over real
  tokens (the hidden-state term of PKD / TinyBERT / DistilBERT's cosine term).
* :func:`attention_loss` -- KL between matched layers' attention distributions, over real keys
  (TinyBERT's and MiniLM's attention transfer, on probabilities).

:func:`run_bert` runs a :class:`BertClassifier` and also returns every layer's output and
attention probabilities (read from flax's ``'intermediates'`` collection),
:func:`student_from_teacher` builds a shallower student from a teacher's layers (DistilBERT's
initialisation), and
:func:`make_distill_loss` puts it together as one loss function that runs the teacher inside the
student's jitted step, with the teacher's parameters as an argument.

Layer matching: ``layer_map[i]`` is the teacher layer whose *output* student layer ``i``'s output
is compared with. :func:`student_from_teacher` maps each student layer to the last teacher layer
of the span it replaces: keeping teacher layers ``(0, 2, 4)`` of 6, student layer 0 stands for
teacher layers 0-1, so ``layer_map = (1, 3, 5)`` (PKD-skip / TinyBERT's uniform map). The last
student layer then always matches the teacher's last layer, whose output feeds the copied head.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from peftjax.errors import ConfigError
from peftjax.errors import UserInputError
from peftjax.models.bert import BertClassifier
from peftjax.models.bert import BertConfig
from peftjax.models.bert import Layer

BERT_INPUT_KEYS = ('input_ids', 'attention_mask', 'token_type_ids')


class Taps(NamedTuple):
  """What a forward exposes to distillation: logits, and optionally per-layer internals.

  ``hiddens[i]`` is encoder layer ``i``'s output ``(batch, length, hidden)``; ``attentions[i]``
  its attention probabilities ``(batch, heads, query, key)`` (before attention dropout);
  ``aux`` the ``'moe'`` collection of an MoE model (``None`` or ``{}`` for a dense one).

  >>> Taps(jnp.zeros((2, 3))).hiddens is None
  True
  """
  logits: jax.Array
  hiddens: tuple | None = None
  attentions: tuple | None = None
  aux: Any = None


class Student(NamedTuple):
  """A student's architecture, its parameters, and which teacher layer each layer matches.

  >>> cfg, params, layer_map = student_from_teacher(teacher_cfg, teacher_params)  # doctest: +SKIP
  """
  cfg: BertConfig
  params: dict
  layer_map: tuple[int, ...]


# ----------------------------------------------------------------------------- validation


def _number(field: str, value) -> float | None:
  """``float(value)``, or ``None`` for a traced value, which cannot be checked (hyperparameters
  are normally Python numbers; a traced one is the caller's responsibility)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ConfigError(f'{field}={value!r}; valid: a number') from None


def check_hparams(temperature, alpha, hidden_weight=0.0, attention_weight=0.0) -> None:
  """Raises :class:`ConfigError` naming the first invalid distillation hyperparameter.

  >>> check_hparams(temperature=2.0, alpha=0.5)
  >>> check_hparams(temperature=0.0, alpha=0.5)  # doctest: +SKIP
  ConfigError: compress.distill.temperature=0.0; valid: a number > 0 (1 = plain softmax, ...)
  """
  t = _number('compress.distill.temperature', temperature)
  # `not x > 0` rather than `x <= 0`: NaN fails too.
  if t is not None and not t > 0:
    raise ConfigError(f'compress.distill.temperature={temperature!r}; valid: a number > 0 '
                      '(1 = plain softmax, 2-20 typical)')
  a = _number('compress.distill.alpha', alpha)
  if a is not None and not 0.0 <= a <= 1.0:
    raise ConfigError(f'compress.distill.alpha={alpha!r}; valid: a number in [0, 1] '
                      '(the weight of the soft term; 1 - alpha weights the label cross-entropy)')
  for field, value in (('compress.distill.hidden_weight', hidden_weight),
                       ('compress.distill.attention_weight', attention_weight)):
    w = _number(field, value)
    if w is not None and not w >= 0.0:
      raise ConfigError(f'{field}={value!r}; valid: a number >= 0 (0 turns the term off)')


def _check_indices(field: str, indices, n: int | None, what: str) -> tuple[int, ...]:
  """``indices`` as a tuple of ints, non-empty, strictly increasing, each in ``0..n-1``.

  ``n=None`` checks everything but the upper bound (not known yet).
  """
  span = 'non-negative' if n is None else f'in 0..{n - 1}'
  valid = f'strictly increasing {what} indices {span}'
  try:
    out = tuple(indices)
  except TypeError:
    raise ConfigError(f'{field}={indices!r}; valid: a sequence of {valid}') from None
  if not out:
    raise ConfigError(f'{field}={indices!r}; valid: at least one of {valid}')
  try:
    if any(isinstance(i, bool) for i in out):
      raise TypeError
    out = tuple(operator.index(i) for i in out)  # ints and numpy ints; not floats or bools
  except TypeError:
    raise ConfigError(f'{field}={indices!r}: not all integers; valid: {valid}') from None
  bad = [i for i in out if i < 0 or n is not None and i >= n]
  if bad:
    raise ConfigError(f'{field}={out}: index {bad[0]} is out of range; valid: {valid}')
  for a, b in zip(out, out[1:]):
    if b <= a:
      raise ConfigError(f'{field}={out}: {b} after {a} is not increasing; valid: {valid}')
  return out


def check_layer_map(layer_map, num_student_layers: int, num_teacher_layers: int) -> tuple:
  """``layer_map`` validated: one strictly increasing teacher layer index per student layer.

  >>> check_layer_map((1, 3, 5), 3, 6)
  (1, 3, 5)
  """
  out = _check_indices('compress.distill.layer_map', layer_map, num_teacher_layers,
                       'teacher layer')
  if len(out) != num_student_layers:
    raise ConfigError(f'compress.distill.layer_map={out} has {len(out)} entries; valid: one '
                      f'teacher layer index per student layer ({num_student_layers})')
  return out


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> tuple[int, ...]:
  """Student layer ``i`` matches teacher layer ``(i + 1) * N // M - 1`` (M student, N teacher).

  Each student layer stands for ``N / M`` consecutive teacher layers and matches the last of
  them, so the last layers always match (PKD-skip, TinyBERT's uniform strategy).

  >>> uniform_layer_map(3, 6)
  (1, 3, 5)
  """
  m, n = num_student_layers, num_teacher_layers
  if not 1 <= m <= n:
    raise ConfigError(f'student num_layers={m}; valid: 1..{n} (the teacher has {n} layers)')
  return tuple((i + 1) * n // m - 1 for i in range(m))


def _same_shape(what: str, student_shape, teacher_shape) -> None:
  if tuple(student_shape) != tuple(teacher_shape):
    raise UserInputError(f'{what}: the student has shape {tuple(student_shape)}, the teacher '
                         f'{tuple(teacher_shape)}; they must match')


# ----------------------------------------------------------------------------- losses


def _weighted_mean(x, weight):
  if weight is None:
    return jnp.mean(x)
  w = jnp.asarray(weight, jnp.float32)
  # All-zero weights (a batch of padding) give 0, not NaN.
  return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)


def kd_loss(student_logits, teacher_logits, labels, *, temperature, alpha, weight=None):
  """Hinton et al.'s distillation loss and its parts, in float32.

  ``loss = mean_b[alpha * soft_b + (1 - alpha) * hard_b]`` with ``soft_b = T^2 *
  KL(softmax(t_b / T) || softmax(s_b / T))`` and ``hard_b`` the cross-entropy with the label.
  The ``T^2`` keeps the soft term's gradient, ``alpha * T * (softmax(s/T) - softmax(t/T)) / B``,
  of a similar size at every temperature (for zero-mean logits it tends to
  ``alpha * (s - t) / (C * B)`` as ``T`` grows), so changing ``T`` does not rescale ``alpha``.
  ``weight`` (``(batch,)``) weights examples (0 for padding rows); the mean is then
  ``sum(w * l) / sum(w)``. The teacher's gradient is stopped.

  Returns ``(loss, {'soft': mean soft_b, 'hard': mean hard_b})``, so ``loss = alpha * soft +
  (1 - alpha) * hard``.

  >>> loss, parts = kd_loss(s, t, y, temperature=2.0, alpha=0.5)  # doctest: +SKIP
  >>> float(parts['soft']), float(parts['hard'])  # doctest: +SKIP
  (0.031, 1.12)
  """
  check_hparams(temperature, alpha)
  s_shape, t_shape = jnp.shape(student_logits), jnp.shape(teacher_logits)
  _same_shape('logits', s_shape, t_shape)
  if jnp.shape(labels) != s_shape[:-1]:
    raise UserInputError(f'labels have shape {jnp.shape(labels)}; valid: {s_shape[:-1]} '
                         f'(the logits are {s_shape})')
  if weight is not None and jnp.shape(weight) != s_shape[:-1]:
    raise UserInputError(f'weight has shape {jnp.shape(weight)}; valid: {s_shape[:-1]}')
  s = jnp.asarray(student_logits).astype(jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits).astype(jnp.float32))
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  soft = temperature ** 2 * kl
  hard = optax.softmax_cross_entropy_with_integer_labels(s, labels)
  parts = {'soft': _weighted_mean(soft, weight), 'hard': _weighted_mean(hard, weight)}
  return alpha * parts['soft'] + (1 - alpha) * parts['hard'], parts


def _require_taps(what, student_seq, teacher_seq):
  for side, seq in (('student', student_seq), ('teacher', teacher_seq)):
    if seq is None:
      raise UserInputError(f"{what}: the {side}'s forward returned no per-layer values; use a "
                           'forward that returns Taps with them (e.g. run_bert)')


def _check_pairs(what, student_seq, teacher_seq, layer_map):
  _require_taps(what, student_seq, teacher_seq)
  layer_map = check_layer_map(layer_map, len(student_seq), len(teacher_seq))
  for i, j in enumerate(layer_map):
    _same_shape(f'{what} of student layer {i} / teacher layer {j}', jnp.shape(student_seq[i]),
                jnp.shape(teacher_seq[j]))
  return layer_map


def hidden_loss(student_hiddens, teacher_hiddens, layer_map, mask):
  """MSE between student layer ``i``'s output and teacher layer ``layer_map[i]``'s (real tokens).

  Each matched pair contributes the mean of the squared difference over real tokens
  (``mask`` = attention mask ``(batch, length)``) and hidden units; the loss is the mean over
  pairs. The hidden sizes must be equal (no learned projection). Teacher gradient stopped.

  >>> t = run_bert(teacher_model, teacher_params, inputs)  # doctest: +SKIP
  >>> s = run_bert(student_model, student_params, inputs)  # doctest: +SKIP
  >>> hidden_loss(s.hiddens, t.hiddens, (1, 3, 5), inputs['attention_mask'])  # doctest: +SKIP
  """
  layer_map = _check_pairs('hidden states', student_hiddens, teacher_hiddens, layer_map)
  if jnp.shape(mask) != jnp.shape(student_hiddens[0])[:2]:
    raise UserInputError(f'mask has shape {jnp.shape(mask)}; valid: '
                         f'{jnp.shape(student_hiddens[0])[:2]} (batch, length)')
  m = jnp.asarray(mask).astype(jnp.float32)[..., None]
  denom = jnp.maximum(jnp.sum(m) * jnp.shape(student_hiddens[0])[-1], 1.0)
  per_layer = []
  for i, j in enumerate(layer_map):
    s = jnp.asarray(student_hiddens[i]).astype(jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_hiddens[j]).astype(jnp.float32))
    per_layer.append(jnp.sum(jnp.square(s - t) * m) / denom)
  return jnp.mean(jnp.stack(per_layer))


def attention_loss(student_attentions, teacher_attentions, layer_map, mask):
  """KL(teacher || student) between matched layers' attention rows, over real keys.

  For each head and real query, ``sum_k p_t log(p_t / p_s)`` over the real keys; averaged over
  heads and real queries (``mask`` = attention mask), then over matched pairs. The head counts
  must be equal. Teacher gradient stopped.

  >>> attention_loss(s.attentions, t.attentions, (1, 3, 5), mask)  # doctest: +SKIP
  """
  layer_map = _check_pairs('attention probabilities', student_attentions, teacher_attentions,
                           layer_map)
  b, h, q, k = jnp.shape(student_attentions[0])
  if jnp.shape(mask) != (b, k) or q != k:
    raise UserInputError(f'mask has shape {jnp.shape(mask)} for attention probabilities '
                         f'{(b, h, q, k)}; valid: (batch, length) with queries = keys = length')
  real = jnp.asarray(mask) > 0
  key_real = real[:, None, None, :]
  query_real = real[:, None, :].astype(jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny
  denom = jnp.maximum(h * jnp.sum(query_real), 1.0)
  per_layer = []
  for i, j in enumerate(layer_map):
    ps = jnp.asarray(student_attentions[i]).astype(jnp.float32)
    pt = jax.lax.stop_gradient(jnp.asarray(teacher_attentions[j]).astype(jnp.float32))
    # Padding keys have probability 0 in both: the mask keeps them out of the value, and the
    # clamp keeps the logs finite, so no 0 * inf = NaN in the value or the gradient. One
    # expression for both logs: identical distributions give exactly 0.
    log = lambda p: jnp.log(jnp.maximum(p, tiny))
    terms = pt * (log(pt) - log(ps))
    row_kl = jnp.sum(jnp.where(key_real, terms, 0.0), axis=-1)  # (batch, heads, query)
    per_layer.append(jnp.sum(row_kl * query_real) / denom)
  return jnp.mean(jnp.stack(per_layer))


# ----------------------------------------------------------------------------- running a model


def is_layer_call(module, method_name: str) -> bool:
  """The capture filter of every encoder layer's output (``capture_intermediates``)."""
  # nn.remat(Layer) subclasses Layer, so this also captures rematerialized layers.
  return isinstance(module, Layer) and method_name == '__call__'


def run_bert(module: nn.Module, params, inputs: dict, *, rng=None,
             deterministic: bool = True) -> Taps:
  """Runs a :class:`BertClassifier` and returns its logits, layer outputs and attention probs.

  Layer outputs come from ``capture_intermediates`` (``Layer.__call__`` only), attention
  probabilities from ``SelfAttention``'s ``sow`` into ``'intermediates'``; the MoE statistics
  (``'moe'``) come back as ``aux``. Under ``jit`` the internals nobody reads are dead code, so
  capturing costs nothing when only logits are used. ``rng`` is the dropout key (needed when
  ``deterministic=False``).

  >>> model = BertClassifier(BertConfig(num_layers=2), num_classes=3)  # doctest: +SKIP
  >>> taps = run_bert(model, params, {'input_ids': ids, 'attention_mask': mask})  # doctest: +SKIP
  >>> len(taps.hiddens), taps.attentions[0].shape  # doctest: +SKIP
  (2, (8, 12, 16, 16))
  """
  rngs = {} if rng is None else {'dropout': rng}
  logits, state = module.apply({'params': params}, **inputs, deterministic=deterministic,
                               rngs=rngs, capture_intermediates=is_layer_call,
                               mutable=['intermediates', 'moe'])
  return taps_from(logits, state['intermediates'], state.get('moe', {}))


def taps_from(logits, intermediates: dict, aux=None) -> Taps:
  """:class:`Taps` from a BERT forward's ``'intermediates'`` collection captured with
  :func:`is_layer_call` (e.g. ``peft.apply(..., capture=is_layer_call)``)."""
  enc = intermediates['encoder']
  n = len([k for k in enc if k.startswith('layer_')])
  layers = [enc[f'layer_{i}'] for i in range(n)]
  return Taps(logits=logits,
              hiddens=tuple(l['__call__'][0] for l in layers),
              attentions=tuple(l['attention']['attention_probs'][0] for l in layers),
              aux=aux)


# ----------------------------------------------------------------------------- building students


def select_layers(num_layers: int, layers='every_other') -> tuple[int, ...]:
  """The teacher layer indices a student keeps: ``'every_other'`` (0, 2, 4, ...) or a tuple.

  >>> select_layers(6)
  (0, 2, 4)
  >>> select_layers(6, (0, 5))
  (0, 5)
  """
  if isinstance(layers, str):
    if layers != 'every_other':
      raise ConfigError(f"compress.distill.student_layers={layers!r}; valid: 'every_other' or "
                        f'a tuple of strictly increasing teacher layer indices in '
                        f'0..{num_layers - 1}')
    return tuple(range(0, num_layers, 2))
  return _check_indices('compress.distill.student_layers', layers, num_layers, 'teacher layer')


def _encoder_of(cfg: BertConfig, params) -> tuple[dict, bool]:
  """(encoder tree, whether ``params`` is a classifier tree holding it under 'encoder')."""
  nested = 'encoder' in params
  enc = params['encoder'] if nested else params
  found = sorted(int(k[len('layer_'):]) for k in enc if k.startswith('layer_'))
  if found != list(range(cfg.num_layers)):
    raise UserInputError(f'teacher params have encoder layers {found}; the teacher config has '
                         f'num_layers={cfg.num_layers} (layers 0..{cfg.num_layers - 1})')
  return enc, nested


def student_from_teacher(cfg: BertConfig, params: dict, layers='every_other') -> Student:
  """A shallower student initialised from the teacher's layers ``layers`` (DistilBERT's init).

  The kept layers are renumbered ``layer_0..``; embeddings, everything else in the encoder and
  every non-encoder subtree (the classifier head) are copied. ``params`` is a classifier tree
  (``{'encoder': ..., 'classifier': ...}``) or an encoder tree. Leaves are copied into new
  buffers, so donating the student's state in a train step never deletes the teacher's arrays.
  MoE layers stay MoE layers (``moe_layers`` renumbered).

  ``layer_map[i]`` is the last teacher layer of the span student layer ``i`` replaces (see the
  module docstring): keeping ``(0, 2, 4)`` of 6 gives ``(1, 3, 5)``; keeping all layers gives
  the identity.

  >>> cfg6, params6 = minilm  # doctest: +SKIP
  >>> student = student_from_teacher(cfg6, {'encoder': params6}, 'every_other')  # doctest: +SKIP
  >>> student.cfg.num_layers, student.layer_map  # doctest: +SKIP
  (3, (1, 3, 5))
  """
  kept = select_layers(cfg.num_layers, layers)
  enc, nested = _encoder_of(cfg, params)
  copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)
  student_enc = {k: copy(v) for k, v in enc.items() if not k.startswith('layer_')}
  for i, j in enumerate(kept):
    student_enc[f'layer_{i}'] = copy(enc[f'layer_{j}'])
  if nested:
    student_params = {k: copy(v) for k, v in params.items() if k != 'encoder'}
    student_params['encoder'] = student_enc
  else:
    student_params = student_enc
  student_cfg = dataclasses.replace(
      cfg, num_layers=len(kept),
      moe_layers=tuple(i for i, j in enumerate(kept) if j in cfg.moe_layers))
  ends = tuple(j - 1 for j in kept[1:]) + (cfg.num_layers - 1,)
  return Student(student_cfg, student_params, ends)


def fresh_student(cfg: BertConfig, num_layers: int, *, num_classes: int, rng,
                  pooling: str = 'mean') -> Student:
  """A randomly initialised ``num_layers``-layer classifier with the teacher's other sizes.

  ``layer_map`` is :func:`uniform_layer_map`.

  >>> student = fresh_student(teacher_cfg, 2, num_classes=3,
  ...                         rng=jax.random.key(0))  # doctest: +SKIP
  >>> model = BertClassifier(student.cfg, num_classes=3)  # doctest: +SKIP
  """
  layer_map = uniform_layer_map(num_layers, cfg.num_layers)
  student_cfg = dataclasses.replace(
      cfg, num_layers=num_layers, moe_layers=tuple(i for i in cfg.moe_layers if i < num_layers))
  module = BertClassifier(student_cfg, num_classes=num_classes, pooling=pooling)
  ids = jnp.ones((1, 2), jnp.int32)
  params = jax.jit(lambda k: nn.meta.unbox(module.init(k, ids, ids)['params']))(rng)
  return Student(student_cfg, params, layer_map)


# ----------------------------------------------------------------------------- the loss


def _as_taps(out) -> Taps:
  if isinstance(out, Taps):
    return out
  if isinstance(out, (tuple, list, dict)):
    # e.g. train's forward with with_aux=True, which returns (logits, aux).
    raise UserInputError(f'a distillation forward returned a {type(out).__name__}; valid: the '
                         'logits array or Taps(logits, ..., aux=...)')
  return Taps(logits=out)


def objective(student: Taps, teacher: Taps, batch: dict, *, temperature: float, alpha: float,
              hidden_weight: float = 0.0, attention_weight: float = 0.0,
              layer_map: Sequence[int] | None = None) -> tuple[jax.Array, dict]:
  """``(loss, metrics)`` of a student against a teacher (both :class:`Taps`) on one batch.

  The one distillation objective: :func:`make_distill_loss` and the training loop's
  distillation component (``peftjax/components/distill.py``) both compute it. The loss is
  ``kd_loss + hidden_weight * hidden_loss + attention_weight * attention_loss``; the metrics
  are ``loss``, ``soft_loss``, ``hard_loss``, ``hidden_loss``/``attention_loss`` when on,
  ``accuracy`` and ``agreement``. The teacher's values should arrive with their gradient
  stopped.

  >>> loss, m = objective(Taps(s_logits), Taps(t_logits), batch, temperature=2., alpha=.5)  # doctest: +SKIP
  """
  weight = batch.get('weight')
  # kd_loss checks the shapes while tracing, before any compute: a teacher for another task
  # fails with both shapes named, not inside XLA.
  loss, parts = kd_loss(student.logits, teacher.logits, batch['label'],
                        temperature=temperature, alpha=alpha, weight=weight)
  metrics = {'soft_loss': parts['soft'], 'hard_loss': parts['hard']}
  if hidden_weight or attention_weight:
    terms = []
    if hidden_weight:
      terms.append(('hidden', hidden_loss, hidden_weight, student.hiddens, teacher.hiddens))
    if attention_weight:
      terms.append(('attention', attention_loss, attention_weight, student.attentions,
                    teacher.attentions))
    for name, _, _, s_seq, t_seq in terms:  # what is missing, before what is needed for it
      _require_taps(f'{name} matching', s_seq, t_seq)
    mask = batch.get('attention_mask')
    if mask is None:
      raise UserInputError('hidden/attention matching needs the attention mask: the batch has '
                           f"no 'attention_mask' (keys: {sorted(batch)})")
    for name, term_loss, term_weight, s_seq, t_seq in terms:
      lmap = layer_map if layer_map is not None else uniform_layer_map(len(s_seq), len(t_seq))
      metrics[f'{name}_loss'] = term_loss(s_seq, t_seq, lmap, mask)
      loss = loss + term_weight * metrics[f'{name}_loss']
  metrics['loss'] = loss
  pred = student.logits.argmax(-1)
  metrics['accuracy'] = _weighted_mean((pred == batch['label']).astype(jnp.float32), weight)
  metrics['agreement'] = _weighted_mean(
      (pred == teacher.logits.argmax(-1)).astype(jnp.float32), weight)
  return loss, metrics


def make_distill_loss(student_forward: Callable, teacher_forward: Callable, *,
                      temperature: float, alpha: float, hidden_weight: float = 0.0,
                      attention_weight: float = 0.0, layer_map: Sequence[int] | None = None,
                      aux_loss: Callable | None = None,
                      input_keys: Sequence[str] = BERT_INPUT_KEYS) -> Callable:
  """Builds ``loss_fn(student_params, teacher_params, batch, rng=None, deterministic=False)``.

  ``loss_fn`` returns ``(loss, metrics)``, the form ``jax.value_and_grad(..., has_aux=True)``
  takes.

  ``student_forward(student_params, inputs, rng=..., deterministic=...)`` and
  ``teacher_forward(teacher_params, inputs)`` return logits or :class:`Taps` (e.g.
  ``functools.partial(run_bert, module)``; the teacher's forward should run in eval mode, which
  ``run_bert`` does by default). ``inputs`` are ``batch``'s ``input_keys``; the labels are
  ``batch['label']``, an optional ``batch['weight']`` weights examples.

  The loss is ``kd_loss + hidden_weight * hidden_loss + attention_weight * attention_loss``
  (+ ``aux_loss(student aux)`` if given, e.g. the MoE router losses:
  ``lambda aux: moe.losses.aux_losses(aux, 0.01, 1e-3)``). ``layer_map`` defaults to
  :func:`uniform_layer_map` (pass ``Student.layer_map``). The teacher runs inside the same
  program with ``stop_gradient`` on its parameters and outputs, so no gradient reaches it, and
  its parameters are an argument, so they are not baked into the compiled program as constants.

  Hidden and attention matching need both forwards to return per-layer values (:func:`run_bert`,
  a full-parameter model); asking for them from a forward that returns logits only raises.

  Metrics: ``loss`` (the distillation objective, without ``aux_loss``), ``soft_loss``,
  ``hard_loss`` (the label cross-entropy, comparable with a run without a teacher),
  ``hidden_loss`` / ``attention_loss`` when on, ``accuracy``, ``agreement`` (student argmax ==
  teacher argmax), and ``aux_loss``'s metrics.

  The training loop computes the same :func:`objective` through its distillation component
  (``peftjax/components/distill.py``), with the teacher's params an argument of the step.

  >>> loss_fn = make_distill_loss(partial(run_bert, student_model),
  ...                             partial(run_bert, teacher_model),
  ...                             temperature=2.0, alpha=0.5, hidden_weight=1.0,
  ...                             layer_map=student.layer_map)  # doctest: +SKIP
  >>> (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
  ...     student.params, teacher_params, batch, rng)  # doctest: +SKIP
  """
  check_hparams(temperature, alpha, hidden_weight, attention_weight)
  if layer_map is not None:
    layer_map = _check_indices('compress.distill.layer_map', layer_map, None, 'teacher layer')
  input_keys = tuple(input_keys)

  def loss_fn(student_params, teacher_params, batch, rng=None, deterministic: bool = False):
    inputs = {k: batch[k] for k in input_keys}
    student = _as_taps(student_forward(student_params, inputs, rng=rng,
                                       deterministic=deterministic))
    # Stopped on the way in and on the way out: even if a caller differentiates w.r.t. the
    # teacher's params (e.g. they sit in the same tree), its gradient is exactly zero.
    teacher = _as_taps(teacher_forward(jax.lax.stop_gradient(teacher_params), inputs))
    loss, metrics = objective(student, jax.lax.stop_gradient(teacher), batch,
                              temperature=temperature, alpha=alpha, hidden_weight=hidden_weight,
                              attention_weight=attention_weight, layer_map=layer_map)
    if aux_loss is not None:
      extra, aux_metrics = aux_loss(student.aux or {})
      loss = loss + extra
      metrics.update(aux_metrics)
    return loss, metrics

  return loss_fn
