"""Shared command-line plumbing of the entry points (training, int8 conversion, compression).

Config files and overrides fail in one line, before anything heavy is imported:

* ``--config=path[:arg]`` is loaded by :func:`load_config_file` (every ``DEFINE_config_file``
  flag of the program is switched to it in :func:`parse_flags`): a missing file, a syntax error,
  no ``get_config``, a ``get_config`` that raises, an unknown ``:variant`` or an ``arg`` for a
  config without variants are each a :class:`~peftjax.errors.ConfigError` naming the file.
* ``--config.section.field=value`` names are checked against the loaded config
  (:func:`check_override_names`: the unknown part, the closest match, the valid names); a value
  of the wrong type names the field, the value and the type (:func:`parse_flags`). Values are then
  checked by :mod:`peftjax.validate`.

Tools that build configs without absl (``experiments/sweep.py``) use the same functions.
"""
from __future__ import annotations

import difflib
import inspect
import pathlib
import re
import sys
import types

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections.config_flags import config_flags
from ml_collections.config_flags import config_path

from peftjax.errors import ConfigError
from peftjax.errors import UserInputError

# Config files import `configs.common`: the repository root must be importable.
_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every entry point imports this module, so each has --verbose: full tracebacks instead of the
# one-line messages of peftjax.errors (PEFTJAX_VERBOSE=1 does the same).
flags.DEFINE_bool('verbose', False, 'Show the full traceback of a failure instead of one line '
                  '(also: PEFTJAX_VERBOSE=1).')
flags.DEFINE_bool('config_help', False, 'List every field of the --config file (its value, the '
                  "default when it differs, and the field's comment from configs/common.py) "
                  'and exit; other required flags are not needed.')


# ---------------------------------------------------------------------------- config files


def _config_examples() -> str:
  names = sorted(p.stem for p in (_ROOT / 'configs').glob('*.py')
                 if not p.name.startswith('_') and p.name != 'common.py')
  return f'configs/quickstart.py (in configs/: {", ".join(names)})'


def _near_files(path: pathlib.Path) -> str:
  """' (did you mean ...?)' for a missing config file, from the files beside it."""
  parent = path.parent if path.parent.is_dir() else _ROOT / 'configs'
  if not parent.is_dir():
    return ''
  files = [p.name for p in parent.glob('*.py')]
  close = difflib.get_close_matches(path.name, files, n=1, cutoff=0.6)
  if not close:
    return ''
  shown = path.parent / close[0] if path.parent.is_dir() else parent.relative_to(_ROOT) / close[0]
  return f' (did you mean {str(shown)!r}?)'


def _line_in(e: BaseException, filename: str) -> str:
  """' (line N)': the deepest frame of ``e``'s traceback inside ``filename``."""
  line, tb = None, e.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_filename == filename:
      line = tb.tb_lineno
    tb = tb.tb_next
  return f' (line {line})' if line else ''


def _oneline(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _takes_arg(fn) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
             for p in params)


