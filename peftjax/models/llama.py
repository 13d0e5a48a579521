"""A Llama-family causal language model in flax.linen (Llama, Mistral, Qwen2, SmolLM).

Parameter layout (``layers/...`` carries a leading ``'layers'`` axis with ``scan_layers=True``;
unrolled, each layer is ``layer_<i>/...`` without it)::

  embed/embedding                     (vocab, embed)           ('vocab', 'embed')
  layers/attn_norm/scale              (embed,)                 ('norm',)
  layers/attn/{q,k,v}_proj/kernel     (embed, heads*head_dim)  ('embed', 'heads')
  layers/attn/{q,k,v}_proj/bias       only with qkv_bias       ('heads',)
  layers/attn/o_proj/kernel           (heads*head_dim, embed)  ('heads', 'embed')
  layers/mlp_norm/scale               (embed,)                 ('norm',)
  layers/mlp/{gate,up}_proj/kernel    (embed, mlp)             ('embed', 'mlp')
  layers/mlp/down_proj/kernel         (mlp, embed)             ('mlp', 'embed')
  norm/scale                          (embed,)                 ('norm',)
  lm_head/kernel                      untied only              ('embed', 'vocab')

Pre-RMSNorm blocks, rotary position embeddings (Hugging Face's half-rotation layout), grouped-query
attention, SwiGLU. With tied embeddings the logits are ``embed.attend(h)``, so a method that
adapts the embedding table (LoRA on ``embed``) adapts the output layer the same way.

Inputs: ``attention_mask`` is a *segment id* array: 0 marks padding, and tokens with equal
nonzero ids form one sequence, so a packed row of several examples needs no other input (a 0/1
mask is the one-segment case). ``positions`` are the RoPE positions (default: 0, 1, ... per
row). With a ``cache`` (:func:`init_cache`), the positions are also the cache slots the new keys
and values are written to, and a query at position ``p`` attends slots ``0..p`` of its row; a
batch of prompts of different lengths is right-padded and each row decodes from its own length.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.logical import param_init
from peftjax.models.barrier import grad_barrier
from peftjax.models.bert import REMAT_POLICIES

# HF ``rope_scaling['rope_type']`` values this model computes; others are refused by name.
ROPE_TYPES = ('default', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (the fields of a HF ``config.json``, renamed).

  The defaults are SmolLM2-135M's. ``rope_scaling`` is ``None`` or HF's ``rope_scaling`` dict
  as a tuple of ``(key, value)`` pairs (hashable, so the config can be a module field).
  """
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rms_norm_eps: float = 1e-5
  rope_theta: float = 100000.0
  rope_scaling: tuple | None = None
  max_position: int = 8192
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
  sliding_window: int = 0  # Mistral: a query attends at most this many keys back; 0 = all
  scan_layers: bool = True  # one nn.scan over the layers (one compile) or unrolled layers
  remat: str = 'none'  # per-layer rematerialization, a key of REMAT_POLICIES
  grad_barrier: bool = True  # a gradient fusion barrier per layer (peftjax/models/barrier.py)
  dtype: str = 'float32'  # compute dtype; parameters stay float32

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of num_kv_heads='
                       f'{self.num_kv_heads}; grouped-query attention needs whole groups')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat={self.remat!r}; valid: {", ".join(REMAT_POLICIES)}')
    kind = dict(self.rope_scaling or ()).get('rope_type', dict(self.rope_scaling or ()).get(
        'type', 'default'))
    if kind not in ROPE_TYPES:
      raise ValueError(f'rope_scaling type {kind!r} is not supported; supported: '
                       f'{", ".join(ROPE_TYPES)}')

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, m, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
    layer = attn + 3 * d * m + 2 * d
    return v * d + self.num_layers * layer + d + (0 if self.tie_embeddings else d * v)

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> 'LlamaConfig':
    """The config of a HF ``config.json`` dict (``llama``, ``mistral``, ``qwen2``).

    >>> LlamaConfig.from_hf(json.load(open('config.json')), scan_layers=False)  # doctest: +SKIP
    """
    heads = hf['num_attention_heads']
    scaling = hf.get('rope_scaling')
    fields = dict(
        vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'], num_layers=hf['num_hidden_layers'],
        num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
        rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        rope_theta=float(hf.get('rope_theta', 10000.0)),
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        max_position=hf.get('max_position_embeddings', 2048),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        qkv_bias=bool(hf.get('attention_bias', hf.get('model_type') == 'qwen2')),
        # Mistral v0.1 sets a window; later Mistrals, Llama and Qwen2 (use_sliding_window
        # false) attend everything.
        sliding_window=0 if hf.get('use_sliding_window') is False else int(
            hf.get('sliding_window') or 0))
    return cls(**{**fields, **overrides})

  def to_hf(self) -> dict:
    """A HF ``LlamaForCausalLM`` ``config.json`` dict for this architecture."""
    return {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'vocab_size': self.vocab_size, 'hidden_size': self.hidden_size,
        'intermediate_size': self.intermediate_size, 'num_hidden_layers': self.num_layers,
        'num_attention_heads': self.num_heads, 'num_key_value_heads': self.num_kv_heads,
        'head_dim': self.head_dim, 'rms_norm_eps': self.rms_norm_eps,
        'rope_theta': self.rope_theta,
        'rope_scaling': dict(self.rope_scaling) if self.rope_scaling else None,
        'max_position_embeddings': self.max_position,
        'tie_word_embeddings': self.tie_embeddings, 'attention_bias': self.qkv_bias,
        'mlp_bias': False, 'hidden_act': 'silu', 'torch_dtype': 'float32'}


