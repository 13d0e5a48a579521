"""HF interop: merged BERT exports, PEFT-format LoRA adapters (names, shapes, scaling, errors)."""
import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from peftjax import peft
from peftjax import tree
from peftjax.hf import ExportError
from peftjax.hf import PeftFormatError
from peftjax.hf import export_bert
from peftjax.hf import load_bert_classifier
from peftjax.hf import load_peft_adapter
from peftjax.hf import save_peft_adapter
from peftjax.hf import to_peft
from peftjax.models import BertClassifier
from peftjax.models import CheckpointError
from peftjax.models import load_bert

R, ALPHA, C = 4, 16.0, 3
TARGETS = (r'(attention/(query|value|out)/kernel|intermediate/kernel|'
           r'word_embeddings/embedding)$')
P = 'base_model.model.'


def _lora_cfg(**kw):
  base = dict(method='lora', rank=R, alpha=ALPHA, dropout=0.0, targets=TARGETS, head='',
              rslora=False)
  return ml_collections.ConfigDict({**base, **kw})


@pytest.fixture(scope='module')
def small(minilm_dir):
  """A 2-layer MiniLM classifier, its inputs, and a LoRA with random non-zero factors."""
  cfg, enc = load_bert(minilm_dir, num_layers=2)
  rng = np.random.default_rng(0)
  params = {'encoder': enc,
            'classifier': {'kernel': rng.normal(0, 0.2, (384, C)).astype(np.float32),
                           'bias': rng.normal(0, 0.2, (C,)).astype(np.float32)}}
  ids = rng.integers(1000, 5000, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  inputs = {'input_ids': ids, 'attention_mask': mask}
  model = BertClassifier(cfg, num_classes=C, pooling='mean')
  method = peft.build(_lora_cfg())
  lora = method.init(jax.random.key(1), model, params, inputs)
  leaves, treedef = jax.tree.flatten(lora)
  lora = treedef.unflatten([rng.normal(0, 0.1, x.shape).astype(np.float32) for x in leaves])
  return cfg, params, inputs, model, method, lora


def _flat_equal(a, b):
  fa, fb = tree.flatten(a), tree.flatten(b)
  assert sorted(fa) == sorted(fb)
  for p in fa:
    x, y = np.asarray(fa[p]), np.asarray(fb[p])
    assert x.dtype == y.dtype == np.float32, p
    assert np.array_equal(x, y), p


# ----------------------------------------------------------------------------- merged export


def test_merged_export_round_trip_is_bit_identical(tmp_path, small):
  cfg, params, *_ = small
  out = export_bert(tmp_path / 'm', cfg, params, pooling='cls', class_names=['a', 'b', 'c'],
                    source='unit-test')
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  cfg2, params2, pooling, names = load_bert_classifier(out)
  assert cfg2 == cfg and pooling == 'cls' and names == ['a', 'b', 'c']
  _flat_equal(params2, params)
  hf = json.loads((out / 'config.json').read_text())
  assert hf['model_type'] == 'bert' and hf['architectures'] == ['BertModel']
  assert (hf['num_hidden_layers'], hf['hidden_size'], hf['num_attention_heads'],
          hf['intermediate_size'], hf['vocab_size']) == (2, 384, 12, 1536, 30522)
  assert hf['num_labels'] == 3 and hf['id2label'] == {'0': 'a', '1': 'b', '2': 'c'}
  assert hf['label2id'] == {'a': 0, 'b': 1, 'c': 2}
  assert hf['peftjax']['pooling'] == 'cls' and hf['peftjax']['head'] == 'classifier'
  assert hf['peftjax']['source'] == 'unit-test'
  with safe_open(str(out / 'model.safetensors'), 'np') as f:
    assert f.metadata() == {'format': 'pt'}
    assert f.get_tensor('classifier.weight').shape == (3, 384)
  # The plain importer reads the export too.
  _, enc = load_bert(out)
  _flat_equal(enc, params['encoder'])


def test_minilm_tensors_round_trip_through_convert_and_export(tmp_path, minilm, minilm_dir):
  cfg, enc = minilm
  out = export_bert(tmp_path / 'enc', cfg, {'encoder': enc}, pooling='mean')
  original = load_file(str(minilm_dir / 'model.safetensors'))
  exported = load_file(str(out / 'model.safetensors'))
  kept = {k for k in original if not (k.startswith('pooler.') or k.endswith('position_ids'))}
  assert len(kept) == 5 + 16 * 6 and set(exported) == kept
  for k in kept:
    assert exported[k].shape == original[k].shape, k
    assert np.array_equal(exported[k], original[k].astype(np.float32)), k
  with pytest.raises(CheckpointError, match='classifier'):
    load_bert_classifier(out)


def test_exported_merged_lora_matches_implicit_forward(tmp_path, small):
  cfg, params, inputs, model, method, lora = small
  base = model.apply({'params': params}, **inputs)
  implicit = peft.apply(model, method, params, lora, inputs)
  assert float(np.abs(implicit - base).max()) > 1e-2  # the adapter changes the logits
  out = export_bert(tmp_path / 'merged', cfg, method.merge(params, lora), pooling='mean')
  cfg2, loaded, pooling, _ = load_bert_classifier(out)
  logits = BertClassifier(cfg2, num_classes=C, pooling=pooling).apply({'params': loaded},
                                                                      **inputs)
  np.testing.assert_allclose(logits, implicit, atol=1e-5, rtol=0)


def test_export_refuses_non_empty_dir_and_overwrites_atomically(tmp_path, small):
  cfg, params, *_ = small
  out = tmp_path / 'm'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  with pytest.raises(ExportError, match='not empty'):
    export_bert(out, cfg, params, pooling='mean')
  assert os.listdir(out) == ['keep.txt']
  export_bert(out, cfg, params, pooling='mean', overwrite=True)
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  assert sorted(os.listdir(tmp_path)) == ['m']  # no temporary or moved-aside directories
  with pytest.raises(ExportError, match="pooling='max'"):
    export_bert(tmp_path / 'x', cfg, params, pooling='max')


def test_failed_export_leaves_nothing_behind(tmp_path, small, monkeypatch):
  cfg, params, *_ = small

  def broken_rename(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'rename', broken_rename)
  with pytest.raises(OSError, match='disk full'):
    export_bert(tmp_path / 'm', cfg, params, pooling='mean')
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- PEFT format


def test_peft_key_names_shapes_and_config(tmp_path, small):
  cfg, params, _, _, _, lora = small
  config, tensors = to_peft(lora, rank=R, alpha=ALPHA, head=params['classifier'],
                            base_model_name_or_path='sentence-transformers/all-MiniLM-L6-v2')
  expected = {}
  for i in range(2):
    b = f'base_model.model.bert.encoder.layer.{i}.'
    expected.update({
        b + 'attention.self.query.lora_A.weight': (R, 384),
        b + 'attention.self.query.lora_B.weight': (384, R),
        b + 'attention.self.value.lora_A.weight': (R, 384),
        b + 'attention.self.value.lora_B.weight': (384, R),
        b + 'attention.output.dense.lora_A.weight': (R, 384),
        b + 'attention.output.dense.lora_B.weight': (384, R),
        b + 'intermediate.dense.lora_A.weight': (R, 384),
        b + 'intermediate.dense.lora_B.weight': (1536, R),
    })
  expected.update({
      'base_model.model.bert.embeddings.word_embeddings.lora_embedding_A': (R, 30522),
      'base_model.model.bert.embeddings.word_embeddings.lora_embedding_B': (384, R),
      'base_model.model.classifier.weight': (C, 384),
      'base_model.model.classifier.bias': (C,),
  })
  assert {k: v.shape for k, v in tensors.items()} == expected
  # Values: A = lora_a.T, B = lora_b.T, in torch layout (out index = head * 32 + dim).
  q = lora['encoder']['layer_0']['attention']['query']
  np.testing.assert_array_equal(
      tensors['base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight'],
      np.asarray(q['lora_a']).T)
  np.testing.assert_array_equal(
      tensors['base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight'],
      np.asarray(q['lora_b']).reshape(R, 384).T)
  o = lora['encoder']['layer_1']['attention']['out']
  np.testing.assert_array_equal(
      tensors['base_model.model.bert.encoder.layer.1.attention.output.dense.lora_A.weight'],
      np.asarray(o['lora_a']).reshape(384, R).T)
  np.testing.assert_array_equal(tensors['base_model.model.classifier.weight'],
                                params['classifier']['kernel'].T)
  assert config['peft_type'] == 'LORA' and config['task_type'] == 'SEQ_CLS'
  assert config['r'] == R and config['lora_alpha'] == ALPHA and config['use_rslora'] is False
  assert config['target_modules'] == ['attention.output.dense', 'intermediate.dense', 'query',
                                      'value', 'word_embeddings']
  assert config['modules_to_save'] == ['classifier']
  assert config['bias'] == 'none' and config['use_dora'] is False
  assert config['rank_pattern'] == {} and config['alpha_pattern'] == {}
  assert config['base_model_name_or_path'] == 'sentence-transformers/all-MiniLM-L6-v2'

  out = save_peft_adapter(tmp_path / 'a', lora, rank=R, alpha=ALPHA, head=params['classifier'])
  assert sorted(os.listdir(out)) == ['adapter_config.json', 'adapter_model.safetensors']
  assert json.loads((out / 'adapter_config.json').read_text())['target_modules'] == \
      config['target_modules']
  with safe_open(str(out / 'adapter_model.safetensors'), 'np') as f:
    assert f.metadata() == {'format': 'pt'} and set(f.keys()) == set(expected)


def test_encoder_only_adapter_uses_bert_model_names(small):
  *_, lora = small
  config, tensors = to_peft(lora, rank=R, alpha=ALPHA)
  assert config['task_type'] == 'FEATURE_EXTRACTION' and config['modules_to_save'] is None
  assert 'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight' in tensors
  assert not any(k.startswith('base_model.model.bert.') or 'classifier' in k for k in tensors)


@pytest.mark.parametrize('rslora', [False, True])
def test_peft_round_trip_is_exact(tmp_path, small, rslora):
  cfg, params, inputs, model, _, lora = small
  out = save_peft_adapter(tmp_path / 'a', lora, rank=R, alpha=ALPHA, rslora=rslora,
                          head=params['classifier'])
  lora2, head, info = load_peft_adapter(out, cfg)
  _flat_equal(lora2, lora)
  _flat_equal(head, params['classifier'])
  assert (info['rank'], info['alpha'], info['rslora']) == (R, ALPHA, rslora)
  assert info['task_type'] == 'SEQ_CLS'
  want = ALPHA / (math.sqrt(R) if rslora else R)
  assert set(info['scales'].values()) == {want} and set(info['ranks'].values()) == {R}
  # info['targets'] selects exactly the adapted weights, and a LoRA built from it runs the tree.
  sites = sorted(p.rsplit('/', 1)[0] for p in tree.flatten(lora) if p.endswith('lora_a'))
  assert sorted(p.rsplit('/', 1)[0] for p in tree.select(params, info['targets'])) == sites
  method = peft.build(_lora_cfg(targets=info['targets'], rank=info['rank'],
                                alpha=info['alpha'], rslora=info['rslora']))
  method.init(jax.random.key(0), model, params, inputs)
  assert sorted(s.path for s in method.sites) == sites


def test_mixed_ranks_round_trip_through_rank_and_alpha_patterns(tmp_path, small):
  cfg, params, inputs, model, method, lora = small
  mixed = jax.tree.map(np.asarray, lora)
  v = mixed['encoder']['layer_1']['attention']['value']
  v['lora_a'], v['lora_b'] = v['lora_a'][..., :2], v['lora_b'][:2]
  config, _ = to_peft(mixed, rank=R, alpha=ALPHA)
  name = 'encoder.layer.1.attention.self.value'
  assert config['rank_pattern'] == {name: 2}
  assert config['alpha_pattern'] == {name: ALPHA / R * 2}  # PEFT's alpha_m / r_m == our scale
  out = save_peft_adapter(tmp_path / 'a', mixed, rank=R, alpha=ALPHA)
  lora2, head, info = load_peft_adapter(out, cfg)
  assert head is None and info['ranks']['encoder/layer_1/attention/value'] == 2
  _flat_equal(lora2, mixed)
  # A tree with per-site ranks runs through the ordinary LoRA forward and merge.
  merged = BertClassifier(cfg, C).apply({'params': method.merge(params, lora2)}, **inputs)
  np.testing.assert_allclose(merged, peft.apply(model, method, params, lora2, inputs),
                             atol=1e-5, rtol=0)


def _torch_weights(minilm_dir):
  t = load_file(str(minilm_dir / 'model.safetensors'))
  return {k: v.astype(np.float64) for k, v in t.items()}


@pytest.mark.parametrize('rslora', [False, True])
def test_scaling_matches_numpy_reference_in_torch_layout(tmp_path, small, minilm_dir, rslora):
  """A hand-built PEFT adapter (alpha 16, r 4, one rank/alpha-pattern override) merges to
  ``W + scaling * B @ A`` computed in numpy, in torch layout, then transposed to ours."""
  cfg, params, inputs, model, _, _ = small
  rng = np.random.default_rng(7)
  modules = {  # HF module -> (in, out)
      'encoder.layer.0.attention.self.query': (384, 384),
      'encoder.layer.0.attention.self.value': (384, 384),
      'encoder.layer.1.attention.self.value': (384, 384),
      'encoder.layer.0.attention.output.dense': (384, 384),
      'encoder.layer.1.intermediate.dense': (384, 1536),
      'encoder.layer.1.output.dense': (1536, 384),
  }
  rank_pattern = {'encoder.layer.1.attention.self.value': 2}
  alpha_pattern = {'value': 3}  # every value module: alpha 3 (rank from rank_pattern or r)
  tensors, ref_scale = {}, {}
  for name, (d_in, d_out) in modules.items():
    r = rank_pattern.get(name, R)
    alpha = 3 if name.endswith('value') else ALPHA
    tensors[f'{P}bert.{name}.lora_A.weight'] = rng.normal(0, 0.1, (r, d_in)).astype(np.float32)
    tensors[f'{P}bert.{name}.lora_B.weight'] = rng.normal(0, 0.1, (d_out, r)).astype(np.float32)
    ref_scale[name] = alpha / (math.sqrt(r) if rslora else r)
  emb = 'embeddings.word_embeddings'
  tensors[f'{P}bert.{emb}.lora_embedding_A'] = rng.normal(0, 0.1, (R, 30522)).astype(np.float32)
  tensors[f'{P}bert.{emb}.lora_embedding_B'] = rng.normal(0, 0.1, (384, R)).astype(np.float32)
  ref_scale[emb] = ALPHA / (math.sqrt(R) if rslora else R)
  tensors[f'{P}classifier.weight'] = rng.normal(0, 0.1, (C, 384)).astype(np.float32)
  tensors[f'{P}classifier.bias'] = rng.normal(0, 0.1, (C,)).astype(np.float32)
  adapter = tmp_path / 'hand'
  adapter.mkdir()
  save_file(tensors, str(adapter / 'adapter_model.safetensors'), metadata={'format': 'pt'})
  (adapter / 'adapter_config.json').write_text(json.dumps({
      'peft_type': 'LORA', 'task_type': 'SEQ_CLS', 'r': R, 'lora_alpha': ALPHA,
      'use_rslora': rslora, 'rank_pattern': rank_pattern, 'alpha_pattern': alpha_pattern,
      'target_modules': ['query', 'value', 'dense', 'word_embeddings'], 'bias': 'none',
      'modules_to_save': ['classifier', 'score'], 'lora_dropout': 0.1, 'fan_in_fan_out': False,
      'init_lora_weights': True, 'use_dora': False}))

  lora, head, info = load_peft_adapter(adapter, cfg)
  assert info['ranks']['encoder/layer_1/attention/value'] == 2
  assert info['scales']['encoder/layer_0/attention/value'] == ref_scale[
      'encoder.layer.0.attention.self.value']
  method = peft.build(_lora_cfg(targets=info['targets'], rank=info['rank'],
                                alpha=info['alpha'], rslora=info['rslora']))
  method.init(jax.random.key(0), model, {**params, 'classifier': head}, inputs)
  merged = tree.flatten(method.merge(params, lora))

  w = _torch_weights(minilm_dir)
  ours = {  # HF module -> our weight path and its shape
      'encoder.layer.0.attention.self.query': ('encoder/layer_0/attention/query/kernel',
                                               (384, 12, 32)),
      'encoder.layer.0.attention.self.value': ('encoder/layer_0/attention/value/kernel',
                                               (384, 12, 32)),
      'encoder.layer.1.attention.self.value': ('encoder/layer_1/attention/value/kernel',
                                               (384, 12, 32)),
      'encoder.layer.0.attention.output.dense': ('encoder/layer_0/attention/out/kernel',
                                                 (12, 32, 384)),
      'encoder.layer.1.intermediate.dense': ('encoder/layer_1/intermediate/kernel', (384, 1536)),
      'encoder.layer.1.output.dense': ('encoder/layer_1/output/kernel', (1536, 384)),
  }
  for name, (path, shape) in ours.items():
    a = tensors[f'{P}bert.{name}.lora_A.weight'].astype(np.float64)
    b = tensors[f'{P}bert.{name}.lora_B.weight'].astype(np.float64)
    ref_torch = w[f'{name}.weight'] + ref_scale[name] * b @ a  # (out, in)
    np.testing.assert_allclose(np.asarray(merged[path]), ref_torch.T.reshape(shape), atol=1e-6,
                               rtol=0, err_msg=name)
  a = tensors[f'{P}bert.{emb}.lora_embedding_A'].astype(np.float64)
  b = tensors[f'{P}bert.{emb}.lora_embedding_B'].astype(np.float64)
  ref_table = w[f'{emb}.weight'] + ref_scale[emb] * (b @ a).T  # (vocab, dim)
  np.testing.assert_allclose(np.asarray(merged['encoder/embeddings/word_embeddings/embedding']),
                             ref_table, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(head['kernel'], tensors[f'{P}classifier.weight'].T)


# ----------------------------------------------------------------------------- bad adapters


@pytest.fixture
def adapter(tmp_path, small):
  cfg, params, *_, lora = small
  return save_peft_adapter(tmp_path / 'good', lora, rank=R, alpha=ALPHA,
                           head=params['classifier'])


def _edit_config(path, **changes):
  cfg = json.loads((path / 'adapter_config.json').read_text())
  cfg.update(changes)
  (path / 'adapter_config.json').write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
  t = load_file(str(path / 'adapter_model.safetensors'))
  fn(t)
  save_file(t, str(path / 'adapter_model.safetensors'))


@pytest.mark.parametrize('field,value', [
    ('peft_type', 'IA3'), ('use_dora', True), ('bias', 'all'), ('lora_bias', True),
    ('init_lora_weights', 'pissa_niter_4'), ('layer_replication', [[0, 1]]), ('r', 0),
])
def test_unsupported_config_fields_are_named(adapter, small, field, value):
  _edit_config(adapter, **{field: value})
  with pytest.raises(PeftFormatError, match=field) as e:
    load_peft_adapter(adapter, small[0])
  assert 'adapter_config.json' in str(e.value) and repr(value) in str(e.value)


def test_missing_files_are_named(adapter, small):
  cfg = small[0]
  (adapter / 'adapter_model.safetensors').rename(adapter / 'adapter_model.bin')
  with pytest.raises(PeftFormatError, match='only safetensors is supported'):
    load_peft_adapter(adapter, cfg)
  (adapter / 'adapter_config.json').unlink()
  with pytest.raises(PeftFormatError, match='has no adapter_config.json'):
    load_peft_adapter(adapter, cfg)


def test_fan_in_fan_out_is_ignored_for_linear_as_peft_does(adapter, small):
  cfg = small[0]
  plain, _, _ = load_peft_adapter(adapter, cfg)
  _edit_config(adapter, fan_in_fan_out=True)
  flipped, _, _ = load_peft_adapter(adapter, cfg)
  _flat_equal(flipped, plain)


def test_unknown_key_lists_valid_patterns(adapter, small):
  key = P + 'bert.pooler.dense.lora_A.weight'
  _edit_tensors(adapter, lambda t: t.update({key: np.zeros((R, 384), np.float32)}))
  with pytest.raises(PeftFormatError, match='unknown key') as e:
    load_peft_adapter(adapter, small[0])
  assert key in str(e.value) and 'attention.self.{query,key,value}' in str(e.value)


def test_shape_mismatch_names_key_got_and_expected(adapter, small):
  key = P + 'bert.encoder.layer.0.intermediate.dense.lora_B.weight'
  _edit_tensors(adapter, lambda t: t.update({key: np.zeros((384, R), np.float32)}))
  with pytest.raises(PeftFormatError) as e:
    load_peft_adapter(adapter, small[0])
  assert key in str(e.value) and '(384, 4)' in str(e.value) and '(1536, 4)' in str(e.value)
  _edit_config(adapter, r=8)  # the config's rank disagrees with every tensor
  with pytest.raises(PeftFormatError, match=r'has shape \(4, \d+\), expected \(8, \d+\)'):
    load_peft_adapter(adapter, small[0])


def test_layer_beyond_the_model_and_missing_partner(adapter, small):
  cfg = small[0]
  one_layer = type(cfg)(**{**cfg.__dict__, 'num_layers': 1})
  with pytest.raises(PeftFormatError, match=r'layer 1, but the model has 1 layers \(valid: 0..0\)'):
    load_peft_adapter(adapter, one_layer)
  key = P + 'bert.encoder.layer.0.attention.self.query.lora_B.weight'
  _edit_tensors(adapter, lambda t: t.pop(key))
  with pytest.raises(PeftFormatError, match='has no lora_B partner'):
    load_peft_adapter(adapter, cfg)


def test_unsupported_sites_are_refused_on_export(small):
  *_, lora = small
  bad = {**lora, 'classifier': {'lora_a': np.zeros((384, R)), 'lora_b': np.zeros((R, C))}}
  with pytest.raises(PeftFormatError, match="'classifier' has no HF PEFT equivalent"):
    to_peft(bad, rank=R, alpha=ALPHA)
