"""A zoo of tiny linen models written the ways researchers write them, and what each PEFT method
claims on them: the fixtures of ``tests/test_any_model.py`` (and of the README's model table).

Each :class:`Entry` builds ``(module, params, inputs)`` -- a module with linen's
``.apply({'params': p}, **inputs)``, its plain (unboxed) parameters, a batch of keyword inputs --
and says, per method, either the config it is claimed with (``claims``) or the error it refuses
with (``refuses``). The models are defined here, not in peftjax: scan and remat stacks, a causal
LM with tied embeddings, a layer reused on inputs of different rank, multi-axis ``DenseGeneral``
listing its axes out of order, convolutions, flax's own attention, models without
``deterministic``. ``tests/zoo_nnx.py`` (if present) adds NNX models with the same :class:`Entry`.

>>> module, params, inputs = ENTRIES[0].build()  # doctest: +SKIP
>>> module.apply({'params': params}, **inputs).shape  # doctest: +SKIP
(2, 3)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

B, T, D, F, V, L, H = 2, 6, 16, 32, 32, 2, 2  # batch, length, width, FFN, vocab, layers, heads
CLASSES = 3
RANK, ALPHA = 2, 4.0


@dataclasses.dataclass(frozen=True)
class Entry:
  """One model of the zoo and the (model, method) pairs it claims or refuses.

  ``claims``: method name -> config overrides, dotted keys relative to ``cfg.peft``
  (``{'lora.targets': r'.*/(q|v)/kernel$', 'lora.rank': 2}``). ``refuses``: method name -> a
  regex the ``ConfigError`` raised at ``init`` must match; a refused method is built with the
  overrides of every claim of the entry (the first claim setting a key wins), so e.g. a DoRA
  refusal sees the LoRA claim's targets. ``head``: ``peft.head`` (``''``: no fresh head).
  """
  name: str
  build: Callable[[], tuple]
  claims: dict[str, dict]
  refuses: dict[str, str] = dataclasses.field(default_factory=dict)
  head: str = ''
  family: str = 'linen'

  def overrides(self, method: str) -> dict:
    """The overrides ``method`` is built with (its claim's; for a refusal, see the class)."""
    if method in self.claims:
      return dict(self.claims[method])
    out = {}
    for claim in self.claims.values():
      for k, v in claim.items():
        out.setdefault(k, v)
    return out


def lora(targets: str, **kw) -> dict:
  """LoRA-family overrides: ``targets`` over weight paths, rank 2, alpha 4."""
  return {'lora.targets': targets, 'lora.rank': RANK, 'lora.alpha': ALPHA, **kw}


def ia3(targets: str, ffn_targets: str = '') -> dict:
  return {'ia3.targets': targets, 'ia3.ffn_targets': ffn_targets}


def adapter(ffn_targets: str, attn_targets: str | None = None) -> dict:
  """Houlsby adapters when ``attn_targets`` is given, else Pfeiffer (FFN outputs only)."""
  out = {'adapter.size': 4, 'adapter.ffn_targets': ffn_targets,
         'adapter.kind': 'pfeiffer' if attn_targets is None else 'houlsby'}
  if attn_targets is not None:
    out['adapter.attn_targets'] = attn_targets
  return out


# The baselines select base leaves by regex and never touch a layer, so a few models of each
# family carry them (the project's own, a stack, a tied LM): repeating them on every model would
# only repeat the same check.
BASELINES = {'bitfit': {}, 'full': {}, 'linear_probe': {}}
NO_HOOKS = {'prefix': 'prefix_kv'}           # prefix tuning needs a prefix_kv hook point
PROMPT = {'prompt.length': 3, 'prompt.init': 'vocab'}  # the generic input-embedding hook
NO_EMBED = {'prompt': '(?i)embed', **NO_HOOKS}  # prompt tuning needs an input embedding


def _init(module, *args):
  """Plain params of ``module`` on ``args``: jitted (several times faster than eager init), and
  compiled without XLA's backend optimizations (half the compile time of a run-once program)."""
  key = jax.random.key(0)
  init = jax.jit(module.init).lower(key, *args).compile({'xla_backend_optimization_level': 0})
  return nn.meta.unbox(init(key, *args)['params'])


def _ids(seed: int = 1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def _attention(q, k, v, heads: int, causal: bool = False):
  """Multi-head dot-product attention on (b, t, d) projections, written out as models do."""
  b, t, d = q.shape
  split = lambda x: x.reshape(b, t, heads, d // heads)
  logits = jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k)) / jnp.sqrt(d // heads)
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits), split(v)).reshape(b, t, d)


