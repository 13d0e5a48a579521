"""Config validation at the boundary: one clear message before any compute.

Every error names the field, the bad value, and what would be valid. Fields are checked in
dependency order (``train.steps`` before the ``optim.warmup_steps`` that must be smaller), so the
message names the root cause.

This module is the dispatcher: it checks the plain fields of the small sections (``train``,
``model``, ``data``, ``optim``, ``mesh``) and the checks that span sections, and hands every
other section to the package that owns it:

* ``peft`` -> :func:`peftjax.peft.sections.check` (each method's sub-section only when the
  method is in use; light: no jax);
* ``moe`` -> :func:`peftjax.moe.section.check`, ``quant`` -> :func:`peftjax.quant.qat.check_config`,
  ``compress`` -> :func:`peftjax.compress.plan.validate`, ``model.pretrained`` ->
  :func:`peftjax.models.hf_bert.check_model_dir`: imported only when the section is in use.

Plain values are checked without jax, flax or optax (a bad override fails in a fraction of a
second): the names that the heavy modules own (models, poolings, schedules, mesh axes) are
repeated here and kept equal to their registries by ``tests/test_config_errors.py``.
Stored configs of earlier versions (flat ``peft.rank`` ...) are brought to today's sections by
:func:`upgrade`, and :func:`renamed` names a field's new place for the command line. What
needs the data set or the model's parameter paths (:func:`validate_data`,
:func:`validate_params`) runs in ``run.build_setup``, before the run creates its workdir.
"""
from __future__ import annotations

import ast
import os
import pathlib
import re

from peftjax import fields
from peftjax.errors import ConfigError
from peftjax.peft import sections as peft_sections

# Registries of heavy modules, repeated so that validation imports none of them.
METHOD_NAMES = peft_sections.METHOD_NAMES  # peftjax.peft.method_names()
MODEL_NAMES = ('bert', 'mlp', 'cnn', 'llama')  # peftjax.models.build.MODEL_NAMES
POOLINGS = ('mean', 'cls', 'cls_pooler')  # peftjax.models.bert.POOLINGS
REMAT_POLICIES = ('none', 'full', 'dots')  # peftjax.models.bert.REMAT_POLICIES
SCHEDULES = ('cosine', 'linear', 'constant')  # peftjax.optim.SCHEDULES
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')  # the axes of sharding.make_mesh's mesh
# The bundled data sets and what they hold (peftjax.data.KNOWN); other names are checked once
# the data set is opened (validate_data).
KNOWN_DATA = {'rotten_tomatoes': 'text', 'mnist5k': 'image', 'digits': 'image',
              # peftjax.data.lm_builders.KNOWN_LM: data for causal LMs
              'rt_instructions': 'lm', 'word_reverse': 'lm', 'hamlet_text': 'lm'}
MODEL_INPUTS = {'bert': 'text', 'mlp': 'image', 'cnn': 'image', 'llama': 'lm'}
# What each task trains (peftjax/tasks/): the models it fits.
TASK_MODELS = {'classification': ('bert', 'mlp', 'cnn'), 'causal_lm': ('llama',)}
PACKINGS = ('pack', 'bucket', 'none')  # peftjax.data.lm_pipeline.PACKINGS

# The valid form of each tuple-valued field, for messages (here and for a bad override).
TUPLE_FORMS = {
    'mesh.rules': ("pairs (logical axis name, mesh axes), the mesh axes None, one of "
                   f"{', '.join(map(repr, MESH_AXES))} or a tuple of them, e.g. "
                   "--config.mesh.rules=\"(('batch', ('data', 'fsdp')), ('embed', None))\""),
    'optim.lr_multipliers': ("pairs (regex over trainable parameter paths, positive factor), "
                             "e.g. --config.optim.lr_multipliers=\"(('lora_b$', 16.0),)\""),
    'train.unfreeze': ("pairs (step, regex over base parameter paths) with non-decreasing steps "
                       ">= 0, e.g. --config.train.unfreeze=\"((0, 'classifier/'), "
                       "(100, 'layer_5/'))\""),
    'model.hidden': 'positive layer sizes, e.g. --config.model.hidden="(256, 128)"',
}


# The field checks every section owner shares (peftjax/fields.py).
_fail, _check, _is_int, _is_num = fields.fail, fields.check, fields.is_int, fields.is_num
_int, _num, _regex = fields.integer, fields.number, fields.regex


