"""The NNX half of the model zoo (``tests/zoo.py``): tiny ``flax.nnx`` models written the ways NNX
code is written, seen through :func:`peftjax.models.nnx_bridge.from_nnx`, as ``zoo.Entry``\\ s.

An entry's ``build()`` returns ``(module, params, inputs)`` like the linen ones: ``module`` is the
:class:`~peftjax.models.nnx_bridge.NNXModel` (linen's ``.apply({'params': p}, **inputs)``),
``params`` the plain dict of the model's ``nnx.Param`` leaves. The models: an MLP of
``nnx.Linear`` with dropout; a stack of blocks made by ``nnx.vmap`` and run by ``nnx.scan``
(weights stacked on a leading 'layers' axis, with dropout); a causal LM with tied embeddings
(``nnx.Embed.attend``) over an ``nnx.List`` of blocks; multi-axis ``nnx.LinearGeneral`` listing
its axes out of order; ``nnx.Einsum`` projections (and one that is not a matmul); convolutions;
models whose ``__call__`` has no ``deterministic``.

>>> module, params, inputs = ENTRIES[0].build()  # doctest: +SKIP
>>> module.apply({'params': params}, **inputs).shape  # doctest: +SKIP
(2, 3)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import zoo
from peftjax.models.nnx_bridge import from_nnx
from zoo import ALPHA, B, CLASSES, D, F, H, L, RANK, T, V, Entry, adapter, ia3, lora  # noqa: F401

BASELINES, NO_HOOKS, NO_EMBED = zoo.BASELINES, zoo.NO_HOOKS, zoo.NO_EMBED


def _linear(din, dout, rngs, axes=None, use_bias=True):
  """An nnx.Linear, its weights named with logical axes (``axes``: the kernel's) if given."""
  if axes is None:
    return nnx.Linear(din, dout, use_bias=use_bias, rngs=rngs)
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes, eager_sharding=False)
  bias = nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:], eager_sharding=False)
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=init, bias_init=bias, rngs=rngs)


def attention(q, k, v, heads: int, causal: bool = False):
  return zoo._attention(q, k, v, heads, causal)  # pylint: disable=protected-access


class Block(nnx.Module):
  """A pre-LN transformer block: q, k (no bias), v, o; up, down; dropout on the residuals."""

  def __init__(self, rngs: nnx.Rngs, *, causal: bool = False, rate: float = 0.0):
    self.causal = causal
    self.ln_attn, self.ln_mlp = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
    self.q = _linear(D, D, rngs, ('embed', 'heads'))
    self.k = _linear(D, D, rngs, ('embed', 'heads'), use_bias=False)
    self.v = _linear(D, D, rngs, ('embed', 'heads'))
    self.o = _linear(D, D, rngs, ('heads', 'embed'))
    self.up = _linear(D, F, rngs, ('embed', 'mlp'))
    self.down = _linear(F, D, rngs, ('mlp', 'embed'))
    self.drop = nnx.Dropout(rate, rngs=rngs) if rate else None

  def __call__(self, x):
    h = self.ln_attn(x)
    a = self.o(attention(self.q(h), self.k(h), self.v(h), H, self.causal))
    x = x + (self.drop(a) if self.drop is not None else a)
    return x + self.down(nnx.gelu(self.up(self.ln_mlp(x))))


class Mlp(nnx.Module):
  """``nnx.Linear`` layers with dropout; ``__call__`` takes ``deterministic`` (as NNX code
  often does, forwarding it to its dropout)."""

  def __init__(self, rngs: nnx.Rngs):
    self.dense_0 = nnx.Linear(D, F, rngs=rngs)
    self.dense_1 = nnx.Linear(F, D, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(D, CLASSES, rngs=rngs)

  def __call__(self, x, deterministic: bool = False):
    h = self.drop(nnx.relu(self.dense_0(x)), deterministic=deterministic)
    return self.head(nnx.relu(self.dense_1(h)))


class ScanStack(nnx.Module):
  """Embedding, L blocks created by ``nnx.vmap`` (params stacked, the layer axis named
  'layers') and run by ``nnx.scan``; dropout inside the scanned blocks; no ``deterministic``."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def blocks(rngs):
      return Block(rngs, rate=0.1)

    self.layers = blocks(rngs)
    self.ln_f = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, CLASSES, rngs=rngs)

  def __call__(self, ids):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    x = run(self.embed(ids), self.layers)
    return self.head(self.ln_f(x).mean(1))


class TiedLM(nnx.Module):
  """A causal LM over an ``nnx.List`` of blocks whose output projection is the input embedding
  (``nnx.Embed.attend``)."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (T, D)))
    self.blocks = nnx.List([Block(rngs, causal=True) for _ in range(L)])
    self.ln_f = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids) + self.pos[...][:ids.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.ln_f(x))


class MultiAxis(nnx.Module):
  """``nnx.LinearGeneral`` out to (4, 8) and (4, 4) and back with ``axis=(-1, -2)``: NNX, as
  linen, contracts the axes sorted, so ``in_features`` lists them in that order: kernels
  (4, 8, D) and (4, 4, D) (equal dims: a wrong order would be silent)."""

  def __init__(self, rngs: nnx.Rngs):
    self.proj = nnx.LinearGeneral(8, (4, 8), rngs=rngs)
    self.square = nnx.LinearGeneral(8, (4, 4), rngs=rngs)
    self.merge_uneq = nnx.LinearGeneral((4, 8), D, axis=(-1, -2), rngs=rngs)
    self.merge_eq = nnx.LinearGeneral((4, 4), D, axis=(-1, -2), rngs=rngs)
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, CLASSES, rngs=rngs)

  def __call__(self, x):
    h, s = jnp.tanh(self.proj(x)), jnp.tanh(self.square(x))
    y = self.merge_uneq(h) + self.merge_eq(s)
    return self.head(self.ln(y).mean(1))


