"""HF interop: merged BERT exports, PEFT-format LoRA adapters (names, shapes, scaling, errors)."""
import json
import math
import os
import pathlib
import re
import subprocess
import sys

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
EXPORT_FILES = ['config.json', 'model.safetensors', 'special_tokens_map.json', 'tokenizer.json',
                'tokenizer_config.json', 'vocab.txt']
TARGETS = (r'(attention/(query|value|out)/kernel|intermediate/kernel|'
           r'word_embeddings/embedding)$')
P = 'base_model.model.'


def _lora_cfg(**lora):
  """A ``peft`` section for LoRA; ``lora`` sets fields of ``peft.lora``."""
  base = dict(rank=R, alpha=ALPHA, dropout=0.0, targets=TARGETS, rslora=False)
  return ml_collections.ConfigDict({'method': 'lora', 'head': '', 'lora': {**base, **lora}})


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
  assert sorted(os.listdir(out)) == EXPORT_FILES
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
  assert sorted(os.listdir(out)) == EXPORT_FILES
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
  fresh = method.init(jax.random.key(0), model, params, inputs)
  assert sorted(s.path for s in method.sites(params, fresh)) == sites


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
  key = P + 'bert.encoder.layer.0.output.LayerNorm.lora_A.weight'
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


# ----------------------------------------------------------------------------- HF references
# tests/fixtures/hf_peft: adapters written by PyTorch PEFT over the bundled MiniLM, with the
# outputs transformers + peft compute from them (tests/fixtures/make_hf_peft_reference.py).

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'hf_peft'
ROOT = pathlib.Path(__file__).resolve().parents[1]
HUB_ID = 'sentence-transformers/all-MiniLM-L6-v2'


@pytest.fixture(scope='module')
def ref():
  r = np.load(FIXTURES / 'reference.npz')
  return {k: r[k] for k in r.files}


def _inputs(ref):
  return {k: ref[k] for k in ('input_ids', 'attention_mask', 'token_type_ids')}


@pytest.fixture(scope='module')
def minilm_pooler(minilm, minilm_dir):
  """(cfg, encoder, pooler) of the full bundled MiniLM-L6."""
  from peftjax.models.hf_bert import load_pooler
  cfg, enc = minilm
  return cfg, enc, load_pooler(minilm_dir, cfg)


@pytest.fixture(scope='module')
def all_linear_lib():
  """A library built for the HF all-linear SEQ_CLS adapter (its pooling selected)."""
  from peftjax.serving import hf
  return hf.library_from_peft(FIXTURES / 'seq_cls_all_linear')


def _run_lora(cfg, params, info, lora, inputs, pooling, classes=C):
  """(implicit LoRA logits, logits of the merged model), each one jitted forward."""
  model = BertClassifier(cfg, num_classes=classes, pooling=pooling)
  method = peft.build(_lora_cfg(targets=info['targets'], rank=info['rank'], alpha=info['alpha'],
                                rslora=info['rslora']))
  method.init(jax.random.key(0), model, params, inputs)
  implicit = jax.jit(lambda p, l, x: peft.apply(model, method, p, l, x))(params, lora, inputs)
  merged = jax.jit(lambda p, x: model.apply({'params': p}, **x))(method.merge(params, lora),
                                                                  inputs)
  return np.asarray(implicit), np.asarray(merged)


