"""Deep Compression (Han et al., 2016) stages: centroid fine-tuning of shared weights, the
Huffman round trip, evaluation of plain parameters, the report table.

The pipeline that runs them (prune -> retrain -> share -> Huffman, each stage reported with its
storage bytes and test accuracy) is :mod:`peftjax.deep_compression`:

  python -m peftjax.deep_compression --config=configs/deep_compression.py --workdir=/tmp/dc

(``python -m peftjax.compress.deep`` is the same command under its former name.)
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import evaluate as eval_lib
from peftjax import run as run_lib
from peftjax import step as step_lib
from peftjax import tree as tree_lib
from peftjax.compress import huffman
from peftjax.compress import share as share_lib
from peftjax.tasks.classification import Classification


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
  if steps <= 0:
    return shared
  trainable, frozen = share_lib.partition_centroids(shared)
  # Fresh buffers: the step donates its state, which must not delete the caller's centroids.
  trainable = jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)

  def forward(trainable, frozen, batch, rng=None, deterministic=True, with_aux=False):
    params = share_lib.expand(tree_lib.combine(frozen, trainable['base']))
    rngs = {} if rng is None else {'dropout': rng}
    logits = built.module.apply({'params': params}, **{k: batch[k] for k in built.input_keys},
                                deterministic=deterministic, rngs=rngs)
    return (logits, {}) if with_aux else logits

  tx = optax.adam(learning_rate)
  state = run_lib.TrainState.create(tx, {'base': trainable, 'peft': {}}, seed=seed + 1)
  step = jax.jit(step_lib.make_train_step(forward, tx, Classification(None)),
                 donate_argnums=(0,))
  batches = data.train_batches(batch_size, seed + 3)
  for i in range(steps):
    state, _ = step(state, frozen, {k: jnp.asarray(v) for k, v in batches[i].items()})
  return tree_lib.combine(frozen, state.params['base'])


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


def format_table(report: dict) -> str:
  """The stages as a Markdown table: bytes, compression vs. float32, accuracy."""
  rows = ['| stage | bytes | x smaller | test accuracy |', '|---|---|---|---|']
  for s in report['stages']:
    rows.append(f"| {s['stage']} | {s['bytes']:,d} | {s['compression']:.1f} | "
                f"{s['accuracy']:.4f} |")
  return '\n'.join(rows)


if __name__ == '__main__':
  # The former spelling of the command: the pipeline lives above the loop it drives.
  import runpy  # pylint: disable=g-import-not-at-top
  runpy.run_module('peftjax.deep_compression', run_name='__main__', alter_sys=True)
