"""The Mixture-of-Experts FFN as a linen module: router, top-k or expert-choice routing,
capacity, dispatch, optional shared experts, and the auxiliary statistics.

Parameter layout under the layer (``moe/``), with logical axes::

  router/kernel                  ('embed', 'expert')          no bias
  intermediate/{kernel, bias}    ('expert', 'embed', 'mlp'), ('expert', 'mlp')
  output/{kernel, bias}          ('expert', 'mlp', 'embed'), ('expert', 'embed')
  shared/{intermediate, output}  a dense FFN every token passes through (moe.shared_experts)

The expert kernels mirror a dense FFN's ``intermediate``/``output`` names with a leading expert
axis, so sparse upcycling is a copy and one regex can target both.

Statistics go to the ``'moe'`` collection (``self.sow``): ``balance_loss``, ``z_loss``,
``dropped_fraction``, ``expert_load``; ``losses.py`` reduces them over layers for the train step.

Hook point: ``expert_lora={'intermediate': (A, B), 'output': (A, B)}`` with ``expert_lora_scale``
adds per-expert LoRA updates inside the expert matmuls (and inside ``shard_map`` under expert
parallelism, where the factors are split over the expert axis like the kernels they adapt).
PEFT methods set it through ``flax.linen.intercept_methods``; this file never knows which.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.logical import param_init
from peftjax.moe import dispatch
from peftjax.moe import parallel
from peftjax.moe import routing

ROUTERS = ('topk', 'expert_choice')
DISPATCHES = ('sorted', 'onehot', 'ragged')


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """An MoE FFN's routing and dispatch (the ``moe`` config section, less the loss weights)."""
  num_experts: int = 8
  top_k: int = 2  # experts per token (top-k); average experts per token (expert choice)
  capacity_factor: float = 1.25  # slots per expert = ceil(k * tokens * cf / E)
  dropless: bool = False  # capacity = tokens per group: nothing is ever dropped
  router: str = 'topk'  # 'topk' | 'expert_choice'
  renormalize: bool = True  # top-k weights sum to 1 (False: raw softmax, Switch's top-1 gate)
  jitter: float = 0.0  # training: router input times U(1 - jitter, 1 + jitter) (Switch)
  shared_experts: int = 0  # dense experts every token passes through (DeepSeek-MoE)
  dispatch: str = 'sorted'  # 'sorted' | 'onehot' (GShard reference) | 'ragged' (dropless)
  router_init_std: float = 0.02

  def check(self) -> None:
    """Raises ValueError naming the first invalid field (as ``moe.<field>``)."""
    e = self.num_experts
    _require(isinstance(e, int) and e >= 1, 'num_experts', e, 'a positive integer')
    _require(self.router in ROUTERS, 'router', self.router, ', '.join(ROUTERS))
    _require(self.dispatch in DISPATCHES, 'dispatch', self.dispatch, ', '.join(DISPATCHES))
    _require(isinstance(self.top_k, int) and 1 <= self.top_k <= e, 'top_k', self.top_k,
             f'1 <= top_k <= num_experts ({e})')
    _require(self.capacity_factor > 0, 'capacity_factor', self.capacity_factor, 'a number > 0')
    _require(0.0 <= self.jitter < 1.0, 'jitter', self.jitter, '0 <= jitter < 1')
    _require(self.shared_experts >= 0, 'shared_experts', self.shared_experts, '>= 0')
    _require(self.router_init_std >= 0, 'router_init_std', self.router_init_std, '>= 0')
    if self.router == 'expert_choice':
      _require(self.dispatch == 'sorted', 'dispatch', self.dispatch,
               "'sorted' with router='expert_choice'")
      _require(not self.dropless, 'dropless', self.dropless,
               "False with router='expert_choice' (its capacity is its top_k)")


def _require(cond: bool, field: str, value, valid: str):
  if not cond:
    raise ValueError(f'moe.{field}={value!r} is invalid; valid: {valid}')


class ExpertWeights(nn.Module):
  """Declares ``kernel`` (E, in, out) and ``bias`` (E, out) and returns them (no compute)."""
  num_experts: int
  d_in: int
  d_out: int
  axes: tuple  # logical axes of the kernel, expert first
  stddev: float = 0.02

  @nn.compact
  def __call__(self):
    kernel = self.param('kernel', param_init(nn.initializers.normal(self.stddev), self.axes),
                        (self.num_experts, self.d_in, self.d_out))
    bias = self.param('bias', param_init(nn.initializers.zeros_init(),
                                         (self.axes[0], self.axes[-1])),
                      (self.num_experts, self.d_out))
    return kernel, bias


class SharedFFN(nn.Module):
  """A dense FFN (``intermediate`` -> activation -> ``output``), the shared experts."""
  hidden_size: int
  intermediate_size: int
  activation: Callable
  dtype: str = 'float32'
  stddev: float = 0.02

  @nn.compact
  def __call__(self, x):
    dense = lambda n, axes, name: nn.Dense(
        n, name=name, dtype=self.dtype,
        kernel_init=param_init(nn.initializers.normal(self.stddev), axes),
        bias_init=param_init(nn.initializers.zeros_init(), axes[-1:]))
    h = self.activation(dense(self.intermediate_size, ('embed', 'mlp'), 'intermediate')(x))
    return dense(self.hidden_size, ('mlp', 'embed'), 'output')(h)


