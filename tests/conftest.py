"""Shared fixtures: the bundled model, small configs, a data cache shared by the test run."""
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs` is importable in tests

# One TFDS cache for the whole run (workers build under a file lock), kept out of ~/.cache.
os.environ.setdefault('PEFTJAX_DATA_DIR', str(ROOT / '.venv' / 'test-data'))
# One persistent XLA compilation cache for the run, inherited by every subprocess (main runs,
# sweeps, benchmarks, notebooks): the many tiny runs compile the same programs, and a warm
# cache makes such a run about 2.5x faster here. The key is the program, so it never goes stale.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(ROOT / '.venv' / 'test-jax-cache'))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_platforms', 'cpu')


@pytest.fixture(scope='session')
def minilm_dir():
  from peftjax.data import minilm_dir
  return minilm_dir()


@pytest.fixture(scope='session')
def minilm(minilm_dir):
  """(BertConfig, encoder params) of the bundled MiniLM-L6."""
  from peftjax.models import load_bert
  return load_bert(minilm_dir)
