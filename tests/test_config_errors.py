"""Bad config files, overrides and values: one `error:` line naming the field, the bad value and
what is valid, exit 1, and no workdir, through the real entry points.

Most cases fail before jax is imported (well under a second each); the few that need the
model's parameter paths or the data set's size use configs/tiny.py.
"""
import importlib
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import ml_collections
import pytest

from configs import common
from peftjax import cli
from peftjax import validate
from peftjax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = '--config=configs/tiny.py'


def _run(module, args, tmp_path, env=None):
  workdir = tmp_path / 'w'
  p = subprocess.run([sys.executable, '-m', module, *args, f'--workdir={workdir}'], cwd=ROOT,
                     capture_output=True, text=True, timeout=600,
                     env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})})
  return p, workdir


def _assert_refused(p, workdir, words):
  errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
  assert len(errors) == 1, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr and 'unexpected' not in errors[0], p.stderr[-3000:]
  for w in words:
    assert w in errors[0], (w, errors[0])
  assert not workdir.exists()
  return errors[0]


# ---------------------------------------------------------------------------- config files

_FILES = {
    'syntax.py': 'def get_config(:\n  pass\n',
    'noget.py': 'X = 1\n',
    'raises.py': 'def get_config():\n  raise RuntimeError("boom")\n',
    'bad_import.py': 'import no_such_module\n\ndef get_config():\n  return None\n',
    'returns_none.py': 'def get_config():\n  c = 1\n',
}


@pytest.fixture
def config_files(tmp_path):
  d = tmp_path / 'cfg'
  d.mkdir()
  for name, text in _FILES.items():
    (d / name).write_text(text)
  return d


@pytest.mark.parametrize('spec,words', [
    ('{d}/missing.py', ['--config={d}/missing.py: no such file', 'configs/quickstart.py']),
    ('configs/quikstart.py', ['--config=configs/quikstart.py: no such file',
                              "did you mean 'configs/quickstart.py'?"]),
    ('{d}', ['--config={d}: is a directory, not a config file']),
    ('{d}/syntax.py', ['--config={d}/syntax.py: syntax error at line 1', 'def get_config(:']),
    ('{d}/noget.py', ['--config={d}/noget.py: the file defines no get_config()',
                      'def get_config(arg=None)']),
    ('{d}/raises.py', ['--config={d}/raises.py: get_config() raised RuntimeError: boom',
                       '(line 2)']),
    ('{d}/bad_import.py', ['--config={d}/bad_import.py: loading the file raised '
                           'ModuleNotFoundError', 'no_such_module', '(line 1)']),
    ('{d}/returns_none.py', ['--config={d}/returns_none.py: get_config() returned NoneType '
                             '(a missing return?)', 'valid: a ml_collections.ConfigDict']),
    ('configs/moe.py:lroa', ["--config=configs/moe.py:lroa: unknown variant 'lroa'",
                             "did you mean 'lora'?", "valid: 'full' (the default", "'lora'"]),
    ('configs/compression.py:magnitude60', ["unknown variant 'magnitude60'",
                                            "'teacher' (the default", "'magnitude50'",
                                            "'svd_quarter'"]),
    ('configs/quickstart.py:nosuch', ["--config=configs/quickstart.py:nosuch: unknown variant "
                                      "'nosuch': this config has no variants"]),
    ('configs/bitfit.py:x', ["--config=configs/bitfit.py:x: unknown variant 'x': this config has "
                             'no variants', 'valid: --config=configs/bitfit.py']),
])
def test_bad_config_file(tmp_path, config_files, spec, words):
  spec = spec.format(d=config_files)
  p, wd = _run('peftjax.main', [f'--config={spec}'], tmp_path)
  _assert_refused(p, wd, [w.format(d=config_files) for w in words])


@pytest.mark.parametrize('module,args,words', [
    ('peftjax.compress.deep', ['--config=configs/deep_compression.py:lenet'],
     ["--config=configs/deep_compression.py:lenet: unknown variant 'lenet'",
      "'mnist' (the default", "'minilm'"]),
    ('peftjax.compress.deep', ['--config=configs/deep_compression.py',
                               '--config.compress.share.bitz=4'],
     ["--config.compress.share.bitz: unknown field 'bitz' in section 'compress.share'",
      "did you mean 'bits'?"]),
    ('peftjax.quant.convert', ['--config=configs/nope.py'],
     ['--config=configs/nope.py: no such file']),
    ('peftjax.quant.convert', [TINY, '--config.train.steps=many'],
     ["--config.train.steps='many' is invalid; valid: an integer"]),
])
def test_every_entry_point_with_config_is_one_line(tmp_path, module, args, words):
  p, wd = _run(module, args, tmp_path)
  _assert_refused(p, wd, words)


