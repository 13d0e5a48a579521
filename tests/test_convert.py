"""PTQ of a finished run: restore, merge, calibrate, convert, evaluate, save; bad inputs."""
import json

import pytest

from configs import tiny
from peftjax import run
from peftjax import train
from peftjax.errors import UserInputError
from peftjax.quant import int8
from peftjax.quant.convert import ptq


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  summary = train.train_and_evaluate(tiny.get_config(), str(workdir))
  return workdir, summary


def test_ptq_converts_the_trained_lora_run(trained, tmp_path):
  workdir, summary = trained
  c = tiny.get_config()
  c.quant.activations, c.quant.calibration_batches = 'static', 2
  s = ptq(c, str(workdir), str(tmp_path / 'int8'), timing_steps=2, log=lambda m: None)
  # The float side is the trained model with LoRA merged: the run's own test accuracy.
  assert abs(s['float']['accuracy'] - summary['accuracy_after']) < 1e-6
  assert s['int8_layers'] == 6 and s['activations'].startswith('static (minmax, 2 batches)')
  assert s['int8_disk_bytes'] > 0 and 0 < s['bytes_ratio'] < 1 and s['infer_time_ratio'] > 0
  saved = json.loads((tmp_path / 'int8' / 'ptq_summary.json').read_text())
  assert saved['int8']['accuracy'] == s['int8']['accuracy']
  # The saved model loads into the float model and gives the evaluated predictions.
  setup = run.build_setup(c)
  built = setup.built
  model = int8.load(tmp_path / 'int8', built.module, built.params)
  batch = next(iter(setup.data.eval_batches('test', 64)))
  logits = model({k: batch[k] for k in built.input_keys})
  correct = ((logits.argmax(-1) == batch['label']) * batch['weight']).sum() / batch['weight'].sum()
  assert abs(float(correct) - s['int8']['accuracy']) < 1e-6  # the tiny test split is one batch


def test_ptq_refuses_an_existing_output_and_a_run_without_checkpoints(trained, tmp_path):
  workdir, _ = trained
  (tmp_path / 'taken').mkdir()
  with pytest.raises(UserInputError, match='exists; choose a new directory'):
    ptq(tiny.get_config(), str(workdir), str(tmp_path / 'taken'))
  with pytest.raises(UserInputError, match='holds no checkpoint; train with this config first'):
    ptq(tiny.get_config(), str(tmp_path / 'empty'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
