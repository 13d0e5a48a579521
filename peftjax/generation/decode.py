"""Jitted generation: one prefill call, then a fixed-shape KV-cache decode loop.

The model is seen through a *step function*::

  step_fn(input_ids (B, T), positions (B, T), cache, logits_at=None)
      -> (logits (B, T, vocab), cache)      # (B, K, vocab) at the indices logits_at (B, K)

with the cache contract of :mod:`peftjax.models.llama`: prompts are RIGHT-padded with per-row
lengths, ``positions`` are also the cache slots written, and a query at position ``p`` attends
slots ``0..p`` of its row. Anything that honours it plugs in: a plain model (:func:`model_step`),
a model run through a PEFT method (:func:`method_step`), a multi-adapter server. A step function
without ``logits_at`` is wrapped (its full logits are gathered). Pass a ``jax.tree_util.Partial``
(as those helpers return) so the weights are arguments of the compiled program rather than
constants baked into it; a plain function is wrapped (no weights).

Prefill runs the padded prompts ``(B, P)`` at positions ``0..P-1``; row ``b``'s first new token
is drawn from the logits at ``prompt_lengths[b] - 1`` (the only position whose logits are
computed). When the rows share a prefix (a system prompt, an instruction template: 36 tokens
of the Rotten Tomatoes prompts), it is run once at batch 1, its cache copied to every row, and
only the rest of each prompt runs at batch B (see :func:`shared_prefix`). Decode step ``t``
feeds row ``b``'s token ``t - 1`` at position ``prompt_lengths[b] + t - 1`` inside a
``lax.while_loop`` that exits when every row has stopped. A row stops at a stop token (which
is kept: see :class:`Generation`), and every later slot holds ``pad_id``.

Shapes are fixed per bucket: the batch is padded to a power of two, the prompt length to
:func:`length_bucket`, and the cache made for ``bucketed length + max_new_tokens`` slots, so
prompts of similar lengths share one compiled program. :func:`compile_count` counts traces.

The key for token ``t`` is ``fold_in(rng, t)`` and each row folds in its index
(:func:`peftjax.generation.sampling.sample`), so a draw does not depend on the batch bucket, and
:func:`stream` (batch 1, a Python loop over a jitted step) yields exactly the tokens
:func:`generate` returns for the same prompt at batch 1.

>>> step = model_step(LlamaForCausalLM(cfg), params)                    # doctest: +SKIP
>>> out = generate(step, functools.partial(init_cache, cfg), ids, lengths,
...                max_new_tokens=32, stop_ids=(2,))                     # doctest: +SKIP
>>> out.ids.shape, out.lengths                                          # doctest: +SKIP
((4, 32), array([ 7, 32, 12,  3]))
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import UserInputError
from peftjax.generation.sampling import GREEDY
from peftjax.generation.sampling import SamplingConfig
from peftjax.generation.sampling import sample

# Traces of each jitted program, by name ('generate', 'prefill', 'step'): one per compiled
# shape/setting (jit traces exactly when it compiles a new program), read by tests.
COMPILES: collections.Counter = collections.Counter()


class GenerationError(UserInputError):
  """Invalid generation arguments; the message names the argument, the value and what is valid."""


class Generation(NamedTuple):
  """What :func:`generate` returns (unpacks as ``ids, lengths``).

  ``ids`` (B, max_new_tokens) int32: the new tokens of each row, ``pad_id`` after it stopped.
  ``lengths`` (B,) int32: the tokens each row generated, *including* its stop token when it
  stopped on one (so ``ids[b, :lengths[b]]`` is the row's output, and it stopped on a stop token
  iff ``lengths[b] > 0 and ids[b, lengths[b] - 1] in stop_ids``).
  """
  ids: np.ndarray
  lengths: np.ndarray


def compile_count(name: str = 'generate') -> int:
  """How many programs ``name`` ('generate', 'prefill' or 'step') has compiled in this process.

  >>> before = compile_count(); generate(...); compile_count() - before  # doctest: +SKIP
  1
  """
  return COMPILES[name]


def length_bucket(n: int, *, minimum: int = 8, step: int = 256) -> int:
  """The padded prompt length for a longest prompt of ``n`` tokens: the next power of two (at
  least ``minimum``) up to 64, the next multiple of 32 up to ``step``, then the next multiple
  of ``step``. (Prefill is compute-bound: a 70-token batch padded to 128 would cost 1.8x.)

  >>> [length_bucket(n) for n in (1, 9, 70, 200, 300)]
  [8, 16, 96, 224, 512]
  """
  if n > step:
    return -(-n // step) * step
  if n > 64:
    return -(-n // 32) * 32
  b = max(minimum, 1)
  while b < n:
    b *= 2
  return b


# A shared prefix shorter than this is not worth a second prefill call.
MIN_SHARED_PREFIX = 16


def shared_prefix(ids: np.ndarray, lengths: np.ndarray) -> int:
  """How many leading tokens every row of ``ids`` shares and prefill runs once: the common
  prefix, leaving each row at least one token of its own (its first new token is drawn from
  its last prompt position), rounded down to a multiple of 4 (one program per rounded length);
  0 below :data:`MIN_SHARED_PREFIX` or for one row.

  >>> shared_prefix(np.array([[1] * 18 + [2], [1] * 18 + [3]]), np.array([19, 19]))
  16
  """
  if ids.shape[0] < 2:
    return 0
  same = np.all(ids == ids[:1], axis=0)
  common = ids.shape[1] if same.all() else int(np.argmin(same))
  common = min(common, int(lengths.min()) - 1) // 4 * 4
  return common if common >= MIN_SHARED_PREFIX else 0


def batch_bucket(n: int) -> int:
  """The padded batch size for ``n`` rows: the next power of two.

  >>> [batch_bucket(n) for n in (1, 3, 8, 9)]
  [1, 4, 8, 16]
  """
  b = 1
  while b < n:
    b *= 2
  return b


# ---------------------------------------------------------------------------- step functions


def _takes_logits_at(module) -> bool:
  """Whether the model computes logits at chosen positions only (``logits_at``, as the Llama
  LM does); other models' full logits are gathered."""
  try:
    return 'logits_at' in inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return False