def _logical_dense(features: int, name: str, axes, use_bias: bool = True) -> nn.Dense:
  """A Dense with logically partitioned weights (the MaxText way), so nn.scan's
  ``metadata_params`` names the layer axis of its stacked kernel."""
  return nn.Dense(features, name=name, use_bias=use_bias,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


class Block(nn.Module):
  """A pre-LN transformer block: q, k (no bias: softmax ignores a key bias), v, o; up, down.

  The ``(x, carry_out)`` signature is nn.scan's; a remat or plain stack ignores the second value.
  """
  causal: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm(name='ln_attn')(x)
    q = _logical_dense(D, 'q', ('embed', 'heads'))(h)
    k = _logical_dense(D, 'k', ('embed', 'heads'), use_bias=False)(h)
    v = _logical_dense(D, 'v', ('embed', 'heads'))(h)
    x = x + _logical_dense(D, 'o', ('heads', 'embed'))(_attention(q, k, v, H, self.causal))
    h = nn.LayerNorm(name='ln_mlp')(x)
    h = nn.gelu(_logical_dense(F, 'up', ('embed', 'mlp'))(h))
    return x + _logical_dense(D, 'down', ('mlp', 'embed'))(h), None


class ScanStack(nn.Module):
  """Embedding, ``nn.scan`` over L blocks (params stacked on a leading 'layers' axis), head."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(V, D, name='embed')(ids)
    stack = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=L,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = stack(name='layers')(x, None)
    return nn.Dense(CLASSES, name='head')(nn.LayerNorm(name='ln_f')(x).mean(1))


class RematStack(nn.Module):
  """L ``nn.remat`` blocks in a Python loop (activation checkpointing), with dropout."""
  rate: float = 0.1

  @nn.compact
  def __call__(self, ids, deterministic: bool = True):
    x = nn.Embed(V, D, name='embed')(ids)
    block = nn.remat(Block)
    for i in range(L):
      x, _ = block(name=f'block_{i}')(x)
      x = nn.Dropout(self.rate)(x, deterministic=deterministic)
    return nn.Dense(CLASSES, name='head')(nn.LayerNorm(name='ln_f')(x).mean(1))


class TiedLM(nn.Module):
  """A small causal LM whose output projection is the input embedding (``Embed.attend``)."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(V, D, name='embed')
    pos = self.param('pos', nn.initializers.normal(0.02), (T, D))
    x = embed(ids) + pos[:ids.shape[1]]
    for i in range(L):
      x, _ = Block(causal=True, name=f'block_{i}')(x)
    return embed.attend(nn.LayerNorm(name='ln_f')(x))  # (b, t, V) next-token logits


class Reused(nn.Module):
  """One layer called on (b, t, d) and again on the pooled (b, d); no ``deterministic``."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(D, name='shared')
    h = jnp.tanh(shared(x))          # (b, t, d)
    h = jnp.tanh(shared(h.mean(1)))  # (b, d): the same weights, an input of another rank
    return nn.Dense(CLASSES, name='head')(h)


class MultiAxis(nn.Module):
  """DenseGeneral out to (4, 8) and (4, 4), and back with ``axis=(-1, -2)`` (flax stores the
  kernel with the axes sorted): unequal dims, and equal dims (where a wrong order is silent)."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.DenseGeneral((4, 8), name='proj')(x))            # (b, t, 4, 8)
    s = jnp.tanh(nn.DenseGeneral((4, 4), name='square')(x))          # (b, t, 4, 4)
    y = (nn.DenseGeneral(D, axis=(-1, -2), name='merge_uneq')(h)     # kernel (4, 8, D)
         + nn.DenseGeneral(D, axis=(-1, -2), name='merge_eq')(s))    # kernel (4, 4, D)
    return nn.Dense(CLASSES, name='head')(nn.LayerNorm(name='ln')(y).mean(1))


class TinyViT(nn.Module):
  """A ViT: strided-conv patches, flax's own ``nn.MultiHeadDotProductAttention``, an MLP."""

  @nn.compact
  def __call__(self, image, train: bool = False):
    x = nn.Conv(D, (4, 4), strides=(4, 4), padding='VALID', name='patch')(image)  # (b, 2, 2, D)
    x = x.reshape(x.shape[0], -1, D)
    x = x + self.param('pos', nn.initializers.normal(0.02), (1, x.shape[1], D))
    for i in range(L):
      h = nn.LayerNorm(name=f'ln_attn_{i}')(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=H, name=f'attn_{i}')(
          h, deterministic=not train)
      h = nn.gelu(nn.Dense(F, name=f'mlp_in_{i}')(nn.LayerNorm(name=f'ln_mlp_{i}')(x)))
      x = x + nn.Dense(D, name=f'mlp_out_{i}')(h)
    return nn.Dense(CLASSES, name='head')(x.mean(1))


class ConvNet(nn.Module):
  """Convolutions with a stride, SAME and VALID padding and a bias-free one; no ``deterministic``."""

  @nn.compact
  def __call__(self, image):
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding='SAME', name='stem')(image))
    x = nn.relu(nn.Conv(8, (3, 3), padding='VALID', use_bias=False, name='conv')(x))
    return nn.Dense(CLASSES, name='head')(x.mean((1, 2)))


