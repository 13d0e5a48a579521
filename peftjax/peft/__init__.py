"""PEFT methods as functional transforms, selected by ``--config.peft.method``.

The package imports its method modules (which register themselves, and import jax) on first
use of any name below, not when it is imported: :mod:`peftjax.peft.sections`, the config checks,
is then importable without jax (a bad ``--config.peft.*`` value fails in a fraction of a second).
"""
import importlib

# Each registers its methods when imported.
_METHOD_MODULES = ('baselines',  # 'full', 'linear_probe', 'bitfit'
                   'adapters',  # 'adapter'
                   'ia3', 'lora', 'prefix', 'prompt',
                   'lora_variants')  # 'pissa', 'dora'
_EXPORTS = {'Compose': 'base', 'Method': 'base', 'apply': 'base', 'build': 'base',
            'method_names': 'base', 'register': 'base', 'takes_deterministic': 'base',
            'LoRA': 'lora'}
__all__ = sorted(_EXPORTS)


def load_methods() -> None:
  """Imports every method module, so that the registry holds every method."""
  for name in _METHOD_MODULES:
    importlib.import_module(f'peftjax.peft.{name}')


def __getattr__(name):  # PEP 562: the first `peft.build`, `peft.lora`... loads the methods
  if name not in _EXPORTS and name not in _METHOD_MODULES and name != 'base':
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  load_methods()
  value = (getattr(importlib.import_module(f'peftjax.peft.{_EXPORTS[name]}'), name)
           if name in _EXPORTS else importlib.import_module(f'peftjax.peft.{name}'))
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS) | set(_METHOD_MODULES))