def _gather(out, logits_at):
  logits, cache = out
  if logits_at is not None:
    logits = jnp.take_along_axis(logits, logits_at[..., None], axis=1)
  return logits, cache


@dataclasses.dataclass(frozen=True)
class _ApplyStep:
  """``module.apply`` as a step (hashable by the module's value: one program per model)."""
  module: Any

  def __call__(self, params, input_ids, positions, cache, logits_at=None):
    at = {'logits_at': logits_at} if _takes_logits_at(self.module) else {}
    out = self.module.apply({'params': params}, input_ids, positions=positions, cache=cache,
                            **at)
    return out if at else _gather(out, logits_at)


@dataclasses.dataclass(frozen=True)
class _MethodStep:
  """A model run through a PEFT method (``peft.apply``) as a step."""
  module: Any
  method: Any

  def __call__(self, base, peft_params, input_ids, positions, cache, logits_at=None):
    from peftjax import peft  # pylint: disable=g-import-not-at-top  (generation is below peft)
    inputs = {'input_ids': input_ids, 'positions': positions, 'cache': cache}
    if _takes_logits_at(self.module):
      return peft.apply(self.module, self.method, base, peft_params,
                        {**inputs, 'logits_at': logits_at})
    return _gather(peft.apply(self.module, self.method, base, peft_params, inputs), logits_at)


def model_step(module, params) -> jax.tree_util.Partial:
  """The step function of a linen causal LM that follows the cache contract
  (``module.apply({'params': params}, ids, positions=..., cache=...) -> (logits, cache)``).

  >>> step = model_step(LlamaForCausalLM(cfg), params)  # doctest: +SKIP
  """
  return jax.tree_util.Partial(_ApplyStep(module), params)