class EinsumNet(nnx.Module):
  """``nnx.Einsum`` projections as Gemma-style code writes them: a matmul over the last axis
  with bias, one contracting two axes (heads, head_dim) at once, and a 'batched' one whose label
  ``h`` is in the input, the kernel and the output (not a matmul: no method adapts it)."""

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Einsum('btd,df->btf', (D, F), (F,), rngs=rngs)
    self.split = nnx.Einsum('btf,fhk->bthk', (F, H, D // H), rngs=rngs)
    self.per_head = nnx.Einsum('bthk,hkj->bthj', (H, D // H, 4), rngs=rngs)
    self.out = nnx.Einsum('bthj,hjd->btd', (H, 4, D), rngs=rngs)
    self.head = nnx.Linear(D, CLASSES, rngs=rngs)

  def __call__(self, x):
    h = self.split(nnx.gelu(self.up(x)))
    return self.head(self.out(jnp.tanh(self.per_head(h))).mean(1))


class ConvNet(nnx.Module):
  """Convolutions with a stride, SAME and VALID padding, a bias-free one; no ``deterministic``."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=(2, 2), padding='SAME', rngs=rngs)
    self.conv = nnx.Conv(8, 8, (3, 3), padding='VALID', use_bias=False, rngs=rngs)
    self.head = nnx.Linear(8, CLASSES, rngs=rngs)

  def __call__(self, image):
    x = nnx.relu(self.conv(nnx.relu(self.stem(image))))
    return self.head(x.mean((1, 2)))


def _built(cls, input_key: str, make_input):
  @functools.cache
  def build():
    built = from_nnx(cls(nnx.Rngs(0, dropout=1)), input_keys=(input_key,))
    return built.module, built.params, {input_key: make_input()}
  build.model_class = cls
  return build


def _ids():
  return jax.random.randint(jax.random.key(1), (B, T), 0, V)


def _normal(shape, seed=2):
  return lambda: jax.random.normal(jax.random.key(seed), (B, *shape))


ENTRIES: list[Entry] = [
    Entry('nnx_mlp', _built(Mlp, 'x', _normal((D,))), head='head/', family='nnx', claims={
        'lora': lora(r'dense_\d/kernel$'),
        'dora': lora(r'dense_\d/kernel$'),
        'pissa': lora(r'dense_\d/kernel$'),
        'ia3': ia3(r'dense_0$', r'dense_1$'),
        'adapter': adapter(r'dense_1$'),
        }, refuses=NO_EMBED),
    Entry('nnx_scan_stack', _built(ScanStack, 'ids', _ids), head='head/', family='nnx', claims={
        'lora': lora(r'layers/(q|v)/kernel$'),
        'dora': lora(r'layers/(q|v)/kernel$'),
        'pissa': lora(r'layers/(q|v)/kernel$'),
        'ia3': ia3(r'layers/(k|v)$', r'layers/down$'),
        'adapter': adapter(r'layers/down$', r'layers/o$'),
        **BASELINES}, refuses=NO_HOOKS),
    Entry('nnx_tied_lm', _built(TiedLM, 'ids', _ids), head='', family='nnx', claims={
        'lora': lora(r'(embed/embedding|blocks/\d/(q|v)/kernel)$'),
        'pissa': lora(r'(embed/embedding|blocks/\d/(q|v)/kernel)$'),
        'ia3': ia3(r'blocks/\d/(k|v)$', r'blocks/\d/down$'),
        'bitfit': {}, 'full': {}},
          refuses={'dora': 'embedding', **NO_HOOKS}),
    Entry('nnx_linear_general', _built(MultiAxis, 'x', _normal((T, 8))), head='head/',
          family='nnx', claims={
              'lora': lora(r'(proj|square|merge_uneq|merge_eq)/kernel$'),
              'dora': lora(r'(proj|square|merge_uneq|merge_eq)/kernel$'),
              'pissa': lora(r'(proj|square|merge_uneq|merge_eq)/kernel$'),
              'ia3': ia3(r'(proj|square)$', r'merge_(uneq|eq)$'),
              'adapter': adapter(r'merge_(uneq|eq)$'),
              }, refuses=NO_EMBED),
    Entry('nnx_einsum', _built(EinsumNet, 'x', _normal((T, D))), head='head/', family='nnx',
          claims={
              'lora': lora(r'(up|split|out)/kernel$'),
              'ia3': ia3(r'(up|split)$', r'out$'),
              }, refuses=NO_EMBED),
    # An explicit LoRA target on the batched einsum (label h in input, kernel and output) is
    # refused; the refusals are built with the claims' overrides, so 'full' carries the target.
    Entry('nnx_einsum_batched', _built(EinsumNet, 'x', _normal((T, D))), head='head/',
          family='nnx', claims={'full': lora(r'per_head/kernel$')},
          refuses={'lora': '(?i)matmul', 'dora': '(?i)matmul', 'pissa': '(?i)matmul'}),
    Entry('nnx_conv', _built(ConvNet, 'image', _normal((8, 8, 3))), head='head/', family='nnx',
          claims={
              'lora': lora(r'(stem|conv)/kernel$'),
              'ia3': ia3(r'(stem|conv)$'),
              }, refuses=NO_EMBED),
]
