"""The training loop: mesh -> setup -> partition -> optimizer -> jitted step -> eval -> checkpoint.

One explicit function, :func:`train_and_evaluate`, with banner comments for each stage. It knows
no feature by name: the task (:mod:`peftjax.tasks`) says what a batch holds, its loss and its
metrics; the loop components (:mod:`peftjax.components`) add loss terms, state, scopes and
per-update transforms; the setup and the train state come from :mod:`peftjax.run`.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import tqdm

from peftjax import checkpoint as ckpt_lib
from peftjax import components as comp_lib
from peftjax import delta
from peftjax import errors as errors_lib
from peftjax import evaluate as eval_lib
from peftjax import run as run_lib
from peftjax import sharding
from peftjax import step as step_lib
from peftjax import storage
from peftjax import tree as tree_lib
from peftjax import unfreeze
from peftjax import validate as validate_lib
from peftjax import workdir_lock
from peftjax.errors import ConfigError


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf; no checkpoint of that state was written."""


def _log(msg: str):
  """Prints on process 0 only, through tqdm so that a progress bar stays intact."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


class MetricWriter:
  """Metrics to ``metrics.jsonl`` and TensorBoard event files (process 0 only).

  In a bucket workdir both are staged locally and uploaded at each :meth:`sync` (objects can't
  be appended to); a resumed run continues the bucket's ``metrics.jsonl``.
  """

  def __init__(self, workdir, *, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported lazily: a heavy import
      self._stage = storage.Staging(workdir, resume=('metrics.jsonl',))
      if resume_step is not None:
        _drop_records_after(self._stage.local / 'metrics.jsonl', resume_step)
      self._jsonl = open(self._stage.local / 'metrics.jsonl', 'a')
      self._tb = SummaryWriter(str(self._stage.local / 'tensorboard'))

  def sync(self):
    """Makes everything written so far visible in the workdir (an upload for a bucket)."""
    if self.enabled:
      self._tb.flush()
      self._stage.sync()

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      if isinstance(v, (int, float)):
        self._tb.add_scalar(f'{split}/{k}', v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      self._stage.close()


def _drop_records_after(path: pathlib.Path, step: int) -> None:
  """Removes the records of steps after ``step`` from a ``metrics.jsonl`` a resumed run
  continues (a run killed, interrupted or resumed from an earlier checkpoint logged them before
  its checkpoint), so that the log reads as one uninterrupted run's."""
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      if json.loads(line).get('step', 0) > step:
        continue
    except ValueError:
      continue  # a line cut short by a kill mid-write
    keep.append(line if line.endswith('\n') else line + '\n')
  if keep != lines:
    storage.write_bytes_atomic(path, ''.join(keep).encode())


def _place(tree, shardings):
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def _put_batch(batch: dict, bsh) -> dict:
  """Host batch -> global array sharded on the batch axis (each process feeds its own rows)."""
  return {k: jax.make_array_from_process_local_data(bsh, np.asarray(v)) for k, v in batch.items()}


