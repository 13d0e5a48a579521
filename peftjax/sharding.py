"""Device meshes from config and logical-axis rules -> shardings.

Parameters and activations carry logical axis names (``('embed', 'mlp')``,
``('batch', 'length', 'embed')``); ``config.mesh.rules`` maps them to mesh axes
(``data``, ``fsdp``, ``expert``, ``tensor``). Unlisted logical axes are replicated.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from peftjax.errors import ConfigError
from peftjax.validate import MESH_AXES  # ('data', 'fsdp', 'expert', 'tensor')
from peftjax.validate import check_mesh_rules


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves sizes (one may be -1, meaning "the rest") against ``num_devices``.

  >>> mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1)), 8)  # doctest: +SKIP
  {'data': 4, 'fsdp': 2, 'expert': 1, 'tensor': 1}
  """
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
  if bad:
    a, s = next(iter(bad.items()))
    raise ConfigError(f'mesh.{a}={s}; valid: a positive size or -1 (the remaining devices)')
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ConfigError(f'mesh: only one axis may be -1, got {rest}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if num_devices % fixed:
      raise ConfigError(f'mesh: {num_devices} devices are not divisible by the fixed axes '
                       f'product {fixed}')
    sizes[rest[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f'mesh {sizes} needs {math.prod(sizes.values())} devices; '
                      f'{num_devices} are available (set one axis to -1 for "the rest")')
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A ``Mesh`` with axes ``('data', 'fsdp', 'expert', 'tensor')`` over ``devices`` (default: all)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  arr = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(arr, MESH_AXES)


def rules(mesh_cfg) -> tuple:
  """The logical -> mesh axis rules as a tuple of pairs (for ``nn.logical_axis_rules``).

  Each rule is ``(logical name, None | mesh axis | tuple of mesh axes)``; anything else (a
  malformed override, an axis the mesh does not have) is a ConfigError naming the entry.
  """
  return check_mesh_rules(mesh_cfg.rules)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, axis_rules) -> Any:
  """Maps a tree of logical ``PartitionSpec``s to ``NamedSharding``s on ``mesh``."""
  mesh_specs = nn.logical_to_mesh(logical_specs, axis_rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s if s is not None else P()), mesh_specs,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def fit(shardings: Any, tree: Any) -> Any:
  """``shardings`` with every dimension that its mesh axes do not divide left unsplit.

  Rules name axes by meaning, and a small dimension may not divide: BERT's token-type table has
  2 rows under ``('vocab', 'tensor')`` with ``mesh.tensor=4``. Such a dimension is replicated
  instead of failing; the rest of the array stays split.

  >>> fit(NamedSharding(mesh, P('tensor', 'fsdp')), np.zeros((2, 32)))  # doctest: +SKIP
  NamedSharding(mesh=..., spec=PartitionSpec(None, 'fsdp'))
  """
  def one(sh, x):
    if not isinstance(sh, NamedSharding):
      return sh
    shape = np.shape(x)
    spec = list(sh.spec) + [None] * (len(shape) - len(sh.spec))
    for i, axes in enumerate(spec[:len(shape)]):
      names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      if names and shape[i] % math.prod(sh.mesh.shape[a] for a in names):
        spec[i] = None
    return NamedSharding(sh.mesh, P(*spec[:len(shape)]))

  return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh, axis_rules) -> int:
  """How many ways the batch is split: the product of the mesh axes ``'batch'`` maps to."""
  spec = nn.logical_to_mesh_axes(('batch',), axis_rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, axis_rules) -> NamedSharding:
  """Sharding of a batch's leading axis (``'batch'`` under the rules)."""
  spec = nn.logical_to_mesh_axes(('batch',), axis_rules)
  return NamedSharding(mesh, spec)


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Places a host batch (numpy) on the mesh, split along its leading axis."""
  return {k: jax.device_put(v, sharding if np.ndim(v) else replicated(sharding.mesh))
          for k, v in batch.items()}


def to_host(tree: Any) -> Any:
  """``tree`` as numpy arrays on this host, whole, even when its arrays span other processes.

  Arrays this process holds entirely are fetched as they are; arrays split over devices of
  several processes (a batch, FSDP-sharded weights) are all-gathered. In a multi-process run
  every process must call it (it is a collective whenever some array is not fully addressable).

  >>> to_host({'w': jnp.ones(2)})['w']  # doctest: +SKIP
  array([1., 1.], dtype=float32)
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


def replicated_leaves(tree: Any, shardings: Any, *, min_bytes: int = 0) -> list[tuple[str, int]]:
  """``[(path, bytes)]`` of arrays of at least ``min_bytes`` that ``shardings`` leave whole on
  every device although the mesh has model-parallel axes (``fsdp``, ``tensor`` or ``expert``
  > 1), largest first. A pure data-parallel mesh replicates by design: ``[]``.

  >>> replicated_leaves(params, shardings, min_bytes=2**20)  # doctest: +SKIP
  [('encoder/embeddings/position_embeddings/embedding', 786432)]
  """
  from peftjax import tree as tree_lib  # pylint: disable=g-import-not-at-top
  out = []
  sh = tree_lib.flatten(jax.tree.map(lambda s: s, shardings,
                                     is_leaf=lambda x: isinstance(x, NamedSharding)))
  for path, x in tree_lib.flatten(tree).items():
    s = sh.get(path)
    if not isinstance(s, NamedSharding):
      continue
    model = math.prod(n for a, n in s.mesh.shape.items() if a != 'data')
    nbytes = int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
    if model > 1 and nbytes >= min_bytes and all(a is None for a in s.spec):
      out.append((path, nbytes))
  return sorted(out, key=lambda t: -t[1])