# ---------------------------------------------------------------------------- tuple fields


def quoted_literal(text: str) -> str | None:
  """``text`` with its bare names quoted, if that makes it a Python literal: the form a shell
  leaves of ``(('batch', 'data'),)`` typed without inner quotes."""
  fixed = re.sub(r"(?<!['\"\w])([A-Za-z_][\w.$/*^-]*)(?!['\"\w])",
                 lambda m: m.group(1) if m.group(1) in ('None', 'True', 'False')
                 else repr(m.group(1)), text)
  try:
    value = ast.literal_eval(fixed)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return None
  return repr(value) if isinstance(value, (tuple, list)) else None


def _tuple_field(field: str, value, entry_problem) -> tuple:
  """``value`` as a tuple of entries for which ``entry_problem(entry)`` (a str or None) is None.

  An override that is not a Python literal reaches here as a 1-tuple of its text (the flag
  parser keeps what it cannot read): the message says so and suggests the quoted form.
  """
  form = TUPLE_FORMS[field]
  if not isinstance(value, (tuple, list)):
    _fail(field, value, form)
  if (len(value) == 1 and isinstance(value[0], str) and value[0].lstrip()[:1] in '([' and
      entry_problem(value[0])):
    fixed = quoted_literal(value[0])
    hint = f' (did you mean --config.{field}="{fixed}"?)' if fixed else ' (quote each name)'
    raise ConfigError(f'config.{field}={value[0]!r} is invalid: it is not a Python tuple '
                      f'literal{hint}; valid: {form}')
  for entry in value:
    problem = entry_problem(entry)
    if problem:
      if value and not isinstance(value[0], (tuple, list)) and not entry_problem(tuple(value)):
        problem += f'; one pair needs a trailing comma: ({tuple(value)!r},)'
      raise ConfigError(f'config.{field} entry {entry!r} is invalid ({problem}); valid: {form}')
  return tuple(value)


def _rule_problem(entry) -> str | None:
  if not isinstance(entry, (tuple, list)) or len(entry) != 2:
    return 'not a (logical axis, mesh axes) pair'
  name, axes = entry
  if not isinstance(name, str) or not name:
    return f'the logical axis name {name!r} is not a non-empty string'
  names = () if axes is None else (axes,) if isinstance(axes, str) else axes
  if not isinstance(names, (tuple, list)) or not all(isinstance(a, str) for a in names):
    return f'the mesh axes {axes!r} are not None, a mesh axis name or a tuple of them'
  unknown = [a for a in names if a not in MESH_AXES]
  if unknown:
    return f'{unknown[0]!r} is not a mesh axis'
  if len(set(names)) != len(names):
    return f'a mesh axis appears twice in {axes!r}'
  return None


def check_mesh_rules(rules, field: str = 'mesh.rules') -> tuple:
  """``config.mesh.rules`` as a tuple of ``(logical name, None | axis | tuple of axes)`` pairs
  (for ``nn.logical_axis_rules``); a :class:`ConfigError` naming the bad entry otherwise.

  >>> check_mesh_rules((('batch', ['data', 'fsdp']), ('embed', None)))
  (('batch', ('data', 'fsdp')), ('embed', None))
  >>> check_mesh_rules((('batch', 'dta'),))
  Traceback (most recent call last):
  ...
  peftjax.errors.ConfigError: config.mesh.rules entry ('batch', 'dta') is invalid ('dta' is not a mesh axis); valid: ...
  """
  rules = _tuple_field(field, rules, _rule_problem)
  return tuple((str(k), v if v is None or isinstance(v, str) else tuple(v)) for k, v in rules)


def _regex_problem(regex) -> str | None:
  """Why ``regex`` is not a usable parameter-path selector, or None."""
  if not isinstance(regex, str):
    return f'the regex {regex!r} is not a string'
  try:
    re.compile(regex)
  except re.error as e:
    return f'invalid selector regex {regex!r}: {e}'
  return None


def _multiplier_problem(entry) -> str | None:
  if not isinstance(entry, (tuple, list)) or len(entry) != 2:
    return 'not a (regex, factor) pair'
  regex, factor = entry
  if _regex_problem(regex):
    return _regex_problem(regex)
  if not _is_num(factor) or factor <= 0:
    return f'the factor {factor!r} is not a positive number'
  return None


