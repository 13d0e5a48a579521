"""Deep Compression (Han et al., 2016): prune -> retrain -> share -> Huffman, with sizes and accuracy.

  python -m peftjax.compress.deep --config=configs/deep_compression.py --workdir=/tmp/dc
  python -m peftjax.compress.deep --config=configs/deep_compression.py:minilm \\
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

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import evaluate as eval_lib
from peftjax import storage
from peftjax import tree as tree_lib
from peftjax.compress import huffman
from peftjax.compress import plan as plan_lib
from peftjax.compress import share as share_lib


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


def evaluate_params(built, data, params: dict, split: str, batch_size: int) -> dict:
  """Test metrics of ``built.module`` with plain ``params`` (one jitted forward)."""
  @jax.jit
  def stats(params, batch):
    logits = built.module.apply({'params': params}, **{k: batch[k] for k in built.input_keys})
    return eval_lib.batch_stats(logits, batch['label'], batch['weight'])
  return eval_lib.evaluate(lambda b: stats(params, b), data.eval_batches(split, batch_size))


def finetune_centroids(built, data, shared: dict, *, steps: int, learning_rate: float,
                       batch_size: int, seed: int) -> dict:
  """``steps`` Adam updates of the centroids (indices and masks fixed); returns the new tree.

  The weights are ``share.expand(shared)``: a gather, so the gradient of centroid ``j`` is the
  sum of the gradients of the weights in cluster ``j`` (Han et al.'s centroid update).
  """
  from peftjax import train  # pylint: disable=g-import-not-at-top  (train imports compress)
  if steps <= 0:
    return shared
  trainable, frozen = share_lib.partition_centroids(shared)
  # Fresh buffers: the step donates its state, which must not delete the caller's centroids.
  trainable = jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)

  def forward(trainable, frozen, inputs, rng=None, deterministic=True, with_aux=False):
    params = share_lib.expand(tree_lib.combine(frozen, trainable['base']))
    rngs = {} if rng is None else {'dropout': rng}
    logits = built.module.apply({'params': params}, **inputs, deterministic=deterministic,
                                rngs=rngs)
    return (logits, {}) if with_aux else logits

  tx = optax.adam(learning_rate)
  params = {'base': trainable, 'peft': {}}
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'rng': jax.random.key_data(jax.random.key(seed + 3))}
  step = jax.jit(train.make_train_step(forward, tx, built.input_keys), donate_argnums=(0,))
  batches = data.train_batches(batch_size, seed + 3)
  for i in range(steps):
    state, _ = step(state, frozen, {k: jnp.asarray(v) for k, v in batches[i].items()})
  return tree_lib.combine(frozen, state['params']['base'])


def share_stage(config, built, data, params: dict, masks: dict | None = None
                ) -> tuple[dict, float]:
  """``(shared tree, its test accuracy)``: ``compress.share``'s k-means of ``params`` (pruned
  entries per ``masks`` kept at zero), then its centroid fine-tuning.

  >>> shared, acc = share_stage(config, built, data, params)  # doctest: +SKIP
  """
  s = config.compress.share
  shared = share_lib.share(params, bits=s.bits, targets=s.targets, masks=masks)
  shared = finetune_centroids(built, data, shared, steps=s.finetune_steps,
                              learning_rate=s.learning_rate,
                              batch_size=config.train.batch_size, seed=config.seed)
  acc = evaluate_params(built, data, share_lib.expand(shared), config.data.test_split,
                        config.train.eval_batch_size)['accuracy']
  return shared, acc


def huffman_roundtrip(shared: dict, gap_bits: int) -> tuple[dict, int]:
  """Encodes every shared leaf's indices and sparse gaps, decodes them, rebuilds the tree.

  Returns ``(decoded tree, encoded bytes of the shared leaves)``; the decoded tree is built from
  the bytes alone (plus centroids and shapes), so comparing it with ``shared`` checks the
  coding end to end.
  """
  flat_leaves, treedef = jax.tree_util.tree_flatten(shared, is_leaf=share_lib.is_shared)
  out, total = [], 0
  for leaf in flat_leaves:
    if not share_lib.is_shared(leaf):
      out.append(leaf)
      continue
    idx = np.asarray(leaf['indices']).ravel()
    shape = np.shape(leaf['indices'])
    k = int(np.shape(leaf['centroids'])[0])
    new = {'centroids': leaf['centroids']}
    if 'mask' in leaf:
      mask = np.asarray(leaf['mask']).ravel()
      gaps, filler = huffman.relative_index(mask, gap_bits)
      g_code = huffman.build_code(gaps, n_symbols=2 ** gap_bits)
      g_bytes, g_bits = huffman.encode(gaps, g_code)
      kept = np.flatnonzero(mask)
      # The index stream holds one symbol per stored entry; fillers take the reserved symbol k.
      stream = np.full(len(gaps), k, np.int64)
      stream[~np.asarray(filler, bool)] = idx[kept]
      i_code = huffman.build_code(stream, n_symbols=k + 1)
      i_bytes, i_bits = huffman.encode(stream, i_code)
      total += len(g_bytes) + len(i_bytes)
      gaps2 = huffman.decode(g_bytes, g_bits, g_code)
      stream2 = huffman.decode(i_bytes, i_bits, i_code)
      filler2 = stream2 == k
      mask2 = huffman.from_relative_index(gaps2, filler2, idx.size)
      idx2 = np.zeros(idx.size, np.uint8)
      idx2[np.flatnonzero(mask2)] = stream2[~filler2]
      new['indices'] = jnp.asarray(idx2.reshape(shape))
      new['mask'] = jnp.asarray(mask2.reshape(shape))
    else:
      code = huffman.build_code(idx, n_symbols=k)
      data, bits = huffman.encode(idx, code)
      total += len(data)
      new['indices'] = jnp.asarray(huffman.decode(data, bits, code).astype(np.uint8).reshape(shape))
    out.append(new)
  return jax.tree_util.tree_unflatten(treedef, out), total


def run(config, workdir: str) -> dict:
  """:func:`run_stages` under the workdir's lock (``peftjax.workdir_lock``: a second run on
  ``workdir`` is refused in one line naming the first; process 0 takes it)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  from peftjax import workdir_lock  # pylint: disable=g-import-not-at-top
  with (workdir_lock.WorkdirLock(workdir, purpose='compress.deep')
        if jax.process_index() == 0 else contextlib.nullcontext()):
    return run_stages(config, workdir)


