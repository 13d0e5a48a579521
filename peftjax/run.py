"""The run library below the loop: the train state, a run's setup (task, data, model, method,
partition, components), its forward, and reading or writing a finished run.

``peftjax/train.py`` (the loop), the tools (``predict``, ``export``, ``quant.convert``,
``compress.deep``, serving), benchmarks and tests all build on these; nothing here imports the
loop.

>>> setup = build_setup(config)  # doctest: +SKIP
>>> tx, state = initial_state(config, setup, setup.trainable)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from peftjax import checkpoint as ckpt_lib
from peftjax import components as comp_lib
from peftjax import delta
from peftjax import optim
from peftjax import peft
from peftjax import quant
from peftjax import storage
from peftjax import tasks as tasks_lib
from peftjax import tree as tree_lib
from peftjax import validate as validate_lib
from peftjax import workdir_lock
from peftjax.compress import plan as compress_lib
from peftjax.errors import UserInputError
from peftjax.models import Built
from peftjax.tasks.classification import resolve_pretrained  # re-exported: tools use it


@flax.struct.dataclass
class TrainState:
  """Everything a step updates and a checkpoint holds.

  ``micro_step`` counts micro-batches (``train.steps * optim.grad_accum_steps`` at the end; the
  optimizer updates done are ``micro_step // grad_accum_steps``, see :meth:`updates`);
  ``params`` is the trainable partition ``{'base', 'peft'}``; ``rng`` the raw key data dropout
  is folded from; ``extra`` the loop components' states by component name (pruning masks).
  """
  micro_step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extra: dict = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, tx: optax.GradientTransformation, params, *, seed: int,
             extra: dict | None = None) -> 'TrainState':
    """The step-0 state: ``tx``'s initial state for ``params``, the rng from ``seed``.

    >>> state = TrainState.create(optax.adam(1e-3), {'base': {}, 'peft': p}, seed=0)  # doctest: +SKIP
    """
    return cls(micro_step=jnp.zeros((), jnp.int32), params=params,
               opt_state=jax.jit(tx.init)(params),
               rng=jax.random.key_data(jax.random.key(seed + 2)), extra=dict(extra or {}))

  def updates(self, accum: int = 1) -> int:
    """Optimizer updates completed (micro-batches // ``accum``)."""
    return int(self.micro_step) // accum


@dataclasses.dataclass
class Setup:
  """A run before training: what :func:`build_setup` made from a config.

  ``trainable`` is ``{'base': trainable base leaves, 'peft': the method's parameters}`` at
  step 0 and ``frozen`` the other base leaves; ``peft_specs`` the method's logical axes;
  ``plan`` what the model preparation did (``compress``); ``components`` the loop components
  the config turns on.
  """
  config: Any
  task: Any
  data: Any
  built: Built
  method: peft.Method
  trainable: dict
  frozen: dict
  plan: compress_lib.Plan
  peft_specs: Any = None
  components: tuple = ()

  def base(self) -> dict:
    """The full base tree (frozen and trainable leaves)."""
    return tree_lib.combine(self.frozen, self.trainable['base'])


def build_setup(config) -> Setup:
  """Task, data, model (prepared by ``compress``), method, the step-0 partition, components.

  Shared by training, evaluation, tools and benchmarks. Nothing is written.

  >>> setup = build_setup(configs.quickstart.get_config())  # doctest: +SKIP
  """
  task = tasks_lib.get(config)
  data = task.build_data(config)
  built = task.build_model(config, data)
  plan = compress_lib.Plan()
  if config.get('compress') is not None:
    built, plan = compress_lib.prepare(config, built, data, load_finished)
  method = quant.wrap(peft.build(config.peft), config.quant)
  inputs = task.sample_inputs(built, data)
  # Only what the model takes: a task's sample may hold more inputs than a user's model reads.
  inputs = {k: v for k, v in inputs.items() if k in built.input_keys} or inputs
  peft_params = method.init(jax.random.key(config.seed + 1), built.module, built.params, inputs)
  validate_lib.validate_params(config, built.params, peft_params)  # peft.head, lr_multipliers
  base = method.prepare_base(built.params, peft_params, module=built.module, inputs=inputs)
  base_trainable, frozen = tree_lib.partition(base, method.trainable_base)
  setup = Setup(config=config, task=task, data=data, built=built, method=method,
                trainable={'base': base_trainable, 'peft': peft_params}, frozen=frozen,
                plan=plan)
  comps = comp_lib.build(config, setup)
  for c in comps:
    if c.prepare is not None:
      setup = c.prepare(setup)
  return dataclasses.replace(
      setup, components=comps,
      peft_specs=method.logical_specs(built.logical_specs, setup.trainable['peft']))


def _depth(built) -> int:
  """Encoder depth for layer-wise learning rates (0 for models without layers)."""
  cfg = getattr(built.module, 'cfg', None)
  return getattr(cfg, 'num_layers', 0)


def initial_state(config, setup: Setup, trainable: dict) -> tuple[optax.GradientTransformation,
                                                                  TrainState]:
  """The optimizer (``config.optim``) and the step-0 :class:`TrainState` for ``trainable``
  (placed or not), with the components' initial states.

  >>> tx, state = initial_state(config, setup, setup.trainable)  # doctest: +SKIP
  """
  tx = optim.make_optimizer(config.optim, config.train.steps, num_layers=_depth(setup.built))
  extra = {}
  for c in setup.components:
    if c.init is not None:
      s = c.init(trainable)
      if s is not None:
        extra[c.name] = s
  return tx, TrainState.create(tx, trainable, seed=config.seed, extra=extra)


def consts(setup: Setup) -> tuple[dict, dict]:
  """``(arrays, logical axes)`` the components' steps read, by component name."""
  picked = [c for c in setup.components if c.consts is not None]
  return ({c.name: c.consts for c in picked}, {c.name: c.consts_specs for c in picked})


def make_forward(built: Built, method: peft.Method, *, scopes=()):
  """``forward(trainable, frozen, inputs, rng, deterministic, with_aux, capture) -> outputs``.

  ``inputs`` may hold more than the model reads (a whole batch): the model's ``input_keys``
  are picked. ``with_aux=True`` returns ``(outputs, moe collection)`` (see
  :func:`peft.apply`); ``scopes`` are context-manager factories entered around the forward
  (the loop components', e.g. low-rank factored layers).

  >>> logits = make_forward(built, method)(trainable, frozen, batch)  # doctest: +SKIP
  """
  keys = tuple(built.input_keys)

  def forward(trainable, frozen, inputs, rng=None, deterministic=True, with_aux=False,
              capture=None):
    base = tree_lib.combine(frozen, trainable['base'])
    inputs = {k: inputs[k] for k in keys}
    with contextlib.ExitStack() as stack:
      for scope in scopes:
        stack.enter_context(scope())
      return peft.apply(built.module, method, base, trainable['peft'], inputs, rng=rng,
                        deterministic=deterministic, with_aux=with_aux, capture=capture)
  return forward


def setup_forward(setup: Setup):
  """:func:`make_forward` of a setup, with its components' scopes."""
  return make_forward(setup.built, setup.method,
                      scopes=[c.scope for c in setup.components if c.scope is not None])


def make_generator(setup: Setup, gen_cfg=None):
  """``texts(trainable, frozen, prompt_ids, prompt_lengths, max_new_tokens, seed=0) -> [str]``
  for a causal-LM setup: jitted prefill + KV-cache decode of the model run through its method
  (:mod:`peftjax.generation`), stopping at the tokenizer's end-of-sequence token, decoded
  without special tokens. ``gen_cfg`` is the config's ``generate`` section (greedy if None).

  >>> texts = make_generator(setup, config.generate)  # doctest: +SKIP
  >>> texts(state.params, frozen, batch['prompt_ids'], batch['prompt_lengths'], 4)  # doctest: +SKIP
  ['positive', 'negative', ...]
  """
  from peftjax import generation  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama import init_cache  # pylint: disable=g-import-not-at-top
  cfg = setup.built.module.cfg
  tok = setup.task.tokenizer
  sampling = generation.GREEDY if gen_cfg is None else generation.SamplingConfig(
      temperature=gen_cfg.temperature, top_k=gen_cfg.top_k, top_p=gen_cfg.top_p)
  stops = tuple(i for i in (tok.eos_id,) if i is not None)

  def texts(trainable, frozen, prompt_ids, prompt_lengths, max_new_tokens: int, seed: int = 0):
    base = tree_lib.combine(frozen, trainable['base'])
    module = setup.built.module
    step = generation.method_step(module, setup.method, base, trainable['peft'])
    make_cache = generation.method_cache(functools.partial(init_cache, cfg), module,
                                         setup.method, base, trainable['peft'])
    out = generation.generate(
        step, make_cache, prompt_ids, prompt_lengths,
        max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stops,
        pad_id=tok.pad_id or 0, rng=seed, max_positions=cfg.max_position)
    return [tok.decode([int(t) for t in ids[:n] if int(t) not in stops])
            for ids, n in zip(out.ids, out.lengths)]
  return texts


def generates(setup: Setup) -> bool:
  """Whether evaluating ``setup`` generates (a causal LM on data with reference answers)."""
  return (hasattr(setup.task, 'generation_metrics') and
          getattr(setup.data.info, 'exact_match', False))


def generation_eval(setup: Setup, texts, trainable, frozen, split: str, *,
                    progress: bool = False) -> dict:
  """Exact match of the answers generated for ``split``'s prompts (``texts`` is
  :func:`make_generator`'s), on the first ``generate.max_eval_examples`` prompts (-1: all).

  Each prompt gets ``min(generate.max_new_tokens, longest reference + 2)`` new tokens: enough
  for any reference and its end-of-turn token, so a longer answer is never cut into a match.
  The prompts go shortest first (less padding per batch).

  >>> generation_eval(setup, texts, state.params, frozen, 'test')  # doctest: +SKIP
  {'exact_match': 0.874}
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  g, data = setup.config.generate, setup.data
  limit = g.max_eval_examples
  total = data.num_examples(split) if limit < 0 else min(limit, data.num_examples(split))
  max_new = min(g.max_new_tokens, data.max_completion_length(split) + 2)
  done, gen, refs, weights = 0, [], [], []
  with tqdm.tqdm(total=total, desc=f'generate {split}', unit='ex', disable=not progress,
                 leave=False) as bar:
    for batch in data.eval_prompts(split, g.batch_size, by_length=True, limit=total):
      out = texts(trainable, frozen, batch['prompt_ids'], batch['prompt_lengths'], max_new,
                  seed=setup.config.seed)
      keep = min(len(out), total - done)
      gen += out[:keep]
      refs += list(batch['references'][:keep])
      weights += list(np.asarray(batch['weight'])[:keep])
      done += keep
      bar.update(keep)
      if done >= total:
        break
  return setup.task.generation_metrics(gen, refs, weights)


def load_finished(workdir: str) -> tuple[Any, Built]:
  """``(config, Built)`` of the finished run in ``workdir``, its method merged into the weights.

  The run's own config comes from its ``summary.json``; the result is a plain model (no method)
  that a later run can start from or learn from (``compress.init_from``, ``compress.distill``).

  >>> cfg, teacher = load_finished('/tmp/run')  # doctest: +SKIP
  """
  summary = storage.path(workdir) / 'summary.json'
  if not summary.exists():
    raise UserInputError(f'{str(summary)!r} does not exist: {workdir!r} is not a finished run '
                         '(train it first: python -m peftjax.main --config=... --workdir=...)')
  # A run of an older version stored flat method fields (peft.rank, ...): upgraded on read.
  config = ml_collections.ConfigDict(validate_lib.upgrade(
      json.loads(summary.read_text())['config']))
  setup, params = restore_trained(config, workdir)
  try:
    merged = setup.method.merge(params['base'], params['peft'])
  except NotImplementedError as e:
    raise UserInputError(f'{workdir!r}: its {setup.method.name} model cannot be merged into '
                         f'plain weights ({e}); use a run of a mergeable method') from None
  return config, dataclasses.replace(setup.built, params=merged)


def restore_trained(config, workdir: str) -> tuple[Setup, dict]:
  """``(setup, trained params {'base', 'peft'})`` of the finished run in ``workdir``.

  The base is the full base tree (frozen + trained leaves). Raises a UserInputError, creating
  nothing, when the directory holds no checkpoint, when a run is writing it, when its final
  checkpoint is damaged (a tool wants the run's result, so an older checkpoint is not silently
  used instead: rerunning the training resumes from the newest intact one and redoes the rest)
  and when ``config`` does not fit its checkpoints (naming the config fields that differ).

  >>> setup, params = restore_trained(config, '/tmp/run')  # doctest: +SKIP
  """
  workdir_lock.check(workdir, reading=True)
  ckpt_dir = storage.path(workdir) / 'checkpoints'
  found = ckpt_lib.survey(ckpt_dir, max_steps=1)  # the final checkpoint: the run's result
  if not found.steps:
    raise UserInputError(f'{ckpt_dir} holds no checkpoint; train with this config first '
                         '(python -m peftjax.main --config=... --workdir=...)')

  def damaged(step, why):
    older = [s for s in found.steps if s < step]
    redo = (f'rerun its training (python -m peftjax.main with its config and --workdir={workdir})'
            f' to resume from checkpoint step {older[0]} and redo the rest' if older else
            'retrain it (python -m peftjax.main ... --fresh)')
    return ckpt_lib.CheckpointError(
        f'the final checkpoint of {workdir} (step {step}) is damaged: {why}; {redo}')

  if found.good is None:
    raise damaged(*found.damaged[0])
  setup = build_setup(config)
  # The final partition: with gradual unfreezing, every leaf the schedule ever unfroze.
  sel = comp_lib.trainable_selector(setup.components, setup.method.trainable_base,
                                    max(config.train.steps - 1, 0))
  base_train, frozen = tree_lib.partition(setup.base(), sel)
  _, state = initial_state(config, setup, {'base': base_train,
                                           'peft': setup.trainable['peft']})
  target = ckpt_lib.abstract(state)
  ckpt_lib.check_fits(found, target, ckpt_lib.saved_config(workdir), config, this='this config',
                      hint='pass the config the run was trained with (its '
                           f'{ckpt_lib.CONFIG} or summary.json in {workdir})')
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, every=0, read_only=True)
  try:
    state = ckpt.restore(found.good, target)
  except ckpt_lib.CheckpointError as e:
    raise damaged(found.good, str(e)) from None
  finally:
    ckpt.close()
  params = state.params
  return setup, {'base': tree_lib.combine(frozen, params['base']), 'peft': params['peft']}


def write_adapter(path, config, setup: Setup, params, frozen, *, metrics=None, opt_state=None,
                  first_batch=None) -> dict:
  """Writes ``params`` (a trainable partition of ``setup``) as a delta checkpoint with its
  provenance: method, base (source, model config, hash of ``frozen``), data (name, split,
  max_length, a fingerprint of the split sizes and the first training batch), class names,
  metrics, parent (``train.init_adapter``). Returns the manifest.

  >>> write_adapter('/tmp/a.safetensors', config, setup, setup.trainable, setup.frozen)  # doctest: +SKIP
  """
  info = setup.data.info
  seen = {'splits': np.asarray(sorted(info.splits.values()))}
  if first_batch is not None:
    seen.update({k: np.asarray(v) for k, v in first_batch.items()})
  return delta.save_delta(
      path, jax.device_get(params), base_params=jax.device_get(frozen),
      method=setup.method.name, peft_config=config.peft, base_source=setup.built.source,
      model_config=config.model, class_names=info.class_names,
      parent=config.train.init_adapter or None,
      opt_state=None if opt_state is None else jax.device_get(opt_state), metrics=metrics,
      dataset={'name': info.name, 'split': config.data.train_split,
               'max_length': config.data.max_length, 'splits': dict(info.splits),
               'fingerprint': tree_lib.fingerprint(seen)})


__all__ = ['TrainState', 'Setup', 'build_setup', 'initial_state', 'consts', 'make_forward',
           'setup_forward', 'make_generator', 'generates', 'generation_eval', 'load_finished', 'restore_trained', 'write_adapter',
           'resolve_pretrained']
