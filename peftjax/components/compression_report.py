"""The ``compression`` entry of ``summary.json``: what the model preparation did, and the final
model's size (parameters, zeros in the prune targets, sparse storage bytes), with the method's
own parameters served beside it (``served_bytes``: the compressed base's smallest stored form
plus the method's parameters, unmerged; a quantized model's is the quant report's)."""
from __future__ import annotations

from peftjax import tree as tree_lib
from peftjax.components.base import Component
from peftjax.compress import plan as plan_lib


def _method_bytes(setup) -> int:
  """Bytes of the method's own parameters (shapes are fixed from step 0)."""
  return int(sum(x.size * x.dtype.itemsize for x in tree_lib.flatten(
      setup.trainable['peft']).values()))


def from_config(config, setup) -> Component | None:
  """On when the model preparation compressed something."""
  plan = setup.plan
  if not plan.report and plan.masks is None:
    return None
  method_bytes = _method_bytes(setup)

  def report(base):
    size = plan_lib.size_summary(base, config.compress)
    stored, form = next((size[k], k) for k in ('nm_bytes', 'sparse_bytes', 'float32_bytes')
                        if k in size)
    what = {'nm_bytes': 'N:M-sparse base', 'sparse_bytes': 'sparse base (relative indices)',
            'float32_bytes': 'float32 model'}[form]
    served = stored + method_bytes
    if method_bytes:
      what += f' + float {setup.method.name} parameters (unmerged)'
    return {'compression': {**plan.report, **size, 'method_bytes': method_bytes,
                            'served_bytes': served},
            'served_bytes': served, 'served': what}
  return Component('compression_report', report=report)