def method_step(module, method, base_params, peft_params) -> jax.tree_util.Partial:
  """The step function of ``module`` run through a PEFT ``method`` (see ``peft.apply``).

  >>> step = method_step(model, peft.build(config.peft), base, trained['peft'])  # doctest: +SKIP
  """
  return jax.tree_util.Partial(_MethodStep(module, method), base_params, peft_params)


def method_prefix(module, method, base_params, peft_params):
  """The prefix ``method`` puts before every sequence of ``module`` (prompt or prefix tuning:
  ``prefix_kv``'s layout, see :mod:`peftjax.models.llama`), or None (a method whose
  ``adds_prefix`` is false): one forward of a single token through the method, reading what the
  model's hook sowed (``intermediates/prefix``).

  >>> method_prefix(model, peft.build(cfg.peft), base, trained['peft']).shape  # doctest: +SKIP
  (30, 2, 20, 3, 64)
  """
  from peftjax import peft  # pylint: disable=g-import-not-at-top  (generation is below peft)
  if not getattr(method, 'adds_prefix', False):
    return None
  one = {'input_ids': jnp.zeros((1, 1), jnp.int32)}
  _, _, found = peft.apply(module, method, base_params, peft_params, one,
                           capture=lambda mdl, name: False)  # only what was sown
  prefix = found.get('prefix')
  return None if prefix is None else prefix[0]


def method_cache(make_cache: Callable[..., Any], module, method, base_params, peft_params):
  """``make_cache(batch, max_len)`` for decoding ``module`` through ``method``: with the
  method's prefix (:func:`method_prefix`) computed once, here, and put in every cache
  (``make_cache(..., prefix_kv=...)``, as :func:`peftjax.models.llama.init_cache` takes it), so
  prefill and decode attend it without recomputing it; ``make_cache`` itself for a method
  without one.

  >>> make = functools.partial(init_cache, cfg)
  >>> cache_fn = method_cache(make, model, method, base, p)  # doctest: +SKIP
  """
  prefix = method_prefix(module, method, base_params, peft_params)
  if prefix is None:
    return make_cache
  return functools.partial(make_cache, prefix_kv=prefix)


def _gathering(step, input_ids, positions, cache, logits_at=None):
  """A step without ``logits_at``: its full logits, gathered at ``logits_at``."""
  return _gather(step(input_ids, positions, cache), logits_at)


def _as_step(step_fn) -> jax.tree_util.Partial:
  if isinstance(step_fn, jax.tree_util.Partial) and isinstance(step_fn.func,
                                                                (_ApplyStep, _MethodStep)):
    return step_fn
  if not callable(step_fn):
    raise GenerationError(f'step_fn={step_fn!r} is not callable; valid: a function '
                          '(input_ids, positions, cache) -> (logits, cache)')
  if not isinstance(step_fn, jax.tree_util.Partial):
    step_fn = jax.tree_util.Partial(step_fn)
  # The wrapped Partial is an argument (a pytree), so its weights stay inputs of the program.
  return jax.tree_util.Partial(_gathering, step_fn)


# ---------------------------------------------------------------------------- the programs


def _is_stop(tok, stop_ids: tuple):
  if not stop_ids:
    return jnp.zeros(tok.shape, bool)
  return jnp.isin(tok, jnp.asarray(stop_ids, tok.dtype))