def train_and_evaluate(config, workdir: str, *, fresh: bool = False) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the summary.

  ``fresh``: delete a previous run's files in ``workdir`` first (only peftjax run files; a
  directory holding anything else is refused) and start from step 0.

  The workdir is locked for the run (:mod:`peftjax.workdir_lock`; a second run is refused),
  checkpoints are verified before they are resumed (:mod:`peftjax.checkpoint`: a damaged one is
  moved aside and the previous one used; checkpoints of another config are refused, naming the
  fields that differ), and Ctrl-C or SIGTERM stops the loop after the current step, writes a
  checkpoint of it and raises :class:`peftjax.errors.Interrupted` saying where it stopped
  (rerunning resumes there). Whatever ends the run, its files and the lock are closed first.

  >>> summary = train_and_evaluate(configs.quickstart.get_config(), '/tmp/run')  # doctest: +SKIP
  """
  run = _RunState()
  try:
    return _train_and_evaluate(config, workdir, fresh, run)
  except errors_lib.Interrupted:
    run.close(failed=True)
    raise
  except KeyboardInterrupt:
    run.close(failed=True)
    raise errors_lib.Interrupted(run.where()) from None
  except BaseException:
    run.close(failed=True)
    raise
  finally:
    run.close(failed=False)


class _RunState:
  """Where a run is (for the message when it is interrupted) and what it must close however it
  ends, newest first. After a failure, errors while closing are dropped: the failure is what
  gets reported."""

  def __init__(self):
    self.phase, self.step, self.steps, self.accum = 'while setting up', 0, None, 1
    self.ckpt = None
    self.ckpt_dir = None
    self.known_last = None  # the newest intact checkpoint found before the manager existed
    self._closers: list = []

  def add(self, fn):
    """Registers ``fn`` to run at the end; returns a function that runs it now (once)."""
    self._closers.append(fn)

    def now():
      if fn in self._closers:
        self._closers.remove(fn)
        fn()
    return now

  def close(self, failed: bool):
    while self._closers:
      fn = self._closers.pop()
      if failed:
        try:
          fn()
        except Exception:  # pylint: disable=broad-except
          pass
      else:
        fn()

  def where(self) -> str:
    steps = f' of {self.steps}' if self.steps else ''
    last = self.known_last
    if self.ckpt is not None:
      try:
        last = self.ckpt.latest_step()
      except Exception:  # pylint: disable=broad-except
        last = None
    if last is not None:
      resume = (f'last checkpoint: step {last // self.accum} in {self.ckpt_dir}; rerun the same '
                'command to resume from it')
    else:
      resume = 'no checkpoint was written; rerunning the same command starts from step 0'
    return f'stopped {self.phase} (at step {self.step}{steps}); {resume}'


class _StopSignals:
  """Ctrl-C (SIGINT) and SIGTERM (a preempted TPU VM) during the loop: the first asks it to stop
  after the current step, a second one stops at once (KeyboardInterrupt). Installed only in
  the main thread; the previous handlers come back when the loop ends."""

  def __init__(self):
    self.signal: str | None = None
    self._saved: dict = {}

  def install(self) -> '_StopSignals':
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._saved[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:
      raise KeyboardInterrupt(f'{signal.Signals(signum).name} again')
    self.signal = signal.Signals(signum).name
    if jax.process_index() == 0:
      try:  # a raw write: the interrupted code may be inside a buffered print
        os.write(sys.stdout.fileno(), f'\n{self.signal}: stopping after this step and writing '
                 'a checkpoint (send it again to stop at once)\n'.encode())
      except (OSError, ValueError, AttributeError):
        pass

  def requested(self) -> bool:
    """Whether to stop now; every process of a multi-process run agrees (any one was told)."""
    flag = self.signal is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
      self.signal = self.signal or ('a signal on another process' if flag else None)
    return flag

  def restore(self):
    for sig, handler in self._saved.items():
      signal.signal(sig, handler)
    self._saved = {}


def _on_process_0(fn, what: str):
  """``fn()`` on process 0 only; in a multi-process run every process learns whether it raised
  (and raises too), instead of waiting for process 0 at the next collective."""
  err = result = None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      err = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(err is not None)))
    if failed and err is None:
      raise errors_lib.UserInputError(f'process 0 failed to {what}; see its error')
  if err is not None:
    raise err
  return result


_RUN_FILES = ('checkpoints', 'tensorboard', 'metrics.jsonl', 'summary.json', 'run_state.json',
              'adapter.safetensors', ckpt_lib.CONFIG)
# Also part of a run directory, and kept by --fresh: the lock this run holds, and the log a
# sweep (experiments/sweep.py) is writing the run's output to.
_KEPT_BY_FRESH = (workdir_lock.LOCK_NAME, 'sweep.log')


def _check_fresh(workdir) -> None:
  """--fresh clears only a peftjax run directory (a ConfigError for one holding other files)."""
  if not workdir.exists():
    return
  others = [p.name for p in workdir.iterdir() if p.name not in _RUN_FILES + _KEPT_BY_FRESH]
  if others:
    raise ConfigError(f'--fresh: {workdir} holds files that are not a peftjax run '
                      f'({sorted(others)[:3]}); refusing to clear it. Choose another --workdir.')


def _clear_run_files(workdir) -> None:
  """Removes a previous run's files (not ``_KEPT_BY_FRESH``)."""
  for name in _RUN_FILES:
    p = workdir / name
    if p.is_dir():
      p.rmtree()
    elif p.exists():
      p.unlink()


