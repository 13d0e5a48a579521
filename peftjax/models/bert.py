"""A BERT-family encoder in flax.linen with logical axis names, and a sequence classifier.

Parameter layout (per layer ``i``)::

  encoder/embeddings/{word,position,token_type}_embeddings/embedding   ('vocab', 'embed')
  encoder/embeddings/layer_norm/{scale,bias}                           ('embed',)
  encoder/layer_i/attention/{query,key,value}/kernel                   ('embed', 'heads', 'kv')
  encoder/layer_i/attention/out/kernel                                 ('heads', 'kv', 'embed')
  encoder/layer_i/attention_norm/{scale,bias}
  encoder/layer_i/intermediate/kernel                                  ('embed', 'mlp')
  encoder/layer_i/output/kernel                                        ('mlp', 'embed')
  encoder/layer_i/output_norm/{scale,bias}
  encoder/layer_i/moe/...          instead of intermediate/output in ``cfg.moe_layers`` (see
                                   peftjax/moe/layer.py: router, experts with an 'expert' axis)
  pooler/{kernel,bias}             only with pooling='cls_pooler'      ('embed', 'pooled')
  classifier/{kernel,bias}                                             ('embed', 'classes')

Post-LayerNorm blocks with exact (erf) GELU, as in the original BERT and MiniLM.

Hook points (keyword arguments that default to ``None``; unused, the model is bit-identical to
one without them). PEFT methods set them through ``flax.linen.intercept_methods`` on
``BertEncoder.__call__``, so this file never knows which method is running:

* ``BertEncoder(..., prompt_embeds=(n, D) or (B, n, D))`` -- soft prompts (prompt tuning).
  They are prepended to the embedding *sum* (word + position + type) of the real tokens, before
  the embedding LayerNorm: real tokens keep positions ``0..L-1`` (what the pretrained weights
  saw), the prompts take no position/type embedding (they are free vectors), and the LayerNorm
  puts them on the same scale as every token entering layer 0. The attention mask is extended
  with ones, and the encoder returns ``(B, n + L, D)``, prompts first.
* ``BertEncoder(..., prefix_kv=...)`` -- per-layer key/value prefixes (prefix tuning): a
  stacked array ``(num_layers, 2, [B,] n, heads, head_dim)`` or a sequence of ``num_layers``
  ``(k, v)`` pairs. ``SelfAttention`` concatenates them in front of its keys and values (they
  bypass the key/value projections, as in Li & Liang) and every query may attend to them. The
  output length stays ``L``.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models.barrier import grad_barrier
from peftjax.logical import param_init
from peftjax.moe.layer import MoeConfig
from peftjax.moe.layer import MoeFFN


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder (the fields of a Hugging Face ``config.json``)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  grad_barrier: bool = True  # see peftjax/models/barrier.py
  dtype: str = 'float32'  # compute dtype; parameters stay float32
  remat: str = 'none'  # per-layer rematerialization policy, a key of REMAT_POLICIES
  moe: MoeConfig | None = None  # Mixture-of-Experts FFN settings (None: dense everywhere)
  moe_layers: tuple = ()  # indices of the layers whose FFN is an MoE layer
  # Per-head size; 0 = hidden_size // num_heads. Head pruning (peftjax/compress/structured.py) removes
  # heads at a fixed hidden size, so there num_heads * head_size < hidden_size.
  head_size: int = 0

  @property
  def head_dim(self) -> int:
    return self.head_size or self.hidden_size // self.num_heads


# Per-layer rematerialization (``jax.checkpoint`` around each encoder layer): which values of a
# layer's forward the backward keeps; everything else it recomputes from the layer's input.
REMAT_POLICIES = {
    'none': None,  # no layer-level remat (plain autodiff; LayerNorm and GELU remat still apply)
    'full': jax.checkpoint_policies.nothing_saveable,  # keep only the layer input
    # keep the dense projections' outputs (dots without batch dims), recompute attention,
    # softmax, GELU and the norms
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _layer_class(cfg: BertConfig):
  """``Layer``, wrapped in ``nn.remat`` with the configured policy (``Layer`` for 'none').

  ``deterministic`` (positional argument 3, counting ``self``) is static: it selects Python
  control flow (dropout on/off). Variables of every collection are lifted, so the MoE layers'
  ``sow`` into ``'moe'`` and dropout rngs pass through the checkpoint unchanged.
  """
  if cfg.remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={cfg.remat!r}; valid: {", ".join(REMAT_POLICIES)}')
  if cfg.remat == 'none':
    return Layer
  return nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3,))


def _init(stddev: float, axes: tuple):
  return param_init(nn.initializers.normal(stddev), axes)


def _zeros(axes):
  return param_init(nn.initializers.zeros_init(), axes)


def _ones(axes):
  return param_init(nn.initializers.ones_init(), axes)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  # Rematerialized: the backward recomputes the normalization from its input instead of keeping
  # four (batch, length, embed) intermediates per norm alive (peak memory -8% on the LoRA step).
  return nn.remat(nn.LayerNorm)(epsilon=cfg.layer_norm_eps, name=name, dtype=cfg.dtype,
                                scale_init=_ones(('embed',)), bias_init=_zeros(('embed',)))


@jax.checkpoint
def _gelu(h):
  """Exact (erf) GELU under ``jax.checkpoint``: only its input is kept for the backward, which
  recomputes erf/exp in the same fusion (plain autodiff keeps three (batch, length, mlp)
  intermediates per layer: -20% peak memory and -8% step time on the LoRA step)."""
  return nn.gelu(h, approximate=False)


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


class Embeddings(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool, prompt_embeds=None):
    """``prompt_embeds`` ``(n, D)`` or ``(B, n, D)``: prepended before the LayerNorm."""
    cfg = self.cfg
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, name=name,
                                     embedding_init=_init(0.02, ('vocab', 'embed')))
    x = embed(cfg.vocab_size, 'word_embeddings')(input_ids)
    length = input_ids.shape[1]
    x = x + embed(cfg.max_position, 'position_embeddings')(jnp.arange(length)[None, :])
    x = x + embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids)
    if prompt_embeds is not None:
      prompts = jnp.asarray(prompt_embeds, x.dtype)
      if prompts.ndim == 2:
        prompts = jnp.broadcast_to(prompts[None], (x.shape[0],) + prompts.shape)
      x = jnp.concatenate([prompts, x], axis=1)
    x = _layer_norm(cfg, 'layer_norm')(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return _constrain(x.astype(cfg.dtype), ('batch', 'length', 'embed'))


class SelfAttention(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool, prefix_kv=None):
    """``prefix_kv = (k, v)``, each ``(n, heads, head_dim)`` or ``(B, n, heads, head_dim)``:
    extra keys/values in front of this layer's own, attended by every query."""
    cfg = self.cfg
    proj = lambda name: nn.DenseGeneral(
        (cfg.num_heads, cfg.head_dim), name=name, dtype=cfg.dtype,
        kernel_init=_init(0.02, ('embed', 'heads', 'kv')), bias_init=_zeros(('heads', 'kv')))
    q, k, v = proj('query')(x), proj('key')(x), proj('value')(x)
    if prefix_kv is not None:
      pk, pv = prefix_kv
      batch = lambda t: jnp.broadcast_to(t, (k.shape[0],) + t.shape[-3:]).astype(k.dtype)
      k = jnp.concatenate([batch(pk), k], axis=1)
      v = jnp.concatenate([batch(pv), v], axis=1)
      # Prefix keys are never padding: a 0 bias for each, in front of the tokens' biases.
      n = k.shape[1] - x.shape[1]
      pad = jnp.zeros(mask_bias.shape[:-1] + (n,), mask_bias.dtype)
      mask_bias = jnp.concatenate([pad, mask_bias], axis=-1)
    q = q / jnp.sqrt(cfg.head_dim).astype(q.dtype)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) + mask_bias
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(cfg.dtype)
    self.sow('intermediates', 'attention_probs', probs)
    probs = nn.Dropout(cfg.attention_dropout_rate)(probs, deterministic=deterministic)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    ctx = _constrain(ctx, ('batch', 'length', 'heads', 'kv'))
    return nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), name='out', dtype=cfg.dtype,
                           kernel_init=_init(0.02, ('heads', 'kv', 'embed')),
                           bias_init=_zeros(('embed',)))(ctx)


