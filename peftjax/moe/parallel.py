"""Expert parallelism: the sorted-dispatch layer inside ``jax.shard_map`` with ``all_to_all``.

Expert parameters carry the logical axis ``'expert'``; the config's rules map it to a mesh axis
(``('expert', 'expert')``). When that mesh axis has more than one device, each device holds
``E / n`` experts and a slice of the batch (the ``'batch'`` rule must include the expert axis, so
the expert devices also split the tokens, as in GShard and MaxText). Every device routes its own
tokens, gathers them into per-expert buffers, and one ``all_to_all`` sends each expert's buffer
to the device holding that expert; a second ``all_to_all`` brings the outputs back for the
combine. Because routing groups are sequences, the result equals the single-device layer
exactly, outputs and gradients (the transposes of ``all_to_all`` are ``all_to_all``s; the
replicated router and the data-parallel copies of the experts get their gradients summed by
``shard_map``'s transpose).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from peftjax.moe import dispatch


class ExpertMesh(NamedTuple):
  """The mesh axis the experts are split over, its size, and the batch's mesh axes."""
  axis: str
  size: int
  batch_axes: tuple


def _axes(spec_entry) -> tuple:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def expert_mesh(num_experts: int) -> ExpertMesh | None:
  """The expert-parallel setting of the current mesh and logical rules, or None (no EP).

  Raises ValueError when the experts cannot be split: ``num_experts`` not divisible by the
  expert axis, or a ``'batch'`` rule that does not include the expert axis.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  ep = _axes(nn.logical_to_mesh_axes(('expert',))[0])
  ep = tuple(a for a in ep if mesh.shape.get(a, 1) > 1)
  if not ep:
    return None
  if len(ep) > 1:
    raise ValueError(f"the logical axis 'expert' maps to several mesh axes {ep}; map it to one")
  axis, size = ep[0], mesh.shape[ep[0]]
  if num_experts % size:
    raise ValueError(f'moe.num_experts={num_experts} is not divisible by the mesh axis '
                     f'{axis!r} of size {size}; valid: a multiple of {size}')
  batch = _axes(nn.logical_to_mesh_axes(('batch',))[0])
  if axis not in batch:
    raise ValueError(f"expert parallelism over {axis!r} needs the 'batch' rule to include it "
                     f"(e.g. ('batch', ('data', 'fsdp', '{axis}'))); it maps to {batch}")
  return ExpertMesh(axis, size, batch)


def sharded_sorted_moe(em: ExpertMesh, x, slot_token, slot_weight, params: dict,
                       activation: Callable, *, lora: dict | None = None,
                       lora_scale: float = 1.0):
  """:func:`dispatch.sorted_moe` with experts split over ``em.axis`` (under the current mesh).

  >>> y = sharded_sorted_moe(expert_mesh(8), x, tok, w, params, gelu)  # doctest: +SKIP
  """
  batch = P(em.batch_axes)
  experts = P(em.axis)

  def body(x, slot_token, slot_weight, params, lora):
    return dispatch.sorted_moe(x, slot_token, slot_weight, params, activation, lora=lora,
                               lora_scale=lora_scale, ep_axis=em.axis)

  spec = lambda tree: jax.tree.map(lambda _: experts, tree)
  fn = jax.shard_map(body, in_specs=(batch, batch, batch, spec(params), spec(lora or {})),
                     out_specs=batch)
  return fn(x, slot_token, slot_weight, params, lora or {})

