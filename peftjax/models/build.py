"""Build a model and its initial parameters from the ``model`` section of a config."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models.bert import BertClassifier
from peftjax.models.bert import BertConfig
from peftjax.models.hf_bert import load_bert
from peftjax.models.hf_bert import load_pooler
from peftjax.models.vision import CNN
from peftjax.models.vision import MLP
from peftjax.moe.layer import MoeConfig
from peftjax.moe.upcycle import upcycle_ffn

MODEL_NAMES = ('bert', 'mlp', 'cnn', 'llama')  # 'llama': peftjax.models.lm_build (task causal_lm)


@dataclasses.dataclass
class Built:
  """A model ready to train: the module, its parameters, and how to feed it.

  ``input_keys`` are the batch keys passed to ``module.apply`` as keyword arguments;
  ``logical_specs`` mirrors ``params`` with each leaf's logical axis names;
  ``source`` records where the weights came from (a path, or 'random').
  """
  module: nn.Module
  params: dict
  input_keys: tuple[str, ...]
  logical_specs: Any
  source: str


def sample_inputs(input_keys, *, batch: int = 2, length: int = 8, image_shape=None) -> dict:
  """Dummy inputs with the right dtypes, for shape inference and ``init``."""
  if 'image' in input_keys:
    return {'image': jnp.zeros((batch, *image_shape), jnp.float32)}
  ids = jnp.ones((batch, length), jnp.int32)
  return {'input_ids': ids, 'attention_mask': ids, 'token_type_ids': jnp.zeros_like(ids)}


def _init_params(module, inputs, seed: int, only: str | None = None):
  """(plain params, logical axis specs); shapes first, then a jitted random init.

  With ``only``, just that top-level subtree is initialised (e.g. a fresh ``classifier`` on a
  pretrained encoder): the rest is cut from the jitted program, so no random encoder is built
  only to be replaced.
  """
  init = lambda k: module.init(k, **inputs)['params']
  specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(seed)))
  pick = (lambda t: {only: t[only]}) if only else (lambda t: t)
  params = jax.jit(lambda k: nn.meta.unbox(pick(init(k))))(jax.random.key(seed))
  return params, specs


def moe_settings(moe_cfg, num_layers: int) -> tuple[MoeConfig | None, tuple]:
  """``(MoeConfig, MoE layer indices)`` from the ``moe`` config section; ``(None, ())`` if off.

  With ``moe.every = N`` the FFN of every N-th layer is an MoE layer (layers N-1, 2N-1, ...).

  >>> moe_settings(config.moe, 6)  # doctest: +SKIP
  (MoeConfig(num_experts=8, ...), (1, 3, 5))
  """
  if moe_cfg is None or moe_cfg.num_experts <= 0:
    return None, ()
  cfg = MoeConfig(**{f.name: moe_cfg[f.name] for f in dataclasses.fields(MoeConfig)})
  return cfg, tuple(i for i in range(num_layers) if (i + 1) % moe_cfg.every == 0)


def build(model_cfg, *, num_classes: int, pretrained_dir: str | None = None,
          image_shape=None, seed: int = 0, moe_cfg=None, dtype: str = 'float32') -> Built:
  """Builds the model named by ``model_cfg.name``.

  For ``'bert'``: weights from ``pretrained_dir`` (a HF BERT directory) unless
  ``model_cfg.pretrained == 'random'``; ``model_cfg.num_layers > 0`` keeps only the first
  layers; the classifier head is always freshly initialised. With ``model_cfg.pooling=
  'cls_pooler'`` the model has BERT's pooler (``pooler/{kernel,bias}``), loaded from the
  checkpoint's ``pooler.dense`` (random with ``pretrained='random'``). With ``moe_cfg.num_experts > 0``
  the FFN of every ``moe_cfg.every``-th layer is an MoE layer, upcycled from the pretrained FFN
  (every expert a copy, a small random router) or randomly initialised without pretrained
  weights. ``dtype`` is the compute dtype (the top-level ``config.dtype``); the parameters are
  float32 whatever it is. ``model_cfg.remat`` (absent in old manifests: 'none') sets the
  per-layer rematerialization.

  >>> built = build(cfg.model, num_classes=2, pretrained_dir=minilm_dir())  # doctest: +SKIP
  """
  name = model_cfg.name
  if name == 'bert':
    overrides = dict(dropout_rate=model_cfg.dropout_rate,
                     attention_dropout_rate=model_cfg.dropout_rate,
                     grad_barrier=model_cfg.grad_barrier, dtype=dtype,
                     remat=model_cfg.get('remat', 'none'))
    if model_cfg.num_layers > 0:
      overrides['num_layers'] = model_cfg.num_layers
    if model_cfg.pretrained == 'random':
      bert_cfg = BertConfig(**{**BertConfig().__dict__, **overrides})
      encoder, source = None, 'random'
    else:
      bert_cfg, encoder = load_bert(pretrained_dir, **overrides)
      source = str(pretrained_dir)
    moe, moe_layers = moe_settings(moe_cfg, bert_cfg.num_layers)
    bert_cfg = dataclasses.replace(bert_cfg, moe=moe, moe_layers=moe_layers)
    if encoder is not None:
      for i in moe_layers:
        encoder = upcycle_ffn(encoder, f'layer_{i}', moe.num_experts,
                              rng=jax.random.fold_in(jax.random.key(seed), i),
                              shared_experts=moe.shared_experts, router_std=moe.router_init_std)
    module = BertClassifier(bert_cfg, num_classes=num_classes, pooling=model_cfg.pooling)
    pooler = None
    if encoder is not None and model_cfg.pooling == 'cls_pooler':
      pooler = load_pooler(pretrained_dir, bert_cfg)
    keys = ('input_ids', 'attention_mask', 'token_type_ids')
    params, specs = _init_params(module, sample_inputs(keys), seed,
                                 only=None if encoder is None else 'classifier')
    if encoder is not None:
      params['encoder'] = jax.tree.map(jnp.asarray, encoder)
    if pooler is not None:
      params['pooler'] = jax.tree.map(jnp.asarray, pooler)
    return Built(module, params, keys, specs, source)
  if name in ('mlp', 'cnn'):
    if image_shape is None:
      raise ValueError(f"model.name={name!r} needs image data; the data set has no image feature")
    if name == 'mlp':
      module = MLP(hidden=tuple(model_cfg.hidden), num_classes=num_classes,
                   dropout_rate=model_cfg.dropout_rate)
    else:
      module = CNN(num_classes=num_classes, dropout_rate=model_cfg.dropout_rate)
    keys = ('image',)
    params, specs = _init_params(module, sample_inputs(keys, image_shape=image_shape), seed)
    return Built(module, params, keys, specs, 'random')
  if name == 'llama':
    raise ValueError("model.name='llama' is a causal LM: build it with models.build_lm (config.task="
                     "'causal_lm')")
  raise ValueError(f'model.name={name!r}; valid: {MODEL_NAMES}')