def check_lr_multipliers(multipliers) -> tuple[tuple[str, float], ...]:
  """``optim.lr_multipliers`` as ``((regex, factor), ...)``; a ConfigError naming the bad entry.

  >>> check_lr_multipliers([('lora_b$', 16)])
  (('lora_b$', 16.0),)
  """
  entries = _tuple_field('optim.lr_multipliers', multipliers, _multiplier_problem)
  return tuple((r, float(f)) for r, f in entries)


def _unfreeze_problem(entry) -> str | None:
  if not isinstance(entry, (tuple, list)) or len(entry) != 2:
    return 'not a (step, regex) pair'
  step, regex = entry
  if not _is_int(step) or step < 0:
    return f'the step {step!r} is not an integer >= 0'
  return _regex_problem(regex)


def check_unfreeze(schedule, steps: int) -> None:
  """``train.unfreeze``: (step, regex) pairs, steps non-decreasing and before ``train.steps``."""
  entries = _tuple_field('train.unfreeze', schedule, _unfreeze_problem)
  last = 0
  for step, regex in entries:
    if step < last:
      raise ConfigError(f'config.train.unfreeze entry {(step, regex)!r} is invalid (its step '
                        f'comes before the previous group\'s {last}); valid: '
                        f'{TUPLE_FORMS["train.unfreeze"]}')
    if step >= steps:
      raise ConfigError(f'config.train.unfreeze entry {(step, regex)!r} is invalid with '
                        f'train.steps={steps}: the group would never train; valid: steps below '
                        f'train.steps ({steps})')
    last = step


# ---------------------------------------------------------------------------- paths


def check_data_dir(value: str, field: str = 'data.data_dir') -> None:
  """``data.data_dir`` (or ``$PEFTJAX_DATA_DIR`` when it is empty) must be a directory, or a
  path where one can be created; bucket paths (``gs://...``) are left to TFDS."""
  raw, name = value, f'config.{field}'
  if not raw:
    raw, name = os.environ.get('PEFTJAX_DATA_DIR', ''), '$PEFTJAX_DATA_DIR'
  if not raw or '://' in raw:
    return
  path = pathlib.Path(raw).expanduser()
  valid = ("a directory for the prepared data sets (created if missing); '' = "
           '$PEFTJAX_DATA_DIR or ~/.cache/peftjax/tfds')
  if path.exists() and not path.is_dir():
    raise ConfigError(f'{name}={raw!r} is invalid: it is a file, not a directory; valid: {valid}')
  if path.is_dir():
    if not os.access(path, os.R_OK | os.X_OK):
      raise ConfigError(f'{name}={raw!r} is invalid: the directory is not readable; '
                        f'valid: {valid}')
    return
  parent = path.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise ConfigError(f'{name}={raw!r} is invalid: {str(parent)!r} is a file, so the directory '
                      f'cannot be created; valid: {valid}')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f'{name}={raw!r} is invalid: it does not exist and cannot be created in '
                      f'{str(parent)!r} (permission denied); valid: {valid}')


# ---------------------------------------------------------------------------- the config