# ------------------------------------------------------------------------------------------------
# builders (cached: every test reads, none writes)
# ------------------------------------------------------------------------------------------------

@functools.cache
def _bert():
  import tinybert  # pylint: disable=g-import-not-at-top
  built = tinybert.built()
  ids = _ids() % tinybert.BERT.vocab_size
  inputs = {'input_ids': ids, 'attention_mask': jnp.ones_like(ids),
            'token_type_ids': jnp.zeros_like(ids)}
  return built.module, built.params, inputs


def _images(shape, seed=2):
  return {'image': jax.random.normal(jax.random.key(seed), (B, *shape))}


@functools.cache
def _mlp():
  from peftjax.models import MLP  # pylint: disable=g-import-not-at-top
  module, inputs = MLP(hidden=(D, D), num_classes=CLASSES), _images((4, 4, 1))
  return module, _init(module, inputs['image']), inputs


@functools.cache
def _cnn():
  from peftjax.models import CNN  # pylint: disable=g-import-not-at-top
  module, inputs = CNN(channels=(4, 8), hidden=D, num_classes=CLASSES), _images((8, 8, 1))
  return module, _init(module, inputs['image']), inputs


def _on_ids(cls):
  @functools.cache
  def build():
    module, ids = cls(), _ids()
    return module, _init(module, ids), {'ids': ids}
  return build


def _on(cls, name, shape, seed=2):
  @functools.cache
  def build():
    module = cls()
    x = jax.random.normal(jax.random.key(seed), (B, *shape))
    return module, _init(module, x), {name: x}
  return build


