"""The small public face: ``import peftjax`` is light, its verbs load on use, and the README's
Python example runs as a saved file from the repository root and from another directory."""
import pathlib
import re
import subprocess
import sys

import pytest

import peftjax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_example() -> str:
  text = (ROOT / 'README.md').read_text()
  section = text[text.index('## Using it from Python'):]
  return re.search(r'```python\n(.*?)```', section, flags=re.S).group(1)


def test_import_peftjax_loads_no_jax():
  out = subprocess.run([sys.executable, '-c', 'import sys, peftjax; print("jax" in sys.modules)'],
                       capture_output=True, text=True, check=True, cwd='/')
  assert out.stdout.strip() == 'False'


def test_every_export_resolves():
  for name in peftjax.__all__:
    assert callable(getattr(peftjax, name)), name
  with pytest.raises(AttributeError, match='no attribute'):
    peftjax.not_a_verb  # pylint: disable=pointless-statement


def test_unknown_config_name_lists_the_bundled_ones():
  with pytest.raises(peftjax.errors.ConfigError, match=r"config 'quickstrat'.*quickstart"):
    peftjax.config('quickstrat')


@pytest.mark.parametrize('where', ['root', 'elsewhere'])
def test_readme_python_example_runs_as_a_saved_file(tmp_path, where):
  script = tmp_path / 'example.py'
  script.write_text(_readme_example())
  cwd = ROOT if where == 'root' else tmp_path
  r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=cwd,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'trainable: 74,498 of 22,639,874' in r.stdout
  loss = float(re.search(r'loss (\d+\.\d+)', r.stdout).group(1))
  assert 0.3 < loss < 1.2  # two-class cross-entropy near log(2) for a fresh head