class Layer(nn.Module):
  cfg: BertConfig
  moe: bool = False  # the FFN is a Mixture-of-Experts layer (routed over real tokens)

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool, prefix_kv=None, token_mask=None):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    h = SelfAttention(cfg, name='attention')(x, mask_bias, deterministic, prefix_kv=prefix_kv)
    x = _layer_norm(cfg, 'attention_norm')(x + drop(h))
    if self.moe:
      h = MoeFFN(cfg.moe, cfg.hidden_size, cfg.intermediate_size, activation=_gelu,
                 dtype=cfg.dtype, name='moe')(x, token_mask, deterministic)
      x = _layer_norm(cfg, 'output_norm')(x + drop(h))
      return _constrain(x, ('batch', 'length', 'embed'))
    h = nn.Dense(cfg.intermediate_size, name='intermediate', dtype=cfg.dtype,
                 kernel_init=_init(0.02, ('embed', 'mlp')), bias_init=_zeros(('mlp',)))(x)
    h = _gelu(h)
    h = _constrain(h, ('batch', 'length', 'mlp'))
    h = nn.Dense(cfg.hidden_size, name='output', dtype=cfg.dtype,
                 kernel_init=_init(0.02, ('mlp', 'embed')), bias_init=_zeros(('embed',)))(h)
    x = _layer_norm(cfg, 'output_norm')(x + drop(h))
    return _constrain(x, ('batch', 'length', 'embed'))


