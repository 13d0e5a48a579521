"""peftjax: parameter-efficient fine-tuning, quantization, compression and MoE in JAX/Flax.

The verbs a user needs are attributes of the package, loaded on first use (so that
``import peftjax`` stays light and a bad config fails before jax is imported)::

  import peftjax as pj
  cfg = pj.config('quickstart')                 # configs/quickstart.py, or any config file
  model = pj.build_model(cfg, num_classes=2)    # the bundled MiniLM-L6, a fresh head
  method = pj.build_method(cfg.peft)            # pj.method_names(); 'lora+ia3' composes
  lora = method.init(key, model.module, model.params, pj.sample_inputs(model, cfg))
  head, frozen = pj.partition(model.params, method.trainable_base)
  logits = pj.apply(model.module, method, model.params, lora, inputs)
  merged = pj.merge(method, model.params, lora)
  pj.train_and_evaluate(cfg, '/tmp/run')        # the whole loop
"""
__version__ = '0.1.0'

_EXPORTS = {
    # configs, models, methods
    'config': 'peftjax.api', 'build_model': 'peftjax.api', 'sample_inputs': 'peftjax.api',
    'build_method': 'peftjax.api', 'method_names': 'peftjax.api', 'apply': 'peftjax.api',
    'merge': 'peftjax.api',
    # models written elsewhere (Flax NNX)
    'from_nnx': 'peftjax.models.nnx_bridge', 'to_nnx': 'peftjax.models.nnx_bridge',
    # parameter trees
    'partition': 'peftjax.api', 'combine': 'peftjax.api', 'size_report': 'peftjax.api',
    # training
    'optimizer': 'peftjax.api', 'task': 'peftjax.api', 'TrainState': 'peftjax.run',
    'build_setup': 'peftjax.run', 'make_forward': 'peftjax.run',
    'make_train_step': 'peftjax.step', 'train_and_evaluate': 'peftjax.train',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    import importlib  # pylint: disable=g-import-not-at-top
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))
