"""The ``quant`` entry of ``summary.json`` for a causal LM: what is served and how it scores.

On for a causal-LM run with ``quant.qat``, ``quant.qlora`` or ``quant.ptq`` (post-training
quantization at the end of the run; a field of ``configs/lm_compress.py``). At the end of the
run:

* a model trained whole (``peft.method='full'``, or a distilled student), QAT or not, is
  converted to a real int8 model (:func:`peftjax.quant.int8.convert`: the QAT grid, or PTQ's
  with static ranges calibrated on ``quant.calibration_batches`` train batches) and its exact
  match is *generated in int8* (:meth:`peftjax.quant.int8.Int8Model.step`): ``int8_exact_match``
  beside the run's own ``exact_match_after`` (the float or fake-quant model);
* a method with parameters of its own (LoRA on a QLoRA or QAT base) is merged into the base
  and converted the same way when the loop passes the trained method parameters to the report
  (``report(base, peft)``); given the base alone it is reported as served as trained, an int8
  base with the float method beside it (its ``exact_match_after`` is that model's), with its
  bytes, and the int8 model of the merged weights is ``python -m peftjax.quant.convert``'s.

``served_bytes`` (top level, with ``served``, a description) is the bytes of the weights a
server holds: int8 weights, their scales and the float rest (norms; a method's parameters).

>>> comp = from_config(config, setup)  # doctest: +SKIP
"""
from __future__ import annotations

from peftjax import tree as tree_lib
from peftjax.components.base import Component
from peftjax.errors import ConfigError


def _inner_tree(method, peft_params):
  """The method's own parameters (a :class:`Quantized` wrapper's inner method's)."""
  from peftjax.quant import qat  # pylint: disable=g-import-not-at-top
  if isinstance(method, qat.Quantized):
    return method._parts(peft_params)[0]  # pylint: disable=protected-access
  return peft_params


def report_fn(config, setup):
  """``report(base) -> {'quant': ..., 'served_bytes', 'served'}`` (see the module docstring)."""
  from peftjax.quant import int8  # pylint: disable=g-import-not-at-top
  from peftjax.quant import lm  # pylint: disable=g-import-not-at-top
  from peftjax.quant import qat  # pylint: disable=g-import-not-at-top
  q, method = config.quant, setup.method
  own = _inner_tree(method, setup.trainable['peft'])
  own_bytes = qat.bytes_of(own)  # shapes are fixed from step 0: the final bytes
  static = method.static_scales(setup.trainable['peft']) if (
      isinstance(method, qat.Quantized) and method.static) else None  # never trained

  def report(base, peft=None):
    stored = qat.Quantized._stored(base)  # pylint: disable=protected-access  (QLoRA's int8)
    float_base = qat.load_int8(base, stored) if stored else base
    out = {'float_bytes': qat.bytes_of(float_base), 'method_bytes': own_bytes}
    has_own = bool(tree_lib.flatten(own))
    if has_own and peft is not None:
      # The trained method at hand (the loop passed it): merged, then converted like a model
      # trained whole (QLoRA: into the dequantized base, re-quantized).
      float_base = method.merge(base, peft)
    lsq = q.qat and q.activations == 'lsq'  # learned steps: no int8 model of them here
    if lsq or (has_own and peft is None):
      int8_bytes = (qat.bytes_of(base) if stored else int8.convert(
          setup.built.module, float_base, lm.sample_inputs(setup), q).weight_bytes)
      convert = 'int8 inference of the merged model: python -m peftjax.quant.convert'
      if lsq or (q.qat and q.of == 'effective'):  # trained as the int8 grid of these weights
        served, what = int8_bytes, f'int8 model of the merged weights (as trained); {convert}'
      else:
        served = int8_bytes + own_bytes
        what = (f'int8 base + float {method.name} parameters (unmerged), as trained; '
                f'{convert}')
      out.update(int8_base_bytes=int8_bytes)
    else:
      model, how = lm.int8_model(config, setup, float_base, static=static)
      served = model.weight_bytes
      what = f'real int8 model (weights per channel, activations {how})'
      em = lm.exact_match(config, setup, model.as_module(), model.merged_params())
      out.update(int8_layers=len(model.sites), activations=how,
                 **{f'int8_{k}': v for k, v in em.items()})
    out['served_bytes'] = served
    return {'quant': out, 'served_bytes': served, 'served': what}
  return report


def from_config(config, setup) -> Component | None:
  """On for a causal LM with ``quant.qat``, ``quant.qlora`` or ``quant.ptq``."""
  q = config.quant
  ptq = bool(q.get('ptq', False))
  if not (q.qat or q.qlora or ptq):
    return None
  causal = getattr(setup.task, 'name', '') == 'causal_lm'
  if not causal:
    if ptq:
      raise ConfigError('quant.ptq=True converts a causal LM at the end of its run; for this '
                        f'{getattr(setup.task, "name", "")} run convert the finished run: '
                        'python -m peftjax.quant.convert --config=... --workdir=...')
    return None
  return Component('quant_report', report=report_fn(config, setup))