class BertEncoder(nn.Module):
  """Token ids -> final hidden states ``(batch, length, hidden)``.

  ``prompt_embeds`` and ``prefix_kv`` are the hook points of prompt and prefix tuning (see the
  module docstring); with prompts the output is ``(batch, n + length, hidden)``, prompts first.

  >>> enc = BertEncoder(BertConfig(num_layers=1))
  >>> ids = jnp.ones((2, 8), jnp.int32)
  >>> params = enc.init(jax.random.key(0), ids, jnp.ones_like(ids))
  >>> enc.apply(params, ids, jnp.ones_like(ids), prompt_embeds=jnp.zeros((3, 384))).shape
  (2, 11, 384)
  """
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True,
               prompt_embeds=None, prefix_kv=None):
    cfg = self.cfg
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(cfg, name='embeddings')(input_ids, token_type_ids, deterministic,
                                           prompt_embeds=prompt_embeds)
    if prompt_embeds is not None:
      # Soft prompts are real positions: every token may attend to them.
      n = x.shape[1] - input_ids.shape[1]
      attention_mask = jnp.concatenate(
          [jnp.ones((attention_mask.shape[0], n), attention_mask.dtype), attention_mask], axis=1)
    if prefix_kv is not None and len(prefix_kv) != cfg.num_layers:
      raise ValueError(f'prefix_kv has {len(prefix_kv)} layers; the encoder has {cfg.num_layers}')
    # Additive mask: 0 for real keys, a large negative number for padding.
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                          jnp.finfo(jnp.float32).min).astype(jnp.float32)
    bad = [i for i in cfg.moe_layers if not 0 <= i < cfg.num_layers]
    if bad or (cfg.moe_layers and cfg.moe is None):
      raise ValueError(f'moe_layers={cfg.moe_layers} needs a MoeConfig and indices in '
                       f'0..{cfg.num_layers - 1}')
    token_mask = attention_mask > 0 if cfg.moe_layers else None
    layer_cls = _layer_class(cfg)
    for i in range(cfg.num_layers):
      # The barrier sits between layers, outside any remat: the residual-stream gradient is
      # materialized at each layer boundary whether or not the layer recomputes its forward.
      if cfg.grad_barrier:
        x = grad_barrier(x)
      kv = None if prefix_kv is None else (prefix_kv[i][0], prefix_kv[i][1])
      moe = i in cfg.moe_layers
      # Positional arguments: nn.remat's static_argnums index positions.
      x = layer_cls(cfg, moe=moe, name=f'layer_{i}')(x, mask_bias, deterministic, kv,
                                                      token_mask if moe else None)
    return x


