"""Causal language modelling: completion-only token cross-entropy, perplexity, exact match.

A batch holds ``input_ids``, ``attention_mask`` (segment ids), ``positions``, ``targets`` and
``loss_mask`` (see :mod:`peftjax.data.packing`); the model returns logits (B, T, V). The loss is
the mean cross-entropy of ``targets`` over the tokens where ``loss_mask`` is 1 (the completion
tokens and their end-of-turn), in float32. Evaluation sums the negative log-likelihood and the
scored tokens over the whole split, so ``loss`` (per token) and ``perplexity = exp(loss)`` are
exact whatever the batching. Exact match compares generated answers with the references
(:func:`exact_match`); generation itself is the loop's (``peftjax.generate``).

>>> task = CausalLM(config)                      # doctest: +SKIP
>>> loss, metrics = task.loss(logits, batch)     # doctest: +SKIP
"""
from __future__ import annotations

import math
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import ConfigError
from peftjax.tasks.base import register

_TRAILING = string.punctuation + ' \t\n\r'


def token_nll(logits, targets):
  """Per-token negative log-likelihood (B, T) of ``targets`` under ``logits``, in float32."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return logz - picked


def _outputs_logits(outputs):
  """The logits of a model's outputs (a model called with a cache returns (logits, cache))."""
  return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def normalize_answer(text: str) -> str:
  """The form answers are compared in: whitespace runs collapsed to one space, stripped,
  casefolded, then trailing punctuation and spaces removed (leading and inner ones stay).

  >>> normalize_answer('  Positive.\\n')
  'positive'
  >>> normalize_answer('Master  cinema hour THREE!')
  'master cinema hour three'
  """
  return ' '.join(str(text).split()).casefold().rstrip(_TRAILING)


def exact_match(generated_texts: Sequence[str], references: Sequence[str],
                weights: Sequence[float] | None = None) -> float:
  """The (weighted) share of generations equal to their reference after
  :func:`normalize_answer`; rows of weight 0 (batch filling) count nowhere.

  >>> exact_match(['Positive.', 'negative', 'no'], ['positive', 'Negative', 'yes'])
  0.6666666666666666
  """
  if len(generated_texts) != len(references):
    raise ValueError(f'{len(generated_texts)} generations for {len(references)} references')
  w = np.ones(len(references)) if weights is None else np.asarray(weights, np.float64)
  hits = np.array([normalize_answer(g) == normalize_answer(r)
                   for g, r in zip(generated_texts, references)], np.float64)
  total = w.sum()
  if total == 0:
    raise ValueError('exact_match over no examples')
  return float((hits * w).sum() / total)


class CausalLM:
  """The 'causal_lm' task: instruction tuning (completion-only loss, exact match by
  generation) and plain-text language modelling (perplexity).

  ``headline`` is 'exact_match' for instruction data and 'perplexity' for plain text (known
  once :meth:`build_data` has run; 'perplexity' before).
  """
  name = 'causal_lm'

  def __init__(self, config):
    self.config = config
    self.headline = 'perplexity'
    self.tokenizer = None

  # -------------------------------------------------------------------------- building

  def build_data(self, config):
    from peftjax.data import lm_pipeline  # pylint: disable=g-import-not-at-top
    if self.tokenizer is None:
      self.tokenizer = _load_tokenizer(config)
    data = lm_pipeline.build_lm(config.data, self.tokenizer)
    self.headline = 'exact_match' if data.info.exact_match else 'perplexity'
    return data

  def build_model(self, config, data):
    from peftjax import models  # pylint: disable=g-import-not-at-top
    build_lm = getattr(models, 'build_lm', None)
    if build_lm is None:
      raise NotImplementedError(
          "config.task='causal_lm' needs peftjax.models.build_lm(model_cfg, seed=, dtype=) -> "
          '(Built, tokenizer), which is not there yet')
    built, tokenizer = build_lm(config.model, seed=config.seed,
                                dtype=config.get('dtype', 'float32'))
    if self.tokenizer is None:
      self.tokenizer = tokenizer
    check_positions(config, data, built.module.cfg.max_position)
    return built

  def sample_inputs(self, built, data):
    del built
    length = data.info.max_length
    ids = jnp.ones((1, length), jnp.int32)
    return {'input_ids': ids, 'attention_mask': ids,
            'positions': jnp.arange(length, dtype=jnp.int32)[None]}

  # -------------------------------------------------------------------------- loss and metrics

  def loss(self, outputs, batch):
    """Mean cross-entropy over the scored tokens of the batch, and token accuracy."""
    logits = _outputs_logits(outputs)
    mask = batch['loss_mask'].astype(jnp.float32)
    nll = token_nll(logits, batch['targets'])
    tokens = mask.sum()
    denom = jnp.maximum(tokens, 1.0)  # a batch with nothing to score gives 0, not NaN
    # where(), not a product: logits of padding slots may be anything, even inf.
    loss = jnp.where(mask > 0, nll, 0.0).sum() / denom
    correct = (logits.argmax(-1) == batch['targets']) & (mask > 0)
    return loss, {'token_accuracy': correct.sum() / denom, 'tokens': tokens}

  def eval_stats(self, outputs, batch):
    """Per row: summed NLL, scored tokens, correct tokens and examples, each times ``weight``."""
    logits = _outputs_logits(outputs)
    w = batch['weight'].astype(jnp.float32)
    scored = batch['loss_mask'] > 0
    nll = jnp.where(scored, token_nll(logits, batch['targets']), 0.0).sum(-1)
    correct = ((logits.argmax(-1) == batch['targets']) & scored).sum(-1)
    return {'nll': nll * w, 'tokens': scored.sum(-1) * w, 'correct': correct * w,
            'examples': batch['attention_mask'].max(-1) * w, 'weight': w}

  def eval_reduce(self, stats):
    """``loss`` (summed NLL / summed tokens over the split), ``perplexity``, ``token_accuracy``,
    ``tokens`` and ``examples``."""
    tokens = float(np.sum(stats['tokens']))
    if tokens == 0:
      raise ValueError('evaluation split has no scored tokens')
    loss = float(np.sum(stats['nll'], dtype=np.float64) / tokens)
    return {'loss': loss, 'perplexity': math.exp(loss) if loss < 700 else math.inf,
            'token_accuracy': float(np.sum(stats['correct']) / tokens), 'tokens': int(tokens),
            'examples': int(np.sum(stats['examples']))}

  def generation_metrics(self, generated_texts, references, weights=None) -> dict:
    """What generation adds to an evaluation's metrics: ``{'exact_match': ...}``."""
    return {'exact_match': exact_match(generated_texts, references, weights)}

  def summary(self, before, after):
    out = {}
    for key in ('loss', 'perplexity', 'exact_match'):
      out[f'{key}_before'] = None if before is None else before.get(key)
      out[f'{key}_after'] = after.get(key)
    return out

  def progress(self, logged: dict) -> dict:
    """The progress bar's fields from the logged train metrics."""
    return {'loss': f"{logged['loss']:.4f}", 'tok_acc': f"{logged['token_accuracy']:.3f}"}