class MoeFFN(nn.Module):
  """``x`` (batch, length, embed) -> same shape, through ``cfg.num_experts`` routed FFNs.

  Each sequence is one routing group. ``token_mask`` (batch, length) marks real tokens; padding
  routes nowhere and takes no capacity.

  >>> layer = MoeFFN(MoeConfig(num_experts=4), hidden_size=16, intermediate_size=32)
  >>> x = jnp.ones((2, 8, 16))
  >>> params = layer.init(jax.random.key(0), x)['params']
  >>> y, stats = layer.apply({'params': params}, x, mutable=['moe'])
  >>> y.shape, sorted(stats['moe'])
  ((2, 8, 16), ['balance_loss', 'dropped_fraction', 'expert_load', 'z_loss'])
  """
  cfg: MoeConfig
  hidden_size: int
  intermediate_size: int
  activation: Callable = jax.nn.gelu
  dtype: str = 'float32'
  stddev: float = 0.02

  EXPERT_KERNELS = dispatch.EXPERT_KERNELS  # kernels the ``expert_lora`` hook can adapt

  @nn.compact
  def __call__(self, x, token_mask=None, deterministic: bool = True, expert_lora=None,
               expert_lora_scale: float = 1.0):
    cfg = self.cfg
    cfg.check()
    e, (g, s, d) = cfg.num_experts, x.shape
    # ------------------------------------------------------------------ router
    router_in = x
    if cfg.jitter > 0 and not deterministic:
      noise = jax.random.uniform(self.make_rng('dropout'), x.shape, jnp.float32,
                                 1.0 - cfg.jitter, 1.0 + cfg.jitter)
      router_in = x * noise.astype(x.dtype)
    router_logits = nn.Dense(
        e, use_bias=False, name='router', dtype=jnp.float32,
        kernel_init=param_init(nn.initializers.normal(cfg.router_init_std),
                               ('embed', 'expert')))(router_in)
    # ------------------------------------------------------------------ experts' parameters
    params = {
        'intermediate': ExpertWeights(e, d, self.intermediate_size, ('expert', 'embed', 'mlp'),
                                      self.stddev, name='intermediate')(),
        'output': ExpertWeights(e, self.intermediate_size, d, ('expert', 'mlp', 'embed'),
                                self.stddev, name='output')(),
    }
    lora = None
    if expert_lora:
      lora = {k: tuple(v) for k, v in expert_lora.items()}
    em = parallel.expert_mesh(e)
    if em is not None and cfg.dispatch == 'ragged':
      raise ValueError("moe.dispatch='ragged' does not run under expert parallelism here "
                       "(ragged_all_to_all); use 'sorted'")
    x = x.astype(self.dtype)
    # ------------------------------------------------------------------ route and dispatch
    kw = dict(lora=lora, lora_scale=expert_lora_scale)
    if cfg.router == 'expert_choice':
      cap = routing.capacity(s, e, cfg.top_k, cfg.capacity_factor)
      slot_token, slot_weight, probs = routing.expert_choice_route(router_logits, cap, token_mask)
      stats = routing.router_stats(router_logits, probs, None, None, cap, token_mask,
                                   slot_token=slot_token)
      y = self._sorted(em, x, slot_token, slot_weight, params, kw)
    else:
      cap = routing.capacity(s, e, cfg.top_k, cfg.capacity_factor, cfg.dropless)
      route = routing.top_k_route(router_logits, cfg.top_k, token_mask,
                                  renormalize=cfg.renormalize)
      pos = routing.positions_sorted(route.expert, e)
      stats = routing.router_stats(router_logits, route.probs, route.expert, pos, cap,
                                   token_mask)
      if cfg.dispatch == 'onehot':
        # The reference: under an expert mesh its einsums are partitioned by XLA (GSPMD).
        y = dispatch.onehot_moe(x, route, cap, params, self.activation, **kw)
      elif cfg.dispatch == 'ragged':
        y = dispatch.ragged_moe(x, route, params, self.activation, **kw)
        stats['dropped_fraction'] = jnp.zeros((), jnp.float32)
      else:
        slot_token, slot_weight = routing.top_k_slots(route, pos, e, cap)
        y = self._sorted(em, x, slot_token, slot_weight, params, kw)
    if cfg.shared_experts:
      y = y + SharedFFN(d, cfg.shared_experts * self.intermediate_size, self.activation,
                        self.dtype, self.stddev, name='shared')(x)
    for name, value in stats.items():
      self.sow('moe', name, value)
    return nn.with_logical_constraint(y.astype(self.dtype), ('batch', 'length', 'embed'))

  def _sorted(self, em, x, slot_token, slot_weight, params, kw):
    if em is None:
      return dispatch.sorted_moe(x, slot_token, slot_weight, params, self.activation, **kw)
    return parallel.sharded_sorted_moe(em, x, slot_token, slot_weight, params, self.activation,
                                       **kw)
