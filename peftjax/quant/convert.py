"""Post-training quantization of a finished run to a real int8 model.

  python -m peftjax.quant.convert --config=configs/quickstart.py --workdir=/tmp/run \\
      --config.quant.observer=percentile --out=/tmp/run/int8

Restores the run's trained parameters, merges the method into the base (LoRA, IA3...; QLoRA
from its int8 base), calibrates static activation ranges on ``quant.calibration_batches`` train
batches with ``quant.observer`` (or keeps them dynamic with ``--config.quant.activations=dynamic``;
an LSQ-trained run uses its learned steps), converts, and evaluates the float and the int8 model
on the test split. Writes the int8 model to ``--out`` and prints (and saves as
``<out>/ptq_summary.json``) accuracy, bytes and the int8/float forward-time ratio.
"""
from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The config the run was trained with.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained run (its checkpoints/).')
_OUT = flags.DEFINE_string('out', None, 'Where the int8 model goes (default <workdir>/int8); '
                           'must not exist.')
_TIMING_STEPS = flags.DEFINE_integer('timing_steps', 10, 'Interleaved forward calls timed.')
flags.mark_flags_as_required(['config', 'workdir'])


# The run's own directories: an int8 model written inside one of them would be taken for (or
# clash with) the run's files.
_RUN_DIRS = ('checkpoints', 'tensorboard')


def check_inputs(config, workdir: str, out: str | None = None, *, timing_steps: int = 10):
  """Everything ``ptq`` needs, checked before any file is created; returns the output path.

  Refused, each in one line naming the flag or field: ``--timing_steps`` < 1; ``--workdir``
  missing, not a directory, without checkpoints or not finished (no ``summary.json``); ``--out``
  that exists, lies inside the run's ``checkpoints/`` or ``tensorboard/``, is remote, or sits
  where nothing can be created (:func:`check_paths`, which imports nothing heavy); invalid
  ``quant`` settings (bits, activations, observer, percentile, ``calibration_batches``). A config
  other than the run's is refused by the restore (naming the fields that differ), still before
  anything is written.
  """
  path = check_paths(workdir, out, timing_steps=timing_steps)
  check_quant(config)
  return path