def validate(c) -> None:
  """Raises :class:`ConfigError` for the first invalid field of config ``c``.

  >>> validate(configs.quickstart.get_config())  # doctest: +SKIP
  """
  m, d, p, o, t = c.model, c.data, c.peft, c.optim, c.train
  _int('seed', c.seed, 0, 'an integer >= 0')
  _check(c.dtype in ('float32', 'bfloat16'), 'dtype', c.dtype,
         "'float32' or 'bfloat16' (the compute dtype; parameters stay float32)")

  # train first: other sections' fields (warmup, unfreezing) are bounded by train.steps.
  _int('train.steps', t.steps, 1, 'a positive number of steps')
  _int('train.batch_size', t.batch_size, 1, 'a positive batch size')
  _int('train.eval_batch_size', t.eval_batch_size, 1, 'a positive size')
  _int('train.eval_every', t.eval_every, 0, '>= 0 (0 = only at the end)')
  _int('train.log_every', t.log_every, 1, '>= 1')
  _int('train.checkpoint_every', t.checkpoint_every, 0, '>= 0 (0 = off)')
  _int('train.keep_checkpoints', t.keep_checkpoints, 1, '>= 1')
  check_unfreeze(t.unfreeze, t.steps)

  _check(m.name in MODEL_NAMES, 'model.name', m.name, ', '.join(MODEL_NAMES))
  task = c.get('task', 'classification')
  if task in TASK_MODELS and m.name not in TASK_MODELS[task]:
    raise ConfigError(f'config.model.name={m.name!r} cannot run config.task={task!r}; valid: '
                      f'for this task {", ".join(TASK_MODELS[task])}, for this model task='
                      f'{next(t for t, ms in TASK_MODELS.items() if m.name in ms)!r}')
  _check(m.pooling in POOLINGS, 'model.pooling', m.pooling, ', '.join(map(repr, POOLINGS)))
  remat = m.get('remat', 'none')
  _check(remat in REMAT_POLICIES, 'model.remat', remat,
         ', '.join(map(repr, REMAT_POLICIES)) + ' (per-layer rematerialization)')
  _int('model.num_layers', m.num_layers, 0, '0 (all layers) or a positive count')
  _num('model.dropout_rate', m.dropout_rate, lambda v: 0.0 <= v < 1.0, '0 <= rate < 1')
  hidden = _tuple_field('model.hidden', m.hidden,
                        lambda h: None if _is_int(h) and h > 0 else 'not a positive integer')
  del hidden

  _check(isinstance(d.name, str) and d.name != '', 'data.name', d.name,
         "'rotten_tomatoes', 'mnist5k', 'digits' or a prepared TFDS dataset name")
  check_data_dir(d.data_dir)
  kind = KNOWN_DATA.get(d.name)
  if kind is not None and MODEL_INPUTS[m.name] != kind:
    _mismatch(m.name, d.name, kind)
  _int('data.max_length', d.max_length, 2, '2..512 tokens (llama: 2..8192)')
  longest = 8192 if m.name == 'llama' else 512  # the positions the models were trained on
  _check(d.max_length <= longest, 'data.max_length', d.max_length, f'2..{longest} tokens')
  _check(d.padding in ('max_length', 'longest'), 'data.padding', d.padding,
         "'max_length' or 'longest'")
  _check(_is_int(d.max_train_examples) and (d.max_train_examples == -1 or
                                            d.max_train_examples > 0),
         'data.max_train_examples', d.max_train_examples, '-1 (all) or a positive count')
  _check(_is_int(d.max_eval_examples) and (d.max_eval_examples == -1 or d.max_eval_examples > 0),
         'data.max_eval_examples', d.max_eval_examples, '-1 (all) or a positive count')

  if m.name == 'llama':
    _check(d.get('packing', 'pack') in PACKINGS, 'data.packing', d.get('packing'),
           ', '.join(map(repr, PACKINGS)))
    _check(d.get('truncation', 'error') in ('error', 'left'), 'data.truncation',
           d.get('truncation'), "'error' or 'left' (cut the prompt's start)")
    if c.get('generate') is not None:
      g = c.generate
      _int('generate.max_new_tokens', g.max_new_tokens, 1, 'a positive number of tokens')
      _int('generate.batch_size', g.batch_size, 1, 'a positive batch size')
      _num('generate.temperature', g.temperature, lambda v: v >= 0, '>= 0 (0 = greedy)')
      _int('generate.top_k', g.top_k, 0, '>= 0 (0 = all tokens)')
      _num('generate.top_p', g.top_p, lambda v: 0 < v <= 1, '0 < top_p <= 1')
      _check(_is_int(g.max_eval_examples) and (g.max_eval_examples == -1 or
                                               g.max_eval_examples > 0),
             'generate.max_eval_examples', g.max_eval_examples, '-1 (all) or a positive count')
      _check(isinstance(g.get('teacher_forced', True), bool), 'generate.teacher_forced',
             g.get('teacher_forced'), 'True or False')
  validate_mesh(c.mesh)

  peft_sections.check(p)  # light: the method names, head, and the methods' own sub-sections
  _regex('quant.targets', c.quant.targets)

  _num('optim.learning_rate', o.learning_rate, lambda v: v > 0, 'a positive number')
  _check(o.schedule in SCHEDULES, 'optim.schedule', o.schedule, ', '.join(SCHEDULES))
  _check(_is_int(o.warmup_steps) and 0 <= o.warmup_steps < t.steps, 'optim.warmup_steps',
         o.warmup_steps, f'0 <= warmup_steps < train.steps ({t.steps}): lower '
         f'--config.optim.warmup_steps or raise --config.train.steps')
  _num('optim.end_lr_fraction', o.end_lr_fraction, lambda v: 0.0 <= v <= 1.0, '0..1')
  _num('optim.weight_decay', o.weight_decay, lambda v: v >= 0, '>= 0')
  _check(_is_num(o.b1) and _is_num(o.b2) and 0 <= o.b1 < 1 and 0 <= o.b2 < 1, 'optim.b1/b2',
         (o.b1, o.b2), '0 <= b < 1')
  _num('optim.clip_norm', o.clip_norm, lambda v: v >= 0, '>= 0 (0 = off)')
  _int('optim.grad_accum_steps', o.grad_accum_steps, 1, '>= 1')
  _num('optim.layer_decay', o.get('layer_decay', 1.0), lambda v: 0.0 < v <= 1.0,
       '0 < decay <= 1 (1 = off)')
  check_lr_multipliers(o.lr_multipliers)

  # Sections whose checks live in their (heavy) modules: imported only when in use.
  if m.name == 'bert' and m.pretrained not in ('', 'random'):
    from peftjax.models.hf_bert import check_model_dir  # pylint: disable=g-import-not-at-top
    check_model_dir(m.pretrained, field='config.model.pretrained', pooling=m.pooling)
  if c.quant.qat or c.quant.qlora:
    from peftjax.quant.qat import check_config as check_quant  # pylint: disable=g-import-not-at-top
    check_quant(c.quant)
  validate_moe(c)
  if c.get('compress') is not None:
    from peftjax.compress import plan  # pylint: disable=g-import-not-at-top
    plan.validate(c.compress)
    if c.compress.prune.kind in ('magnitude', 'nm') and t.unfreeze:
      raise ConfigError(f'compress.prune.kind={c.compress.prune.kind!r} with train.unfreeze='
                        f'{t.unfreeze!r}; valid: one of them (masks are kept on the leaves '
                        'trainable from the start)')


