"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

The method trains ``n = peft.prompt.length`` soft-prompt vectors ``(n, D)`` and nothing else of the
encoder (the head trains too, through ``peft.head``). They reach the model through its
``prompt_embeds`` hook point: an interceptor on the ``__call__`` of any module that declares a
``prompt_embeds`` keyword (``BertEncoder``) fills it in, so the model never knows which method
runs. What the hook does with them (see ``peftjax/models/bert.py``):

* the prompts are prepended to the embedding sum of the real tokens, before the embedding
  LayerNorm; real tokens keep their positions, prompts get no position/type embedding;
* the attention mask is extended with ones, so every token attends to every prompt, while
  padding stays masked;
* the encoder output is ``(B, n + L, D)``; ``BertClassifier`` pools over the ``L`` real tokens
  only (mean or [CLS]), as the pretrained model pools.

Initialisation (``peft.prompt.init``):

* ``'vocab'`` -- copies of ``n`` random rows of the word-embedding table (Lester et al. found
  vocabulary init far better than uniform random);
* ``'text'`` -- the word embeddings of ``peft.prompt.init_text``'s tokens, tokenized with the
  bundled MiniLM tokenizer (``peftjax.data.minilm_dir() / 'tokenizer.json'``, whose ids are the
  bundled encoder's vocabulary) without [CLS]/[SEP], repeated or cut to ``n``. E.g. a
  task description: ``--config.peft.prompt.init_text='classify the sentiment of this review'``.

The parameter tree is ``{'prompt': (n, D)}``. The model is *not* unchanged at init (the prompts
are new tokens the encoder attends to), and prompts cannot be merged into the weights:
:meth:`PromptTuning.merge` raises.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.base import Method
from peftjax.peft.base import register
from peftjax.peft import sections

PROMPT_INITS = ('vocab', 'text')
_WORD_EMBEDDINGS = r'word_embeddings/embedding$'


@functools.cache
def accepts_kwarg(module_type: type, name: str) -> bool:
  """Whether ``module_type.__call__`` declares a keyword ``name`` (a hook point)."""
  try:
    return name in inspect.signature(module_type.__call__).parameters
  except (TypeError, ValueError):
    return False


@contextlib.contextmanager
def hook_scope(name: str, value):
  """Context under which the *outermost* ``__call__`` declaring keyword ``name`` receives ``value``.

  Only the outermost: a hook point is passed down by the module that owns it (``BertEncoder``
  hands each layer its slice of ``prefix_kv``; its ``Layer``/``SelfAttention`` declare the same
  keyword for that), so nested calls keep what their parent gave them.

  ``value`` may be a function of the hooked (bound) module, for a value that depends on the
  model's weights (prefix tuning reads its layer and head layout so).

  >>> with hook_scope('prompt_embeds', prompts):                      # doctest: +SKIP
  ...   logits = model.apply({'params': params}, ids, mask)  # the encoder gets the prompts
  """
  inside = [False]  # trace-time state: is a hooked call on the Python stack?

  def interceptor(next_fun, args, kwargs, context):
    if (inside[0] or context.method_name != '__call__'
        or not accepts_kwarg(type(context.module), name)):
      return next_fun(*args, **kwargs)
    inside[0] = True
    try:
      given = value(context.module) if callable(value) else value
      return next_fun(*args, **{**kwargs, name: given})
    finally:
      inside[0] = False

  with nn.intercept_methods(interceptor):
    yield


def word_embeddings(base_params):
  """The ``(vocab, D)`` word-embedding table of the base model (path ``.../word_embeddings``)."""
  hits = [x for p, x in tree_lib.flatten(base_params).items() if re.search(_WORD_EMBEDDINGS, p)]
  if len(hits) != 1:
    raise ConfigError(f'prompt tuning needs exactly one base leaf matching {_WORD_EMBEDDINGS!r} '
                      f'(found {len(hits)}); peft.method=prompt supports BERT-family encoders')
  return hits[0]


def text_token_ids(text: str) -> np.ndarray:
  """Token ids of ``text`` under the bundled MiniLM tokenizer, without [CLS] and [SEP].

  >>> text_token_ids('hello world')  # doctest: +SKIP
  array([7592, 2088], dtype=int32)
  """
  from peftjax.data import Tokenizer  # pylint: disable=g-import-not-at-top  (only for 'text')
  from peftjax.data import minilm_dir  # pylint: disable=g-import-not-at-top
  enc = Tokenizer(minilm_dir() / 'tokenizer.json', max_length=512).encode([text])
  ids = enc['input_ids'][0][enc['attention_mask'][0] > 0]
  return ids[1:-1]  # drop [CLS] and [SEP]: the prompt is content, not a second sentence


@register('prompt')
class PromptTuning(Method):
  """Soft prompts from config ``peft.prompt``: ``length``, ``init``, ``init_text``.

  >>> method = peft.build(config.peft)                        # doctest: +SKIP  (method='prompt')
  >>> prompts = method.init(rng, model, params, inputs)       # doctest: +SKIP  {'prompt': (20, D)}
  >>> logits = peft.apply(model, method, params, prompts, inputs)  # doctest: +SKIP
  """

  def __init__(self, peft_cfg):
    super().__init__(peft_cfg)
    sections.check_prompt(peft_cfg.prompt)

  def init(self, rng, module, base_params, inputs) -> dict:
    """``{'prompt': (n, D)}``: rows of the word-embedding table (random or the text's tokens)."""
    del module, inputs
    table = word_embeddings(base_params)
    n = self.cfg.prompt.length
    if self.cfg.prompt.init == 'vocab':
      ids = jax.random.randint(rng, (n,), 0, table.shape[0])
    else:
      ids = text_token_ids(self.cfg.prompt.init_text)
      if ids.size == 0:
        raise ConfigError(f'peft.prompt.init_text={self.cfg.prompt.init_text!r} has no tokens')
      if ids.max() >= table.shape[0]:
        raise ConfigError(f'peft.prompt.init_text={self.cfg.prompt.init_text!r} has token id '
                          f'{int(ids.max())} >= the model vocabulary ({table.shape[0]}); '
                          "'text' init needs the bundled tokenizer's vocabulary; use 'vocab'")
      ids = np.resize(ids, n)  # repeat cyclically, or cut, to n
    return {'prompt': jnp.asarray(table, jnp.float32)[ids]}

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del rng, deterministic  # the embedding dropout already covers the prompts
    return hook_scope('prompt_embeds', peft_params['prompt'])

  def merge(self, base_params, peft_params) -> dict:
    raise NotImplementedError(
        'prompt tuning cannot be merged into the base weights: the prompts are extra input '
        'positions, not a change of any weight. Serve with peft.apply (or pass '
        "prompt_embeds=peft_params['prompt'] to BertEncoder) and export the prompts on their own.")

  def logical_specs(self, base_specs, peft_params):
    """The prompts shard their embedding axis like the word embeddings do."""
    del base_specs, peft_params
    return {'prompt': P(None, 'embed')}