# ------------------------------------------------------------------------------ pieces


def _init(axes, stddev=0.02):
  return param_init(nn.initializers.normal(stddev), axes)


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """``x / rms(x) * scale``, the statistics in float32 (as HF computes them)."""
  eps: float
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', param_init(nn.initializers.ones_init(), ('norm',)),
                       (x.shape[-1],), jnp.float32)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (scale * h.astype(self.dtype)).astype(self.dtype)


def inv_frequencies(cfg: LlamaConfig) -> jax.Array:
  """RoPE inverse frequencies ``(head_dim // 2,)`` with the config's scaling applied."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'linear':
    inv = inv / scaling['factor']
  elif kind == 'llama3':
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    inv = jnp.where(wavelen > old / low, inv / factor,
                    jnp.where(wavelen < old / high, inv, blended))
  return inv


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates ``x`` (B, T, heads, D) by ``positions`` (B, T): HF's half-rotation layout.

  The angles are float32 whatever ``x``'s dtype (bf16 angles lose whole radians at long range).
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _mask(q_pos, k_pos, q_seg, k_seg, window: int):
  """(B, 1, 1, T, S) bool: causal by position, within a segment, inside the sliding window."""
  ok = k_pos[:, None, :] <= q_pos[:, :, None]
  if q_seg is not None:
    ok &= (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
  if window:
    ok &= q_pos[:, :, None] - k_pos[:, None, :] < window
  return ok[:, None, None]


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; reads and writes a KV cache when given one.

  The cache is the whole stack ``{'k', 'v'}`` (layers, B, S, kv_heads, D) with this layer's
  index ``'layer'``: the new keys are scattered into it where it lies, so inside the layer scan
  (a loop carry) and the decode loop it is updated in place. (As the scan's per-layer input and
  output it was copied whole at every decode step: 4 x 59 MB at batch 16 for SmolLM2.)
  """
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, segments, cache=None, prefix=None):
    cfg = self.cfg
    b, t, _ = x.shape
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = lambda n, name, axes, bias: nn.Dense(
        n, use_bias=bias, name=name, dtype=cfg.dtype, kernel_init=_init(axes),
        bias_init=param_init(nn.initializers.zeros_init(), axes[1:]))
    q = dense(h * d, 'q_proj', ('embed', 'heads'), cfg.qkv_bias)(x).reshape(b, t, h, d)
    k = dense(kvh * d, 'k_proj', ('embed', 'heads'), cfg.qkv_bias)(x).reshape(b, t, kvh, d)
    v = dense(kvh * d, 'v_proj', ('embed', 'heads'), cfg.qkv_bias)(x).reshape(b, t, kvh, d)
    inv_freq = inv_frequencies(cfg)
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    q = _constrain(q, ('batch', 'length', 'heads', 'head_dim'))
    if cache is None:
      keys, values, k_pos, k_seg, q_seg = k, v, positions, segments, segments
      new_cache = None
    else:
      # Write this call's keys/values at their positions, then attend the layer's whole cache.
      i, rows = cache['layer'], jnp.arange(b)[:, None]
      all_k = cache['k'].at[i, rows, positions].set(k.astype(cache['k'].dtype))
      all_v = cache['v'].at[i, rows, positions].set(v.astype(cache['v'].dtype))
      keys, values = all_k[i], all_v[i]
      new_cache = {'k': all_k, 'v': all_v, 'layer': i}
      k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
      k_seg = q_seg = None  # right-padded rows: slots past a row's length are never attended
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d)
    scores = jnp.einsum('btkgd,bskd->bkgts', qg, keys.astype(q.dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(d)
    low = jnp.finfo(jnp.float32).min
    scores = jnp.where(_mask(positions, k_pos, q_seg, k_seg, cfg.sliding_window), scores, low)
    if prefix is None:
      probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
      out = jnp.einsum('bkgts,bskd->btkgd', probs, values.astype(cfg.dtype))
    else:
      # One softmax over [prefix keys, token keys]; the prefix is scored apart and never
      # concatenated with the keys, which in decoding would copy the layer's cache every step.
      pk, pv = (jnp.broadcast_to(prefix[n], (b,) + prefix[n].shape[1:]) for n in ('k', 'v'))
      p_scores = jnp.einsum('btkgd,bnkd->bkgtn', qg, pk.astype(q.dtype)).astype(jnp.float32)
      p_scores = jnp.where(prefix['mask'][:, None, None, None, :], p_scores / math.sqrt(d), low)
      n = pk.shape[1]
      probs = jax.nn.softmax(jnp.concatenate([p_scores, scores], -1), axis=-1).astype(cfg.dtype)
      out = (jnp.einsum('bkgtn,bnkd->btkgd', probs[..., :n], pv.astype(cfg.dtype))
             + jnp.einsum('bkgts,bskd->btkgd', probs[..., n:], values.astype(cfg.dtype)))
    out = out.reshape(b, t, h * d)
    out = _constrain(out, ('batch', 'length', 'heads'))
    out = dense(cfg.hidden_size, 'o_proj', ('heads', 'embed'), False)(out)
    return out, new_cache


class TableEmbed(nn.Embed):
  """``nn.Embed`` whose ``attend`` contracts the table's feature axis where it lies.

  Flax's ``attend`` is ``query @ table.T``: in a decode step XLA CPU transposed and copied
  SmolLM2's 113 MB table at every token (three passes over it beside the one the logits need).
  A subclass, so methods that wrap ``nn.Embed`` (LoRA on the tied table, quantization) see it.
  """

  def attend(self, query):
    query, table = self.promote_dtype(query, self.embedding, dtype=self.dtype)
    return jax.lax.dot_general(query, table, (((query.ndim - 1,), (1,)), ((), ())))


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = lambda n, name, axes: nn.Dense(n, use_bias=False, name=name, dtype=cfg.dtype,
                                           kernel_init=_init(axes))
    gate = dense(cfg.intermediate_size, 'gate_proj', ('embed', 'mlp'))(x)
    up = dense(cfg.intermediate_size, 'up_proj', ('embed', 'mlp'))(x)
    hidden = _constrain(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return dense(cfg.hidden_size, 'down_proj', ('mlp', 'embed'))(hidden)


class Block(nn.Module):
  """One decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  Called as ``(carry, prefix) -> (carry, {})`` so that ``nn.scan`` can stack it; the carry is
  ``(x, positions, segments, cache)``, the cache (see :class:`Attention`) or None, and
  ``prefix`` this layer's ``{'k', 'v', 'mask'}`` key/value prefix or ``{}``.
  """
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, carry, prefix):
    cfg = self.cfg
    x, positions, segments, cache = carry
    if cfg.grad_barrier:
      x = grad_barrier(x)
    attn, cache = Attention(cfg, name='attn')(
        RMSNorm(cfg.rms_norm_eps, cfg.dtype, name='attn_norm')(x), positions, segments, cache,
        prefix or None)
    x = _constrain(x + attn, ('batch', 'length', 'embed'))
    x = x + MLP(cfg, name='mlp')(RMSNorm(cfg.rms_norm_eps, cfg.dtype, name='mlp_norm')(x))
    x = _constrain(x, ('batch', 'length', 'embed'))
    if cache is not None:
      cache = {**cache, 'layer': cache['layer'] + 1}
    return (x, positions, segments, cache), {}


def _block_class(cfg: LlamaConfig):
  if cfg.remat == 'none':
    return Block
  # prevent_cse only matters outside scan (inside, the loop already stops CSE across layers).
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class LlamaForCausalLM(nn.Module):
  """The decoder with its output layer: token ids -> next-token logits (float32).

  >>> model = LlamaForCausalLM(LlamaConfig(num_layers=2))
  >>> ids = jnp.ones((1, 4), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids)['params']  # doctest: +SKIP
  >>> model.apply({'params': params}, ids).shape  # doctest: +SKIP
  (1, 4, 49152)
  """
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
               deterministic: bool = True, logits_at=None, prompt_embeds=None, prefix_kv=None,
               prefix_mask=None):
    """Logits (B, T, vocab); ``(logits, new cache)`` when ``cache`` is given.

    ``logits_at`` (B, K) int: the output layer runs only at those indices of the T axis and the
    logits are (B, K, vocab). Prefill needs one position per row, and the output layer is a
    fifth of a small model's FLOPs per token (49,152 x 576 of SmolLM2's ~135M).
    ``deterministic`` is accepted for the loop's sake; the model has no dropout.

    The two hook points of prompt and prefix tuning (:mod:`peftjax.peft.hooks`):

    * ``prefix_kv`` (layers, 2, n, kv_heads, head_dim), or (layers, B, 2, n, ...) one per row:
      keys and values every query of the layer attends before its own row's tokens (padding
      stays masked; the sliding window does not apply to them). Keys are used as given (no
      rotation): a prefix has no position. Grouped-query models take one per *key/value* head.
    * ``prompt_embeds`` (n, D): soft tokens in front of every row (of every packed sequence).
      They run through the layers at positions ``-n..-1`` attending only each other, and the
      text attends their keys and values as a prefix: exactly the model on ``[prompts; text]``
      with the text at positions ``n..`` (RoPE scores depend only on distances). The logits
      are the text's alone, so the task reads them unchanged.

    ``prefix_mask`` (B, n) bool marks each row's valid prefix slots (per-row prefixes of
    different lengths, padded to one ``n``); default all valid. With a ``cache``, the prefix is
    the cache's own (``init_cache(prefix_kv=...)``): it was computed once, before prefill, and
    decoding never recomputes it; hook values passed with such a cache must have its length,
    and a cache without a prefix refuses them. The prefix a forward computed is sown as
    ``intermediates/prefix`` (see :func:`prefix_of`).
    """
    del deterministic
    cfg = self.cfg
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segments = None if attention_mask is None else attention_mask.astype(jnp.int32)
    embed = TableEmbed(cfg.vocab_size, cfg.hidden_size, name='embed', dtype=cfg.dtype,
                     embedding_init=_init(('vocab', 'embed')))
    block = _block_class(cfg)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=0, length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, name='layers')
      run = lambda carry, xs: stack(carry, xs)[0]
    else:
      blocks = [block(cfg, name=f'layer_{i}') for i in range(cfg.num_layers)]

      def run(carry, xs):
        for i, layer in enumerate(blocks):
          carry, _ = layer(carry, jax.tree.map(lambda a, i=i: a[i], xs))
        return carry

    prefix = self._prefix(run, b, cache, prompt_embeds, prefix_kv, prefix_mask)
    x = _constrain(embed(input_ids), ('batch', 'length', 'embed'))
    kv = None if cache is None else {'k': cache['k'], 'v': cache['v'], 'layer': jnp.int32(0)}
    xs = {} if prefix is None else {
        'k': prefix['k'], 'v': prefix['v'],
        'mask': jnp.broadcast_to(prefix['mask'], (cfg.num_layers,) + prefix['mask'].shape)}
    x, _, _, kv = run((x, positions, segments, kv), xs)
    new_cache = None if kv is None else {**cache, 'k': kv['k'], 'v': kv['v']}
    if logits_at is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[..., None], axis=1)
    x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name='norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, name='lm_head', dtype=cfg.dtype,
                        kernel_init=_init(('embed', 'vocab')))(x)
    logits = _constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))
    return logits if cache is None else (logits, new_cache)

  def _prefix(self, run, b, cache, prompt_embeds, prefix_kv, prefix_mask):
    """This forward's ``{'k', 'v'}`` (layers, 1 or B, n, kv_heads, head_dim) and ``'mask'``
    (B, n), or None: the cache's, else the hooks' (prompts run through ``run``, the stack)."""
    cfg = self.cfg
    n_hook = ((0 if prompt_embeds is None else prompt_embeds.shape[0])
              + (0 if prefix_kv is None else prefix_kv.shape[-3]))
    if cache is not None and 'prefix_k' in cache:
      n = cache['prefix_k'].shape[2]
      if n_hook and n_hook != n:
        raise ValueError(f'the cache holds a prefix of {n} slots, the prompt_embeds/prefix_kv '
                         f'given are {n_hook}; valid: the hook values the cache was made with')
      return {'k': cache['prefix_k'], 'v': cache['prefix_v'], 'mask': cache['prefix_mask']}
    if not n_hook:
      return None
    if cache is not None:
      raise ValueError('prompt_embeds/prefix_kv with a cache that holds no prefix: in decoding '
                       'the prefix lives in the cache, computed once; make it with '
                       'init_cache(cfg, batch, length, prefix_kv=prefix_of(...))')
    parts = []
    if prompt_embeds is not None:
      parts.append(self._prompt_kv(run, prompt_embeds))
    if prefix_kv is not None:
      parts.append(_split_kv(prefix_kv, cfg, b))
    rows = max(k.shape[1] for k, _ in parts)
    k, v = (jnp.concatenate([jnp.broadcast_to(p[j], p[j].shape[:1] + (rows,) + p[j].shape[2:])
                             for p in parts], axis=2) for j in (0, 1))
    self.sow('intermediates', 'prefix', jnp.stack([k[:, 0], v[:, 0]], axis=1) if rows == 1
             else jnp.stack([k, v], axis=2))
    mask = jnp.ones((b, n_hook), bool) if prefix_mask is None else jnp.asarray(prefix_mask, bool)
    if mask.shape != (b, n_hook):
      raise ValueError(f'prefix_mask has shape {mask.shape}; valid: (batch, prefix length) = '
                       f'{(b, n_hook)}')
    return {'k': k, 'v': v, 'mask': mask}

  def _prompt_kv(self, run, prompts):
    """The layers' keys and values of soft prompts (n, D) at positions ``-n..-1``."""
    cfg = self.cfg
    n = prompts.shape[0]
    if prompts.ndim != 2 or prompts.shape[1] != cfg.hidden_size:
      raise ValueError(f'prompt_embeds has shape {prompts.shape}; valid: (n, hidden_size='
                       f'{cfg.hidden_size})')
    # Run at positions 0..n-1 through a cache of n slots, then turn the keys back by n: RoPE
    # is a rotation, so that is the keys at -n..-1 (the text keeps its positions from 0).
    empty = init_cache(cfg, 1, n)
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    x = _constrain(jnp.asarray(prompts, cfg.dtype)[None], ('batch', 'length', 'embed'))
    _, _, _, kv = run((x, pos, None, {**empty, 'layer': jnp.int32(0)}), {})
    keys = rope(kv['k'].reshape((-1, n) + kv['k'].shape[3:]),
                jnp.full((cfg.num_layers, n), -n, jnp.int32), inv_frequencies(cfg))
    return keys.reshape(kv['k'].shape), kv['v']

  def prefix_layout(self) -> tuple[int, int, int, int]:
    """``(num_layers, hidden, kv_heads, head_dim)``: the layout of this model's ``prefix_kv``
    (prefix tuning reads it; no weights needed).

    >>> LlamaForCausalLM(LlamaConfig(num_layers=2)).prefix_layout()
    (2, 576, 3, 64)
    """
    cfg = self.cfg
    return cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim


