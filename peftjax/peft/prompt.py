"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

The method trains ``n = peft.prompt.length`` soft-prompt vectors ``(n, D)`` and nothing else of the
model (the head trains too, through ``peft.head``). They reach the model in one of two ways,
chosen per forward by looking at the model (an abstract trace, cached), never by its names:

1. **A ``prompt_embeds`` hook** -- when some module of the model declares a ``prompt_embeds``
   keyword in its ``__call__`` (peftjax's ``BertEncoder``), an interceptor fills it in (the
   outermost such module) and the model decides what to do with them. BERT's hook (see
   ``peftjax/models/bert.py``):

   * the prompts are prepended to the embedding sum of the real tokens, before the embedding
     LayerNorm; real tokens keep their positions, prompts get no position/type embedding;
   * the attention mask is extended with ones, so every token attends to every prompt, while
     padding stays masked;
   * the encoder output is ``(B, n + L, D)``; ``BertClassifier`` pools over the ``L`` real
     tokens only (mean or [CLS]), as the pretrained model pools.

2. **The generic input-embedding hook** -- any other model with an embedding layer (linen
   ``nn.Embed``, or an NNX ``Embed`` seen through :mod:`peftjax.models.nnx_bridge`):

   * the *input embedding* is the first embedding layer the model calls on one of its integer
     inputs (the *token input*, e.g. ``input_ids``); the prompts' width ``D`` is its table's;
   * every ``__call__`` of that layer on the token input returns the ``n`` prompts prepended
     along the sequence axis (the token input's last axis): ``(B, L, D) -> (B, n + L, D)``;
   * *the mask rule*: every model input whose name contains ``'mask'`` (any case) and whose
     shape equals the token input's (``attention_mask``, ``padding_mask``...) is extended the
     same way with ones, so the prompts are real, attended positions and padding stays masked;
     other inputs are passed unchanged;
   * the model then returns ``n`` more positions wherever it returns per-token outputs,
     prompts first; a pooled output (a mask-aware mean pool counts the prompts as tokens) or a
     per-sequence head needs nothing. A task that reads per-token outputs strips them with
     :func:`drop_prompts` (``out[:, n:]``).

   A model that cannot run with ``n`` extra positions (it adds a position table sized from the
   ids' length, or combines the embeddings with another per-token input) is refused at
   ``init`` with a :class:`~peftjax.errors.ConfigError`; give it a ``prompt_embeds`` hook
   (prepend where the model can, e.g. after adding positions, as ``bert.py`` does).

Initialisation (``peft.prompt.init``), from the input embedding's table (the one the model
embeds its tokens with, found as above):

* ``'vocab'`` -- copies of ``n`` random rows of the table (Lester et al. found vocabulary init
  far better than uniform random);
* ``'text'`` -- the table's rows of ``peft.prompt.init_text``'s tokens, tokenized with the
  bundled MiniLM tokenizer (``peftjax.data.minilm_dir() / 'tokenizer.json'``, whose ids are the
  bundled encoder's vocabulary) without [CLS]/[SEP], repeated or cut to ``n``. E.g. a
  task description: ``--config.peft.prompt.init_text='classify the sentiment of this review'``.

The parameter tree is ``{'prompt': (n, D)}``. The model is *not* unchanged at init (the prompts
are new tokens the model attends to), and prompts cannot be merged into the weights:
:meth:`PromptTuning.merge` raises.

Finding the hook or the input embedding (the survey) and filling a hook in are
:mod:`peftjax.peft.hooks`'s job, shared with prefix tuning.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft import hooks
from peftjax import intercept
from peftjax.peft import layers
from peftjax.peft import sections
from peftjax.peft.base import Method
from peftjax.peft.base import register

PROMPT_INITS = ('vocab', 'text')


def _prepend(x, rows, axis: int):
  """``rows`` ``(n, D)`` in front of ``x`` ``(..., L, D)`` along ``axis`` (the sequence axis)."""
  shape = list(x.shape)
  shape[axis] = rows.shape[0]
  rows = jnp.asarray(rows, x.dtype).reshape((1,) * axis + rows.shape)
  return jnp.concatenate([jnp.broadcast_to(rows, shape), x], axis=axis)


def _ones_first(mask, n: int):
  """``mask`` with ``n`` ones in front of its last (sequence) axis: prompts are never padding."""
  ones = jnp.ones(mask.shape[:-1] + (n,), mask.dtype)
  return jnp.concatenate([ones, mask], axis=-1)


@contextlib.contextmanager
def prompt_scope(prompts, report: dict | None = None):
  """Context under which the model runs with ``prompts`` ``(n, D)`` (see the module docstring).

  At the model's own call (the root module) it surveys the model (abstractly, once per model
  and input shapes): a declared ``prompt_embeds`` hook is filled in; otherwise the mask inputs
  are extended with ones and the input embedding's output gets the prompts in front.
  ``report``, if given, is filled with what was done (``'mode'``, ``'embedded'`` -- the
  embedding calls that got the prompts --, ``'masks'``), for :meth:`PromptTuning.init`'s checks.

  >>> with prompt_scope(prompts):                              # doctest: +SKIP
  ...   logits = model.apply({'params': params}, **inputs)   # (B, n + L) positions inside
  """
  report = {} if report is None else report
  report.update(mode=None, embedded=[], masks=[])
  n = int(np.shape(prompts)[0])
  state = {'depth': 0, 'plan': None, 'token': None, 'hooked': False, 'embed_path': None}

  def embed_call(next_fun, args, kwargs, mod):
    plan, x = state['plan'], hooks.first_arg(args, kwargs)
    if not hooks.is_int_array(x):
      return None
    path = layers.path(mod)
    if plan is None:  # no root call seen (layers run on their own): the first integer embedding
      state['embed_path'] = state['embed_path'] or path
    elif not (x is state['token'] if plan.by_identity else tuple(x.shape) == plan.token_shape):
      return None
    elif state['embed_path'] is None:  # a static plan: the first embedding of the token input
      state['embed_path'] = path
    if path != state['embed_path']:
      return None
    out = next_fun(*args, **kwargs)
    report['embedded'].append(path)
    return _prepend(out, prompts, x.ndim - 1)

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if hooks.quiet() or context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    root = state['depth'] == 0 and layers.kind(mod) is None
    if root:
      plan = (None if hooks.declares(mod, 'prompt_embeds')
              else hooks.root_plan(context, args, kwargs))
      if plan is None or 'prompt_embeds' in plan.hooks:
        state['plan'], report['mode'] = 'hook', 'hook'
      else:
        state['plan'], report['mode'] = plan, 'generic'
        state['embed_path'] = plan.embed_path
        method = type(mod).__call__ if isinstance(mod, nn.Module) else context.orig_method
        offset = (None,) if isinstance(mod, nn.Module) else ()
        named = hooks.named_args(method, offset + tuple(args), kwargs)
        state['token'] = named.get(plan.token_input)
        new = {k: _ones_first(named[k], n) for k in plan.mask_inputs if k in named}
        report['masks'].extend(new)
        if new:
          a, kwargs = hooks.replace_args(method, offset + tuple(args), kwargs, new)
          args = a[len(offset):]
    plan = state['plan']
    state['depth'] += 1
    try:
      if plan == 'hook':
        if not state['hooked'] and hooks.declares(mod, 'prompt_embeds'):
          state['hooked'] = True
          try:
            return next_fun(*args, **{**kwargs, 'prompt_embeds': prompts})
          finally:
            state['hooked'] = False
      elif layers.kind(mod) == 'embed' and (plan is None or plan.token_input is not None):
        out = embed_call(next_fun, args, kwargs, mod)
        if out is not None:
          return out
      return next_fun(*args, **kwargs)
    finally:
      state['depth'] -= 1
      if root:  # the model's call is over: the next one is surveyed afresh
        state['plan'] = state['token'] = state['embed_path'] = None

  with intercept.intercept_methods(interceptor):
    yield


def drop_prompts(per_token, num_tokens: int, axis: int = 1):
  """The real tokens' part of a per-token output of a prompt-tuned model (prompts come first).

  >>> drop_prompts(jnp.zeros((2, 5 + 8, 4)), 8).shape
  (2, 8, 4)
  """
  start = per_token.shape[axis] - num_tokens
  return jax.lax.slice_in_dim(per_token, start, per_token.shape[axis], axis=axis)


def input_embedding(module, base_params, inputs, s: hooks.Survey | None = None):
  """``(path, table)``: the model's input embedding (see the module docstring) and its table.

  Raises a :class:`~peftjax.errors.ConfigError` if the model embeds none of its inputs.
  """
  s = s or hooks.survey(module, base_params, inputs)
  if s.embed_path is None:
    ints = [k for k, v in inputs.items() if hooks.is_int_array(v)]
    raise ConfigError(
        f'peft.method=prompt needs an input embedding: an embedding layer (nn.Embed, NNX Embed) '
        f'called on one of the model\'s integer inputs ({", ".join(ints) or "none"}); '
        f'{s.model} calls none (called: {s.called_text()}). Valid: a model that embeds its '
        'token ids with such a layer, or one with a `prompt_embeds` hook and such a layer')
  flat = tree_lib.flatten(base_params)
  table = flat.get(f'{s.embed_path}/embedding') if s.embed_path else None
  if table is None or tuple(table.shape) != s.embed_shape:
    table = _captured_table(module, base_params, inputs, s.embed_path)
  return s.embed_path, table


def _captured_table(module, base_params, inputs, path):
  """The table the layer at ``path`` uses, read inside a forward (a model whose parameter tree
  does not mirror its layer paths); jit keeps only the read, not the forward."""
  def grab(params, named):
    box = []

    def rec(next_fun, args, kwargs, context):
      mod = context.module
      if (not box and context.method_name == '__call__' and layers.kind(mod) == 'embed'
          and layers.path(mod) == path):
        box.append(layers.params(mod)['embedding'])
      return next_fun(*args, **kwargs)

    with hooks.quietly(), intercept.intercept_methods(rec):
      module.apply({'params': params}, **named, **hooks.mode(module))
    return box[0]

  return jax.jit(grab)(base_params, dict(inputs))


def text_token_ids(text: str, vocab_size: int | None = None) -> np.ndarray:
  """Token ids of ``text`` under the bundled MiniLM tokenizer, without [CLS] and [SEP].

  ``vocab_size`` (the model's table rows) must be that tokenizer's: its ids index no other
  vocabulary (a language model's rows of those ids are unrelated tokens), so another size is
  refused with a :class:`~peftjax.errors.ConfigError`.

  >>> text_token_ids('hello world')  # doctest: +SKIP
  array([7592, 2088], dtype=int32)
  """
  from peftjax.data import Tokenizer  # pylint: disable=g-import-not-at-top  (only for 'text')
  from peftjax.data import minilm_dir  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(minilm_dir() / 'tokenizer.json', max_length=512)
  if vocab_size is not None and vocab_size != tok.vocab_size:
    raise ConfigError(f"peft.prompt.init='text' tokenizes peft.prompt.init_text with the bundled "
                      f'MiniLM tokenizer ({tok.vocab_size} ids); the model\'s input embedding '
                      f'has {vocab_size} rows, another vocabulary. Valid: '
                      "peft.prompt.init='vocab' for this model")
  enc = tok.encode([text])
  ids = enc['input_ids'][0][enc['attention_mask'][0] > 0]
  return ids[1:-1]  # drop [CLS] and [SEP]: the prompt is content, not a second sentence


@register('prompt')
class PromptTuning(Method):
  """Soft prompts from config ``peft.prompt``: ``length``, ``init``, ``init_text``.

  >>> method = peft.build(config.peft)                        # doctest: +SKIP  (method='prompt')
  >>> prompts = method.init(rng, model, params, inputs)       # doctest: +SKIP  {'prompt': (20, D)}
  >>> logits = peft.apply(model, method, params, prompts, inputs)  # doctest: +SKIP
  """

  adds_prefix = True  # decoding keeps the prefix in the KV cache

  def __init__(self, peft_cfg):
    super().__init__(peft_cfg)
    sections.check_prompt(peft_cfg.prompt)

  def init(self, rng, module, base_params, inputs) -> dict:
    """``{'prompt': (n, D)}``: rows of the input embedding's table (random or the text's tokens).

    Also runs the model abstractly with the prompts, so a model that cannot take them fails
    here with a :class:`~peftjax.errors.ConfigError`, not in the first training step.
    """
    s = hooks.survey(module, base_params, inputs)
    _, table = input_embedding(module, base_params, inputs, s)
    n = self.cfg.prompt.length
    if self.cfg.prompt.init == 'vocab':
      ids = jax.random.randint(rng, (n,), 0, table.shape[0])
    else:
      ids = text_token_ids(self.cfg.prompt.init_text, int(table.shape[0]))
      if ids.size == 0:
        raise ConfigError(f'peft.prompt.init_text={self.cfg.prompt.init_text!r} has no tokens')
      if ids.max() >= table.shape[0]:
        raise ConfigError(f'peft.prompt.init_text={self.cfg.prompt.init_text!r} has token id '
                          f'{int(ids.max())} >= the model vocabulary ({table.shape[0]}); '
                          "'text' init needs the bundled tokenizer's vocabulary; use 'vocab'")
      ids = np.resize(ids, n)  # repeat cyclically, or cut, to n
    prompts = jnp.asarray(table, jnp.float32)[ids]
    self._dry_run(module, base_params, inputs, prompts, s)
    return {'prompt': prompts}

  def _dry_run(self, module, base_params, inputs, prompts, s: hooks.Survey) -> None:
    """The model traced with the prompts in: a failure is the model not taking ``n`` more
    positions; a silent miss (prompts or masks never reached) is refused too."""
    report = {}

    def forward(params, named, p):
      with prompt_scope(p, report):
        return module.apply({'params': params}, **named, **hooks.mode(module))

    n = prompts.shape[0]
    how = (f'the {n} prompts are prepended to the output of its input embedding '
           f'{s.embed_path!r} (and ones to {", ".join(s.mask_inputs) or "no mask input"})')
    fix = ('Fix: give the model a `prompt_embeds` hook -- a keyword of its __call__ taking the '
           '(n, D) prompts and prepending them where the model can (e.g. after adding position '
           'embeddings; see peftjax/models/bert.py) -- or use a method that adds no positions '
           '(peft.method=lora, ia3, adapter, prefix on a model with a prefix_kv hook)')
    try:
      jax.eval_shape(forward, base_params, dict(inputs), prompts)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any failure: a model/shape error)
      if 'prompt_embeds' in s.hooks:
        raise ConfigError(f'peft.method=prompt: {s.model} fails with prompts in its '
                          f'`prompt_embeds` hook (at {s.hooks["prompt_embeds"]!r}, '
                          f'peft.prompt.length={n}): {type(e).__name__}: {e}') from e
      raise ConfigError(
          f'peft.method=prompt: {s.model} cannot run with {n} extra positions '
          f'(peft.prompt.length={n}): {how}, and the model then fails with '
          f'{type(e).__name__}: {_short(e)}. It has no `prompt_embeds` hook (e.g. it adds a '
          f'position table sized from the ids\' length). {fix}') from e
    if report['mode'] == 'generic':
      missing = [k for k in s.mask_inputs if k not in report['masks']]
      if set(report['embedded']) != {s.embed_path} or missing:
        what = (f'its mask input(s) {missing} were not reached' if missing else
                f'the forward put them after {sorted(set(report["embedded"])) or "no layer"}')
        raise ConfigError(f'peft.method=prompt: {s.model}: {how}, but {what} (the model\'s own '
                          f'call is not visible to the method). {fix}')

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del rng, deterministic  # the embedding dropout already covers the prompts
    return prompt_scope(peft_params['prompt'])

  def merge(self, base_params, peft_params) -> dict:
    raise NotImplementedError(
        'prompt tuning cannot be merged into the base weights: the prompts are extra input '
        'positions, not a change of any weight. Serve with peft.apply (or pass '
        "prompt_embeds=peft_params['prompt'] to BertEncoder) and export the prompts on their own.")

  def logical_specs(self, base_specs, peft_params):
    """The prompts shard their embedding axis like the word embeddings do."""
    del base_specs, peft_params
    return {'prompt': P(None, 'embed')}


def _short(e: Exception, limit: int = 300) -> str:
  text = ' '.join(str(e).split())
  return text if len(text) <= limit else text[:limit] + '...'
