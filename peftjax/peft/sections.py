"""The ``peft`` config section: what is valid in it, method by method, and its old flat names.

``peft.method`` and ``peft.head`` are shared; every method family reads one sub-section::

  peft.lora     rank, alpha, rslora, dropout, targets                         lora, pissa, dora
  peft.ia3      targets, ffn_targets                                          ia3
  peft.adapter  kind, size, activation, attn_targets, ffn_targets, ffn_inputs adapter
  peft.prompt   length, init, init_text                                       prompt
  peft.prefix   length, reparam, hidden                                       prefix

The defaults and their comments are written once, in ``configs/common.py`` (the one list of
every field, which ``--config_help`` prints); this module owns what is *valid*, and checks a
sub-section only when a method in ``peft.method`` reads it (no ``peft.lora.rank`` check for
BitFit). It imports nothing heavy (no jax), so :mod:`peftjax.validate` calls it before any
compute and a bad value fails in a fraction of a second; :func:`peftjax.peft.build` calls it too.

The flat names of earlier versions (``peft.rank``, ``peft.adapter_kind``, ...) are
:data:`RENAMED`: a command-line override with one fails naming the new field
(:mod:`peftjax.cli`), a config file that sets one fails here, and :func:`upgrade` rewrites a
stored flat section (a workdir's ``config.json``/``summary.json``, an adapter file's manifest)
into sections, so old files keep loading.
"""
from __future__ import annotations

from peftjax import fields
from peftjax.errors import ConfigError

# The registry's names (peftjax.peft.method_names(); tests/test_config_errors.py keeps them
# equal), repeated so that checking a config imports no method module.
METHOD_NAMES = ('adapter', 'bitfit', 'dora', 'full', 'ia3', 'linear_probe', 'lora', 'pissa',
                'prefix', 'prompt')
# The sub-section each method reads; methods not listed (full, linear_probe, bitfit) read none.
SECTION_OF = {'lora': 'lora', 'pissa': 'lora', 'dora': 'lora', 'ia3': 'ia3',
              'adapter': 'adapter', 'prompt': 'prompt', 'prefix': 'prefix'}
SECTIONS = ('lora', 'ia3', 'adapter', 'prompt', 'prefix')

# Valid values the heavy modules act on (kept equal to them by tests/test_config_errors.py).
ADAPTER_KINDS = ('houlsby', 'pfeiffer', 'parallel')  # peftjax.peft.adapters.KINDS
ADAPTER_ACTIVATIONS = ('relu', 'gelu')  # peftjax.peft.adapters.ACTIVATIONS
PROMPT_INITS = ('vocab', 'text')  # peftjax.peft.prompt.PROMPT_INITS

# Old flat name -> its place now (both relative to ``peft``).
RENAMED = {
    'rank': 'lora.rank', 'alpha': 'lora.alpha', 'rslora': 'lora.rslora',
    'dropout': 'lora.dropout', 'targets': 'lora.targets',
    'ia3_targets': 'ia3.targets', 'ia3_ffn_targets': 'ia3.ffn_targets',
    'adapter_kind': 'adapter.kind', 'adapter_size': 'adapter.size',
    'adapter_activation': 'adapter.activation', 'adapter_attn_targets': 'adapter.attn_targets',
    'adapter_ffn_targets': 'adapter.ffn_targets', 'adapter_ffn_inputs': 'adapter.ffn_inputs',
    'num_prompts': 'prompt.length', 'prompt_init': 'prompt.init',
    'prompt_init_text': 'prompt.init_text',
    'num_prefix': 'prefix.length', 'prefix_reparam': 'prefix.reparam',
    'prefix_hidden': 'prefix.hidden',
}


def upgrade(peft: dict) -> dict:
  """A stored ``peft`` section (a plain dict) in sections: old flat fields moved to their new
  place; a dict already in sections is returned equal. Never mutates ``peft``.

  >>> upgrade({'method': 'lora', 'head': 'classifier/', 'rank': 4, 'alpha': 8.0})
  {'method': 'lora', 'head': 'classifier/', 'lora': {'rank': 4, 'alpha': 8.0}}
  >>> upgrade({'method': 'lora', 'lora': {'rank': 4}}) == {'method': 'lora', 'lora': {'rank': 4}}
  True
  """
  out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in peft.items() if k not in RENAMED}
  for old, new in RENAMED.items():
    if old in peft:
      section, field = new.split('.')
      out.setdefault(section, {}).setdefault(field, peft[old])
  return out


def methods(peft) -> list[str]:
  """The method names in ``peft.method`` (``'lora+ia3'`` -> ``['lora', 'ia3']``)."""
  return peft['method'].split('+') if isinstance(peft['method'], str) else [peft['method']]


