"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer gets ``n = peft.prefix.length`` trained key and value vectors per head, put in
front of the keys/values its tokens produce; every query attends to them, padding stays masked,
and the output length is unchanged. They reach the model through its ``prefix_kv`` hook point
(``BertEncoder.__call__(..., prefix_kv=(num_layers, 2, n, heads, head_dim))``), filled in by an
interceptor, so the model never knows which method runs. Prefixes bypass the key/value
projections: they *are* the keys and values, as in the paper.

On the Llama LM (``LlamaForCausalLM``, which declares ``prefix_kv`` and ``prefix_layout()``)
there is one prefix per *key/value* head (grouped-query attention shares them across each
group of query heads), ``(num_layers, 2, n, kv_heads, head_dim)``; the keys carry no rotation.
In generation they live in the KV cache (``init_cache(prefix_kv=...)``), written once before
prefill (:func:`peftjax.generation.decode.method_cache`). The token init runs the tokens
through the model's ``prompt_embeds`` hook: the keys and values of ``n`` real tokens placed
before the text.

Two parameterizations (``peft.prefix.reparam``):

* ``True`` (the paper's, for stable training): an ``(n, D)`` embedding ``E`` and a two-layer MLP
  ``tanh(E W1 + b1) W2 + b2``, ``D -> peft.prefix.hidden -> num_layers * 2 * D``, whose output is
  reshaped to the prefixes. Tree::

      embedding (n, D)   mlp/hidden/{kernel (D, h), bias (h,)}
      mlp/out/{kernel (h, num_layers*2*D), bias (num_layers*2*D,)}

* ``False``: the prefixes themselves, ``{'prefix': (num_layers, 2, n, heads, head_dim)}``.

After training with the MLP, :meth:`Prefix.materialize` computes the prefixes once and drops the
MLP: its result is exactly the tree a ``prefix.reparam=False`` method runs with, so the artifact
to ship is ``num_layers * 2 * n * D`` numbers::

    trained = method.materialize(peft_params, params)  # {'prefix': (L, 2, n, H, Dh)}
    serve = peft.build(cfg_with_prefix_reparam_false)  # same model, no MLP
    logits = peft.apply(model, serve, params, trained, inputs)

Prefixes cannot be folded into the weights (they are extra keys/values), so ``merge`` raises.

``init`` refuses (:class:`~peftjax.errors.ConfigError`) a model none of whose called modules
declares ``prefix_kv`` -- found by tracing the model abstractly (:func:`peftjax.peft.hooks.survey`),
not from its parameter names, so a model whose names merely look like BERT's is not silently
left untouched (every gradient 0) -- and one whose hook has no ``layer_i/attention/key`` kernels
under it. Its token-activation init runs the model on a ``(1, n)`` batch; a model that cannot
take that length is refused with a ConfigError too, not a flax shape error.
"""
from __future__ import annotations

import re

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
from peftjax.peft.base import takes_deterministic

_KEY_KERNEL = re.compile(r'layer_(\d+)/attention/key/kernel$')
_HOOK = 'prefix_kv'


def attention_shape(base_params) -> tuple[int, int, int, int]:
  """``(num_layers, D, heads, head_dim)`` read off the base's ``layer_i/attention/key`` kernels."""
  shapes = {int(m.group(1)): tuple(x.shape) for p, x in tree_lib.flatten(base_params).items()
            if (m := _KEY_KERNEL.search(p))}
  if not shapes or sorted(shapes) != list(range(len(shapes))):
    raise ConfigError(f'prefix tuning needs base leaves matching {_KEY_KERNEL.pattern!r} for '
                      f'layers 0..N-1 (found layers {sorted(shapes)}); peft.method=prefix '
                      'supports BERT-family encoders')
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 3:
    raise ConfigError(f'prefix tuning needs every layer_i/attention/key/kernel shaped (D, heads, '
                      f'head_dim) alike; found {shapes}')
  (d, h, dh), = set(shapes.values())
  return len(shapes), d, h, dh


def layout(owner, base_params) -> tuple[int, int, int, int]:
  """``(num_layers, D, heads, head_dim)`` of the prefixes the hooked module ``owner`` takes: its
  own ``prefix_layout()`` if it has one (the Llama LM: one prefix per *key/value* head), else
  read off BERT's key kernels (:func:`attention_shape`) in ``base_params``."""
  fn = getattr(owner, 'prefix_layout', None)
  return tuple(fn()) if callable(fn) else attention_shape(base_params)


def _subtree(base_params, path: str):
  """The params under module path ``path`` ('' is the whole tree), as the hooked module sees
  them."""
  for part in filter(None, path.split('/')):
    base_params = base_params[part]
  return base_params


def hook_owner(module, base_params, inputs) -> tuple[str, hooks.Survey]:
  """``(path, survey)`` of the outermost module declaring the ``prefix_kv`` hook; refuses a
  model without one (its prefixes would reach no attention layer: every gradient 0)."""
  s = hooks.survey(module, base_params, inputs)
  if _HOOK not in s.hooks:
    raise ConfigError(
        f'peft.method=prefix needs a `prefix_kv` hook: a module whose __call__ declares a '
        f'`prefix_kv` keyword and puts the prefixes in front of its attention keys/values; '
        f'{s.model} has none (its forward calls {s.called_text()}), so the prefixes would '
        "reach nothing (a model's parameter names are not a hook). Valid: a model with such a "
        "hook (peftjax's BERT, peftjax.models.BertClassifier / BertEncoder, or its Llama LM, "
        'peftjax.models.LlamaForCausalLM), or '
        'peft.method=prompt, which needs only an embedding layer on the token ids')
  path = s.hooks[_HOOK]
  try:
    sub = _subtree(base_params, path)
  except (KeyError, TypeError):
    sub = base_params
  try:
    layout(module if not path else None, sub)
  except ConfigError as e:
    raise ConfigError(f'peft.method=prefix: {s.model} declares the `prefix_kv` hook (at '
                      f'{path or "the model"!r}), but the hook reads its attention layout off '
                      f'the key kernels under it: {e}') from e
  return path, s


def _token_key_values(module, base_params, inputs, n: int, rng, s=None) -> jax.Array:
  """Every layer's keys and values of ``n`` random vocabulary tokens, ``(n, L * 2 * D)``.

  Laid out as the reparameterization MLP's output: per token, layer-major, keys then values.
  Runs the model on a ``(1, n)`` batch; a model that cannot take that length is refused with a
  :class:`~peftjax.errors.ConfigError`.
  """
  owner, s = hook_owner(module, base_params, inputs) if s is None else s
  if not owner and callable(getattr(module, 'prefix_layout', None)):
    return _prompted_key_values(module, base_params, inputs, n, rng, s)
  flat = tree_lib.flatten(base_params)
  under = f'{owner}/' if owner else ''
  key_paths = sorted((int(m.group(1)), p[:-len('/kernel')]) for p in flat
                     if p.startswith(under) and (m := _KEY_KERNEL.search(p)))
  if s.embed_shape is None:
    raise ConfigError(f'peft.method=prefix initializes the prefixes from the keys/values of '
                      f'real tokens, which needs an embedding layer on the token ids; {s.model} '
                      f'has none (called: {s.called_text()})')
  vocab = s.embed_shape[0]
  token = s.token_input
  # Skip the first 1000 ids of a real vocabulary: BERT keeps special and unused tokens there.
  ids = jax.random.randint(rng, (1, n), 1000 if vocab > 2000 else 0, vocab)

  def dummy(k, v):
    if k == token:
      return ids.astype(v.dtype)
    if tuple(np.shape(v)) == s.token_shape:  # the per-token inputs: masks all ones, others 0
      return (jnp.ones if k in s.mask_inputs else jnp.zeros)((1, n), v.dtype)
    return jnp.zeros((1,) + tuple(np.shape(v))[1:], v.dtype)

  tokens = {k: dummy(k, v) for k, v in inputs.items()}
  paths = {p for _, kp in key_paths for p in (kp, kp[:-len('key')] + 'value')}
  seen = {}

  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and layers.kind(context.module) == 'dense':
      path = layers.path(context.module)
      if path in paths:
        seen[path] = out
    return out

  mode = {'deterministic': True} if takes_deterministic(module) else {}
  try:
    with intercept.intercept_methods(grab):
      module.apply({'params': base_params}, **tokens, **mode)
    per_layer = [jnp.stack([seen[kp][0], seen[kp[:-len('key')] + 'value'][0]])  # (2, n, H, Dh)
                 for _, kp in key_paths]
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the model's own error, any kind)
    text = ' '.join(str(e).split())[:300]
    raise ConfigError(
        f'peft.method=prefix initializes the prefixes from the model\'s own keys and values of '
        f'peft.prefix.length={n} random tokens, running {s.model} on a (1, {n}) batch of '
        f'{", ".join(tokens)}; {s.model} fails on it ({type(e).__name__}: {text}). Valid: a '
        f'peft.prefix.length the model accepts as a sequence length (it runs on the sample '
        f'batch, shaped {s.token_shape})') from e
  kv = jnp.stack(per_layer)  # (L, 2, n, H, Dh)
  return kv.transpose(2, 0, 1, 3, 4).reshape(n, -1)


def _prompted_key_values(module, base_params, inputs, n: int, rng, s) -> jax.Array:
  """``(n, L * 2 * kv_heads * head_dim)``: the keys and values a model with its own prefix
  layout (the Llama LM) computes for ``n`` random tokens placed before the text, read from the
  prefix its ``prompt_embeds`` hook sows (``intermediates/prefix``, the ``prefix_kv``
  layout)."""
  if s.embed_shape is None or 'prompt_embeds' not in s.hooks:
    raise ConfigError(f'peft.method=prefix initializes the prefixes from real tokens\' keys and '
                      f'values through the model\'s prompt_embeds hook and input embedding; '
                      f'{s.model} lacks one (hooks: {sorted(s.hooks)}, called: '
                      f'{s.called_text()})')
  vocab = s.embed_shape[0]
  ids = jax.random.randint(rng, (n,), 0, vocab)
  table = tree_lib.flatten(base_params)[f'{s.embed_path}/embedding']
  named = {k: v[:1, :1] if tuple(np.shape(v))[:2] == s.token_shape[:2] else v
           for k, v in inputs.items() if k not in ('cache', 'logits_at', 'positions')}
  _, state = module.apply({'params': base_params}, **named, prompt_embeds=table[ids],
                          mutable=['intermediates'], **hooks.mode(module))
  found = state.get('intermediates', {}).get('prefix')
  if found is None:
    raise ConfigError(f'peft.method=prefix: {s.model}.prefix_layout exists but its forward '
                      'sowed no intermediates/prefix; valid: a model whose prompt_embeds hook '
                      'sows the prefix it computes (see peftjax/models/llama.py)')
  kv = found[0]  # (L, 2, n, H, Dh)
  return kv.transpose(2, 0, 1, 3, 4).reshape(n, -1)


@register('prefix')
class Prefix(Method):
  """Prefix tuning from config ``peft.prefix``: ``length``, ``reparam``, ``hidden``.

  >>> method = peft.build(config.peft)                      # doctest: +SKIP  (method='prefix')
  >>> prefix = method.init(rng, model, params, inputs)      # doctest: +SKIP
  >>> logits = peft.apply(model, method, params, prefix, inputs)  # doctest: +SKIP
  >>> method.materialize(prefix, params)['prefix'].shape    # doctest: +SKIP
  (6, 2, 10, 12, 32)
  """

  adds_prefix = True  # decoding keeps the prefix in the KV cache

  def __init__(self, peft_cfg):
    super().__init__(peft_cfg)
    sections.check_prefix(peft_cfg.prefix)
    self.shape: tuple[int, int, int, int] | None = None  # (num_layers, D, heads, head_dim)

  def init(self, rng, module, base_params, inputs) -> dict:
    """The reparameterized tree; with ``prefix.reparam=False``, the prefixes it produces.

    The prefixes start as the model's own keys and values of ``n`` random vocabulary tokens
    (Li & Liang's "activations of real words"): random O(1) prefixes swamp a pretrained
    encoder's attention, and at a short budget it then never recovers (measured: the
    method-comparison study collapsed to the majority class). The MLP's output layer is solved
    (least squares, exact for ``n <= prefix.hidden``) so that the MLP produces exactly those
    prefixes at step 0; both variants start from the same prefixes for the same rng.
    """
    owner, s = hook_owner(module, base_params, inputs)  # refuses a model without the hook
    shape = layout(module if not owner else None, _subtree(base_params, owner))
    self.shape = shape
    _, d, _, _ = shape
    n, hidden = self.cfg.prefix.length, self.cfg.prefix.hidden
    k_emb, k_hid, k_tok = jax.random.split(rng, 3)
    lecun = jax.nn.initializers.lecun_normal()
    target = _token_key_values(module, base_params, inputs, n, k_tok, (owner, s))  # (n, L*2*D)
    embedding = jax.random.normal(k_emb, (n, d), jnp.float32)
    hidden_kernel = lecun(k_hid, (d, hidden), jnp.float32)
    h = jnp.tanh(embedding @ hidden_kernel)
    bias = target.mean(axis=0)
    out_kernel = jnp.linalg.lstsq(h, target - bias)[0]
    reparam = {
        'embedding': embedding,
        'mlp': {'hidden': {'kernel': hidden_kernel, 'bias': jnp.zeros((hidden,), jnp.float32)},
                'out': {'kernel': out_kernel.astype(jnp.float32), 'bias': bias}},
    }
    if self.cfg.prefix.reparam:
      return reparam
    return {'prefix': self._prefixes(reparam, True, shape)}

  def _prefixes(self, peft_params, reparam: bool, shape=None):
    """``(num_layers, 2, n, heads, head_dim)`` from either tree; the MLP's needs the model's
    ``attention_shape`` (its output is laid out per layer and head)."""
    if not reparam:
      if 'prefix' not in peft_params:
        raise ValueError("peft.prefix.reparam=False runs with {'prefix': ...}; got a tree with "
                         f'{sorted(peft_params)} (use Prefix.materialize to convert it)')
      return peft_params['prefix']
    num_layers, _, h, dh = shape
    mlp = peft_params['mlp']
    x = jnp.tanh(peft_params['embedding'] @ mlp['hidden']['kernel'] + mlp['hidden']['bias'])
    x = x @ mlp['out']['kernel'] + mlp['out']['bias']  # (n, num_layers * 2 * D)
    n = x.shape[0]
    return x.reshape(n, num_layers, 2, h, dh).transpose(1, 2, 0, 3, 4)

  def materialize(self, peft_params, base_params, module=None) -> dict:
    """``{'prefix': (num_layers, 2, n, heads, head_dim)}``: the prefixes, without the MLP.

    The tree a ``prefix.reparam=False`` method runs with (same outputs, to float rounding).
    The layer and head layout comes from ``module`` (a model with ``prefix_layout()``, as the
    Llama LM), else from this method's ``init``, else from BERT's key kernels in
    ``base_params`` (arrays or shapes).
    """
    if 'prefix' in peft_params:
      return {'prefix': peft_params['prefix']}
    if module is not None:
      shape = layout(module, base_params)
    else:
      shape = self.shape if self.shape is not None else attention_shape(base_params)
    return {'prefix': self._prefixes(peft_params, True, shape)}

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del rng, deterministic  # no dropout on the prefixes
    # Loaded prefixes (prefix.reparam=False) need no init: the tree is all there is.
    if not self.cfg.prefix.reparam:
      return hooks.hook_scope('prefix_kv', self._prefixes(peft_params, False))
    # Computed inside the traced forward, so gradients reach the embedding and the MLP; the
    # layer and head layout is read off the hooked module's own weights (nothing is stored).
    return hooks.hook_scope('prefix_kv', lambda mod: self._prefixes(
        peft_params, True, layout(mod, nn.meta.unbox(mod.variables['params']))))

  def merge(self, base_params, peft_params) -> dict:
    raise NotImplementedError(
        'prefix tuning cannot be merged into the base weights: prefixes are extra keys and '
        'values, not a change of any weight. Use Prefix.materialize(peft_params, base_params) to '
        'drop the reparameterization MLP and ship the prefixes (load them with '
        'peft.prefix.reparam=False).')

  def logical_specs(self, base_specs, peft_params):
    """Prefixes shard their heads like the key/value kernels; the MLP is replicated."""
    del base_specs
    if 'prefix' in peft_params:
      return {'prefix': P(None, None, None, 'heads', 'kv')}
    specs = jax.tree.map(lambda x: P(), peft_params)
    specs['embedding'] = P(None, 'embed')
    return specs