def check_positions(config, data, max_position: int) -> None:
  """A ConfigError unless every row and every generation fits the model's ``max_position``.

  Checked when the model is built, before any compute: past its positions a model trains
  silently on positions it never learned, and generation refuses only in the first evaluation
  (after the workdir was written). Generation gets ``min(generate.max_new_tokens, longest
  completion + 2)`` new tokens per prompt (``peftjax.run.generation_eval``).

  >>> check_positions(config, data, 64)  # doctest: +SKIP
  ConfigError: config.data.max_length=128 is invalid: the model has 64 positions ...
  """
  pretrained = config.model.pretrained
  where = ('config.model.llama.max_position' if pretrained == 'random' else
           f'max_position_embeddings of {pretrained!r}' if pretrained else
           "the bundled SmolLM2's max_position_embeddings")
  length = data.info.max_length
  if length > max_position:
    raise ConfigError(f'config.data.max_length={length} is invalid: the model has {max_position} '
                      f'positions ({where}); valid: data.max_length <= {max_position}')
  g = config.get('generate')
  if g is None or not data.info.exact_match:
    return
  for split in dict.fromkeys(s for s in (config.data.eval_split, config.data.test_split) if s):
    examples = data.examples(split)
    if not examples:
      continue
    new = min(g.max_new_tokens, data.max_completion_length(split) + 2)
    i = max(range(len(examples)), key=lambda k: len(examples[k].prompt_ids))
    prompt = len(examples[i].prompt_ids)
    if prompt + new > max_position:
      raise ConfigError(
          f'the prompt of {data.info.name}/{split}[{i}] ({prompt} tokens) + {new} generated '
          f'tokens (generate.max_new_tokens={g.max_new_tokens}) is {prompt + new} tokens; the '
          f'model has {max_position} positions ({where}); valid: prompt tokens + new tokens <= '
          f'{max_position} (lower generate.max_new_tokens, or data.max_length to '
          f"{max_position - new} with data.truncation='left')")


def _load_tokenizer(config):
  """The tokenizer of ``config.model``: ``peftjax.models.load_lm_tokenizer(model_cfg)`` when the
  model side provides it, else the bundled SmolLM2's (read from its GGUF metadata only)."""
  from peftjax import models  # pylint: disable=g-import-not-at-top
  load = getattr(models, 'load_lm_tokenizer', None)
  if load is not None:
    return load(config.model)
  from peftjax.data.lm_tokenizer import LMTokenizer  # pylint: disable=g-import-not-at-top
  from peftjax.models.gguf_file import smollm2_gguf  # pylint: disable=g-import-not-at-top
  return LMTokenizer.from_gguf(smollm2_gguf())


register('causal_lm', CausalLM)
