"""Keeps the notebooks in step with the repository, and saves them executed.

  python notebooks/build.py            # sync the repository URL, execute, save with outputs
  python notebooks/build.py --sync     # only rewrite the Colab badges and install cells
  python notebooks/build.py --check    # exit 1 if a badge or install cell disagrees with the URL
  python notebooks/build.py quickstart # only this notebook

The repository's address is set once, in ``pyproject.toml`` (``[project.urls] Repository``).
Each notebook's Colab badge and its install cell's ``REPOSITORY`` must carry it literally (a
notebook opened in Colab has nothing else to read); ``--sync`` writes them from the one place.

Executing saves the outputs into the notebook, so a reader sees the results without running it.
Each notebook runs in the setting of :data:`SETTINGS` (the ``PEFTJAX_NOTEBOOK_*`` environment
variables the notebooks read); the setting and the machine are recorded in the notebook's
metadata (``peftjax.outputs``) and in the markdown cell that opens with :data:`OUTPUTS_NOTE`.
``tests/test_notebooks.py`` executes copies in the shortened setting and never writes these files.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import sys
import tempfile
import time

import nbformat

try:
  import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover
  tomllib = None

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
NAMES = ('quickstart', 'methods_tour')
# The setting each notebook's saved outputs come from: the full one where it runs in minutes on
# a 2-core CPU, else the shortened one (the first encoder layer, 16-token reviews, a few hundred
# examples).
SETTINGS = {
    'quickstart': {'fast': True, 'steps': 300},
    'methods_tour': {'fast': True, 'steps': 100},
}
OUTPUTS_NOTE = '**The outputs saved in this notebook**'
_BADGE = re.compile(r'\(https://colab\.research\.google\.com/github/[^)\s]*\)')
_REPOSITORY_LINE = re.compile(r"^REPOSITORY = '[^']*'", re.M)


def repository() -> str:
  """The repository URL: ``[project.urls] Repository`` of pyproject.toml."""
  text = (ROOT / 'pyproject.toml').read_text()
  if tomllib is not None:
    return tomllib.loads(text)['project']['urls']['Repository']
  return re.search(r'^Repository = "([^"]+)"', text, re.M)[1]  # the one line tpu/setup.sh reads


def colab_url(repo: str, name: str, branch: str = 'main') -> str:
  """The address that opens notebooks/<name>.ipynb of a GitHub repository in Colab."""
  m = re.fullmatch(r'https://github\.com/([^/\s]+)/([^/\s]+?)(\.git)?/?', repo)
  if not m:
    raise SystemExit(f'error: pyproject.toml [project.urls] Repository = {repo!r}: Colab opens '
                     'notebooks from GitHub only; give https://github.com/OWNER/NAME')
  return (f'https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/{branch}/'
          f'notebooks/{name}.ipynb')


def install_cell(nb):
  """The install cell: the first code cell (it sets REPOSITORY)."""
  return next(c for c in nb.cells if c.cell_type == 'code')


def sync(nb, name: str, repo: str) -> bool:
  """Writes ``repo`` into the badge and the install cell; returns whether anything changed."""
  badge, cell = nb.cells[0], install_cell(nb)
  new_badge = _BADGE.sub(f'({colab_url(repo, name)})', badge.source, count=1)
  new_cell = _REPOSITORY_LINE.sub(f'REPOSITORY = {repo!r}', cell.source, count=1)
  changed = (new_badge, new_cell) != (badge.source, cell.source)
  badge.source, cell.source = new_badge, new_cell
  return changed


def disagreements(nb, name: str, repo: str) -> list[str]:
  """What in ``nb`` does not carry ``repo`` (empty when the notebook agrees)."""
  out = []
  if f'({colab_url(repo, name)})' not in nb.cells[0].source:
    out.append(f'{name}.ipynb: the Colab badge is not {colab_url(repo, name)}')
  if f'REPOSITORY = {repo!r}' not in install_cell(nb).source:
    out.append(f"{name}.ipynb: the install cell does not set REPOSITORY = {repo!r}")
  return out


def outputs_note(setting: dict, minutes: float) -> str:
  """The markdown cell that says where the saved outputs come from."""
  how = ('the full setting' if not setting['fast'] else
         'the shortened setting (`PEFTJAX_NOTEBOOK_FAST=1`: the first encoder layer, 16-token '
         'reviews, a few hundred examples; the numbers show that everything runs, not what the '
         'methods reach)')
  return (f'{OUTPUTS_NOTE} come from `python notebooks/build.py`: {how}, '
          f'`PEFTJAX_NOTEBOOK_STEPS={setting["steps"]}`, executed top to bottom on a CPU '
          f'in {minutes:.0f} min. Run it yourself for your own numbers; the Settings cell says '
          'how to change them.')


def execute(nb, setting: dict):
  """Executes ``nb`` in place from the notebooks folder, with ``setting``; returns minutes."""
  import nbclient  # pylint: disable=g-import-not-at-top
  env = {'PEFTJAX_NOTEBOOK_FAST': '1' if setting['fast'] else '0',
         'PEFTJAX_NOTEBOOK_STEPS': str(setting['steps']), 'JAX_PLATFORMS': 'cpu',
         'MPLBACKEND': 'agg', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  saved = {k: os.environ.get(k) for k in (*env, 'PEFTJAX_NOTEBOOK_WORKDIR')}
  with tempfile.TemporaryDirectory(prefix='peftjax_notebook_') as workdir:
    os.environ.update(env, PEFTJAX_NOTEBOOK_WORKDIR=workdir)
    try:
      t0 = time.time()
      nbclient.NotebookClient(nb, kernel_name='python3', timeout=3600, allow_errors=False,
                              record_timing=False,
                              resources={'metadata': {'path': str(HERE)}}).execute()
      minutes = (time.time() - t0) / 60
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
  return minutes


def set_outputs_note(nb, setting: dict, minutes: float):
  note = nbformat.v4.new_markdown_cell(outputs_note(setting, minutes))
  cells = [i for i, c in enumerate(nb.cells)
           if c.cell_type == 'markdown' and c.source.startswith(OUTPUTS_NOTE)]
  if cells:
    nb.cells[cells[0]].source = note.source
  else:
    nb.cells.insert(1, note)
  nb.metadata['peftjax'] = {'outputs': {**setting, 'minutes': round(minutes, 1),
                                        'machine': f'{platform.machine()}, '
                                                   f'{os.cpu_count()} CPUs'}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('names', nargs='*', default=list(NAMES), help=f'notebooks (default: {NAMES})')
  p.add_argument('--sync', action='store_true', help='only write the repository URL')
  p.add_argument('--check', action='store_true', help='only check the repository URL')
  args = p.parse_args(argv)
  for n in args.names:
    if n not in NAMES:
      p.error(f'unknown notebook {n!r}; valid: {", ".join(NAMES)}')
  repo = repository()
  problems = []
  for name in args.names:
    path = HERE / f'{name}.ipynb'
    nb = nbformat.read(path, as_version=4)
    if args.check:
      problems += disagreements(nb, name, repo)
      continue
    changed = sync(nb, name, repo)
    if not args.sync:
      minutes = execute(nb, SETTINGS[name])
      set_outputs_note(nb, SETTINGS[name], minutes)
      changed = True
      print(f'{name}.ipynb: executed in {minutes:.1f} min', file=sys.stderr)
    if changed:
      tmp = path.with_suffix('.ipynb.tmp')
      nbformat.write(nb, tmp)
      tmp.replace(path)
      print(f'wrote {path.relative_to(ROOT)}', file=sys.stderr)
  if problems:
    raise SystemExit('error: ' + '; '.join(problems) + ' (run python notebooks/build.py --sync)')


if __name__ == '__main__':
  main()
