"""The config by section: each method reads its own ``peft.<section>``, each section is checked by
its owner only when in use, old flat names fail naming the new field or are upgraded on read,
and ``--config_help`` lists every field with its default and comment.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from configs import common
from peftjax import cli
from peftjax import validate
from peftjax.errors import ConfigError
from peftjax.peft import sections

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = '--config=configs/tiny.py'

# Runs peftjax.main and reports whether jax was imported (a config error must not need it).
_MAIN = textwrap.dedent('''
    import atexit, runpy, sys
    atexit.register(lambda: print('jax imported:', 'jax' in sys.modules))
    sys.argv = ['peftjax.main', *sys.argv[1:]]
    runpy.run_module('peftjax.main', run_name='__main__')
''')


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, '-c', _MAIN, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _error_line(p):
  lines = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert p.returncode == 1 and len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  return lines[0]


# ---------------------------------------------------------------------------- old names


def test_old_flat_override_fails_in_one_line_naming_the_new_field(tmp_path):
  p = _main(TINY, '--config.peft.rank=16', f'--workdir={tmp_path / "w"}')
  assert _error_line(p) == ('error: config.peft.rank was renamed: use '
                            '--config.peft.lora.rank=16')
  assert 'jax imported: False' in p.stdout
  assert not (tmp_path / 'w').exists()
  p = _main(TINY, '--config.peft.adapter_kind=parallel', f'--workdir={tmp_path / "w"}')
  assert _error_line(p) == ('error: config.peft.adapter_kind was renamed: use '
                            '--config.peft.adapter.kind=parallel')


def test_every_old_name_maps_to_a_field_of_common():
  c = common.get_config()
  for old, new in sections.RENAMED.items():
    section, field = new.split('.')
    assert field in c.peft[section], (old, new)
    assert old not in c.peft
    assert validate.renamed(f'peft.{old}') == f'peft.{new}'
  assert validate.renamed('peft.lora.rank') is None


def test_a_config_file_setting_an_old_name_fails_naming_the_new_field(tmp_path):
  cfg = tmp_path / 'old.py'
  cfg.write_text('from configs import common\n\ndef get_config():\n  c = common.get_config()\n'
                 '  c.peft.num_prompts = 5\n  return c\n')
  p = _main(f'--config={cfg}', f'--workdir={tmp_path / "w"}')
  line = _error_line(p)
  assert 'config.peft.num_prompts was renamed: use config.peft.prompt.length' in line, line
  assert 'c.peft.prompt.length = 5' in line
  assert 'jax imported: False' in p.stdout


def test_upgrade_moves_flat_fields_into_sections_and_keeps_current_ones():
  flat = {'method': 'lora+ia3', 'head': 'classifier/', 'rank': 4, 'alpha': 8.0, 'rslora': True,
          'dropout': 0.1, 'targets': 'q$', 'ia3_targets': 'k$', 'ia3_ffn_targets': '',
          'adapter_kind': 'pfeiffer', 'num_prompts': 3, 'prompt_init': 'text',
          'prompt_init_text': 'hi', 'num_prefix': 2, 'prefix_reparam': False,
          'prefix_hidden': 7}
  up = sections.upgrade(flat)
  assert up == {'method': 'lora+ia3', 'head': 'classifier/',
                'lora': {'rank': 4, 'alpha': 8.0, 'rslora': True, 'dropout': 0.1,
                         'targets': 'q$'},
                'ia3': {'targets': 'k$', 'ffn_targets': ''},
                'adapter': {'kind': 'pfeiffer'},
                'prompt': {'length': 3, 'init': 'text', 'init_text': 'hi'},
                'prefix': {'length': 2, 'reparam': False, 'hidden': 7}}
  assert 'rank' in flat  # not mutated
  assert sections.upgrade(up) == up
  current = common.get_config().to_dict()
  assert validate.upgrade(current) == current
  # An old full config (every flat field) upgrades to exactly today's config.
  old = common.get_config().to_dict()
  for name, new in sections.RENAMED.items():
    section, field = new.split('.')
    old['peft'][name] = old['peft'][section].pop(field)
  for section in sections.SECTIONS:
    if not old['peft'][section]:
      del old['peft'][section]
  assert validate.upgrade(old) == current
  validate.validate(ml_collections.ConfigDict(validate.upgrade(old)))


def test_old_workdir_config_is_upgraded_on_read(tmp_path):
  from peftjax import checkpoint
  old = {'seed': 0, 'peft': {'method': 'lora', 'head': 'classifier/', 'rank': 8, 'alpha': 16.0,
                             'targets': 'attention/(query|value)/kernel$'}}
  (tmp_path / 'summary.json').write_text(json.dumps({'config': old}))
  saved = checkpoint.saved_config(tmp_path)
  assert saved['peft'] == {'method': 'lora', 'head': 'classifier/',
                           'lora': {'rank': 8, 'alpha': 16.0,
                                    'targets': 'attention/(query|value)/kernel$'}}
  (tmp_path / checkpoint.CONFIG).write_text(json.dumps(old))
  assert checkpoint.saved_config(tmp_path)['peft'] == saved['peft']
  # The diff a refused resume names is then in today's names.
  current = common.get_config()
  current.peft.lora.rank = 16
  diff = dict((k, (a, b)) for k, a, b in checkpoint.config_diff(saved, current))
  assert diff['peft.lora.rank'] == (8, 16) and 'peft.rank' not in diff


def test_old_adapter_manifest_is_upgraded_on_read(tmp_path):
  from peftjax import delta
  from peftjax.serving import adapter as adapter_lib
  base = {'w': np.ones((4, 2), np.float32)}
  trainable = {'base': {}, 'peft': {'w': {'lora_a': np.ones((4, 1), np.float32),
                                          'lora_b': np.ones((1, 2), np.float32)}}}
  path = tmp_path / 'old.safetensors'
  delta.save_delta(path, trainable, base_params=base, method='lora',
                   peft_config={'method': 'lora', 'head': '', 'rank': 1, 'alpha': 4.0,
                                'rslora': False, 'targets': 'w$'})
  manifest = delta.read_manifest(path)
  assert manifest['peft_config'] == {'method': 'lora', 'head': '',
                                     'lora': {'rank': 1, 'alpha': 4.0, 'rslora': False,
                                              'targets': 'w$'}}
  _, loaded = delta.load_delta(path, base_params=base)
  assert loaded['peft_config']['lora']['rank'] == 1
  # The serving layer reads the section (flat dicts given to it directly are upgraded too).
  assert adapter_lib.lora_scale(manifest['peft_config']) == 4.0
  assert adapter_lib.lora_scale(sections.upgrade({'rank': 4, 'alpha': 8.0, 'rslora': True})) == 4.0


# ---------------------------------------------------------------------------- owners


def _cfg(method, **flat):
  c = common.get_config()
  c.peft.method = method
  c.update_from_flattened_dict(flat)
  return c


@pytest.mark.parametrize('method,field,value,words', [
    ('lora', 'peft.lora.rank', 0, 'config.peft.lora.rank=0 is invalid; valid: a positive integer'),
    ('dora', 'peft.lora.alpha', -1.0, 'config.peft.lora.alpha=-1.0 is invalid'),
    ('pissa', 'peft.lora.targets', '(q', "config.peft.lora.targets='(q' is invalid"),
    ('ia3', 'peft.ia3.targets', '(', "config.peft.ia3.targets='(' is invalid"),
    ('adapter', 'peft.adapter.kind', 'serial', "config.peft.adapter.kind='serial' is invalid; "
                                               "valid: 'houlsby', 'pfeiffer', 'parallel'"),
    ('adapter', 'peft.adapter.size', 0, 'config.peft.adapter.size=0 is invalid'),
    ('prompt', 'peft.prompt.length', 0, 'config.peft.prompt.length=0 is invalid'),
    ('prompt', 'peft.prompt.init', 'random', "config.peft.prompt.init='random' is invalid; "
                                             "valid: 'vocab', 'text'"),
    ('prefix', 'peft.prefix.length', -2, 'config.peft.prefix.length=-2 is invalid'),
    ('prefix', 'peft.prefix.hidden', -1, 'config.peft.prefix.hidden=-1 is invalid'),
])
def test_each_section_is_checked_only_when_its_method_is_in_use(method, field, value, words):
  bad = {field: value}
  with pytest.raises(ConfigError, match=words.replace('(', r'\(').replace('.', r'\.')):
    validate.validate(_cfg(method, **bad))
  # Another method (BitFit, full fine-tuning, or one reading another section) ignores it.
  others = [m for m in ('bitfit', 'full', 'lora', 'ia3', 'adapter', 'prompt', 'prefix')
            if sections.SECTION_OF.get(m) != field.split('.')[1]]
  for other in others:
    validate.validate(_cfg(other, **bad))


def test_composed_methods_check_every_section_they_read(monkeypatch):
  seen = []
  for name, check in list(sections.CHECKS.items()):
    monkeypatch.setitem(sections.CHECKS, name,
                        lambda s, where, _c=check, _n=name: (seen.append(_n), _c(s, where)))
  validate.validate(_cfg('lora+ia3'))
  assert seen == ['lora', 'ia3']
  seen.clear()
  validate.validate(_cfg('pissa'))
  validate.validate(_cfg('bitfit'))
  validate.validate(_cfg('linear_probe'))
  assert seen == ['lora']
  with pytest.raises(ConfigError, match=r'config\.peft\.ia3\.targets and config\.peft\.ia3\.'
                                        r"ffn_targets are both ''"):
    validate.validate(_cfg('lora+ia3', **{'peft.ia3.targets': '', 'peft.ia3.ffn_targets': ''}))


def test_build_checks_the_section_and_refuses_a_flat_one():
  from peftjax import peft
  bad = common.get_config().peft
  bad.lora.rank = 0
  with pytest.raises(ConfigError, match=r'config\.peft\.lora\.rank=0'):
    peft.build(bad)
  bad.method = 'bitfit'
  assert peft.build(bad).name == 'bitfit'  # BitFit reads no LoRA field
  flat = ml_collections.ConfigDict({'method': 'lora', 'head': '', 'rank': 4})
  with pytest.raises(ConfigError, match=r'config\.peft\.rank was renamed: use '
                                        r'config\.peft\.lora\.rank'):
    peft.build(flat)
  with pytest.raises(ConfigError, match=r"config\.peft has no 'lora' section, which "
                                        r"peft\.method='dora' reads"):
    peft.build(ml_collections.ConfigDict({'method': 'dora', 'head': ''}))


def test_section_name_lists_equal_the_modules_that_act_on_them():
  from peftjax import peft
  from peftjax.peft import adapters
  from peftjax.peft import prompt
  assert sections.METHOD_NAMES == peft.method_names()
  assert sections.ADAPTER_KINDS == adapters.KINDS
  assert set(sections.ADAPTER_ACTIVATIONS) == set(adapters.ACTIVATIONS)
  assert sections.PROMPT_INITS == prompt.PROMPT_INITS
  assert set(sections.SECTIONS) == set(sections.SECTION_OF.values()) == set(sections.CHECKS)
  c = common.get_config()
  assert set(c.peft) == {'method', 'head', *sections.SECTIONS}


def test_owner_checks_import_no_jax():
  code = ('import sys\nfrom configs import common\nfrom peftjax import validate\n'
          'from peftjax.peft import sections\nc = common.get_config()\n'
          'c.peft.method = "lora+ia3+adapter+prompt+prefix"\n'
          'sections.check(c.peft)\nprint("jax" in sys.modules)')
  p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0 and p.stdout.strip() == 'False', p.stderr[-2000:]


# ---------------------------------------------------------------------------- --config_help


def test_config_help_lists_every_field_with_its_default_and_comment(tmp_path):
  p = subprocess.run([sys.executable, '-m', 'peftjax.main', '--config=configs/quickstart.py',
                      '--config.peft.lora.alpha=32.0', '--config_help'], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  lines = p.stdout.splitlines()
  assert '    peft.lora.rank = 8  # LoRA rank r' in lines
  assert ('    peft.lora.alpha = 32.0  (default: 16.0)  # LoRA scale is alpha / r' in lines)
  assert '  peft.adapter:  # bottleneck adapters' in lines
  assert any(l.startswith("  optim.warmup_steps = ") and '# linear warmup from 0' in l
             for l in lines)
  # Every field of the config is listed, and every field of common.py has a comment.
  config = cli.load_config_file('configs/quickstart.py')
  listed = {l.split(' = ')[0].strip() for l in lines if ' = ' in l}
  fields = {n for n, _, section in cli._leaves(config) if not section}
  assert fields <= listed, fields - listed
  comments = cli.field_comments()
  uncommented = [n for n, _, _ in cli._leaves(common.get_config()) if not comments.get(n)]
  assert not uncommented, uncommented
  # A multi-line comment above a field is joined into its line.
  assert comments['quant.of'].startswith("With a PEFT method, QAT quantizes 'base'")


def test_config_help_needs_no_workdir_and_imports_no_jax():
  p = _main('--config=configs/tiny.py', '--config_help')
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'peft.lora.rank = ' in p.stdout and 'jax imported: False' in p.stdout
  # A bad override is still refused, not listed.
  p = _main('--config=configs/tiny.py', '--config.peft.rank=3', '--config_help')
  assert _error_line(p) == 'error: config.peft.rank was renamed: use --config.peft.lora.rank=3'