def warnings(c) -> list[str]:
  """Settings that are valid but probably not meant (the run goes on; the loop prints them).

  >>> warnings(quickstart_config_with(train_steps=60))  # doctest: +SKIP
  ['optim.warmup_steps=40 is over half of train.steps=60: ...']
  """
  out = []
  o, t = c.optim, c.train
  if 2 * o.warmup_steps > t.steps:
    out.append(f'optim.warmup_steps={o.warmup_steps} is over half of train.steps={t.steps}: the '
               f'learning rate reaches its peak only at step {o.warmup_steps}; e.g. '
               f'--config.optim.warmup_steps={max(t.steps // 10, 0)} (10% of the run)')
  return out


def _mismatch(model: str, data: str, kind: str):
  fits = [n for n, k in MODEL_INPUTS.items() if k == kind]
  other = sorted(n for n, k in KNOWN_DATA.items() if k == MODEL_INPUTS[model])
  raise ConfigError(f"config.model.name={model!r} reads {MODEL_INPUTS[model]} but "
                    f"data.name={data!r} is {kind} data; valid: for this data a model that "
                    f"reads {kind} ({', '.join(fits)}), for this model {MODEL_INPUTS[model]} "
                    f"data ({', '.join(other)})")


def validate_mesh(mesh) -> None:
  """Mesh sizes (positive, or one -1 for "the remaining devices") and the logical rules."""
  rest = []
  for axis in MESH_AXES:
    v = mesh.get(axis, 1)
    _check(_is_int(v) and (v >= 1 or v == -1), f'mesh.{axis}', v,
           'a positive size or -1 (the remaining devices)')
    if v == -1:
      rest.append(axis)
  if len(rest) > 1:
    raise ConfigError(f'config.mesh: {", ".join(f"mesh.{a}=-1" for a in rest)} is invalid; '
                      'valid: at most one axis = -1 (the remaining devices)')
  check_mesh_rules(mesh.rules)


def validate_moe(c) -> None:
  """The ``moe`` section, by its owner (:mod:`peftjax.moe.section`), when it is in use."""
  moe = c.get('moe')
  if moe is None or moe.num_experts == 0:
    return
  from peftjax.moe import section  # pylint: disable=g-import-not-at-top
  section.check(moe, c.model.name)


