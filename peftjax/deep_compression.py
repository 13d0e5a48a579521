"""Deep Compression (Han et al., 2016): prune -> retrain -> share -> Huffman, with sizes and accuracy.

  python -m peftjax.deep_compression --config=configs/deep_compression.py --workdir=/tmp/dc
  python -m peftjax.deep_compression --config=configs/deep_compression.py:minilm \\
      --config.compress.init_from=/tmp/teacher --workdir=/tmp/dc_minilm

Stages, each reported with its storage bytes and test accuracy:

1. ``dense``: the trained model (``compress.init_from``, or trained here with the config's
   ``peft.method`` and ``compress.prune.kind='none'``), stored as float32.
2. ``pruned``: retrained from the dense model with the config's ``compress.prune`` (gradual
   magnitude pruning by default), stored as float32 values + relative sparse indices.
3. ``shared``: the pruned weights clustered into ``2^share.bits`` shared values per layer
   (k-means, linear init), centroids fine-tuned for ``share.finetune_steps`` updates (each
   centroid's gradient is the sum over its cluster); fixed-width indices.
4. ``huffman``: cluster indices and sparse-index gaps Huffman-coded. The model is rebuilt from
   the encoded bytes and evaluated again: the accuracy must equal stage 3's.

The stages run as separate training runs in ``<workdir>/dense`` and ``<workdir>/pruned`` (each
resumable), then in this process; ``<workdir>/deep_compression.json`` holds the table.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import jax
import numpy as np

from peftjax import data as data_lib
from peftjax import run as run_lib
from peftjax import storage
from peftjax import train
from peftjax import tree as tree_lib
from peftjax import workdir_lock
from peftjax.compress import deep
from peftjax.compress import huffman
from peftjax.compress import plan as plan_lib
from peftjax.compress import share as share_lib
from peftjax.errors import ConfigError

format_table = deep.format_table


def _log(msg: str) -> None:
  print(msg, flush=True)


def _masks_of(params: dict, targets) -> dict:
  """Nonzero patterns of the targeted leaves (the masks the pruned run kept applied)."""
  flat = tree_lib.flatten(params)
  return tree_lib.unflatten({k: np.asarray(flat[k]) != 0 for k in tree_lib.select(params, targets)})


def _stage_config(config, **overrides):
  c = config.copy_and_resolve_references()
  c.update_from_flattened_dict(overrides)
  return c


def run(config, workdir: str) -> dict:
  """:func:`run_stages` under the workdir's lock (``peftjax.workdir_lock``: a second run on
  ``workdir`` is refused in one line naming the first; process 0 takes it)."""
  with (workdir_lock.WorkdirLock(workdir, purpose='compress.deep')
        if jax.process_index() == 0 else contextlib.nullcontext()):
    return run_stages(config, workdir)


def run_stages(config, workdir: str) -> dict:
  """The four stages (see the module docstring); returns and writes the report.

  >>> report = run(configs.deep_compression.get_config(), '/tmp/dc')  # doctest: +SKIP
  >>> [s['stage'] for s in report['stages']]  # doctest: +SKIP
  ['dense', 'pruned', 'shared', 'huffman']
  """
  wd = storage.path(workdir)
  cc = config.compress
  plan_lib.validate(cc)
  if cc.prune.kind not in ('magnitude', 'nm'):
    raise ConfigError(f"compress.prune.kind={cc.prune.kind!r}; Deep Compression prunes weights: "
                      "valid: 'magnitude' or 'nm'")
  stages: list[dict[str, Any]] = []

  # ------------------------------------------------------------------ 1. dense
  dense_dir = cc.init_from or str(wd / 'dense')
  if not cc.init_from:
    _log('== dense: training')
    train.train_and_evaluate(
        _stage_config(config, **{'compress.prune.kind': 'none'}), dense_dir)

  # ------------------------------------------------------------------ 2. pruned + retrained
  _log('== pruned: retraining with the pruning schedule')
  pruned_dir = str(wd / 'pruned')
  s = train.train_and_evaluate(_stage_config(config, **{'compress.init_from': dense_dir}),
                               pruned_dir)
  # The dense model has the pruned one's shapes: its float32 bytes come from that summary.
  stages.append({'stage': 'dense', 'bytes': s['compression']['float32_bytes'],
                 'accuracy': _accuracy(dense_dir)})
  stages.append({'stage': 'pruned', 'bytes': s['compression']['sparse_bytes'],
                 'accuracy': s['accuracy_after'],
                 'target_sparsity': s['compression']['target_sparsity']})

  # ------------------------------------------------------------------ 3. shared + fine-tuned
  _log(f'== shared: {cc.share.bits}-bit k-means, {cc.share.finetune_steps} centroid updates')
  run_cfg, built = run_lib.load_finished(pruned_dir)
  pretrained = run_lib.resolve_pretrained(config.model)
  data = data_lib.build(config.data, tokenizer_path=pretrained and f'{pretrained}/tokenizer.json')
  params = jax.device_get(built.params)
  masks = _masks_of(params, cc.prune.targets)
  shared_targets = tree_lib.select(params, cc.share.targets)
  unshared = [k for k in tree_lib.flatten(masks) if k not in shared_targets]
  if unshared:
    raise ConfigError(f'compress.share.targets={cc.share.targets!r} misses pruned {unshared[0]}; '
                      'valid: a regex that also selects every compress.prune target')
  shared, shared_acc = deep.share_stage(config, built, data, params, masks)
  split, bs = config.data.test_split, config.train.eval_batch_size
  fixed = huffman.compressed_size(shared, gap_bits=cc.share.gap_bits, huffman=False)['total']
  stages.append({'stage': 'shared', 'bytes': fixed['bytes'], 'accuracy': shared_acc})

  # ------------------------------------------------------------------ 4. Huffman
  _log('== huffman: encoding, decoding and evaluating the decoded model')
  coded = huffman.compressed_size(shared, gap_bits=cc.share.gap_bits)
  decoded, _ = deep.huffman_roundtrip(shared, cc.share.gap_bits)
  exact = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
              zip(jax.tree.leaves(shared), jax.tree.leaves(decoded)))
  huff_acc = deep.evaluate_params(built, data, share_lib.expand(decoded), split, bs)['accuracy']
  stages.append({'stage': 'huffman', 'bytes': coded['total']['bytes'], 'accuracy': huff_acc})

  for st in stages:
    st['ratio_to_float32'] = st['bytes'] / stages[0]['bytes']
    st['compression'] = stages[0]['bytes'] / st['bytes']
  report = {'stages': stages, 'huffman_roundtrip_exact': bool(exact),
            'model': config.model.name, 'dataset': config.data.name,
            'bits': cc.share.bits, 'prune': dict(cc.prune), 'leaves': coded['leaves']}
  storage.write_json_atomic(wd / 'deep_compression.json', _jsonable(report))
  _log(format_table(report))
  return report


def _accuracy(run_dir: str) -> float:
  return json.loads((storage.path(run_dir) / 'summary.json').read_text())['accuracy_after']


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    return x.item()
  return x


def main(argv):
  from peftjax import cli  # pylint: disable=g-import-not-at-top
  from peftjax.errors import UserInputError  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  cli.begin(argv, config)
  try:
    run(config, _WORKDIR.value)
  except UserInputError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (or gs:// prefix) of the stages.')
  flags.mark_flags_as_required(['config', 'workdir'])
  from peftjax import cli
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main)
  sys.exit(0)