def _prefill(step, ids, lengths, cache, rng, sampling, prefix: int = 0,
             batch_axes: tuple = ()):
  """The padded prompts through the model; the first new token of each row (from its last
  prompt position) and the filled cache. With ``prefix``, the first ``prefix`` tokens (the same
  in every row) run once at batch 1 and their cache is copied along each leaf's batch axis
  (``batch_axes``, in leaf order)."""
  b, p = ids.shape
  if prefix:
    leaves, tree = jax.tree.flatten(cache)
    one = [jax.lax.slice_in_dim(x, 0, 1, axis=ax) for x, ax in zip(leaves, batch_axes)]
    _, one = step(ids[:1, :prefix], jnp.arange(prefix, dtype=jnp.int32)[None],
                  jax.tree.unflatten(tree, one), logits_at=jnp.zeros((1, 1), jnp.int32))
    cache = jax.tree.unflatten(tree, [jnp.repeat(x, b, axis=ax) for x, ax in
                                      zip(jax.tree.leaves(one), batch_axes)])
  positions = jnp.broadcast_to(jnp.arange(prefix, p, dtype=jnp.int32), (b, p - prefix))
  # Filler rows (length 1 < prefix) are never read: clip their index into range.
  at = jnp.maximum(lengths - 1 - prefix, 0)[:, None]
  logits, cache = step(ids[:, prefix:], positions, cache, logits_at=at)
  return sample(logits[:, 0], jax.random.fold_in(rng, 0), sampling), cache


def cache_batch_axes(cache: Callable[[int, int], Any], max_len: int) -> tuple:
  """The batch axis of every leaf of the caches ``cache(batch, max_len)`` makes (leaf order):
  the axis whose size follows the batch, found from abstract shapes (nothing allocated)."""
  one = jax.tree.leaves(jax.eval_shape(lambda: cache(1, max_len)))
  two = jax.tree.leaves(jax.eval_shape(lambda: cache(2, max_len)))
  axes = []
  for a, b in zip(one, two):
    diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    if len(diff) != 1:
      raise GenerationError(f'the cache leaf of shape {a.shape} at batch 1 is {b.shape} at batch '
                            '2; valid: a cache whose leaves each have one batch axis')
    axes.append(diff[0])
  return tuple(axes)


def _rows_alike(cache, batch_axes: tuple) -> bool:
  """Whether every row of ``cache`` equals row 0 (an empty cache; one prefix for all rows):
  only then may the rows' shared prefix run once and its cache be copied to each."""
  for x, ax in zip(jax.tree.leaves(cache), batch_axes):
    if not bool(jnp.all(x == jax.lax.slice_in_dim(x, 0, 1, axis=ax))):
      return False
  return True


def _decode(step, tok, pos, cache, rng, t, sampling):
  """Token ``t`` of each row: feed token ``t - 1`` (``tok``) at ``pos``."""
  logits, cache = step(tok[:, None], pos[:, None], cache)
  return sample(logits[:, 0], jax.random.fold_in(rng, t), sampling), cache


@functools.partial(jax.jit, static_argnames=('max_new_tokens', 'sampling', 'stop_ids', 'pad_id',
                                             'prefix', 'batch_axes'),
                   donate_argnames=('cache',))
def _generate_program(step, ids, lengths, live, cache, rng, *, max_new_tokens: int,
                      sampling: SamplingConfig, stop_ids: tuple, pad_id: int, prefix: int = 0,
                      batch_axes: tuple = ()):
  COMPILES['generate'] += 1  # runs at trace time only
  b = ids.shape[0]
  pad = jnp.int32(pad_id)
  tok, cache = _prefill(step, ids, lengths, cache, rng, sampling, prefix, batch_axes)
  tok = jnp.where(live, tok, pad)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
  count = live.astype(jnp.int32)
  done = ~live | _is_stop(tok, stop_ids)

  def cond(state):
    t, _, _, _, _, done = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, tok, cache, out, count, done = state
    nxt, cache = _decode(step, tok, lengths + t - 1, cache, rng, t, sampling)
    nxt = jnp.where(done, pad, nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t))
    count = count + (~done).astype(jnp.int32)
    return t + 1, nxt, cache, out, count, done | _is_stop(nxt, stop_ids)

  state = (jnp.int32(1), tok, cache, out, count, done)
  _, _, cache, out, count, _ = jax.lax.while_loop(cond, body, state)
  return out, count, cache  # the cache is returned so its donated buffer is reused in place