def load_config_file(spec: str, *, lock: bool = True, flag: str = 'config'):
  """The ``ConfigDict`` of ``get_config([arg])`` in the file ``spec = 'path[:arg]'``.

  Raises :class:`ConfigError` (message ``--config=<spec>: ...``) for a missing or unreadable
  file, a syntax error, a file without ``get_config``, a ``get_config`` that raises, an unknown
  variant, an ``arg`` for a ``get_config()`` that takes none, or a result that is not a
  ``ConfigDict``. With ``lock`` the config is locked (a misspelled field fails with its name).

  >>> c = load_config_file('configs/moe.py:lora')  # doctest: +SKIP
  >>> c.peft.method                                 # doctest: +SKIP
  'lora'
  """
  spec = str(spec)
  where = f'--{flag}={spec}'
  path_str, sep, arg = spec.partition(':')
  if not path_str:
    raise ConfigError(f'{where}: no config file given; valid: a Python config file, e.g. '
                      f'{_config_examples()}')
  path = pathlib.Path(path_str).expanduser()
  if not path.exists():
    raise ConfigError(f'{where}: no such file{_near_files(path)}; valid: a Python config '
                      f'file, e.g. {_config_examples()}')
  if path.is_dir():
    raise ConfigError(f'{where}: is a directory, not a config file; valid: a Python config '
                      f'file, e.g. {_config_examples()}')
  try:
    source = path.read_bytes()
  except OSError as e:
    raise ConfigError(f'{where}: cannot be read ({e.strerror or _oneline(e)})') from None
  filename = str(path)
  try:
    code = compile(source, filename, 'exec')
  except SyntaxError as e:
    text = f': {e.text.strip()!r}' if e.text and e.text.strip() else ''
    raise ConfigError(f'{where}: syntax error at line {e.lineno}: {e.msg}{text}') from None
  except ValueError as e:  # e.g. null bytes: not a Python file at all
    raise ConfigError(f'{where}: not a Python file ({e})') from None
  if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
  module = types.ModuleType(f'{flag}_config')
  module.__file__ = filename
  sys.modules[module.__name__] = module  # dataclasses and pickling look modules up by name
  try:
    exec(code, module.__dict__)  # pylint: disable=exec-used
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'{where}: loading the file raised {_oneline(e)}'
                      f'{_line_in(e, filename)}') from None
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise ConfigError(f'{where}: the file defines no get_config(); valid: a config file with '
                      'def get_config(arg=None) returning a ml_collections.ConfigDict, e.g. '
                      f'{_config_examples()}')
  takes_arg = _takes_arg(get_config)
  if sep and arg and not takes_arg:
    raise ConfigError(f"{where}: unknown variant {arg!r}: this config has no variants (its "
                      f"get_config() takes no argument); valid: --{flag}={path_str}")
  call = f'get_config({arg!r})' if sep and takes_arg else 'get_config()'
  try:
    config = get_config(arg) if sep and takes_arg else get_config()
  except UserInputError as e:
    raise ConfigError(f'{where}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'{where}: {call} raised {_oneline(e)}{_line_in(e, filename)}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{where}: {call} returned {type(config).__name__}'
                      f'{" (a missing return?)" if config is None else ""}; valid: a '
                      'ml_collections.ConfigDict')
  if lock:
    config.lock()
  return config


# ---------------------------------------------------------------------------- override names


def _section_listing(node) -> str:
  sections = [k for k in node.keys() if isinstance(node[k], ml_collections.ConfigDict)]
  fields = [k for k in node.keys() if k not in sections]
  parts = []
  if sections:
    parts.append('sections ' + ', '.join(sections))
  if fields:
    parts.append('fields ' + ', '.join(fields))
  return '; '.join(parts)


def check_override_names(config, names, *, flag: str = 'config', values=None) -> None:
  """A :class:`ConfigError` for the first dotted name in ``names`` that is not a field of
  ``config`` (a misspelled section or field, a section set as a value, a field used as a section,
  a renamed field: its new name, with the value from ``values`` (name -> the text given)).

  >>> check_override_names(common.get_config(), ['train.stepz'])  # doctest: +SKIP
  ConfigError: --config.train.stepz: unknown field 'stepz' in section 'train' (did you mean
  'steps'?); valid: fields steps, batch_size, ...
  >>> check_override_names(config, ['peft.rank'], values={'peft.rank': '16'})  # doctest: +SKIP
  ConfigError: config.peft.rank was renamed: use --config.peft.lora.rank=16
  """
  from peftjax import validate  # pylint: disable=g-import-not-at-top  (light: no jax)
  for name in names:
    new = validate.renamed(name)
    if new is not None:
      value = (values or {}).get(name)
      raise ConfigError(f'{flag}.{name} was renamed: use --{flag}.{new}'
                        f'{"=" + value if value is not None else "=<value>"}')
    node, done = config, []
    for part in name.split('.'):
      if '[' in part:  # an indexed element: ml_collections resolves it
        break
      here = '.'.join(done)
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f'--{flag}.{name}: {here} is a field ({type(node).__name__}), not a '
                          f'section; valid: --{flag}.{here}=<value>')
      keys = list(node.keys())
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        what = 'section' if len(done) + 1 < len(name.split('.')) else 'field'
        scope = f" in section '{here}'" if here else ''
        raise ConfigError(f'--{flag}.{name}: unknown {what} {part!r}{scope}{hint}; valid: '
                          f'{_section_listing(node)}')
      node = node[part]
      done.append(part)
    else:
      if isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f'--{flag}.{name} is a section, not a field; valid: one of its '
                          f'fields (--{flag}.{name}.<field>=<value>): {_section_listing(node)}')


