"""Command-line entry point.

  python -m peftjax.main --config=configs/quickstart.py --config.peft.lora.rank=16 --workdir=/tmp/run

The config is locked after overrides are applied, so a misspelled ``--config.x.y`` fails with
its name; values are validated before any compute starts. A run resumes from the latest intact
checkpoint in ``--workdir`` unless ``--fresh`` is given (see ``train.train_and_evaluate``: the
workdir is locked for one run at a time; a damaged checkpoint is moved aside and the previous
one resumed; checkpoints of another config are refused). Ctrl-C or SIGTERM stops after the
current step with a checkpoint of it (exit 130); rerunning the same command resumes there.
"""
from __future__ import annotations

import os
import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from peftjax import cli

# Config files import `configs.common`; make the repository root importable wherever we run.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, summary.')
_FRESH = flags.DEFINE_bool('fresh', False, 'Delete earlier checkpoints/metrics in --workdir '
                           'and start from step 0 (only peftjax run directories are cleared).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process id in a multi-process run.')
_MULTIHOST = flags.DEFINE_enum('multihost', 'auto', ['auto', 'true', 'false'],
                               'Initialise jax.distributed: auto = when a coordinator is given or '
                               'the environment names a cluster; true = always (TPU VM slices '
                               'auto-detect); false = never.')
_DIST_TIMEOUT = flags.DEFINE_integer('distributed_timeout', 120, 'Seconds to wait for the '
                                     'coordinator before failing with a clear error.')
_CACHE = flags.DEFINE_string(
    'compilation_cache', os.environ.get('PEFTJAX_COMPILATION_CACHE', ''),
    'Directory of a persistent XLA compilation cache shared by runs (sweeps set it: runs that '
    'differ only in seed or data compile once). Default $PEFTJAX_COMPILATION_CACHE; empty = off.')
flags.mark_flags_as_required(['config', 'workdir'])

def _maybe_init_distributed():
  """Multi-process JAX when flags or the environment ask for it (see peftjax/distributed.py)."""
  from peftjax import distributed
  kwargs = distributed.settings(_MULTIHOST.value, coordinator=_COORDINATOR.value,
                                num_processes=_NUM_PROCESSES.value,
                                process_id=_PROCESS_ID.value)
  if kwargs is not None:
    distributed.initialize(kwargs, timeout=_DIST_TIMEOUT.value)


def main(argv):
  config = _CONFIG.value
  cli.begin(argv, config)
  from peftjax import train
  from peftjax.data import AssetNotFoundError
  from peftjax.errors import UserInputError
  if _CACHE.value:
    cli.enable_compilation_cache(_CACHE.value)
  try:
    _maybe_init_distributed()
  except UserInputError as e:
    raise SystemExit(f'error: {e}') from None
  from peftjax import storage
  workdir = storage.path(_WORKDIR.value)
  try:
    s = train.train_and_evaluate(config, str(workdir), fresh=_FRESH.value)
  except (UserInputError, AssetNotFoundError, train.NonFiniteLossError) as e:
    raise SystemExit(f'error: {e}') from None
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return  # process 0 reports for the whole program
  print(f"\nmethod {s['method']}: trainable {s['trainable_params']:,d} of "
        f"{s['total_params']:,d} parameters ({100 * s['trainable_fraction']:.3f}%)")
  # The task's headline metric first (accuracy, exact match), then perplexity for an LM.
  names = [s.get('headline', 'accuracy')]
  names += [n for n in ('perplexity',) if s.get(f'{n}_after') is not None and n not in names]
  for name in names:
    before, after = s.get(f'{name}_before'), s[f'{name}_after']
    print(f"test {name} before {before:.4f} -> after {after:.4f}" if before is not None
          else f"test {name} after {after:.4f}")
  print(f"train time {s['train_seconds']:.1f}s, wall time {s['wall_seconds']:.1f}s; "
        f"summary: {workdir / 'summary.json'}")


if __name__ == '__main__':
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main)