def run_stages(config, workdir: str) -> dict:
  """The four stages (see the module docstring); returns and writes the report.

  >>> report = run(configs.deep_compression.get_config(), '/tmp/dc')  # doctest: +SKIP
  >>> [s['stage'] for s in report['stages']]  # doctest: +SKIP
  ['dense', 'pruned', 'shared', 'huffman']
  """
  from peftjax import train  # pylint: disable=g-import-not-at-top
  wd = storage.path(workdir)
  cc = config.compress
  plan_lib.validate(cc)
  if cc.prune.kind not in ('magnitude', 'nm'):
    from peftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
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
  run_cfg, built = train.load_finished(pruned_dir)
  from peftjax import data as data_lib  # pylint: disable=g-import-not-at-top
  pretrained = train.resolve_pretrained(config.model)
  data = data_lib.build(config.data, tokenizer_path=pretrained and f'{pretrained}/tokenizer.json')
  params = jax.device_get(built.params)
  masks = _masks_of(params, cc.prune.targets)
  shared_targets = tree_lib.select(params, cc.share.targets)
  unshared = [k for k in tree_lib.flatten(masks) if k not in shared_targets]
  if unshared:
    from peftjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'compress.share.targets={cc.share.targets!r} misses pruned {unshared[0]}; '
                      'valid: a regex that also selects every compress.prune target')
  shared, shared_acc = share_stage(config, built, data, params, masks)
  split, bs = config.data.test_split, config.train.eval_batch_size
  fixed = huffman.compressed_size(shared, gap_bits=cc.share.gap_bits, huffman=False)['total']
  stages.append({'stage': 'shared', 'bytes': fixed['bytes'], 'accuracy': shared_acc})

  # ------------------------------------------------------------------ 4. Huffman
  _log('== huffman: encoding, decoding and evaluating the decoded model')
  coded = huffman.compressed_size(shared, gap_bits=cc.share.gap_bits)
  decoded, _ = huffman_roundtrip(shared, cc.share.gap_bits)
  exact = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
              zip(jax.tree.leaves(shared), jax.tree.leaves(decoded)))
  huff_acc = evaluate_params(built, data, share_lib.expand(decoded), split, bs)['accuracy']
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
  import json  # pylint: disable=g-import-not-at-top
  return json.loads((storage.path(run_dir) / 'summary.json').read_text())['accuracy_after']


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    return x.item()
  return x


def format_table(report: dict) -> str:
  """The stages as a Markdown table: bytes, compression vs. float32, accuracy."""
  rows = ['| stage | bytes | x smaller | test accuracy |', '|---|---|---|---|']
  for s in report['stages']:
    rows.append(f"| {s['stage']} | {s['bytes']:,d} | {s['compression']:.1f} | "
                f"{s['accuracy']:.4f} |")
  return '\n'.join(rows)


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