# ---------------------------------------------------------------------------- overrides

_RULES_FORM = "pairs (logical axis name, mesh axes), the mesh axes None, one of 'data'"


@pytest.mark.parametrize('override,words', [
    ('--config.mesh.rules=((', ["config.mesh.rules='((' is invalid: it is not a Python tuple "
                                'literal', _RULES_FORM]),
    ('--config.mesh.rules=((batch,data),)',
     ["config.mesh.rules='((batch,data),)' is invalid: it is not a Python tuple literal",
      "did you mean --config.mesh.rules=\"(('batch', 'data'),)\"?", _RULES_FORM]),
    ("--config.mesh.rules=(('batch', 'dta'),)",
     ["config.mesh.rules entry ('batch', 'dta') is invalid ('dta' is not a mesh axis)",
      _RULES_FORM]),
    ("--config.mesh.rules=(('batch', 'data'))",
     ["config.mesh.rules entry 'batch' is invalid", "one pair needs a trailing comma: "
      "(('batch', 'data'),)"]),
    ("--config.mesh.rules=(('batch', 'data'),",
     ["--config.mesh.rules=\"(('batch', 'data'),\" is invalid: not a Python tuple literal",
      _RULES_FORM]),
    ("--config.mesh.rules=(('batch', 3),)",
     ["config.mesh.rules entry ('batch', 3) is invalid (the mesh axes 3 are not None"]),
    ('--config.optim.lr_multipliers=((lora_b$,16.0),)',
     ["--config.optim.lr_multipliers='((lora_b$,16.0),)' is invalid: not a Python tuple literal",
      "did you mean --config.optim.lr_multipliers=\"(('lora_b$', 16.0),)\"?",
      'pairs (regex over trainable parameter paths, positive factor)']),
    ('--config.train.unfreeze=((2,layer_0/),)',
     ["--config.train.unfreeze='((2,layer_0/),)' is invalid: not a Python tuple literal",
      "did you mean --config.train.unfreeze=\"((2, 'layer_0/'),)\"?"]),
    ("--config.train.unfreeze=(2, 'layer_0/')",
     ['config.train.unfreeze entry 2 is invalid', "trailing comma: ((2, 'layer_0/'),)"]),
    ('--config.model.hidden=(256, -1)',
     ['config.model.hidden entry -1 is invalid (not a positive integer)',
      'positive layer sizes']),
    ('--config.nosuch.x=1', ["--config.nosuch.x: unknown section 'nosuch'",
                             'valid: sections compress, data, generate, l2sp, mesh, model', 'fields dtype, seed']),
    ('--config.trian.steps=1', ["--config.trian.steps: unknown section 'trian' (did you mean "
                                "'train'?)"]),
    ('--config.train.stepz=1', ["--config.train.stepz: unknown field 'stepz' in section 'train' "
                                "(did you mean 'steps'?)", 'batch_size', 'eval_every']),
    ('--config.peft.lora.rnak=4', ["--config.peft.lora.rnak: unknown field 'rnak' in section "
                                   "'peft.lora' (did you mean 'rank'?)"]),
    ('--config.sed=1', ["--config.sed: unknown field 'sed' (did you mean 'seed'?)"]),
    ('--config.train=1', ['--config.train is a section, not a field', 'steps']),
    ('--config.train.steps.x=1', ['--config.train.steps.x: train.steps is a field (int), not a '
                                  'section; valid: --config.train.steps=<value>']),
    ('--config.train.steps=abc', ["--config.train.steps='abc' is invalid; valid: an integer, "
                                  'e.g. --config.train.steps=8']),
    ('--config.train.steps=2.5', ["--config.train.steps='2.5' is invalid; valid: an integer"]),
    ('--config.train.progress=maybe', ["--config.train.progress='maybe' is invalid; valid: true "
                                       'or false']),
    ('--config.optim.learning_rate=fast', ["--config.optim.learning_rate='fast' is invalid; "
                                           'valid: a number']),
])
def test_bad_override(tmp_path, override, words):
  p, wd = _run('peftjax.main', [TINY, override], tmp_path)
  _assert_refused(p, wd, words)