_SCAN_ATTN = r'layers/o$'
ENTRIES: list[Entry] = [
    Entry('bert', _bert, head='classifier/', claims={
        'lora': lora(r'attention/(query|value)/kernel$'),
        'dora': lora(r'attention/(query|value)/kernel$'),
        'pissa': lora(r'attention/(query|value)/kernel$'),
        'ia3': ia3(r'attention/(key|value)$', r'/output$'),
        'adapter': adapter(r'/output$', r'attention/out$'),
        **BASELINES}),
    Entry('mlp', _mlp, head='classifier/', claims={
        'lora': lora(r'dense_\d/kernel$'),
        'dora': lora(r'dense_\d/kernel$'),
        'pissa': lora(r'dense_\d/kernel$'),
        'ia3': ia3(r'dense_0$', r'dense_1$'),
        'adapter': adapter(r'dense_1$'),
        }, refuses=NO_EMBED),
    Entry('cnn', _cnn, head='classifier/', claims={
        'lora': lora(r'(conv_\d|dense_0)/kernel$'),
        'pissa': lora(r'(conv_\d|dense_0)/kernel$'),
        'ia3': ia3(r'conv_\d$', r'dense_0$'),
        **BASELINES}, refuses=NO_EMBED),
    Entry('conv_strided', _on(ConvNet, 'image', (8, 8, 3)), head='head/', claims={
        'lora': lora(r'(stem|conv)/kernel$'),
        'ia3': ia3(r'(stem|conv)$'),
        }, refuses=NO_EMBED),
    Entry('scan_stack', _on_ids(ScanStack), head='head/', claims={
        'lora': lora(r'layers/(q|v)/kernel$'),
        'dora': lora(r'layers/(q|v)/kernel$'),
        'pissa': lora(r'layers/(q|v)/kernel$'),
        'ia3': ia3(r'layers/(k|v)$', r'layers/down$'),
        'adapter': adapter(r'layers/down$', _SCAN_ATTN),
        'prompt': PROMPT,
        **BASELINES}, refuses=NO_HOOKS),
    Entry('remat_stack', _on_ids(RematStack), head='head/', claims={
        'lora': lora(r'block_\d/(q|v)/kernel$'),
        'dora': lora(r'block_\d/(q|v)/kernel$'),
        'ia3': ia3(r'block_\d/(k|v)$', r'block_\d/down$'),
        'adapter': adapter(r'block_\d/down$', r'block_\d/o$'),
        'prompt': PROMPT,
        }, refuses=NO_HOOKS),
    Entry('tied_lm', _on_ids(TiedLM), head='', claims={
        'lora': lora(r'(embed/embedding|block_\d/(q|v)/kernel)$'),
        'pissa': lora(r'(embed/embedding|block_\d/(q|v)/kernel)$'),
        'ia3': ia3(r'block_\d/(k|v)$', r'block_\d/down$'),
        'bitfit': {}, 'full': {}},
          # DoRA's magnitude is per output feature of a kernel; an embedding table has none.
          # Prompts prepended after the lookup meet a position table sized from the ids.
          refuses={'dora': 'embedding', 'prompt': 'extra positions', **NO_HOOKS}),
    Entry('reused_layer', _on(Reused, 'x', (T, D)), head='head/', claims={
        'lora': lora(r'shared/kernel$'),
        'dora': lora(r'shared/kernel$'),
        'pissa': lora(r'shared/kernel$'),
        'ia3': ia3(r'shared$', r'shared$'),
        'adapter': adapter(r'shared$'),
        }, refuses=NO_EMBED),
    Entry('dense_general', _on(MultiAxis, 'x', (T, 8)), head='head/', claims={
        'lora': lora(r'(proj|square|merge_uneq|merge_eq)/kernel$'),
        'dora': lora(r'(proj|square|merge_uneq|merge_eq)/kernel$'),
        'pissa': lora(r'(proj|square|merge_uneq|merge_eq)/kernel$'),
        'ia3': ia3(r'(proj|square)$', r'merge_(uneq|eq)$'),
        'adapter': adapter(r'merge_(uneq|eq)$'),
        }, refuses=NO_EMBED),
    Entry('vit_flax_mha', _on(TinyViT, 'image', (8, 8, 3)), head='head/', claims={
        'lora': lora(r'(patch|attn_\d/(query|value))/kernel$'),
        'dora': lora(r'attn_\d/(query|value)/kernel$'),
        'pissa': lora(r'attn_\d/(query|value)/kernel$'),
        'ia3': ia3(r'attn_\d/(key|value)$', r'mlp_out_\d$'),
        'adapter': adapter(r'mlp_out_\d$', r'attn_\d/out$'),
        }, refuses=NO_EMBED),
]