_ARGV = None  # the argv being parsed by parse_flags (ml_collections reads sys.argv otherwise)
_LOADED = {}  # flag name -> the config it loaded (for messages about its overrides' values)


def _overrides(flag: str) -> dict[str, str | None]:
  """``{dotted name: the value text (None for a bare boolean flag)}`` of ``--<flag>.x.y=v``."""
  argv = list(sys.argv if _ARGV is None else _ARGV)
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  except flags.Error:
    pass
  out = {}
  for a in argv[1:]:
    m = re.match(rf'-{{1,2}}(no)?{re.escape(flag)}\.', a)
    if m:
      key, eq, value = a.partition('=')
      name = key.split('.', 1)[1]
      out.setdefault(name, value if eq else ('false' if m.group(1) else None))
  return out


class _ConfigFileParser(config_flags.ConfigFileFlagParser):
  """ml_collections' config-file parser, with :func:`load_config_file`'s one-line errors and
  override names checked as soon as the file is loaded."""

  def parse(self, path):
    if isinstance(path, ml_collections.ConfigDict):
      return path
    config = load_config_file(path, lock=self._lock_config, flag=self.name)
    overrides = _overrides(self.name)
    check_override_names(config, list(overrides), flag=self.name, values=overrides)
    _LOADED[self.name] = config
    return config



def _use_config_loader(flag_values) -> None:
  """Switches every config-file flag of ``flag_values`` to :class:`_ConfigFileParser`."""
  for name in list(flag_values):
    flag = flag_values[name]
    parser = getattr(flag, 'parser', None)
    if (config_flags.is_config_flag(flag) and isinstance(parser, config_flags.ConfigFileFlagParser)
        and not isinstance(parser, _ConfigFileParser)):
      flag.parser = _ConfigFileParser(parser.name, getattr(parser, '_lock_config', True))


# ---------------------------------------------------------------------------- config help

COMMON = _ROOT / 'configs' / 'common.py'  # every field's default and comment


def _dotted(node) -> str | None:
  """``'peft.lora.rank'`` for the assignment target ``c.peft.lora.rank`` (root name dropped)."""
  import ast  # pylint: disable=g-import-not-at-top
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return '.'.join(reversed(parts)) if isinstance(node, ast.Name) and parts else None


def field_comments(source: pathlib.Path = COMMON) -> dict[str, str]:
  """``{dotted field: its comment}`` read from a config file's source, in source order: the
  comment block right above the field's assignment (no blank line between) and the comment on
  its line(s).

  >>> field_comments()['peft.lora.rank']  # doctest: +SKIP
  'LoRA rank r'
  """
  import ast  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import tokenize  # pylint: disable=g-import-not-at-top
  text = source.read_text()
  trailing, alone = {}, {}  # line -> comment text
  for tok in tokenize.generate_tokens(io.StringIO(text).readline):
    if tok.type == tokenize.COMMENT and 'pylint:' not in tok.string:
      body = tok.string.lstrip('#').strip()
      (alone if not tok.line[:tok.start[1]].strip() else trailing)[tok.start[0]] = body
  out = {}
  for node in sorted((n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Assign) and
                      len(n.targets) == 1 and _dotted(n.targets[0])), key=lambda n: n.lineno):
    block, line = [], node.lineno - 1
    while line in alone:
      block.insert(0, alone[line])
      line -= 1
    own = [trailing[l] for l in range(node.lineno, node.end_lineno + 1) if l in trailing]
    out[_dotted(node.targets[0])] = ' '.join(block + own)
  return out