# How the classifier reads the encoder's output:
#   'mean'       -- the mean over real tokens (sentence-transformers' pooling)
#   'cls'        -- the [CLS] state
#   'cls_pooler' -- tanh(pooler([CLS])): BERT's pooler (HF ``BertModel.pooler.dense``), the input
#                   of HF ``BertForSequenceClassification``'s classifier
POOLINGS = ('mean', 'cls', 'cls_pooler')


def mean_pool(hidden, attention_mask):
  """Mean of the hidden states over real (unmasked) tokens, as sentence-transformers pools."""
  m = attention_mask[..., None].astype(hidden.dtype)
  return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


class BertClassifier(nn.Module):
  """Encoder + pooling (one of :data:`POOLINGS`) + dropout + a linear head -> logits.

  With ``pooling='cls_pooler'`` this is HF's ``BertForSequenceClassification``: a ``pooler``
  dense layer ``(D, D)`` and tanh on the [CLS] state, dropout, then the classifier.

  >>> model = BertClassifier(BertConfig(num_layers=1), num_classes=2)
  >>> ids = jnp.ones((2, 8), jnp.int32)
  >>> logits = model.apply(model.init(jax.random.key(0), ids, jnp.ones_like(ids)), ids, jnp.ones_like(ids))
  """
  cfg: BertConfig
  num_classes: int
  pooling: str = 'mean'

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
    if self.pooling not in POOLINGS:
      raise ValueError(f'model.pooling={self.pooling!r}; valid: {", ".join(POOLINGS)}')
    hidden = BertEncoder(self.cfg, name='encoder')(input_ids, attention_mask, token_type_ids,
                                                   deterministic)
    # With soft prompts (set on the encoder by a PEFT method) the encoder returns n + L
    # positions, prompts first. Pool over the L real tokens only: 'cls' stays the [CLS] token,
    # 'mean' stays the sentence-transformers mean over real tokens (so a prompt-tuned model
    # pools like the pretrained one), and the prompts still shape every token via attention.
    hidden = hidden[:, hidden.shape[1] - input_ids.shape[1]:]
    if self.pooling == 'mean':
      pooled = mean_pool(hidden, attention_mask)
    else:
      pooled = hidden[:, 0]
    if self.pooling == 'cls_pooler':
      pooled = nn.Dense(self.cfg.hidden_size, name='pooler', dtype=self.cfg.dtype,
                        kernel_init=_init(0.02, ('embed', 'pooled')),
                        bias_init=_zeros(('pooled',)))(pooled)
      pooled = jnp.tanh(pooled)
    pooled = nn.Dropout(self.cfg.dropout_rate)(pooled, deterministic=deterministic)
    logits = nn.Dense(self.num_classes, name='classifier', dtype=jnp.float32,
                      kernel_init=_init(0.02, ('embed', 'classes')),
                      bias_init=_zeros(('classes',)))(pooled)
    return logits.astype(jnp.float32)


def sentence_embedding(cfg: BertConfig, encoder_params, input_ids, attention_mask,
                       token_type_ids=None, normalize: bool = True):
  """The sentence-transformers embedding: mean pooling, then (optionally) L2 normalization."""
  hidden = BertEncoder(cfg).apply({'params': encoder_params}, input_ids, attention_mask,
                                  token_type_ids)
  pooled = mean_pool(hidden, attention_mask)
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled
