"""The serving entry point: mixed-adapter JSONL labelling equal to each adapter alone, errors
that name the line, nothing half-written."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from peftjax import peft
from peftjax import predict
from peftjax import run
from peftjax import tree

TEXTS = ['A wonderful, moving film.', 'Dull and far too long.', 'The plot follows a detective.',
         'I loved every minute of it', 'Not worth the ticket.']


def _adapter(tmp, method: str, seed: int):
  """A tiny-config setup of ``method`` with random (non-identity) parameters, saved as a delta
  checkpoint; returns (path, setup, trainable)."""
  c = tiny.get_config()
  c.peft.method = method
  setup = run.build_setup(c)
  rng = np.random.default_rng(seed)
  trainable = tree.map_with_path(
      lambda p, x: np.asarray(x) + rng.normal(0, 0.3, np.shape(x)).astype(np.float32),
      setup.trainable)
  path = tmp / f'{method}.safetensors'
  run.write_adapter(path, c, setup, trainable, setup.frozen)
  return path, setup, trainable


@pytest.fixture(scope='module')
def adapters(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('adapters')
  return {'lora': _adapter(tmp, 'lora', 0), 'ia3': _adapter(tmp, 'ia3', 1)}


def _reference(setup, trainable, texts) -> np.ndarray:
  """Class probabilities of ``texts``, all with this adapter alone (the training forward)."""
  from peftjax.data.tokenize import Tokenizer
  tok = Tokenizer(f"{setup.built.source}/tokenizer.json", max_length=16)
  base = tree.combine(setup.frozen, trainable['base'])
  logits = jax.jit(lambda i: peft.apply(setup.built.module, setup.method, base,
                                        trainable['peft'], i))(tok.encode(texts))
  return np.asarray(jax.nn.softmax(logits))


def _write(path, records):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n'
                          for r in records))
  return path


def test_mixed_batches_equal_each_adapter_alone(adapters, tmp_path):
  names = ['lora', 'ia3', 'ia3', 'lora', 'ia3']
  req = _write(tmp_path / 'in.jsonl', [{'text': t, 'adapter': n, 'id': i}
                                       for i, (t, n) in enumerate(zip(TEXTS, names))])
  specs = [f'{n}={adapters[n][0]}' for n in ('lora', 'ia3')]
  s = predict.run(specs, str(req), str(tmp_path / 'out.jsonl'), batch_size=3, progress=False)
  assert s['records'] == 5 and s['per_adapter'] == {'lora': 2, 'ia3': 3}
  assert s['compiles'] == 1  # two batches (the last padded), one program
  out = [json.loads(l) for l in (tmp_path / 'out.jsonl').read_text().splitlines()]
  assert [o['id'] for o in out] == list(range(5)) and [o['line'] for o in out] == [1, 2, 3, 4, 5]
  refs = {n: _reference(*adapters[n][1:], TEXTS) for n in adapters}
  for i, (o, name) in enumerate(zip(out, names)):
    want = refs[name][i]
    got = np.array([o['probs']['rotten'], o['probs']['fresh']])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert o['adapter'] == name and o['label'] == ('rotten', 'fresh')[int(np.argmax(want))]


@pytest.mark.parametrize('line,message', [
    ('{"text": "ok", "adapter": "lora"', 'not valid JSON'),
    ('{"text": "ok", "adapter": "nope"}', "unknown adapter 'nope'; loaded: ['lora', 'ia3']"),
    ('{"text": 3, "adapter": "lora"}', '"text" must be a string'),
    ('["text"]', 'a record must be a JSON object'),
    ('{"text": "no adapter named"}', 'no "adapter" and no --default_adapter'),
])
def test_bad_line_names_its_number_and_writes_nothing(adapters, tmp_path, line, message):
  req = _write(tmp_path / 'in.jsonl', [{'text': 'fine', 'adapter': 'ia3'}, '', line])
  out = tmp_path / 'out.jsonl'
  out.write_text('previous results\n')
  specs = [f'{n}={adapters[n][0]}' for n in ('lora', 'ia3')]
  with pytest.raises(predict.PredictError) as e:
    predict.run(specs, str(req), str(out), progress=False)
  assert f'{req}:3: ' in str(e.value) and message in str(e.value)
  assert out.read_text() == 'previous results\n'  # an earlier output is left untouched


def test_bad_flags_are_clear(adapters, tmp_path):
  req = _write(tmp_path / 'in.jsonl', [{'text': 'fine'}])
  good = f"lora={adapters['lora'][0]}"
  cases = [([], str(req), 'no --adapter given'),
           (['lora'], str(req), "--adapter='lora' is invalid; valid: name=path"),
           ([good, good], str(req), "name 'lora' is given twice"),
           ([good], str(tmp_path / 'missing.jsonl'), 'does not exist')]
  for specs, inp, message in cases:
    with pytest.raises(predict.PredictError, match=message):
      predict.run(specs, inp, str(tmp_path / 'o.jsonl'), progress=False)
  with pytest.raises(predict.PredictError, match='--default_adapter'):
    predict.run([good], str(req), str(tmp_path / 'o.jsonl'), default_adapter='x')
  assert not (tmp_path / 'o.jsonl').exists()


def test_command_line(adapters, tmp_path):
  req = _write(tmp_path / 'in.jsonl', [{'text': TEXTS[0]}, {'text': TEXTS[1]}])
  out = tmp_path / 'out.jsonl'
  proc = subprocess.run(
      [sys.executable, '-m', 'peftjax.predict', f"--adapter=lora={adapters['lora'][0]}",
       f'--input={req}', f'--output={out}'], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert 'labelled 2 records with 1 adapters (lora: 2)' in proc.stdout
  assert [json.loads(l)['adapter'] for l in out.read_text().splitlines()] == ['lora', 'lora']


def test_export_merged_and_peft_reproduce_the_adapter(adapters, tmp_path):
  from peftjax import export
  from peftjax.hf import load_bert_classifier
  from peftjax.models import BertClassifier
  from peftjax.serving import hf
  from peftjax.serving.files import library_from_files
  from peftjax.data.tokenize import Tokenizer
  path, setup, trainable = adapters['lora']
  want = _reference(setup, trainable, TEXTS)
  inputs = Tokenizer(f"{setup.built.source}/tokenizer.json", max_length=16).encode(TEXTS)
  # merged: a plain HF BERT directory whose forward equals the adapter's
  merged = export.run(str(path), str(tmp_path / 'merged'), fmt='merged')
  cfg, params, pooling, names = load_bert_classifier(merged)
  assert names == ['rotten', 'fresh'] and pooling == 'mean' and cfg.num_layers == 1
  logits = BertClassifier(cfg, num_classes=2, pooling=pooling).apply({'params': params}, **inputs)
  np.testing.assert_allclose(jax.nn.softmax(logits), want, atol=1e-5)
  # PEFT format: this 1-layer model is not its 6-layer base checkpoint, and a PEFT adapter
  # applies to the whole checkpoint, so it is refused (tests/test_hf_interop.py round-trips a
  # full-depth run through the PEFT format)
  with pytest.raises(Exception, match='not its base checkpoint'):
    export.run(str(path), str(tmp_path / 'peft'), fmt='peft')
  assert not (tmp_path / 'peft').exists()
  # IA3 has no PEFT-LoRA form; an existing output is refused, not overwritten
  with pytest.raises(Exception, match="'ia3'; the PEFT export writes LoRA"):
    export.run(str(adapters['ia3'][0]), str(tmp_path / 'x'), fmt='peft')
  with pytest.raises(Exception, match='exists and is not empty'):
    export.run(str(path), str(merged), fmt='merged')
  assert not (tmp_path / 'x').exists()


def test_committed_serving_demo_results_are_consistent():
  """experiments/serving: serving an adapter reproduces its training run's test accuracy, and a
  mixed batch gives every line what that adapter gives alone."""
  import pathlib
  r = json.loads((pathlib.Path(__file__).parents[1] / 'experiments/serving/results.json')
                 .read_text())
  assert set(r['adapters']) == {'lora', 'ia3'} and r['test_examples'] > 1000
  for name, a in r['adapters'].items():
    # the same examples right: within float32 rounding of the run's mean (one example = 8e-4)
    assert abs(a['served_alone_accuracy'] - a['run_test_accuracy']) < 1e-6, name
    assert a['mixed_lines_equal_to_alone'] == r['plans']['mixed'][name]['examples'], name
    assert a['mixed_max_abs_prob_diff_vs_alone'] <= 1e-5, name
  assert sum(r['plans']['mixed'][n]['examples'] for n in r['adapters']) == r['test_examples']