@functools.partial(jax.jit, static_argnames=('sampling',), donate_argnames=('cache',))
def _prefill_program(step, ids, lengths, cache, rng, *, sampling: SamplingConfig):
  COMPILES['prefill'] += 1
  return _prefill(step, ids, lengths, cache, rng, sampling)


@functools.partial(jax.jit, static_argnames=('sampling',), donate_argnames=('cache',))
def _step_program(step, tok, pos, cache, rng, t, *, sampling: SamplingConfig):
  COMPILES['step'] += 1
  return _decode(step, tok, pos, cache, rng, t, sampling)


# ---------------------------------------------------------------------------- checks


def _int(name: str, value, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
      or value < minimum:
    raise GenerationError(f'{name}={value!r} is invalid; valid: an integer >= {minimum}')
  return int(value)


def _stop_tuple(stop_ids) -> tuple:
  if stop_ids is None:
    return ()
  if isinstance(stop_ids, (int, np.integer)):
    stop_ids = (stop_ids,)
  out = []
  for s in stop_ids:
    out.append(_int('stop_ids entry', s, 0))
  return tuple(sorted(set(out)))


def _key(rng):
  if rng is None:
    return jax.random.key(0)
  if isinstance(rng, (int, np.integer)):
    return jax.random.key(int(rng))
  return rng


def _check_prompts(prompt_ids, prompt_lengths):
  ids = np.asarray(prompt_ids)
  if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype,
                                                                                np.integer):
    raise GenerationError(f'prompt_ids has shape {ids.shape} and dtype {ids.dtype}; valid: '
                          'integer token ids of shape (batch >= 1, length >= 1), right-padded')
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != (ids.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
    raise GenerationError(f'prompt_lengths has shape {lengths.shape} and dtype {lengths.dtype}; '
                          f'valid: one integer per prompt row, shape ({ids.shape[0]},)')
  bad = np.flatnonzero((lengths < 1) | (lengths > ids.shape[1]))
  if bad.size:
    raise GenerationError(f'prompt_lengths[{bad[0]}]={int(lengths[bad[0]])} is invalid; valid: '
                          f'1..{ids.shape[1]} (a prompt needs at least one token, e.g. BOS)')
  return ids.astype(np.int32), lengths.astype(np.int32)


def _check_positions(lengths, max_new_tokens, max_positions):
  if max_positions is None:
    return
  longest = int(lengths.max())
  if longest + max_new_tokens > max_positions:
    raise GenerationError(
        f'a prompt of {longest} tokens + max_new_tokens={max_new_tokens} is '
        f'{longest + max_new_tokens} tokens; the model has {max_positions} positions; valid: '
        f'prompt tokens + max_new_tokens <= {max_positions}')


# ---------------------------------------------------------------------------- entry points


def generate(step_fn, cache: Callable[[int, int], Any], prompt_ids, prompt_lengths, *,
             max_new_tokens: int, sampling: SamplingConfig = GREEDY,
             stop_ids: Sequence[int] = (), rng=None, pad_id: int = 0,
             max_positions: int | None = None, share_prefix: bool = True) -> Generation:
  """Up to ``max_new_tokens`` new tokens for each right-padded prompt row.

  ``cache(batch, max_len)`` makes an empty cache (e.g. ``functools.partial(llama.init_cache,
  cfg)``): it is called with the bucketed batch and ``bucketed prompt length +
  max_new_tokens``. ``rng`` is a key (or an int seed; unused when greedy). ``max_positions``
  (optional) refuses prompts that would run past the model's positions. ``share_prefix``
  runs the rows' common prefix once (:func:`shared_prefix`; the tokens are the same either
  way, up to float rounding). Returns a :class:`Generation` of numpy arrays.

  >>> ids, lengths = generate(step, make_cache, [[5, 6, 7], [8, 0, 0]], [3, 1],
  ...                         max_new_tokens=16, stop_ids=(2,))  # doctest: +SKIP
  """
  if not isinstance(sampling, SamplingConfig):
    raise GenerationError(f'sampling={sampling!r} is invalid; valid: a SamplingConfig')
  n_new = _int('max_new_tokens', max_new_tokens, 1)
  stops = _stop_tuple(stop_ids)
  pad = _int('pad_id', pad_id, 0)
  ids, lengths = _check_prompts(prompt_ids, prompt_lengths)
  _check_positions(lengths, n_new, max_positions)
  rows, width = ids.shape
  prefix = shared_prefix(ids, lengths) if share_prefix else 0
  b, p = batch_bucket(rows), prefix + length_bucket(int(lengths.max()) - prefix)
  padded = np.full((b, p), pad, np.int32)
  width = min(width, p)
  padded[:rows, :width] = ids[:, :width]
  lens = np.ones((b,), np.int32)  # filler rows: one pad token, marked done from the start
  lens[:rows] = lengths
  live = np.arange(b) < rows
  axes = cache_batch_axes(cache, p + n_new) if prefix else ()
  made = cache(b, p + n_new)
  if prefix and not _rows_alike(made, axes):
    # The rows start from different caches (per-row prefixes of a multi-adapter batch): the
    # shared tokens' keys differ per row, so each row runs its whole prompt.
    prefix, axes = 0, ()
  out, count, _ = _generate_program(_as_step(step_fn), padded, lens, live, made,
                                    _key(rng), max_new_tokens=n_new, sampling=sampling,
                                    stop_ids=stops, pad_id=pad, prefix=prefix, batch_axes=axes)
  return Generation(np.asarray(out)[:rows], np.asarray(count)[:rows])


def stream(step_fn, cache: Callable[[int, int], Any], prompt_ids: Sequence[int], *,
           max_new_tokens: int, sampling: SamplingConfig = GREEDY,
           stop_ids: Sequence[int] = (), rng=None, pad_id: int = 0,
           max_positions: int | None = None) -> Iterator[int]:
  """The new tokens of one prompt (a 1-D sequence of ids), yielded as they are produced.

  A Python loop over a jitted prefill and a jitted single decode step (one compile each per
  prompt-length bucket), for printing as it goes; the tokens equal ``generate``'s for the same
  prompt at batch 1, greedy or sampled with the same ``rng``. A stop token is yielded, then the
  stream ends.

  >>> for tok in stream(step, make_cache, ids, max_new_tokens=64, stop_ids=(2,)):  # doctest: +SKIP
  ...   print(tokenizer.decode([tok]), end='', flush=True)
  """
  if not isinstance(sampling, SamplingConfig):
    raise GenerationError(f'sampling={sampling!r} is invalid; valid: a SamplingConfig')
  n_new = _int('max_new_tokens', max_new_tokens, 1)
  stops = _stop_tuple(stop_ids)
  pad = _int('pad_id', pad_id, 0)
  row = np.asarray(prompt_ids)
  if row.ndim != 1:
    raise GenerationError(f'prompt_ids has shape {row.shape}; valid: one prompt, a 1-D '
                          'sequence of token ids')
  ids, lengths = _check_prompts(row[None], [row.shape[0]])
  _check_positions(lengths, n_new, max_positions)
  p = length_bucket(int(lengths[0]))
  padded = np.full((1, p), pad, np.int32)
  padded[0, :lengths[0]] = ids[0]
  step, key = _as_step(step_fn), _key(rng)
  tok, state = _prefill_program(step, padded, lengths, cache(1, p + n_new), key,
                                sampling=sampling)
  for t in range(n_new):
    if t:
      tok, state = _step_program(step, tok, lengths + np.int32(t - 1), state, key,
                                 np.int32(t), sampling=sampling)
    value = int(tok[0])
    yield value
    if value in stops:
      return


__all__ = ['Generation', 'GenerationError', 'generate', 'stream', 'model_step', 'method_step',
           'compile_count', 'length_bucket', 'batch_bucket', 'shared_prefix', 'cache_batch_axes',
           'COMPILES']
