"""Executes the Colab notebooks in notebooks/ top to bottom, on the shortened setting.

``PEFTJAX_NOTEBOOK_FAST=1`` keeps the first encoder layer, 16-token reviews and a few hundred
examples, and a few training steps; a cell that raises (the notebooks ``assert`` their own
results: merged == implicit logits, the reloaded adapter == the trained one, the parameter
budgets) fails the test. The kernel is ipykernel's ``python3`` spec, whose ``python`` jupyter_client
resolves to this interpreter (the venv's).
"""
import base64
import pathlib
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / 'notebooks'
CELL_TIMEOUT = 300  # seconds per cell; the shortened setting needs a few
STEPS = 10  # training steps (per method in the tour); compilation dominates the run time


def _execute(name: str, tmp_path, monkeypatch):
  monkeypatch.setenv('PEFTJAX_NOTEBOOK_FAST', '1')
  monkeypatch.setenv('PEFTJAX_NOTEBOOK_STEPS', str(STEPS))
  monkeypatch.setenv('PEFTJAX_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('MPLBACKEND', 'agg')
  # PEFTJAX_DATA_DIR: conftest's shared test cache, inherited by the kernel.
  nb = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name='python3', timeout=CELL_TIMEOUT, allow_errors=False,
      resources={'metadata': {'path': str(NOTEBOOKS)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{name}.ipynb: a cell failed:\n{str(e)[-4000:]}')
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


def test_notebooks_are_committed_clean():
  """Valid nbformat v4, no outputs, opening with a Colab badge and an install cell."""
  for path in sorted(NOTEBOOKS.glob('*.ipynb')):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(not c.outputs and c.execution_count is None for c in code), path.name
    assert 'colab-badge.svg' in nb.cells[0].source, path.name
    assert f'notebooks/{path.name})' in nb.cells[0].source, path.name
    assert 'pip' in code[0].source and 'find_spec' in code[0].source, path.name
  assert {p.name for p in NOTEBOOKS.glob('*.ipynb')} >= {'quickstart.ipynb', 'methods_tour.ipynb'}


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