def _leaves(config, prefix: str = ''):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield f'{prefix}{key}', value, True
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value, False


def config_help(config, *, flag: str = 'config', source: pathlib.Path = COMMON) -> str:
  """Every field of ``config``, one line each: ``name = value  # comment``, with
  ``(default: ...)`` when the value differs from ``source``'s; a section's line ends with ``:``.

  >>> print(config_help(load_config_file('configs/quickstart.py')))  # doctest: +SKIP
  ...
  peft.lora.rank = 8  # LoRA rank r
  """
  comments = field_comments(source)
  defaults = {}
  try:
    defaults = dict((n, v) for n, v, sec in _leaves(load_config_file(str(source), lock=False))
                    if not sec)
  except ConfigError:
    pass
  shown = source.relative_to(_ROOT) if source.is_relative_to(_ROOT) else source
  lines = [f'Fields of --{flag} (override any with --{flag}.<name>=<value>); defaults and '
           f'comments from {shown}:']
  order = {name: i for i, name in enumerate(comments)}  # the source's order, others after
  for name, value, is_section in sorted(_leaves(config), key=lambda f: (
      [order.get('.'.join(f[0].split('.')[:i + 1]), len(order))
       for i in range(f[0].count('.') + 1)], f[0])):
    note = comments.get(name, '')
    depth = name.count('.')
    if is_section:
      lines.append(f'{"  " * depth}{name}:' + (f'  # {note}' if note else ''))
      continue
    default = defaults.get(name, value)
    differs = f'  (default: {default!r})' if default != value else ''
    lines.append(f'{"  " * depth}{name} = {value!r}{differs}' + (f'  # {note}' if note else ''))
  return '\n'.join(lines)


def _print_config_help() -> bool:
  """Prints :func:`config_help` of every loaded config flag when ``--config_help`` is given."""
  if not (flags.FLAGS['config_help'].present and flags.FLAGS['config_help'].value and _LOADED):
    return False
  for name, config in _LOADED.items():
    value = flags.FLAGS[name].value  # the config with the command line's overrides applied
    print(config_help(value if isinstance(value, ml_collections.ConfigDict) else config,
                      flag=name))
  return True


# ---------------------------------------------------------------------------- flag parsing

_TYPE_WORDS = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string',
               tuple: 'a Python tuple literal'}


def _value_error(e: flags.Error) -> ConfigError | None:
  """The one line for ``--config.a.b=<value>`` that the field's type does not accept."""
  msg = str(e)
  for flag, config in _LOADED.items():
    m = re.match(rf'flag --({re.escape(flag)})\.([\w.\[\]]+)=', msg)
    if not m:
      continue
    path = m.group(2)
    inner = e.__context__
    raw = msg[m.end():]
    if inner is not None and raw.endswith(f': {inner}'):
      raw = raw[:-len(f': {inner}')]
    raw = re.sub(r"^\[(['\"])(.*)\1\]$", r'\2', raw)  # a tuple flag shows its values as a list
    try:
      kind = config_path.get_type(path, config)
      default = config_path.get_value(path, config)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
      return None
    from peftjax import validate  # pylint: disable=g-import-not-at-top
    form = validate.TUPLE_FORMS.get(path) if kind is tuple else None
    if form:  # the form has its own example
      fixed = validate.quoted_literal(raw)
      hint = f' (did you mean --{flag}.{path}="{fixed}"?)' if fixed else ''
      return ConfigError(f'--{flag}.{path}={raw!r} is invalid: not a Python tuple literal{hint}; '
                         f'valid: {form}')
    want = _TYPE_WORDS.get(kind, f'a {getattr(kind, "__name__", kind)}')
    example = (f'"{default!r}"' if isinstance(default, tuple) else
               str(default).lower() if isinstance(default, bool) else repr(default)
               if isinstance(default, str) else str(default))
    return ConfigError(f'--{flag}.{path}={raw!r} is invalid; valid: {want}, e.g. '
                       f'--{flag}.{path}={example} (the config\'s value)')
  return None