@pytest.mark.parametrize('args,words', [
    (['--config.train.steps=3', TINY], ['--config.train.steps=3 comes before --config=<file>',
                                        'valid: --config=<file> first']),
    (['--config.train.steps=3'], ['--config.train.steps: an override needs the config file '
                                  'first; valid: --config=<file.py>']),
])
def test_override_without_its_config_first(tmp_path, args, words):
  p, wd = _run('peftjax.main', args, tmp_path)
  _assert_refused(p, wd, words)


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize('overrides,words', [
    (['--config.train.steps=0'], ['config.train.steps=0 is invalid; valid: a positive number']),
    (['--config.train.steps=-5'], ['config.train.steps=-5 is invalid; valid: a positive number']),
    (['--config.train.steps=2'], ['config.optim.warmup_steps=2 is invalid',
                                  '0 <= warmup_steps < train.steps (2)',
                                  'raise --config.train.steps']),
    (['--config.train.batch_size=0'], ['config.train.batch_size=0 is invalid']),
    (["--config.train.unfreeze=((9, 'layer_0/'),)"],
     ["config.train.unfreeze entry (9, 'layer_0/') is invalid with train.steps=8",
      'valid: steps below train.steps (8)']),
    (['--config.data.data_dir={file}'], ["config.data.data_dir='{file}' is invalid: it is a file, "
                                         'not a directory', 'valid: a directory']),
    (['--config.data.data_dir={file}/sub'], ["config.data.data_dir='{file}/sub' is invalid: "
                                             "'{file}' is a file, so the directory cannot be "
                                             'created']),
    (['--config.model.name=mlp'], ["config.model.name='mlp' reads image but "
                                   "data.name='rotten_tomatoes' is text data",
                                   'a model that reads text (bert)', 'image data (digits, mnist5k)']),
    (['--config.data.name=digits'], ["config.model.name='bert' reads text but data.name='digits' "
                                     'is image data', 'reads image (mlp, cnn)']),
    (['--config.mesh.data=0'], ['config.mesh.data=0 is invalid; valid: a positive size or -1']),
    (['--config.mesh.fsdp=-1'], ['mesh.data=-1, mesh.fsdp=-1 is invalid; valid: at most one '
                                 'axis = -1']),
    (['--config.peft.method=lorra'], ["config.peft.method='lorra' is invalid; valid: adapter, "
                                      'bitfit, dora, full']),
    (['--config.peft.head=(classifier'], ["config.peft.head='(classifier' is invalid; valid: a "
                                          'Python regular expression']),
])
def test_bad_value_names_the_root_cause(tmp_path, overrides, words):
  afile = tmp_path / 'afile'
  afile.write_text('not a directory')
  p, wd = _run('peftjax.main', [TINY, *[o.format(file=afile) for o in overrides]], tmp_path)
  _assert_refused(p, wd, [w.format(file=afile) for w in words])


