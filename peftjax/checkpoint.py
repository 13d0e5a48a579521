"""Resumable train-state checkpoints (orbax), in a local directory or a bucket.

The train state is ``{'step', 'params' (trainable partition only), 'opt_state', 'rng'}``; the
data position is a pure function of the step (see ``Data.train_batches``), so restoring the
latest checkpoint and continuing gives bit-identical parameters to an uninterrupted run.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from peftjax import storage


class Checkpointer:
  """Saves every ``every`` steps into ``directory``, keeps the newest ``keep``.

  >>> ckpt = Checkpointer('/tmp/run/checkpoints', every=100, keep=2)  # doctest: +SKIP
  >>> state = ckpt.restore_latest(abstract_state) or state           # doctest: +SKIP
  """

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 2):
    self.every = every
    self.directory = storage.path(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Writes ``state`` as checkpoint ``step`` (if due, or ``force``); returns whether it did."""
    if not (force or self.due(step)) or step == self.latest_step():
      return False
    saved = self._mngr.save(step, args=ocp.args.StandardSave(state), force=force)
    self._mngr.wait_until_finished()
    return bool(saved)

  def restore_latest(self, abstract_state: Any) -> Any | None:
    """The newest checkpoint restored into ``abstract_state``'s structure, or None."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError) as e:
      raise ValueError(
          f'checkpoint {self.directory}/{step} does not match this config (was it written by a '
          f'different method or model?): {e}') from None

  def close(self):
    self._mngr.close()


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest checkpoint step in ``directory``; None if it has none (nothing is created)."""
  directory = storage.path(directory)
  if not directory.is_dir():
    return None
  mngr = ocp.CheckpointManager(directory,
                               options=ocp.CheckpointManagerOptions(create=False))
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete tree, the target of a restore."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