def check_paths(workdir: str, out: str | None = None, *, timing_steps: int = 10):
  """The ``--workdir``, ``--out`` and ``--timing_steps`` part of :func:`check_inputs`."""
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  from peftjax.errors import UserInputError  # pylint: disable=g-import-not-at-top

  if not isinstance(timing_steps, int) or timing_steps < 1:
    raise UserInputError(f'--timing_steps={timing_steps} is invalid; valid: a positive number '
                         'of timed forward calls')
  if not workdir:
    raise UserInputError('--workdir is empty; valid: the directory of a finished training run')
  run = storage.path(workdir)
  if not run.exists():
    raise UserInputError(f'--workdir={workdir!r} does not exist, so it holds no checkpoint; '
                         'train with this config first (python -m peftjax.main --config=... '
                         '--workdir=...)')
  if not run.is_dir():
    raise UserInputError(f'--workdir={workdir!r} is a file; valid: the directory of a finished '
                         'training run')
  ckpts = run / 'checkpoints'
  steps = [p.name for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
  if not steps:
    raise UserInputError(f'{ckpts} holds no checkpoint; train with this config first '
                         '(python -m peftjax.main --config=... --workdir=...)')
  if not (run / 'summary.json').exists():
    raise UserInputError(f'--workdir={workdir!r} has checkpoints but no summary.json: the run '
                         'has not finished; rerun its training command to finish it (it resumes '
                         'from the last checkpoint), then convert')

  if out is not None and not str(out).strip():
    raise UserInputError("--out='' is empty; valid: a new directory for the int8 model "
                         '(default <workdir>/int8)')
  target = out or str(run / 'int8')
  if storage.is_remote(target):
    raise UserInputError(f'--out={target!r}: the int8 model is written to a local directory; '
                         'give a local --out and copy it to the bucket afterwards')
  path = pathlib.Path(target).expanduser().absolute()
  if path.exists():
    what = '' if path.is_dir() else ' (it is a file)'
    raise UserInputError(f'--out={str(path)} exists; choose a new directory for the int8 '
                         f'model{what}')
  if not storage.is_remote(run):
    for name in _RUN_DIRS:
      inner = pathlib.Path(run) / name
      if path == inner or inner in path.parents:
        raise UserInputError(f'--out={str(path)} is inside the run\'s {name}/ directory; valid: '
                             f'a new directory outside it, e.g. {str(pathlib.Path(run) / "int8")}')
  try:
    storage.probe_writable(path.parent)
  except OSError as e:
    raise UserInputError(f'--out={str(path)} cannot be created: '
                         f'{e.strerror + " (" + str(path.parent) + ")" if e.strerror else e}') from None
  return path


def check_quant(config) -> None:
  """The ``quant`` settings PTQ uses (imports the quantization modules, and so jax)."""
  from peftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from peftjax.quant import qat  # pylint: disable=g-import-not-at-top
  q = config.quant
  if q.calibration_batches < 1 and q.activations == 'static':
    raise ConfigError(f'quant.calibration_batches={q.calibration_batches} is invalid; valid: '
                      '>= 1 (or quant.activations=dynamic)')
  qat.check_config(q)
  if q.activations == 'lsq' and not q.qat:
    raise ConfigError("quant.activations='lsq' is invalid for PTQ of a run trained without "
                      "quant.qat=True (there are no learned steps); valid: 'static' or 'dynamic'")


def ptq(config, workdir: str, out: str | None = None, *, timing_steps: int = 10,
        log=print) -> dict:
  """Converts the run in ``workdir`` to int8; returns the summary (also written to ``out``).

  Every input is checked first (:func:`check_inputs`); the int8 model and its summary are
  written to a temporary sibling of ``out`` and renamed into place together, so ``out`` is
  either complete or absent.

  >>> s = ptq(config, '/tmp/run')   # doctest: +SKIP
  >>> s['int8']['accuracy'], s['bytes_ratio']  # doctest: +SKIP
  """
  import jax

  from peftjax import storage
  from peftjax import evaluate as eval_lib
  from peftjax import timing
  from peftjax import run as run_lib
  from peftjax import tree as tree_lib
  from peftjax.models.build import sample_inputs
  from peftjax.quant import int8
  from peftjax.quant import ops
  from peftjax.quant import qat

  out = check_inputs(config, workdir, out, timing_steps=timing_steps)
  q = config.quant
  setup, params = run_lib.restore_trained(config, workdir)
  data, built, method = setup.data, setup.built, setup.method
  inner = method.inner if isinstance(method, qat.Quantized) else method
  merged = method.merge(params['base'], params['peft'])  # float, the method folded in
  keys = built.input_keys
  inputs = sample_inputs(keys, length=config.data.max_length, image_shape=data.info.image_shape)
  fwd = lambda p, b: built.module.apply({'params': p}, **{k: b[k] for k in keys})

  # ------------------------------------------------------------------ activation ranges
  sites = qat.find_quant_sites(built.module, merged, inputs, q)
  ranges = None
  lsq = params['peft'].get('lsq') if isinstance(method, qat.Quantized) and method.lsq else None
  if lsq is not None:  # the learned steps are the scales: qmax·step is the clipping range
    qmax = ops.qrange(q.act_bits, True)[1]
    ranges = {p[:-len('/act_step')]: (-qmax * v, qmax * v)
              for p, v in tree_lib.flatten(lsq).items()}
    how = 'learned (LSQ)'
  elif q.activations == 'static':
    train_batches = data.train_batches(config.train.batch_size, config.seed)
    ranges = qat.calibrate_ranges(fwd, merged, sites,
                                  [train_batches[i] for i in range(q.calibration_batches)], q)
    how = f'static ({q.observer}, {q.calibration_batches} batches)'
  else:
    how = q.activations
  model = int8.convert(built.module, merged, inputs, q, ranges=ranges)
  log(f'int8: {len(model.sites)} layers, activations {how}')

  # ------------------------------------------------------------------ evaluate both
  # Weights go in as arguments (a closure would bake them into the program as constants).
  f_fwd = jax.jit(fwd)
  i_fwd = model.jit()
  stats = lambda logits, b: eval_lib.batch_stats(logits, b['label'], b['weight'])
  split, bs = config.data.test_split, config.train.eval_batch_size
  float_eval = eval_lib.evaluate(lambda b: stats(f_fwd(merged, b), b),
                                 data.eval_batches(split, bs))
  int8_eval = eval_lib.evaluate(lambda b: stats(i_fwd({k: b[k] for k in keys}), b),
                                data.eval_batches(split, bs))

  batch = next(iter(data.eval_batches(split, bs)))
  x = {k: batch[k] for k in keys}
  times = timing.interleaved({'float': lambda: f_fwd(merged, x), 'int8': lambda: i_fwd(x)},
                             steps=timing_steps)
  # The model and its summary are written together: ``out`` appears only when both are whole.
  with storage.atomic_dir(out) as model_dir:
    size = int8.write(model, model_dir)
    s = {
        **int8.summary(model, merged),
        'method': inner.name, 'activations': how, 'observer': q.observer,
        'float': float_eval, 'int8': int8_eval,
        'accuracy_drop': float_eval['accuracy'] - int8_eval['accuracy'],
        'int8_disk_bytes': size,
        'infer_time_ratio': timing.median_ms(times['int8']) / timing.median_ms(times['float']),
        'int8_dir': str(out),
    }
    storage.write_json_atomic(model_dir / 'ptq_summary.json', s)
  log(f"test accuracy float {float_eval['accuracy']:.4f} -> int8 {int8_eval['accuracy']:.4f}; "
      f"weights {s['float_bytes'] / 2**20:.1f} -> {s['int8_bytes'] / 2**20:.1f} MiB "
      f"(ratio {s['bytes_ratio']:.3f}, {size / 2**20:.1f} MiB on disk); "
      f"forward time int8/float {s['infer_time_ratio']:.2f}; model: {out}")
  return s


def main(argv):
  from peftjax import cli
  config = _CONFIG.value
  cli.quiet(argv)
  # The run and the output first (a missing run or an existing output fails at once, before the
  # config's validation imports the model code); then the config; nothing is written before.
  # Known failures are one line via errors.run.
  check_paths(_WORKDIR.value, _OUT.value, timing_steps=_TIMING_STEPS.value)
  cli.begin(argv, config)
  ptq(config, _WORKDIR.value, _OUT.value, timing_steps=_TIMING_STEPS.value)


if __name__ == '__main__':
  from peftjax import cli
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main)