def check(peft, where: str = 'peft') -> None:
  """Raises :class:`ConfigError` for the first invalid field of the ``peft`` section ``peft``
  (a ConfigDict or dict): ``method``, ``head``, an old flat name, and the sub-sections of the
  methods in use (each only when used).

  >>> check(common.get_config().peft)  # doctest: +SKIP
  """
  for old, new in RENAMED.items():
    if old in peft:
      raise ConfigError(f'config.{where}.{old} was renamed: use config.{where}.{new} (e.g. '
                        f'c.{where}.{new} = {peft[old]!r} in a config file, '
                        f'--config.{where}.{new}=... on the command line)')
  names = methods(peft)
  if not (all(n in METHOD_NAMES for n in names) and len(set(names)) == len(names)):
    _fail(f'{where}.method', peft['method'],
          ', '.join(METHOD_NAMES) + ', or several distinct ones joined by "+"')
  _regex(f'{where}.head', peft['head'])
  for section in dict.fromkeys(SECTION_OF[n] for n in names if n in SECTION_OF):
    if section not in peft:
      users = ', '.join(n for n in names if SECTION_OF.get(n) == section)
      raise ConfigError(f'config.{where} has no {section!r} section, which peft.method='
                        f'{peft["method"]!r} reads ({users}); valid: a config built from '
                        'configs/common.py')
    CHECKS[section](peft[section], f'{where}.{section}')


# ---------------------------------------------------------------------------- one per section


def check_lora(s, where: str = 'peft.lora') -> None:
  """``peft.lora``: rank, alpha, rslora, dropout, targets (LoRA, PiSSA, DoRA)."""
  _int(f'{where}.rank', s['rank'], 1, 'a positive integer')
  _num(f'{where}.alpha', s['alpha'], lambda v: v > 0, 'a positive number')
  _bool(f'{where}.rslora', s['rslora'])
  _num(f'{where}.dropout', s['dropout'], lambda v: 0.0 <= v < 1.0, '0 <= dropout < 1')
  _regex(f'{where}.targets', s['targets'])


def check_ia3(s, where: str = 'peft.ia3') -> None:
  """``peft.ia3``: targets (outputs scaled), ffn_targets (inputs scaled); not both empty."""
  _regex(f'{where}.targets', s['targets'])
  _regex(f'{where}.ffn_targets', s['ffn_targets'])
  if not s['targets'] and not s['ffn_targets']:
    raise ConfigError(f"config.{where}.targets and config.{where}.ffn_targets are both ''; IA3 "
                      f"would train nothing; valid: at least one regex, e.g. "
                      f"--config.{where}.targets='attention/(key|value)$'")


def check_adapter(s, where: str = 'peft.adapter') -> None:
  """``peft.adapter``: kind, size, activation and the three module-path regexes."""
  _check(s['kind'] in ADAPTER_KINDS, f'{where}.kind', s['kind'],
         ', '.join(map(repr, ADAPTER_KINDS)))
  _int(f'{where}.size', s['size'], 1, 'a positive integer (the bottleneck width)')
  _check(s['activation'] in ADAPTER_ACTIVATIONS, f'{where}.activation', s['activation'],
         ', '.join(map(repr, ADAPTER_ACTIVATIONS)))
  for field in ('attn_targets', 'ffn_targets', 'ffn_inputs'):
    _regex(f'{where}.{field}', s[field])


def check_prompt(s, where: str = 'peft.prompt') -> None:
  """``peft.prompt``: length, init ('vocab' | 'text'), init_text (needed by 'text')."""
  _int(f'{where}.length', s['length'], 1, 'a positive integer (soft-prompt vectors)')
  _check(s['init'] in PROMPT_INITS, f'{where}.init', s['init'], ', '.join(map(repr, PROMPT_INITS)))
  _check(isinstance(s['init_text'], str), f'{where}.init_text', s['init_text'], 'a string')
  if s['init'] == 'text' and not s['init_text'].strip():
    raise ConfigError(f"config.{where}.init='text' needs a non-empty {where}.init_text; valid: "
                      f"--config.{where}.init_text='classify the sentiment' or init='vocab'")


def check_prefix(s, where: str = 'peft.prefix') -> None:
  """``peft.prefix``: length, reparam (bool), hidden (the reparameterization MLP's width)."""
  _int(f'{where}.length', s['length'], 1, 'a positive integer')
  _bool(f'{where}.reparam', s['reparam'])
  _int(f'{where}.hidden', s['hidden'], 1, 'a positive integer')


CHECKS = {'lora': check_lora, 'ia3': check_ia3, 'adapter': check_adapter,
          'prompt': check_prompt, 'prefix': check_prefix}


# ---------------------------------------------------------------------------- helpers


_fail, _check, _int, _num = fields.fail, fields.check, fields.integer, fields.number
_bool, _regex = fields.boolean, fields.regex
