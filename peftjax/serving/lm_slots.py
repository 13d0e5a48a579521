"""Many LM adapters as stacked arrays, and the PEFT method that applies the one each row names.

A causal-LM adapter library (:mod:`peftjax.serving.lm_library`) keeps every adapter's
per-layer parts stacked along a *slot* axis ``N``, placed after a scanned layer's stack axis so
``nn.scan`` slices them with the weights (``(L, N, ...)`` under ``layers/...``; ``(N, ...)`` for
the tied embedding or an untied ``lm_head``):

* LoRA ``slot_lora_a`` ``(*lead, N, *in, R)`` and ``slot_lora_b`` ``(*lead, N, R, *out)``: every
  rank zero-padded to the library's ``R``, the scale folded into ``b``;
* IA3 ``slot_ia3_out`` ``(*lead, N, *out)`` and ``slot_ia3_in`` ``(*lead, N, *in)`` (ones where a
  slot has none).

:data:`SLOTS` is a :class:`~peftjax.peft.base.Method` whose parameters are those stacks plus
``index`` ``(B,)``, each row's slot. Run through :func:`peftjax.peft.apply` (or
:func:`peftjax.generation.method_step`), it puts the stacks beside the weights
(:meth:`SlotMethod.layer_tree`) and, in every adapted layer, *gathers* each row's factors
(``A[index]`` is ``(B, *in, R)``) and applies them as batched matmuls: one program for any mix of
adapters, no Python loop over them, and a cost that follows the batch, not the slot count::

  y = l_out[i] ⊙ layer(l_in[i] ⊙ x) + (x · A[i]) · B[i]          for row b with slot i

(the order of ``peft.method='lora+ia3'``). The tied embedding's ``attend`` (the output layer)
adds ``(q · B[i]ᵀ) · A[i]ᵀ``, as LoRA on the table does. A slot of zeros and ones leaves its
rows exactly the base model.

>>> tree = {'index': jnp.array([0, 2]), 'lora': stacks}  # doctest: +SKIP
>>> logits = peft.apply(model, SLOTS, base, tree, {'input_ids': ids})  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib

import jax

from peftjax import tree as tree_lib
from peftjax.peft import layers
from peftjax.peft.base import Method
from peftjax.peft.base import layer_scope

GROUPS = ('lora', 'ia3_out', 'ia3_in')
LEAF = {('lora', 'a'): 'slot_lora_a', ('lora', 'b'): 'slot_lora_b', 'ia3_out': 'slot_ia3_out',
        'ia3_in': 'slot_ia3_in'}


def _per_row_in(x, v, x_axes: tuple):
  """``v`` ``(B, *in)`` shaped to broadcast over ``x`` (batch first) on its contracted axes."""
  shape = [1] * x.ndim
  shape[0] = v.shape[0]
  for ax, n in zip(x_axes, v.shape[1:]):
    shape[ax] = int(n)
  return v.reshape(shape)


def _per_row_out(y, v):
  """``v`` ``(B, *out)`` shaped to broadcast over ``y`` ``(B, ..., *out)``."""
  return v.reshape(v.shape[:1] + (1,) * (y.ndim - v.ndim) + v.shape[1:])


def _down(x, a, x_axes: tuple):
  """``x · A`` per row: ``x`` ``(B, ...)`` contracted on ``x_axes`` with ``a`` ``(B, *in, R)``."""
  n = len(x_axes)
  return jax.lax.dot_general(x, a, ((x_axes, tuple(range(1, n + 1))), ((0,), (0,))))


def _up(xa, b):
  """``(B, ..., R) · (B, R, *out)`` per row."""
  return jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (1,)), ((0,), (0,))))


@contextlib.contextmanager
def slot_scope(tree: dict):
  """Context under which each row of the model's batch runs with its slot ``tree['index'][b]``
  (see the module docstring); the stacks are read off each called layer's own params (a scanned
  layer's slice), where :meth:`SlotMethod.layer_tree` put them."""
  index = tree['index']
  lora, outs, ins = (set(tree.get(g, {})) for g in GROUPS)

  def wrap(path, module, call, x):
    own = layers.params(module)
    is_embed = layers.kind(module) == 'embed'
    axes = () if is_embed else layers.contracted_axes(module, x.ndim)
    x_in = x
    if path in ins:
      x_in = x * _per_row_in(x, own['slot_ia3_in'][index].astype(x.dtype), axes)
    y = call(x_in)
    if path in outs:
      y = y * _per_row_out(y, own['slot_ia3_out'][index].astype(y.dtype))
    if path in lora:
      a, b = own['slot_lora_a'], own['slot_lora_b']
      if is_embed:  # x holds token ids: each row's rows of its A
        xa = a[index.reshape((-1,) + (1,) * (x.ndim - 1)), x].astype(y.dtype)
      else:
        xa = _down(x.astype(y.dtype), a[index].astype(y.dtype), axes)
      y = y + _up(xa, b[index].astype(y.dtype))
    return y

  def attend(path, module, call, q):
    own = layers.params(module)
    y = call(q)
    a, b = own['slot_lora_a'][index].astype(y.dtype), own['slot_lora_b'][index].astype(y.dtype)
    # What E + A·B adds to attend(q) = q·Eᵀ, per row: (q·Bᵀ)·Aᵀ.
    qb = jax.lax.dot_general(q.astype(y.dtype), b, (((q.ndim - 1,), (2,)), ((0,), (0,))))
    return y + jax.lax.dot_general(qb, a, (((qb.ndim - 1,), (2,)), ((0,), (0,))))

  with layer_scope(('dense', 'embed'), lora | outs | ins, wrap), \
      layer_scope(('embed',), lora, attend, method='attend'):
    yield


class SlotMethod(Method):
  """The per-row adapter method (see the module docstring); stateless: the tree says it all.

  Its parameters: ``{'index': (B,) int32, 'lora': {path: {'a', 'b'}}, 'ia3_out': {path: v},
  'ia3_in': {path: v}}``. One instance (:data:`SLOTS`) serves every library, so libraries of
  equal layouts and shapes share compiled programs.
  """
  name = 'slots'

  def __init__(self):
    super().__init__(None)

  @property
  def trainable_base(self):
    return None

  def layer_tree(self, peft_params) -> dict:
    flat = {}
    for path, ab in peft_params.get('lora', {}).items():
      flat[f'{path}/slot_lora_a'], flat[f'{path}/slot_lora_b'] = ab['a'], ab['b']
    for group in ('ia3_out', 'ia3_in'):
      for path, v in peft_params.get(group, {}).items():
        flat[f'{path}/slot_{group}'] = v
    return tree_lib.unflatten(flat)

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del rng, deterministic
    return slot_scope(peft_params)

  def merge(self, base_params, peft_params) -> dict:
    raise NotImplementedError('the slot method serves many adapters at once; merge one adapter '
                              '(LMAdapterLibrary.merged_params) instead')


SLOTS = SlotMethod()