def _train_and_evaluate(config, workdir: str, fresh: bool, run: _RunState) -> dict:
  wall0 = time.time()
  # ------------------------------------------------------------------ config
  validate_lib.validate(config)
  for warning in validate_lib.warnings(config):
    _log(f'warning: {warning}')
  workdir = storage.path(workdir)
  _check_writable(workdir)
  t = config.train
  if fresh:
    _check_fresh(workdir)
  # Another run on this workdir is refused now, before any work (the lock is taken below).
  _on_process_0(lambda: workdir_lock.check(workdir), 'check the workdir lock')

  # ------------------------------------------------------------------ mesh and rules
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  validate_lib.validate_for_mesh(config, mesh, sharding.data_parallel_size(mesh, rules))
  bsh = sharding.batch_sharding(mesh, rules)

  if t.init_adapter:
    delta.read_manifest(t.init_adapter)  # a missing or corrupt file fails before any work

  # ------------------------------------------------------------------ data, model, partition
  setup = run_lib.build_setup(config)
  data, built, method, task = setup.data, setup.built, setup.method, setup.task
  components = setup.components
  accum = config.optim.grad_accum_steps
  run.steps, run.accum = t.steps, accum
  # The checkpoints, checked newest first until one is intact (this reads, it writes nothing).
  ckpt_dir = workdir / 'checkpoints'
  found = ckpt_lib.Survey(ckpt_dir, []) if fresh else ckpt_lib.survey(ckpt_dir)
  if found.good is None and found.damaged:
    raise ckpt_lib.CheckpointError(
        f'no intact checkpoint in {ckpt_dir}: {found.damage()}; nothing was changed; move them '
        'away or rerun with --fresh to start over from step 0 (it deletes them)')
  latest = found.good or 0
  run.known_last, run.ckpt_dir = found.good, ckpt_dir

  def partition(base_params, peft_params, update: int):
    """The trainable/frozen split in force at ``update`` (gradual unfreezing), on the mesh."""
    sel = comp_lib.trainable_selector(components, method.trainable_base, update)
    base_train_specs, frozen_specs = tree_lib.partition(
        method.base_logical_specs(built.logical_specs), sel)
    train_sh = sharding.logical_to_sharding({'base': base_train_specs,
                                             'peft': setup.peft_specs}, mesh, rules)
    frozen_sh = sharding.logical_to_sharding(frozen_specs, mesh, rules)
    base_train, frozen = tree_lib.partition(base_params, sel)
    trainable = {'base': base_train, 'peft': peft_params}
    return (_place(trainable, sharding.fit(train_sh, trainable)),
            _place(frozen, sharding.fit(frozen_sh, frozen)))

  # A resumed run restores into the partition of the last update it completed.
  trainable, frozen = partition(setup.base(), setup.trainable['peft'],
                                max(latest // accum - 1, 0))
  _check_replication(config.mesh, trainable, frozen)

  # ------------------------------------------------------------------ optimizer and state
  tx, state = run_lib.initial_state(config, setup, trainable)
  # Checkpoints of another config are refused here, before anything is written.
  changed = ckpt_lib.check_fits(
      found, ckpt_lib.abstract(state), ckpt_lib.saved_config(workdir) if latest else None,
      config, this='this run', hint='use another --workdir, or --fresh to delete them and start '
      'over')
  if t.init_adapter and not latest:
    state = _start_from_adapter(t.init_adapter, state, frozen)

  # ------------------------------------------------------------------ the workdir
  # The first writes, under the lock (only now: bad input above leaves nothing behind).
  lock = workdir_lock.WorkdirLock(workdir, purpose='training')
  _on_process_0(lock.acquire, 'lock the workdir')
  run.add(lock.release)
  if fresh:
    _on_process_0(lambda: _clear_run_files(workdir), 'clear the workdir (--fresh)')
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, every=t.checkpoint_every * accum,
                               keep=t.keep_checkpoints)
  run.ckpt, run.ckpt_dir = ckpt, ckpt_dir
  close_ckpt = run.add(ckpt.close)
  if found.damaged:
    moved = _on_process_0(lambda: [ckpt.set_aside(s) for s, _ in found.damaged],
                          'move damaged checkpoints aside')
    ckpt.reload()
    for (step, why), to in zip(found.damaged, moved or []):
      _log(f'warning: checkpoint step {step // accum} is damaged ({why}); moved it to {to}; '
           f'resuming from checkpoint step {latest // accum}')
  if changed and latest:
    _log(f'note: resuming with config changes since the checkpoints were written: '
         f'{ckpt_lib.format_diff(changed, limit=5)}')
  if jax.process_index() == 0:
    ckpt_lib.write_config(workdir, config)
  # The report names the method's own parameters after it: 'lora/encoder/...'.
  report = tree_lib.size_report({**trainable['base'], method.name: trainable['peft']}, frozen)
  _log(f'data: {data.info.name} {dict(data.info.splits)}; model: {config.model.name} '
       f'({built.source}); method: {method.name}; mesh: {dict(mesh.shape)}')
  _log(tree_lib.format_report(report))

  # ------------------------------------------------------------------ jitted functions
  forward = run_lib.setup_forward(setup)
  # Arrays the components' terms read (a teacher's weights), sharded like any model's and
  # passed to the step as an argument (not baked into the program as constants).
  consts, consts_specs = run_lib.consts(setup)
  consts = _place(consts, sharding.fit(
      sharding.logical_to_sharding(consts_specs, mesh, rules), consts))
  train_step = jax.jit(step_lib.make_train_step(forward, tx, task, components),
                       donate_argnums=(0,))

  @jax.jit
  def eval_stats(trainable, frozen, batch):
    return task.eval_stats(forward(trainable, frozen, batch), batch)

  # A causal LM on data with answers is also scored by generating them (exact match).
  texts = run_lib.make_generator(setup, config.generate) if run_lib.generates(setup) else None

  # generate.teacher_forced=False: exact match alone (the loss pass costs more than generating).
  teacher_forced = texts is None or config.generate.get('teacher_forced', True)

  def run_eval(split: str) -> dict:
    batches = (_put_batch(b, bsh) for b in data.eval_batches(split, t.eval_batch_size))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      metrics = eval_lib.evaluate(lambda b: eval_stats(state.params, frozen, b), batches,
                                  task.eval_reduce) if teacher_forced else {}
      if texts is not None:
        metrics.update(run_lib.generation_eval(
            setup, texts, state.params, frozen, split,
            progress=t.progress and jax.process_index() == 0))
    return metrics

  # ------------------------------------------------------------------ resume
  restored = None
  while latest and restored is None:
    try:
      restored = ckpt.restore(latest, ckpt_lib.abstract(state))
    except ckpt_lib.CheckpointError as e:
      # Damage that only the read found (a step saved without a manifest): set it aside too,
      # with any damaged step below it, and go on from the newest intact one.
      bad = [(latest, str(e))]
      moved = [_on_process_0(lambda: ckpt.set_aside(latest), 'move a damaged checkpoint aside')]
      ckpt.reload()
      found = ckpt_lib.survey(ckpt_dir)
      if found.damaged:
        bad += found.damaged
        moved += _on_process_0(lambda: [ckpt.set_aside(s) for s, _ in found.damaged],
                               'move damaged checkpoints aside') or []
        ckpt.reload()
      nxt = found.good
      for (step, why), to in zip(bad, moved):
        _log(f'warning: checkpoint step {step // accum} is damaged ({why}); moved it to {to}' +
             (f'; resuming from checkpoint step {nxt // accum}' if nxt else ''))
      if nxt is None:
        raise ckpt_lib.CheckpointError(
            f'no intact checkpoint left in {ckpt_dir}: '
            f'{"; ".join(f"step {s // accum}: {why}" for s, why in bad)}; they were moved '
            'aside (*.damaged-*); rerun with --fresh to start over from step 0') from None
      if found.saved != ckpt_lib.signature(ckpt_lib.abstract(state)):
        raise ckpt_lib.CheckpointError(
            f'checkpoint step {latest // accum} was damaged ({e}) and moved aside; the newest '
            f'intact one (step {nxt // accum}) has another partition (gradual unfreezing): '
            'rerun the same command to resume from it') from None
      latest = nxt
  if restored is not None:
    state = restored
  start = int(state.micro_step)
  total_micro = t.steps * accum
  run.step = start // accum
  run_file = workdir / 'run_state.json'
  run_info = json.loads(run_file.read_text()) if (restored is not None and run_file.exists()) else {}
  if 'accuracy_before' in run_info:  # written by an older version
    run_info.setdefault('before', {'accuracy': run_info.pop('accuracy_before')})
  if start:
    _log(f'resumed from checkpoint at step {start // accum}')

  # ------------------------------------------------------------------ before training
  writer = MetricWriter(workdir, resume_step=start // accum)
  close_writer = run.add(writer.close)
  if 'before' not in run_info and t.eval_before:
    run.phase = 'before training, in its first evaluation'
    run_info['before'] = run_eval(config.data.test_split)
    _log(f"test {task.headline} before training: {run_info['before'][task.headline]:.4f}")
  if jax.process_index() == 0:
    storage.write_json_atomic(run_file, run_info)

  # ------------------------------------------------------------------ the loop
  train_batches = data.train_batches(t.batch_size, config.seed)
  bar = tqdm.tqdm(total=t.steps, initial=start // accum, desc='train', unit='step',
                  disable=not t.progress or jax.process_index() != 0, file=sys.stdout,
                  # A log file (no terminal) gets a line every 30 s, not every step.
                  mininterval=1.0 if sys.stdout.isatty() else 30.0, dynamic_ncols=True)
  close_bar = run.add(bar.close)
  train_t0, train_seconds = time.time(), run_info.get('train_seconds', 0.0)
  last_eval: dict = {}
  # Every step metric but the gradient norm (the task's and the components') is averaged
  # over the logging window; the gradient norm is the last step's.
  window = {'t0': time.time(), 'examples': 0, 'values': {}}
  repartition_at = comp_lib.changes_at(components)  # once, not per step
  stop = _StopSignals().install()
  restore_signals = run.add(stop.restore)
  stopping = False
  run.phase = 'during training'
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for micro in range(start, total_micro):
      if micro % accum == 0 and micro // accum in repartition_at:
        # Another partition (gradual unfreezing): leaves that trained keep their state.
        trainable, frozen = partition(tree_lib.combine(frozen, state.params['base']),
                                      state.params['peft'], micro // accum)
        state = state.replace(params=trainable, opt_state=unfreeze.transplant(
            jax.jit(tx.init)(trainable), state.opt_state))
        why = ', '.join(c.name for c in components if micro // accum in c.changes_at)
        _log(f'step {micro // accum}: {why}; {tree_lib.count(trainable):,d} parameters train '
             'now')
      batch = _put_batch(train_batches[micro], bsh)
      state, metrics = train_step(state, frozen, batch, consts)
      m = jax.device_get(metrics)
      step = (micro + 1) // accum
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        raise NonFiniteLossError(
            f"non-finite training loss at step {step} (loss={float(m['loss'])}, grad_norm="
            f"{float(m['grad_norm'])}); stopped without checkpointing this state. Lower "
            f'optim.learning_rate (now {config.optim.learning_rate}) or enable optim.clip_norm; '
            f'the last good checkpoint is step {ckpt.latest_step()}')
      for k, v in m.items():
        if k != 'grad_norm':
          window['values'].setdefault(k, []).append(float(v))
      window['examples'] += t.batch_size
      if (micro + 1) % accum:
        continue
      run.step = step
      bar.update(1)
      if step % t.log_every == 0 or step == t.steps:
        secs = max(time.time() - window['t0'], 1e-9)
        logged = {k: float(np.mean(v)) for k, v in window['values'].items()}
        logged.update(grad_norm=float(m['grad_norm']), examples_per_sec=window['examples'] / secs)
        writer.write(step, 'train', logged)
        bar.set_postfix(**task.progress(logged), ex_s=f"{logged['examples_per_sec']:.0f}")
        window = {'t0': time.time(), 'examples': 0, 'values': {}}
      if config.data.eval_split and ((t.eval_every and step % t.eval_every == 0)
                                     or step == t.steps):
        last_eval = run_eval(config.data.eval_split)
        writer.write(step, 'eval', last_eval)
        writer.sync()
        _log(f"step {step}: {config.data.eval_split} {task.headline} "
             f"{last_eval[task.headline]:.4f}" +
             (f" loss {last_eval['loss']:.4f}" if 'loss' in last_eval else ''))
      # A stop request (Ctrl-C, SIGTERM) ends the loop here, with a checkpoint of this step.
      stopping = stop.requested()
      if ckpt.save(micro + 1, state,
                   force=(step == t.steps or stopping) and t.checkpoint_every > 0):
        run_info['train_seconds'] = train_seconds + time.time() - train_t0
        if jax.process_index() == 0:
          storage.write_json_atomic(run_file, run_info)
        writer.sync()  # logs reach a bucket workdir with each checkpoint
      if stopping:
        break
  restore_signals()
  close_bar()
  # A signal after the last step's check (one process: nobody else to agree with).
  stopping = stopping or (jax.process_count() == 1 and stop.signal is not None)
  if stopping:
    last = ckpt.latest_step()
    resume = (f'checkpoint step {last // accum} is in {ckpt_dir}; rerun the same command to '
              'resume from it' if last is not None else
              'no checkpoint was written (train.checkpoint_every=0), so rerunning the same '
              'command starts over from step 0')
    raise errors_lib.Interrupted(f'{stop.signal}: stopped at step {run.step} of {t.steps}; '
                                 f'{resume}')
  train_seconds += time.time() - train_t0

  # ------------------------------------------------------------------ after training
  run.phase = 'after training, in its final evaluation'
  test = run_eval(config.data.test_split)
  writer.write(t.steps, 'test', test)
  close_writer()
  close_ckpt()
  summary = {
      **task.summary(run_info.get('before'), test),
      'headline': task.headline,
      'test': test,
      'validation': last_eval or None,
      'trainable_params': report['trainable_params'],
      'total_params': report['total_params'],
      'trainable_fraction': report['trainable_fraction'],
      'trainable_sha256': tree_lib.fingerprint(sharding.to_host(state.params)),
      'train_seconds': train_seconds,
      'wall_seconds': time.time() - wall0,
      'steps': t.steps,
      'method': method.name,
      'model_source': built.source,
      'dataset': data.info.name,
      'config': config.to_dict(),
  }
  if any(c.report is not None for c in components):
    summary.update(comp_lib.merge_reports(
        components, sharding.to_host(tree_lib.combine(frozen, state.params['base'])),
        peft=sharding.to_host(state.params['peft'])))
  if t.save_adapter:
    # The trainable partition alone, with its provenance (peftjax/delta.py). Every process
    # gathers (a collective when weights are sharded over processes); process 0 writes.
    host = sharding.to_host({'params': state.params, 'frozen': frozen,
                             'opt': state.opt_state if t.save_adapter_opt_state else None})
  if t.save_adapter and jax.process_index() == 0:
    manifest = run_lib.write_adapter(
        workdir / 'adapter.safetensors', config, setup, host['params'], host['frozen'],
        metrics={'test': test, 'validation': last_eval or None}, opt_state=host['opt'],
        first_batch=train_batches[0])
    summary['adapter'] = {'path': str(workdir / 'adapter.safetensors'),
                          'file_bytes': manifest['file_bytes'],
                          'adapter_to_base_bytes': manifest['adapter_to_base_bytes']}
    _log(f"adapter: {summary['adapter']['path']} ({manifest['file_bytes']:,d} bytes, "
         f"{100 * manifest['adapter_to_base_bytes']:.2f}% of the frozen base)")
  if jax.process_index() == 0:
    storage.write_json_atomic(workdir / 'summary.json', _jsonable(summary))
  return summary


def _check_writable(workdir) -> None:
  """A ConfigError unless this process can create files in ``workdir`` (a local directory, or
  its nearest existing parent; or a bucket prefix). The probe removes what it writes."""
  try:
    storage.probe_writable(workdir)
  except (OSError, ImportError) as e:
    raise ConfigError(f'--workdir={str(workdir)!r} is not writable ({e}); choose a directory '
                      'this process can write to') from None


def _check_replication(mesh_cfg, trainable, frozen) -> None:
  """Lists large parameters the rules leave replicated on a model-parallel mesh, and refuses
  the run when they total more than ``mesh.max_replicated_mb`` (a ConfigError naming them)."""
  tree = {'trainable': trainable, 'frozen': frozen}
  leaves = sharding.replicated_leaves(
      tree, jax.tree.map(lambda x: x.sharding, tree),
      min_bytes=int(mesh_cfg.get('replicated_report_mb', 1.0) * 2**20))
  if not leaves:
    return
  total = sum(b for _, b in leaves) / 2**20
  listing = ', '.join(f'{p} ({b / 2**20:.1f} MiB)' for p, b in leaves[:5])
  limit = mesh_cfg.get('max_replicated_mb', -1.0)
  if 0 <= limit < total:
    raise ConfigError(
        f'mesh.max_replicated_mb={limit}: {total:.1f} MiB of parameters stay fully replicated '
        f'on every device, e.g. {listing}; add mesh.rules for their logical axes or raise the '
        'limit')
  _log(f'note: {len(leaves)} parameters ({total:.1f} MiB) stay fully replicated: {listing}')


def _start_from_adapter(path: str, state: run_lib.TrainState, frozen) -> run_lib.TrainState:
  """``state`` with the parameters (and optimizer state, if stored) of the adapter at ``path``.

  The adapter must belong to this base (hash check) and have this run's trainable partition.
  """
  params, _ = delta.load_delta(path, base_params=sharding.to_host(frozen))
  want = {p: np.shape(v) for p, v in tree_lib.flatten(state.params).items()}
  have = {p: np.shape(v) for p, v in tree_lib.flatten(params).items()}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:3]
    raise delta.DeltaError(f'train.init_adapter={path!r} does not fit this run\'s trainable '
                           f'partition (method/targets/rank differ), e.g. {diff}')
  place = lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding)
  loaded = tree_lib.flatten(params)
  state = state.replace(params=tree_lib.map_with_path(lambda p, old: place(loaded[p], old),
                                                      state.params))
  opt = delta.load_opt_state(path, sharding.to_host(state.opt_state))
  if opt is not None:
    state = state.replace(opt_state=jax.tree.map(place, opt, state.opt_state))
  _log(f'starting from adapter {path}' + (' with its optimizer state' if opt is not None else ''))
  return state


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  return x
