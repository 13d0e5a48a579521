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


def ptq(config, workdir: str, out: str | None = None, *, timing_steps: int = 10,
        log=print) -> dict:
  """Converts the run in ``workdir`` to int8; returns the summary (also written to ``out``).

  >>> s = ptq(config, '/tmp/run')   # doctest: +SKIP
  >>> s['int8']['accuracy'], s['bytes_ratio']  # doctest: +SKIP
  """
  import jax

  from peftjax import storage
  from peftjax import evaluate as eval_lib
  from peftjax import timing
  from peftjax import train
  from peftjax import tree as tree_lib
  from peftjax.errors import UserInputError
  from peftjax.models.build import sample_inputs
  from peftjax.quant import int8
  from peftjax.quant import ops
  from peftjax.quant import qat

  out = pathlib.Path(out or pathlib.Path(workdir) / 'int8').expanduser().absolute()
  if out.exists():
    raise UserInputError(f'--out={out} exists; choose a new directory for the int8 model')
  q = config.quant
  if q.calibration_batches < 1 and q.activations == 'static':
    raise UserInputError(f'quant.calibration_batches={q.calibration_batches} is invalid; valid: '
                         '>= 1 (or quant.activations=dynamic)')
  task, params = train.restore_trained(config, workdir)
  data, built, method = task['data'], task['built'], task['method']
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
  size = int8.save(model, out)
  s = {
      **int8.summary(model, merged),
      'method': inner.name, 'activations': how, 'observer': q.observer,
      'float': float_eval, 'int8': int8_eval,
      'accuracy_drop': float_eval['accuracy'] - int8_eval['accuracy'],
      'int8_disk_bytes': size,
      'infer_time_ratio': timing.median_ms(times['int8']) / timing.median_ms(times['float']),
      'int8_dir': str(out),
  }
  storage.write_json_atomic(out / 'ptq_summary.json', s)
  log(f"test accuracy float {float_eval['accuracy']:.4f} -> int8 {int8_eval['accuracy']:.4f}; "
      f"weights {s['float_bytes'] / 2**20:.1f} -> {s['int8_bytes'] / 2**20:.1f} MiB "
      f"(ratio {s['bytes_ratio']:.3f}, {size / 2**20:.1f} MiB on disk); "
      f"forward time int8/float {s['infer_time_ratio']:.2f}; model: {out}")
  return s


def main(argv):
  from peftjax import cli
  from peftjax.errors import UserInputError
  config = _CONFIG.value
  cli.begin(argv, config)
  try:
    ptq(config, _WORKDIR.value, _OUT.value, timing_steps=_TIMING_STEPS.value)
  except (UserInputError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  from peftjax import cli
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main)