def test_cls_pooler_reads_the_checkpoint_pooler(minilm_pooler, minilm_dir):
  cfg, enc, pooler = minilm_pooler
  t = load_file(str(minilm_dir / 'model.safetensors'))
  np.testing.assert_array_equal(pooler['kernel'], t['pooler.dense.weight'].T)
  np.testing.assert_array_equal(pooler['bias'], t['pooler.dense.bias'])
  # logits = classifier(tanh(pooler(h[CLS]))), as BertForSequenceClassification computes them
  rng = np.random.default_rng(3)
  head = {'kernel': rng.normal(0, 0.1, (384, 2)).astype(np.float32),
          'bias': rng.normal(0, 0.1, (2,)).astype(np.float32)}
  ids = rng.integers(1000, 5000, (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  from peftjax.models import BertEncoder
  cfg2 = type(cfg)(**{**cfg.__dict__, 'num_layers': 1})
  enc2 = {k: v for k, v in enc.items() if k in ('embeddings', 'layer_0')}
  h0 = np.asarray(jax.jit(BertEncoder(cfg2).apply)({'params': enc2}, ids, mask))[:, 0]
  want = np.tanh(h0.astype(np.float64) @ t['pooler.dense.weight'].T.astype(np.float64)
                 + t['pooler.dense.bias'])
  want = want @ head['kernel'] + head['bias']
  model = BertClassifier(cfg2, 2, pooling='cls_pooler')
  got = jax.jit(model.apply)({'params': {'encoder': enc2, 'pooler': pooler, 'classifier': head}},
                             ids, mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # The pooled path without the pooler ('cls') differs: the pooler is not a no-op.
  plain = jax.jit(BertClassifier(cfg2, 2, pooling='cls').apply)(
      {'params': {'encoder': enc2, 'classifier': head}}, ids, mask)
  assert float(np.abs(np.asarray(plain) - want).max()) > 1e-2


@pytest.mark.parametrize('name', ['seq_cls_qv', 'seq_cls_all_linear'])
def test_hf_seq_cls_adapter_reproduces_transformers_logits(ref, minilm_pooler, name):
  """The usual HF recipe (BertForSequenceClassification + PEFT LoRA, the classifier in
  modules_to_save) and an all-linear adapter (bert.pooler.dense included, rsLoRA, rank and alpha
  patterns): with pooling='cls_pooler' the logits equal PyTorch's, implicit and merged."""
  cfg, enc, pooler = minilm_pooler
  lora, head, info = load_peft_adapter(FIXTURES / name, cfg, pooling='cls_pooler')
  assert info['pooling'] == 'cls_pooler' and info['unused'] == [] and info['pooler'] is None
  assert ('pooler' in lora) == (name == 'seq_cls_all_linear')
  params = {'encoder': enc, 'pooler': pooler, 'classifier': head}
  implicit, merged = _run_lora(cfg, params, info, lora, _inputs(ref), 'cls_pooler')
  want = ref[f'{name}_logits']
  assert float(np.abs(want).max()) > 0.1
  np.testing.assert_allclose(implicit, want, atol=2e-5, rtol=0)
  np.testing.assert_allclose(merged, want, atol=2e-5, rtol=0)


def test_library_from_peft_selects_the_pooler_and_serves_exactly(ref, all_linear_lib):
  lib, names, info = all_linear_lib
  assert lib.module.pooling == 'cls_pooler' and names == ['LABEL_0', 'LABEL_1', 'LABEL_2']
  assert info['base_model_name_or_path'] == HUB_ID
  np.testing.assert_allclose(lib.logits(_inputs(ref)), ref['seq_cls_all_linear_logits'],
                             atol=2e-5, rtol=0)


def test_bert_model_all_linear_pooler_lora_applies_only_with_the_pooler(ref, minilm_pooler):
  """A bare-BertModel all-linear adapter: with mean pooling its pooler LoRA is left out (the
  mean embedding equals transformers'); with 'cls_pooler' it gives transformers' pooler_output."""
  cfg, enc, pooler = minilm_pooler
  inputs = _inputs(ref)
  lora, head, info = load_peft_adapter(FIXTURES / 'bert_model_all_linear', cfg, pooling='mean')
  assert head is None and info['pooling'] is None and info['unused'] == ['pooler.dense']
  assert 'pooler' not in lora and 'pooler' not in info['targets']
  dummy = {'kernel': np.zeros((384, 2), np.float32), 'bias': np.zeros((2,), np.float32)}
  model = BertClassifier(cfg, 2, pooling='mean')
  method = peft.build(_lora_cfg(targets=info['targets'], rank=info['rank'], alpha=info['alpha']))
  method.init(jax.random.key(0), model, {'encoder': enc, 'classifier': dummy}, inputs)
  merged = method.merge({'encoder': enc, 'classifier': dummy}, lora)
  from peftjax.models import sentence_embedding
  mean = jax.jit(lambda e, x: sentence_embedding(cfg, e, x['input_ids'], x['attention_mask'],
                                                 x['token_type_ids'], normalize=False))(
                                                     merged['encoder'], inputs)
  np.testing.assert_allclose(mean, ref['bert_model_all_linear_mean'], atol=2e-5, rtol=0)

  lora, _, info = load_peft_adapter(FIXTURES / 'bert_model_all_linear', cfg,
                                    pooling='cls_pooler')
  assert 'pooler' in lora and info['unused'] == []
  model = BertClassifier(cfg, 2, pooling='cls_pooler')
  params = {'encoder': enc, 'pooler': pooler, 'classifier': dummy}
  method = peft.build(_lora_cfg(targets=info['targets'], rank=info['rank'], alpha=info['alpha']))
  method.init(jax.random.key(0), model, params, inputs)
  merged = method.merge(params, lora)
  from peftjax.models import BertEncoder
  h0 = np.asarray(jax.jit(BertEncoder(cfg).apply)(
      {'params': merged['encoder']}, inputs['input_ids'], inputs['attention_mask'],
      inputs['token_type_ids']))[:, 0]
  pooled = np.tanh(h0 @ merged['pooler']['kernel'] + merged['pooler']['bias'])
  np.testing.assert_allclose(pooled, ref['bert_model_all_linear_pooler'], atol=2e-5, rtol=0)


def test_seq_cls_head_is_refused_with_another_pooling(ref, minilm_pooler, tmp_path):
  cfg, *_ = minilm_pooler
  for pooling in ('mean', 'cls'):
    with pytest.raises(PeftFormatError) as e:
      load_peft_adapter(FIXTURES / 'seq_cls_qv', cfg, pooling=pooling)
    msg = str(e.value)
    assert "tanh pooler on [CLS]" in msg and f"model.pooling={pooling!r}" in msg
    assert "valid: model.pooling='cls_pooler'" in msg and '\n' not in msg
  # A library of another pooling refuses it and stays as it was.
  from peftjax.serving import AdapterLibrary
  from peftjax.serving import hf
  _, enc, _ = minilm_pooler
  head = {'kernel': np.zeros((384, C), np.float32), 'bias': np.zeros((C,), np.float32)}
  lib = AdapterLibrary(BertClassifier(cfg, C, pooling='mean'),
                       {'encoder': enc, 'classifier': head}, max_rank=4)
  with pytest.raises(PeftFormatError, match="valid: model.pooling='cls_pooler'"):
    hf.load_peft(lib, 'hub', FIXTURES / 'seq_cls_qv')
  assert lib.names == []


# ----------------------------------------------------------------------------- exports of a cls_pooler model


def test_cls_pooler_merged_export_is_a_bert_for_sequence_classification(tmp_path, ref,
                                                                        all_linear_lib):
  from peftjax.serving import hf
  lib, *_ = all_linear_lib
  out = hf.export_merged(lib, 'adapter', tmp_path / 'm')
  assert sorted(os.listdir(out)) == EXPORT_FILES
  config = json.loads((out / 'config.json').read_text())
  assert config['architectures'] == ['BertForSequenceClassification']
  assert config['num_labels'] == 3 and config['peftjax']['pooling'] == 'cls_pooler'
  assert config['peftjax']['base_model'] == HUB_ID and config['peftjax']['source'] == HUB_ID
  keys = set(load_file(str(out / 'model.safetensors')))
  assert {'bert.pooler.dense.weight', 'bert.pooler.dense.bias', 'classifier.weight',
          'bert.encoder.layer.5.output.dense.weight'} <= keys
  assert not any(k.startswith(('encoder.', 'embeddings.', 'pooler.')) for k in keys)
  cfg, params, pooling, names = load_bert_classifier(out)
  assert pooling == 'cls_pooler' and sorted(params) == ['classifier', 'encoder', 'pooler']
  logits = jax.jit(BertClassifier(cfg, 3, pooling=pooling).apply)({'params': params},
                                                                   **_inputs(ref))
  np.testing.assert_allclose(logits, ref['seq_cls_all_linear_logits'], atol=2e-5, rtol=0)
  # The tokenizer is the one the model was trained with, byte for byte.
  from peftjax.data import minilm_dir
  for f in EXPORT_FILES[2:]:
    assert (out / f).read_bytes() == (minilm_dir() / f).read_bytes(), f


def test_all_linear_peft_export_is_what_peft_writes(tmp_path, ref, all_linear_lib):
  """Our PEFT export of an all-linear adapter has PEFT's keys (pooler included), its
  target_modules for 'all-linear', the classifier in modules_to_save, a portable base name,
  and imports back to the same logits."""
  from peftjax.serving import hf
  lib, *_ = all_linear_lib
  out = hf.export_peft(lib, 'adapter', tmp_path / 'p')
  assert sorted(os.listdir(out)) == ['adapter_config.json', 'adapter_model.safetensors']
  config = json.loads((out / 'adapter_config.json').read_text())
  hf_config = json.loads((FIXTURES / 'seq_cls_all_linear' / 'adapter_config.json').read_text())
  assert config['task_type'] == 'SEQ_CLS' and config['modules_to_save'] == ['classifier']
  assert config['target_modules'] == sorted(hf_config['target_modules'])
  assert config['base_model_name_or_path'] == HUB_ID
  ours = load_file(str(out / 'adapter_model.safetensors'))
  theirs = load_file(str(FIXTURES / 'seq_cls_all_linear' / 'adapter_model.safetensors'))
  assert set(ours) == set(theirs)
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  lib2, _, _ = hf.library_from_peft(out)
  np.testing.assert_allclose(lib2.logits(_inputs(ref)), ref['seq_cls_all_linear_logits'],
                             atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- other poolings


def test_mean_head_exports_as_bert_model_adapter_plus_head_file(tmp_path, small):
  """A mean-pooled head has no BertForSequenceClassification form: the adapter is a bare
  BertModel one (exact for transformers' BertModel), the head beside it in peftjax_head; it
  imports back exactly with 'mean' and is refused with 'cls_pooler'."""
  from peftjax.hf.peft_lora import HEAD_NAME
  cfg, params, *_, lora = small
  out = save_peft_adapter(tmp_path / 'a', lora, rank=R, alpha=ALPHA, head=params['classifier'],
                          pooling='mean', class_names=['x', 'y', 'z'])
  assert sorted(os.listdir(out)) == ['adapter_config.json', 'adapter_model.safetensors',
                                     HEAD_NAME]
  config = json.loads((out / 'adapter_config.json').read_text())
  assert config['task_type'] == 'FEATURE_EXTRACTION' and config['modules_to_save'] is None
  keys = set(load_file(str(out / 'adapter_model.safetensors')))
  assert not any(k.startswith(P + 'bert.') or 'classifier' in k for k in keys)
  with safe_open(str(out / HEAD_NAME), 'np') as f:
    assert f.metadata()['pooling'] == 'mean'
  lora2, head, info = load_peft_adapter(out, cfg, pooling='mean')
  _flat_equal(lora2, lora)
  _flat_equal(head, params['classifier'])
  assert info['pooling'] == 'mean' and info['class_names'] == ['x', 'y', 'z']
  with pytest.raises(PeftFormatError, match=r"the mean over tokens .*valid: model.pooling='mean'"):
    load_peft_adapter(out, cfg, pooling='cls_pooler')


def test_pooler_lora_and_trained_pooler_round_trip_through_modules_to_save(tmp_path, small):
  cfg, params, *_, lora = small
  rng = np.random.default_rng(5)
  with_pooler = {**lora, 'pooler': {'lora_a': rng.normal(0, .1, (384, 2)).astype(np.float32),
                                    'lora_b': rng.normal(0, .1, (2, 384)).astype(np.float32)}}
  pooler = {'kernel': rng.normal(0, .1, (384, 384)).astype(np.float32),
            'bias': rng.normal(0, .1, (384,)).astype(np.float32)}
  config, tensors = to_peft(with_pooler, rank=R, alpha=ALPHA, head=params['classifier'],
                            pooler=pooler)
  assert config['modules_to_save'] == ['classifier', 'pooler']
  assert 'pooler.dense' in config['target_modules']
  assert config['rank_pattern'] == {'pooler.dense': 2}
  assert P + 'bert.pooler.dense.lora_A.weight' in tensors
  np.testing.assert_array_equal(tensors[P + 'bert.pooler.dense.weight'], pooler['kernel'].T)
  out = save_peft_adapter(tmp_path / 'a', with_pooler, rank=R, alpha=ALPHA,
                          head=params['classifier'], pooler=pooler)
  lora2, head, info = load_peft_adapter(out, cfg, pooling='cls_pooler')
  _flat_equal(lora2, with_pooler)
  _flat_equal(info['pooler'], pooler)
  assert info['targets'].endswith('|pooler/kernel)$')
  with pytest.raises(PeftFormatError, match="only a model with pooling='cls_pooler'"):
    to_peft(with_pooler, rank=R, alpha=ALPHA, head=params['classifier'], pooling='mean')


def test_peft_configs_name_the_base_portably(tmp_path, small, minilm_dir):
  *_, lora = small
  name = lambda src: to_peft(lora, rank=R, alpha=ALPHA, base_model_name_or_path=src)[0][
      'base_model_name_or_path']
  assert name(str(minilm_dir)) == HUB_ID
  assert name('bert-base-uncased') == 'bert-base-uncased' and name(HUB_ID) == HUB_ID
  other = tmp_path / 'my_bert'
  other.mkdir()
  assert name(str(other)) == 'my_bert'
  (other / 'config.json').write_text(json.dumps({'peftjax': {'base_model': 'org/base'}}))
  assert name(str(other)) == 'org/base'
  assert name('') is None


def test_merged_export_of_a_mean_model_keeps_the_base_pooler(tmp_path, small, minilm_dir):
  """The base's pooler is written (so BertModel loads complete and the export can serve a
  'cls_pooler' run), unused by the mean head; no absolute path is written."""
  from peftjax.serving import AdapterLibrary
  from peftjax.serving import hf
  cfg, params, _, model, *_ = small
  lib = AdapterLibrary(model, params, max_rank=4, base_source=str(minilm_dir))
  lib.add_trained('a', {'base': {'classifier': params['classifier']}, 'peft': {}},
                  'linear_probe', {'method': 'linear_probe'})
  out = hf.export_merged(lib, 'a', tmp_path / 'm')
  t = load_file(str(out / 'model.safetensors'))
  src = load_file(str(minilm_dir / 'model.safetensors'))
  np.testing.assert_array_equal(t['pooler.dense.weight'], src['pooler.dense.weight'])
  config = json.loads((out / 'config.json').read_text())
  assert config['architectures'] == ['BertModel'] and config['peftjax']['pooling'] == 'mean'
  text = (out / 'config.json').read_text()
  assert str(minilm_dir) not in text and str(tmp_path) not in text
  assert config['peftjax']['base_model'] == HUB_ID


def test_full_depth_cls_pooler_run_exports_to_peft_and_merged(tmp_path):
  """A run of every linear layer with BERT's pooler ('all-linear' style) -> delta checkpoint ->
  PEFT export (PEFT's all-linear config) and merged export, both serving its logits."""
  from configs import tiny
  from peftjax import run
  from peftjax.serving import hf
  from peftjax.serving.files import library_from_files
  c = tiny.get_config()
  c.model.num_layers = 0
  c.model.pooling = 'cls_pooler'
  c.peft.lora.rank = 2
  c.peft.lora.targets = r'(query|key|value|out|intermediate|output|pooler)/kernel$'
  setup = run.build_setup(c)
  assert 'pooler' in setup.trainable['peft']
  rng = np.random.default_rng(0)
  trainable = tree.map_with_path(
      lambda p, x: np.asarray(x) + rng.normal(0, 0.05, np.shape(x)).astype(np.float32),
      setup.trainable)
  path = tmp_path / 'adapter.safetensors'
  run.write_adapter(path, c, setup, trainable, setup.frozen)
  inputs = {k: v[:, :12] for k, v in _inputs(np.load(FIXTURES / 'reference.npz')).items()}
  base = tree.combine(setup.frozen, trainable['base'])
  want = np.asarray(jax.jit(lambda p, l, x: peft.apply(setup.built.module, setup.method, p,
                                                       l, x))(base, trainable['peft'], inputs))

  lib, _, _ = library_from_files({'orig': str(path)})
  peft_dir = hf.export_peft(lib, 'orig', tmp_path / 'peft')  # what export.run(fmt='peft') does
  config = json.loads((peft_dir / 'adapter_config.json').read_text())
  assert config['target_modules'] == ['dense', 'key', 'query', 'value']
  assert config['task_type'] == 'SEQ_CLS' and config['base_model_name_or_path'] == HUB_ID
  assert P + 'bert.pooler.dense.lora_B.weight' in load_file(str(peft_dir /
                                                                'adapter_model.safetensors'))
  hf.load_peft(lib, 'imported', peft_dir)
  for name in ('orig', 'imported'):
    np.testing.assert_allclose(lib.logits(inputs, name), want, atol=2e-5, rtol=0)
  merged = hf.export_merged(lib, 'orig', tmp_path / 'merged')
  cfg, params, pooling, names = load_bert_classifier(merged)
  assert pooling == 'cls_pooler' and names == ['rotten', 'fresh']
  logits = jax.jit(BertClassifier(cfg, 2, pooling=pooling).apply)({'params': params}, **inputs)
  np.testing.assert_allclose(logits, want, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- bad inputs


def _copy_dir(src, dst, skip=()):
  """A copy of an HF directory's files (symlinks to them), without the names in ``skip``."""
  dst.mkdir()
  for f in os.listdir(src):
    if f not in skip and (src / f).is_file():
      os.symlink(src / f, dst / f)
  return dst


@pytest.mark.parametrize('missing', ['config.json', 'model.safetensors', 'tokenizer.json'])
def test_model_dir_missing_a_file_is_named(tmp_path, minilm_dir, missing):
  from peftjax.models.hf_bert import check_model_dir
  d = _copy_dir(minilm_dir, tmp_path / 'm', skip=(missing,))
  with pytest.raises(CheckpointError) as e:
    check_model_dir(d)
  msg = str(e.value)
  assert f"model.pretrained='{d}': the directory has no {missing}" in msg
  assert 'config.json, model.safetensors, tokenizer.json' in msg and '\n' not in msg


def test_model_dir_other_faults_are_named(tmp_path, minilm_dir, small):
  from peftjax.models.hf_bert import check_model_dir
  with pytest.raises(CheckpointError, match='does not exist'):
    check_model_dir(tmp_path / 'nope')
  (tmp_path / 'file').write_text('x')
  with pytest.raises(CheckpointError, match='is a file'):
    check_model_dir(tmp_path / 'file')
  d = _copy_dir(minilm_dir, tmp_path / 'corrupt', skip=('model.safetensors',))
  (d / 'model.safetensors').write_bytes(b'\x00' * 64)
  with pytest.raises(CheckpointError, match=r'cannot read .*model.safetensors'):
    check_model_dir(d)
  # 'cls_pooler' needs the checkpoint's pooler: an export of a model without one has none.
  cfg, params, *_ = small
  out = export_bert(tmp_path / 'nopooler', cfg, params, pooling='mean')
  check_model_dir(out)
  with pytest.raises(CheckpointError) as e:
    check_model_dir(out, pooling='cls_pooler')
  assert "no 'pooler.dense.weight'" in str(e.value) and "model.pooling='mean'" in str(e.value)


def test_export_needs_the_tokenizer_and_writes_nothing_without_it(tmp_path, small, minilm_dir):
  cfg, params, *_ = small
  tok = _copy_dir(minilm_dir, tmp_path / 'tok', skip=('tokenizer.json',))
  with pytest.raises(ExportError, match="has no tokenizer.json"):
    export_bert(tmp_path / 'out', cfg, params, pooling='mean', tokenizer_dir=tok)
  assert not (tmp_path / 'out').exists()
  small_vocab = type(cfg)(**{**cfg.__dict__, 'vocab_size': 100})
  enc = {**params['encoder'], 'embeddings': {
      **params['encoder']['embeddings'],
      'word_embeddings': {'embedding': np.zeros((100, 384), np.float32)}}}
  with pytest.raises(ExportError, match='30522 token ids but the model embeds 100'):
    export_bert(tmp_path / 'out', small_vocab, {**params, 'encoder': enc}, pooling='mean')
  assert not (tmp_path / 'out').exists()


def _hf_copy(tmp_path, name='seq_cls_qv'):
  d = tmp_path / name
  d.mkdir(parents=True)
  for f in ('adapter_config.json', 'adapter_model.safetensors'):
    (d / f).write_bytes((FIXTURES / name / f).read_bytes())
  return d


def test_bad_hf_adapters_are_one_line_each(tmp_path, minilm_pooler):
  from peftjax import errors
  cfg, *_ = minilm_pooler
  cases = []
  d = _hf_copy(tmp_path / '1')  # another architecture: RoBERTa's module names
  _edit_tensors(d, lambda t: t.update({k.replace('.bert.', '.roberta.'): t.pop(k)
                                       for k in list(t) if '.bert.' in k}))
  cases.append((d, r"under 'roberta': an adapter for another architecture"))
  d = _hf_copy(tmp_path / '2')  # another hidden size (768, as bert-base)
  _edit_tensors(d, lambda t: t.update({k: np.zeros((4, 768), np.float32) for k in list(t)
                                       if k.endswith('lora_A.weight')}))
  cases.append((d, r'has shape \(4, 768\), expected \(4, 384\) .*hidden_size=384'))
  d = _hf_copy(tmp_path / '3')
  (d / 'adapter_model.safetensors').write_bytes(
      (FIXTURES / 'seq_cls_qv' / 'adapter_model.safetensors').read_bytes()[:5000])
  cases.append((d, r'cannot read .*adapter_model.safetensors.*corrupt or truncated'))
  d = _hf_copy(tmp_path / '4')
  _edit_config(d, task_type='TOKEN_CLS')
  cases.append((d, r"task_type='TOKEN_CLS'; supported: SEQ_CLS, FEATURE_EXTRACTION"))
  d = _hf_copy(tmp_path / '5')  # a SEQ_CLS adapter whose classifier was not saved
  _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if 'classifier' in k])
  cases.append((d, r"task_type='SEQ_CLS' but adapter_model.safetensors has no classifier"))
  d = _hf_copy(tmp_path / '6')
  _edit_config(d, use_qalora=True)
  cases.append((d, r'use_qalora=True; supported: false/null'))
  d = _hf_copy(tmp_path / '7')
  (d / 'adapter_config.json').write_text('[1, 2]')
  cases.append((d, r'holds a JSON list; valid: a JSON object'))
  cases.append((tmp_path / 'absent', r'does not exist; valid: a Hugging Face PEFT adapter'))
  for d, pattern in cases:
    with pytest.raises(PeftFormatError) as e:
      load_peft_adapter(d, cfg, pooling='cls_pooler')
    line = errors.describe(e.value)
    assert line == str(e.value) and '\n' not in line, d
    assert re.search(pattern, line), (d, line)


# ----------------------------------------------------------------------------- entry points


def _cli(module, *args, timeout=600):
  p = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=timeout, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  return p.returncode, p.stdout, p.stderr


def _error_line(err: str) -> str:
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  return lines[0]


@pytest.fixture(scope='module')
def hf_run(tmp_path_factory):
  """The HF SEQ_CLS adapter merged by the export CLI, then a tiny cls_pooler run on that export
  (its pooler LoRA-adapted) saving its adapter."""
  tmp = tmp_path_factory.mktemp('hf_run')
  code, out, err = _cli('peftjax.export', f'--adapter={FIXTURES / "seq_cls_qv"}',
                        f'--out={tmp / "merged"}')
  assert code == 0, err[-3000:]
  code, _, err = _cli('peftjax.main', '--config=configs/tiny.py', f'--workdir={tmp / "run"}',
                      f'--config.model.pretrained={tmp / "merged"}',
                      '--config.model.pooling=cls_pooler',
                      '--config.peft.lora.targets=(attention/(query|value)|pooler)/kernel$',
                      '--config.train.steps=2', '--config.optim.warmup_steps=0',
                      '--config.train.eval_before=False',
                      '--config.train.checkpoint_every=0', '--config.train.save_adapter=True')
  assert code == 0, err[-3000:]
  return tmp, out


def test_merged_export_serves_as_pretrained_for_a_cls_pooler_run(hf_run):
  tmp, out = hf_run
  assert 'exported' in out and sorted(os.listdir(tmp / 'merged')) == EXPORT_FILES
  config = json.loads((tmp / 'merged' / 'config.json').read_text())
  assert config['architectures'] == ['BertForSequenceClassification']
  summary = json.loads((tmp / 'run' / 'summary.json').read_text())
  assert summary['config']['model']['pooling'] == 'cls_pooler'
  assert (tmp / 'run' / 'adapter.safetensors').is_file()


def test_pretrained_dir_without_tokenizer_is_refused_before_the_workdir(hf_run, tmp_path):
  tmp, _ = hf_run
  bad = _copy_dir(tmp / 'merged', tmp_path / 'old_export', skip=('tokenizer.json',))
  wd = tmp_path / 'wd'
  code, _, err = _cli('peftjax.main', '--config=configs/tiny.py', f'--workdir={wd}',
                      f'--config.model.pretrained={bad}')
  line = _error_line(err)
  assert code == 1 and f"config.model.pretrained='{bad}'" in line
  assert 'the directory has no tokenizer.json' in line
  assert not wd.exists()


def test_peft_export_of_a_truncated_model_is_refused(hf_run, tmp_path):
  tmp, _ = hf_run
  out = tmp_path / 'peft'
  code, _, err = _cli('peftjax.export', f'--adapter={tmp / "run" / "adapter.safetensors"}',
                      '--format=peft', f'--out={out}')
  line = _error_line(err)
  assert code == 1 and 'num_layers=1 (checkpoint: 6)' in line and '--format=merged' in line
  assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize('fault,pattern', [
    ('no_weights', r'has no adapter_model.safetensors'),
    ('corrupt', r'cannot read .*adapter_model.safetensors.*corrupt or truncated'),
    ('architecture', r"under 'roberta': an adapter for another architecture"),
    ('hidden_size', r'has shape \(4, 768\), expected \(4, 384\)'),
])
def test_export_cli_refuses_bad_hf_adapters(tmp_path, fault, pattern):
  d = _hf_copy(tmp_path)
  weights = d / 'adapter_model.safetensors'
  if fault == 'no_weights':
    weights.unlink()
  elif fault == 'corrupt':
    weights.write_bytes(weights.read_bytes()[:5000])
  elif fault == 'architecture':
    _edit_tensors(d, lambda t: t.update({k.replace('.bert.', '.roberta.'): t.pop(k)
                                         for k in list(t) if '.bert.' in k}))
  else:
    _edit_tensors(d, lambda t: t.update({k: np.zeros((4, 768), np.float32) for k in list(t)
                                         if k.endswith('lora_A.weight')}))
  out = tmp_path / 'out'
  code, _, err = _cli('peftjax.export', f'--adapter={d}', f'--out={out}')
  assert code == 1 and re.search(pattern, _error_line(err)), err[-2000:]
  assert not out.exists() and sorted(os.listdir(tmp_path)) == [d.name]
