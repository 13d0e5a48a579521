"""The BERT port matches sentence-transformers exactly; the importer rejects bad directories."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from peftjax.models import BertClassifier
from peftjax.models import BertConfig
from peftjax.models import BertEncoder
from peftjax.models import CheckpointError
from peftjax.models import CNN
from peftjax.models import MLP
from peftjax.models import load_bert
from peftjax.models import sentence_embedding
from peftjax.models import grad_barrier

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'minilm_reference.npz'


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(FIXTURE))


def test_hidden_states_match_reference(minilm, ref):
  cfg, enc = minilm
  h = BertEncoder(cfg).apply({'params': enc}, ref['input_ids'], ref['attention_mask'],
                             ref['token_type_ids'])
  m = ref['attention_mask'][..., None].astype(bool)
  np.testing.assert_allclose(np.where(m, h, 0), np.where(m, ref['last_hidden_state'], 0),
                             atol=1e-4, rtol=0)


def test_sentence_embeddings_match_reference(minilm, ref):
  cfg, enc = minilm
  e = sentence_embedding(cfg, enc, ref['input_ids'], ref['attention_mask'],
                         ref['token_type_ids'])
  np.testing.assert_allclose(e, ref['sentence_embeddings'], atol=1e-4, rtol=0)
  raw = sentence_embedding(cfg, enc, ref['input_ids'], ref['attention_mask'], normalize=False)
  np.testing.assert_allclose(raw, ref['mean_pooled'], atol=1e-4, rtol=0)


def test_our_tokenizer_reproduces_reference_ids(minilm_dir, ref):
  from peftjax.data import Tokenizer
  tok = Tokenizer(str(minilm_dir / 'tokenizer.json'), max_length=ref['input_ids'].shape[1])
  out = tok.encode([str(s) for s in ref['sentences']])
  np.testing.assert_array_equal(out['input_ids'], ref['input_ids'])
  np.testing.assert_array_equal(out['attention_mask'], ref['attention_mask'])


def test_import_layout_and_count(minilm):
  cfg, enc = minilm
  q = enc['layer_0']['attention']['query']['kernel']
  assert q.shape == (384, 12, 32)
  assert enc['layer_5']['attention']['out']['kernel'].shape == (12, 32, 384)
  # all-MiniLM-L6-v2 has 22,713,216 parameters in HF; its pooler (147,840) is unused and dropped.
  assert sum(x.size for x in jax.tree.leaves(enc)) == 22_565_376


def test_truncated_import_keeps_first_layers(minilm_dir, minilm):
  cfg3, enc3 = load_bert(minilm_dir, num_layers=3)
  assert cfg3.num_layers == 3 and sorted(k for k in enc3 if k.startswith('layer_')) == [
      'layer_0', 'layer_1', 'layer_2']
  np.testing.assert_array_equal(enc3['layer_2']['output']['kernel'],
                                minilm[1]['layer_2']['output']['kernel'])
  with pytest.raises(ValueError, match='only 6 layers'):
    load_bert(minilm_dir, num_layers=7)


def _copy_model(src, dst):
  dst.mkdir()
  for f in ('config.json', 'model.safetensors'):
    shutil.copy(src / f, dst / f)
  return dst


def test_importer_errors(minilm_dir, tmp_path):
  with pytest.raises(CheckpointError, match='no config.json'):
    load_bert(tmp_path)
  d = _copy_model(minilm_dir, tmp_path / 'm')
  tensors = load_file(str(d / 'model.safetensors'))
  del tensors['encoder.layer.3.attention.self.key.weight']
  save_file(tensors, str(d / 'model.safetensors'))
  with pytest.raises(CheckpointError, match='missing 1 tensors'):
    load_bert(d)
  cfg = json.loads((d / 'config.json').read_text())
  cfg['hidden_act'] = 'relu'
  (d / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="hidden_act='relu'"):
    load_bert(d)


def test_importer_accepts_bert_prefix_and_gamma_beta(minilm_dir, minilm, tmp_path):
  d = _copy_model(minilm_dir, tmp_path / 'm')
  t = load_file(str(d / 'model.safetensors'))
  renamed = {'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma')
             .replace('LayerNorm.bias', 'LayerNorm.beta'): v for k, v in t.items()}
  save_file(renamed, str(d / 'model.safetensors'))
  _, enc = load_bert(d)
  np.testing.assert_array_equal(enc['layer_4']['output_norm']['scale'],
                                minilm[1]['layer_4']['output_norm']['scale'])


def test_classifier_logical_axes():
  import flax.linen as nn
  model = BertClassifier(BertConfig(num_layers=1, vocab_size=64, hidden_size=32, num_heads=4,
                                    intermediate_size=64, max_position=16), num_classes=3)
  ids = jnp.ones((2, 8), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), ids, ids)['params']
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs['encoder']['layer_0']['attention']['query']['kernel']) == (
      'embed', 'heads', 'kv')
  assert tuple(specs['encoder']['layer_0']['intermediate']['kernel']) == ('embed', 'mlp')
  assert tuple(specs['classifier']['kernel']) == ('embed', 'classes')
  # Every parameter carries logical names.
  assert all(s is not None for s in jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))


def test_grad_barrier_is_identity_with_identity_gradient():
  x = jnp.arange(6.0).reshape(2, 3)
  f = lambda x: (jnp.sin(grad_barrier(x * 2.0)) ** 2).sum()
  g = lambda x: (jnp.sin(x * 2.0) ** 2).sum()
  np.testing.assert_array_equal(grad_barrier(x), x)
  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-6)


def test_barrier_does_not_change_model_gradients(minilm, ref):
  cfg, enc = minilm
  ids, mask = ref['input_ids'][:2, :16], ref['attention_mask'][:2, :16]
  grads = []
  for barrier in (True, False):
    c = BertConfig(**{**cfg.__dict__, 'grad_barrier': barrier, 'num_layers': 2})
    p = {k: v for k, v in enc.items() if k in ('embeddings', 'layer_0', 'layer_1')}
    loss = lambda p: (BertEncoder(c).apply({'params': p}, ids, mask) ** 2).mean()
    grads.append(jax.grad(loss)(p))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *grads)


@pytest.mark.parametrize('cls,shape', [(MLP, (8, 8, 1)), (CNN, (28, 28, 1))])
def test_vision_models_shapes(cls, shape):
  model = cls(num_classes=10)
  x = jnp.zeros((3, *shape))
  params = model.init(jax.random.key(0), x)
  assert model.apply(params, x).shape == (3, 10)


def test_barrier_survives_compilation_and_supports_jvp():
  x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  f = lambda x: jnp.tanh(grad_barrier(x * 3.0)).sum()
  hlo = jax.jit(jax.grad(f)).lower(x).compile().as_text()
  assert 'conditional' in hlo  # an XLA upgrade that folds the barrier away fails here
  y, t = jax.jvp(lambda x: grad_barrier(x) ** 2, (x,), (jnp.ones_like(x),))
  np.testing.assert_array_equal(y, x ** 2)
  np.testing.assert_allclose(t, 2 * x, rtol=1e-6)