def _flag_error(e: BaseException) -> UserInputError:
  """A one-line error for a failure of absl flag parsing."""
  cause = e
  while cause is not None:  # absl re-raises a parser's ValueError as IllegalFlagValueError
    if isinstance(cause, UserInputError):
      return cause
    cause = cause.__cause__ or cause.__context__
  if isinstance(e, flags.IllegalFlagValueError):
    out = _value_error(e)
    if out is not None:
      return out
  if isinstance(e, config_flags.FlagOrderError):
    m = re.match(r'Found (\S+) in argv before a value for (--\S+) was', str(e))
    if m:
      return ConfigError(f'{m.group(1)} comes before {m.group(2)}=<file>; valid: '
                         f'{m.group(2)}=<file> first, then its overrides')
  if isinstance(e, flags.UnrecognizedFlagError):
    for name in flags.FLAGS:
      if config_flags.is_config_flag(flags.FLAGS[name]) and re.match(
          rf'(no)?{re.escape(name)}\.', e.flagname or ''):
        return ConfigError(f'--{e.flagname}: an override needs the config file first; valid: '
                           f'--{name}=<file.py> before --{e.flagname}=<value>')
  lines = str(e).encode().decode('unicode_escape', errors='replace').strip('\'"').splitlines()
  if isinstance(e, AttributeError) and lines:  # ml_collections: a key the config lacks
    lines[0] = f"unknown config field '{lines[0].strip(chr(39))}'."
  return ConfigError(f'bad flag or config override: {" ".join(lines) or type(e).__name__}')


def parse_flags(argv):
  """absl flag parsing where a bad ``--config`` file, override name or value is one line.

  Raises :class:`ConfigError` (printed as ``error: ...`` by :func:`peftjax.errors.run`).
  """
  global _ARGV
  _use_config_loader(flags.FLAGS)
  _ARGV = list(argv)
  try:
    out = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # Every flag parsed and only a validator failed (e.g. --workdir is required): the listing
    # needs none of the other flags.
    if flags.FLAGS.is_parsed() and _print_config_help():
      raise SystemExit(0) from None
    raise _flag_error(e) from None
  finally:
    _ARGV = None
  if _print_config_help():
    raise SystemExit(0)
  return out


def quiet(argv) -> None:
  """No stray arguments; absl logs at WARNING unless ``--verbosity`` is given (orbax and the
  backend probe log at INFO)."""
  if len(argv) > 1:
    raise app.UsageError(f'stray arguments {argv[1:]}; valid: flags only, each as --name=value')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def begin(argv, config) -> None:
  """The common start of an entry point: no stray arguments, quiet orbax, a validated config.

  A config error exits with its one-line message before any compute (and before jax is
  imported: :mod:`peftjax.validate` checks plain values without it).
  """
  quiet(argv)
  from peftjax import validate  # pylint: disable=g-import-not-at-top
  try:
    validate.validate(config)
  except UserInputError as e:
    raise SystemExit(f'error: {e}') from None


def enable_compilation_cache(path: str):
  """Persists compiled executables under ``path``; the key is the program, not the run."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(path).expanduser()))
  # Cache everything worth a few hundred ms; train/eval steps take 5-30 s to compile here.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