def validate_mesh_moe(c, mesh) -> None:
  """Experts must split evenly over the mesh's ``expert`` axis."""
  moe = c.get('moe')
  if moe is None or moe.num_experts <= 0:
    return
  from peftjax.moe import section  # pylint: disable=g-import-not-at-top
  section.check_mesh(moe, mesh.shape.get('expert', 1))


# ---------------------------------------------------------------------------- old names

# Renamed fields, old dotted name -> new, from the sections' owners.
RENAMED = {f'peft.{old}': f'peft.{new}' for old, new in peft_sections.RENAMED.items()}


def renamed(name: str) -> str | None:
  """The new dotted name of a renamed config field, or None.

  >>> renamed('peft.rank')
  'peft.lora.rank'
  """
  return RENAMED.get(name)


def upgrade(config: dict) -> dict:
  """A stored config (a plain dict: a workdir's ``config.json``, a summary's ``config``) with
  each section in today's form, by its owner; a current config is returned equal.

  >>> upgrade({'peft': {'method': 'lora', 'rank': 4}})['peft']
  {'method': 'lora', 'lora': {'rank': 4}}
  """
  out = dict(config)
  if isinstance(out.get('peft'), dict):
    out['peft'] = peft_sections.upgrade(out['peft'])
  return out


def validate_mesh_batch(c, data_parallel: int) -> None:
  """The global batch must split evenly over the data-parallel devices."""
  for field in ('batch_size', 'eval_batch_size'):
    v = getattr(c.train, field)
    _check(v % data_parallel == 0, f'train.{field}', v,
           f"a multiple of the data-parallel size {data_parallel} (the mesh axes of 'batch')")


# ---------------------------------------------------------------------------- data and model


def validate_data(c, data) -> None:
  """Checks that need the opened data set (``peftjax.data.Data``): the model reads what the
  data holds, and a training batch fits in the train split."""
  kind = data.info.kind
  if MODEL_INPUTS.get(c.model.name, kind) != kind:
    _mismatch(c.model.name, c.data.name, kind)
  split = c.data.train_split
  n = data.num_examples(split)
  if c.train.batch_size > n:
    limit = (f' (data.max_train_examples={c.data.max_train_examples})'
             if c.data.max_train_examples != -1 else '')
    raise ConfigError(f'config.train.batch_size={c.train.batch_size} is invalid: the train split '
                      f'{split!r} of {data.info.name!r} gives {n} examples{limit}; valid: a '
                      f'batch size of at most {n}')


def validate_params(c, base_params, peft_params=None) -> None:
  """Regexes that select parameters must select some: ``peft.head`` (over the base model's
  paths; unused by ``full``) and each ``optim.lr_multipliers`` regex (over the trainable tree's
  ``base/...`` and ``peft/...`` paths). Needs the model's parameters (or their shapes).

  (``peft.lora.targets``, the adapter/IA3 targets, ``quant.targets``, ``train.unfreeze`` and the
  ``compress`` targets are checked where they are used, before the workdir is created too.)
  """
  from peftjax import tree as tree_lib  # pylint: disable=g-import-not-at-top
  base_paths = tree_lib.paths(base_params)
  head = c.peft.head
  if head and 'full' not in c.peft.method.split('+') and not tree_lib.select(base_params, head):
    tops = sorted({path.split('/')[0] + '/' for path in base_paths})
    raise ConfigError(f'config.peft.head={head!r} matches no parameter of the model; valid: a '
                      f'regex over its parameter paths (under {", ".join(tops)}; closest: '
                      f'{tree_lib.closest_paths(head, base_paths, n=3)}), or \'\' (no base '
                      'leaf trains besides the method\'s own)')
  tree = {'base': base_params, 'peft': peft_params or {}}
  all_paths = tree_lib.paths(tree)
  for regex, _ in check_lr_multipliers(c.optim.lr_multipliers):
    if not tree_lib.select(tree, regex):
      raise ConfigError(f'config.optim.lr_multipliers regex {regex!r} matches no parameter; '
                        f'valid: a regex over the trainable paths, e.g. '
                        f'{tree_lib.closest_paths(regex, all_paths, n=3)}')


def validate_for_mesh(c, mesh, data_parallel: int) -> None:
  """Every check that needs the device mesh: the batch splits over its data-parallel devices,
  MoE experts over its expert axis."""
  validate_mesh_batch(c, data_parallel)
  validate_mesh_moe(c, mesh)