def test_data_dir_from_the_environment_that_is_a_file(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('x')
  p, wd = _run('peftjax.main', [TINY], tmp_path, env={'PEFTJAX_DATA_DIR': str(afile)})
  _assert_refused(p, wd, [f"$PEFTJAX_DATA_DIR='{afile}' is invalid: it is a file"])


_NO_JAX = textwrap.dedent('''
    import atexit, runpy, sys
    atexit.register(lambda: print('jax imported:', 'jax' in sys.modules))
    sys.argv = ['peftjax.main', *sys.argv[1:]]
    runpy.run_module('peftjax.main', run_name='__main__')
''')


@pytest.mark.parametrize('override', ['--config.train.steps=0', '--config.nosuch.x=1',
                                      '--config.mesh.rules=((', '--config.peft.method=lorra'])
def test_config_errors_fail_before_jax_is_imported(tmp_path, override):
  p = subprocess.run([sys.executable, '-c', _NO_JAX, TINY, override,
                      f'--workdir={tmp_path / "w"}'], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 1 and p.stderr.startswith('error:'), p.stderr[-2000:]
  assert 'jax imported: False' in p.stdout


# ---------------------------------------------------------------------------- needs the model


def test_head_regex_matching_nothing(tmp_path):
  p, wd = _run('peftjax.main', [TINY, '--config.peft.head=classifer/'], tmp_path)
  _assert_refused(p, wd, ["config.peft.head='classifer/' matches no parameter of the model",
                          'under classifier/, encoder/', 'classifier/kernel', "or ''"])


def test_batch_larger_than_the_data_fails_before_the_workdir_and_warmup_warns(tmp_path):
  # warmup 5 of 8 steps is valid but over half the run: a warning line, and the run goes on
  # (to open the data set, where the batch size is refused).
  p, wd = _run('peftjax.main', [TINY, '--config.train.batch_size=300',
                                '--config.optim.warmup_steps=5'], tmp_path)
  _assert_refused(p, wd, ["config.train.batch_size=300 is invalid: the train split 'train' of "
                          "'rotten_tomatoes' gives 256 examples (data.max_train_examples=256)",
                          'valid: a batch size of at most 256'])
  warnings = [l for l in p.stdout.splitlines() if l.startswith('warning:')]
  assert warnings == ['warning: optim.warmup_steps=5 is over half of train.steps=8: the learning '
                      'rate reaches its peak only at step 5; e.g. --config.optim.warmup_steps=0 '
                      '(10% of the run)'], p.stdout[-2000:]


# ---------------------------------------------------------------------------- unit level


def _cfg(**sections):
  c = common.get_config()
  for dotted, value in sections.items():
    c.update_from_flattened_dict({dotted.replace('__', '.'): value})
  return c


def test_warnings_only_when_warmup_is_over_half_the_run():
  assert validate.warnings(_cfg(optim__warmup_steps=40, train__steps=400)) == []
  assert validate.warnings(_cfg(optim__warmup_steps=50, train__steps=100)) == []
  (w,) = validate.warnings(_cfg(optim__warmup_steps=40, train__steps=60))
  assert w.startswith('optim.warmup_steps=40 is over half of train.steps=60')
  validate.validate(_cfg(optim__warmup_steps=40, train__steps=60))  # valid: a warning only
  with pytest.raises(ConfigError, match=r'warmup_steps=40 is invalid; valid: 0 <= warmup_steps '
                                        r'< train.steps \(40\)'):
    validate.validate(_cfg(optim__warmup_steps=40, train__steps=40))


def test_mesh_rules_parser():
  rules = (('batch', ['data', 'fsdp']), ('embed', None), ('mlp', 'tensor'), ('kv', ()))
  assert validate.check_mesh_rules(rules) == (('batch', ('data', 'fsdp')), ('embed', None),
                                              ('mlp', 'tensor'), ('kv', ()))
  assert validate.check_mesh_rules(()) == ()
  for bad, why in [((('batch',),), 'not a (logical axis, mesh axes) pair'),
                   ((('', 'data'),), "the logical axis name '' is not a non-empty string"),
                   (((1, 'data'),), 'the logical axis name 1'),
                   ((('batch', ('data', 'data')),), "a mesh axis appears twice in ('data', 'data')"),
                   ((('batch', ('data', 'model')),), "'model' is not a mesh axis"),
                   ('batch', "config.mesh.rules='batch' is invalid")]:
    with pytest.raises(ConfigError, match='mesh.rules') as e:
      validate.check_mesh_rules(bad)
    assert why in str(e.value)


def test_quoting_suggestion_for_unquoted_names():
  assert validate.quoted_literal('((batch,data),(embed,None))') == (
      "(('batch', 'data'), ('embed', None))")
  assert validate.quoted_literal("((0, classifier/), (5, 'layer_5/'))") == (
      "((0, 'classifier/'), (5, 'layer_5/'))")
  assert validate.quoted_literal('((') is None


def test_sharding_rules_use_the_parser():
  from peftjax import sharding
  mesh = ml_collections.ConfigDict({'rules': (('batch', ['data']),)})
  assert sharding.rules(mesh) == (('batch', ('data',)),)
  with pytest.raises(ConfigError, match="'dta' is not a mesh axis"):
    sharding.rules(ml_collections.ConfigDict({'rules': (('batch', 'dta'),)}))


def test_params_regexes_must_match():
  base = {'classifier': {'kernel': 0, 'bias': 0}, 'encoder': {'layer_0': {'w': 0}}}
  peft = {'encoder': {'layer_0': {'lora_a': 0, 'lora_b': 0}}}
  validate.validate_params(_cfg(), base, peft)
  validate.validate_params(_cfg(peft__head=''), base, peft)  # '' = no head
  validate.validate_params(_cfg(peft__head='nomatch', peft__method='full'), base, peft)
  with pytest.raises(ConfigError, match="config.peft.head='nomatch' matches no parameter"):
    validate.validate_params(_cfg(peft__head='nomatch'), base, peft)
  validate.validate_params(_cfg(optim__lr_multipliers=(('lora_b$', 16.0),)), base, peft)
  with pytest.raises(ConfigError, match=r"lr_multipliers regex 'lora_c\$' matches no parameter; "
                                        r".*peft/encoder/layer_0/lora_"):
    validate.validate_params(_cfg(optim__lr_multipliers=(('lora_c$', 16.0),)), base, peft)


def test_data_checks_for_any_dataset():
  data = types.SimpleNamespace(info=types.SimpleNamespace(kind='image', name='my_images'),
                               num_examples=lambda split: 10)
  c = _cfg(data__name='my_images', model__name='mlp', train__batch_size=10)
  validate.validate_data(c, data)
  with pytest.raises(ConfigError, match="model.name='bert' reads text but data.name='my_images' "
                                        'is image data'):
    validate.validate_data(_cfg(data__name='my_images'), data)
  with pytest.raises(ConfigError, match="batch_size=11 is invalid: the train split 'train' of "
                                        "'my_images' gives 10 examples; valid: a batch size of "
                                        'at most 10'):
    validate.validate_data(_cfg(data__name='my_images', model__name='mlp',
                                train__batch_size=11), data)


def test_name_lists_equal_the_registries():
  from peftjax import data
  from peftjax import optim
  from peftjax import peft
  from peftjax import sharding
  from peftjax.models import bert
  build = importlib.import_module('peftjax.models.build')  # peftjax.models.build is a function
  assert validate.METHOD_NAMES == peft.method_names()
  assert validate.MODEL_NAMES == build.MODEL_NAMES
  assert validate.POOLINGS == bert.POOLINGS
  assert validate.REMAT_POLICIES == tuple(bert.REMAT_POLICIES)
  assert validate.SCHEDULES == optim.SCHEDULES
  assert validate.MESH_AXES == sharding.MESH_AXES
  from peftjax.data.lm_builders import KNOWN_LM
  assert set(validate.KNOWN_DATA) == set(data.KNOWN) | set(KNOWN_LM)
  assert validate.PACKINGS == __import__('peftjax.data.lm_pipeline', fromlist=['x']).PACKINGS


def test_load_config_file_for_tools(tmp_path):
  c = cli.load_config_file('configs/moe.py:lora')
  assert c.peft.method == 'lora' and c.is_locked
  assert cli.load_config_file('configs/moe.py:', lock=False).peft.method == 'full'
  with pytest.raises(ConfigError, match=r"--config=configs/moe.py:x: unknown variant 'x'"):
    cli.load_config_file('configs/moe.py:x')
  cli.check_override_names(c, ['peft.lora.rank', 'mesh.rules', 'seed'])
  with pytest.raises(ConfigError, match=r"--config.peft.lora.rnak: unknown field 'rnak'"):
    cli.check_override_names(c, ['peft.lora.rank', 'peft.lora.rnak'])


def test_variant_helpers():
  assert common.variant(None, ('a', 'b'), default='a') == 'a'
  assert common.variant('b', ('a', 'b'), default='a') == 'b'
  with pytest.raises(ConfigError, match=r"unknown variant 'c'; valid: 'a' \(the default"):
    common.variant('c', ('a', 'b'), default='a')
  common.no_variant('')
  with pytest.raises(ConfigError, match='this config has no variants'):
    common.no_variant('x')
  assert common.settings('steps=60', steps=120) == {'steps': 60}
  with pytest.raises(ConfigError, match=r"unknown setting 'stpes'.*did you mean 'steps'"):
    common.settings('stpes=60', steps=120)
  with pytest.raises(ConfigError, match=r"steps='x' is not an integer"):
    common.settings('steps=x', steps=120)
  with pytest.raises(ConfigError, match=r"'steps' \(not key=value\)"):
    common.settings('steps', steps=120)


@pytest.mark.parametrize('args,words', [
    ([TINY, 'extra'], ["stray arguments ['extra']", 'valid: flags only, each as --name=value']),
    ([], ['--config', 'must have a value']),
])
def test_stray_arguments_and_a_missing_config_are_one_line(tmp_path, args, words):
  p, wd = _run('peftjax.main', args, tmp_path)
  _assert_refused(p, wd, words)