def _split_kv(prefix_kv, cfg: LlamaConfig, b: int):
  """``(k, v)`` (layers, 1 or B, n, kv_heads, head_dim) of a ``prefix_kv`` hook value."""
  shape = tuple(prefix_kv.shape)
  tail = (cfg.num_kv_heads, cfg.head_dim)
  if len(shape) == 5 and shape[:2] == (cfg.num_layers, 2) and shape[3:] == tail:
    return prefix_kv[:, 0][:, None], prefix_kv[:, 1][:, None]
  if len(shape) == 6 and shape[:3] == (cfg.num_layers, b, 2) and shape[4:] == tail:
    return prefix_kv[:, :, 0], prefix_kv[:, :, 1]
  raise ValueError(f'prefix_kv has shape {shape}; valid: (layers={cfg.num_layers}, 2, n, '
                   f'kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}) or (layers, '
                   f'batch={b}, 2, n, kv_heads, head_dim)')


def prefix_of(state) -> jax.Array | None:
  """The prefix a forward computed (``prefix_kv`` layout), from its ``intermediates``; None if
  it had none. The prefix of a prompt-/prefix-tuned model, computed once for decoding::

    _, state = model.apply({'params': p}, ids, prompt_embeds=e, mutable=['intermediates'])
    cache = init_cache(cfg, batch, length, prefix_kv=prefix_of(state))

  >>> prefix_of({'intermediates': {}}) is None
  True
  """
  found = state.get('intermediates', state).get('prefix')
  return None if found is None else found[0]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32,
               prefix_kv=None, prefix_mask=None) -> dict:
  """An empty KV cache: ``{'k', 'v'}`` of shape (layers, batch, max_len, kv_heads, head_dim).

  With ``prefix_kv`` (the hook's layout, see :meth:`LlamaForCausalLM.__call__`; e.g.
  :func:`prefix_of` a prompt-tuned forward) the cache also holds the prefix every query
  attends, ``prefix_k``/``prefix_v`` (layers, batch, n, kv_heads, head_dim), and
  ``prefix_mask`` (batch, n) (default all valid): computed once, it lives in the cache.

  >>> cache = init_cache(LlamaConfig(num_layers=2), batch=4, max_len=64)
  >>> cache['k'].shape
  (2, 4, 64, 3, 64)
  """
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  cache = {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
  if prefix_kv is None:
    return cache
  k, v = _split_kv(jnp.asarray(prefix_kv), cfg, batch)
  n = k.shape[2]
  full = (cfg.num_layers, batch, n, cfg.num_kv_heads, cfg.head_dim)
  mask = jnp.ones((batch, n), bool) if prefix_mask is None else jnp.asarray(prefix_mask, bool)
  if mask.shape != (batch, n):
    raise ValueError(f'prefix_mask has shape {mask.shape}; valid: (batch, n) = {(batch, n)}')
  return {**cache, 'prefix_k': jnp.broadcast_to(k, full).astype(dtype),
          'prefix_v': jnp.broadcast_to(v, full).astype(dtype), 'prefix_mask': mask}


# Logical axes of the cache (for placing it on a mesh).
CACHE_AXES = ('layers', 'batch', 'cache_length', 'heads', 'head_dim')
