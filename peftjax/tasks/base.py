"""The task protocol and its registry."""
from __future__ import annotations

from typing import Any, Callable, Protocol

from peftjax.errors import ConfigError

_REGISTRY: dict[str, Callable[[Any], 'Task']] = {}


class Task(Protocol):
  """What the loop asks of a task. Methods are pure; jitted ones take arrays only.

  * ``build_data(config) -> data``: an object with ``info`` (``name``, ``splits``,
    ``class_names``, ...), ``train_batches(batch_size, seed)`` (random access: ``ds[i]`` is
    batch ``i``) and ``eval_batches(split, batch_size)`` (every example once, padded rows with
    ``weight`` 0).
  * ``build_model(config, data) -> models.Built``: the module, its parameters, its input keys.
  * ``sample_inputs(built, data) -> dict``: inputs for initialising methods (shapes only).
  * ``loss(outputs, batch) -> (loss, metrics)``: the training objective of one batch (inside jit).
  * ``eval_stats(outputs, batch) -> dict``: per-example statistics of an evaluation batch,
    weighted by ``batch['weight']`` (inside jit); ``eval_reduce(stats) -> metrics`` turns the
    concatenated statistics of a split into metrics (on the host).
  * ``headline``: the metric named in logs (``'accuracy'``); ``summary(before, after)`` the
    entries of ``summary.json`` comparing the test metrics before and after training
    (``before`` is ``None`` without ``train.eval_before``); ``progress(logged)`` the progress
    bar's fields from the logged train metrics.
  """
  name: str
  headline: str

  def build_data(self, config) -> Any: ...
  def build_model(self, config, data) -> Any: ...
  def sample_inputs(self, built, data) -> dict: ...
  def loss(self, outputs, batch) -> tuple[Any, dict]: ...
  def eval_stats(self, outputs, batch) -> dict: ...
  def eval_reduce(self, stats: dict) -> dict: ...
  def summary(self, before: dict | None, after: dict) -> dict: ...
  def progress(self, logged: dict) -> dict: ...


def register(name: str, factory: Callable[[Any], Task]) -> Callable[[Any], Task]:
  """Makes ``config.task = name`` select ``factory(config)``; returns ``factory``.

  >>> register('regression', lambda config: Regression())  # doctest: +SKIP
  """
  _REGISTRY[name] = factory
  return factory


def names() -> tuple[str, ...]:
  """The registered task names."""
  return tuple(sorted(_REGISTRY))


def get(config) -> Task:
  """The task ``config.task`` names (``'classification'`` when the config has no task field)."""
  name = config.get('task', 'classification')
  if name not in _REGISTRY:
    raise ConfigError(f'config.task={name!r} is invalid; valid: {", ".join(map(repr, names()))}')
  return _REGISTRY[name](config)
