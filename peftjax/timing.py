"""Timing and cost helpers for ratio benchmarks: interleaved timing, a matmul FLOP/s probe,
and the cost and memory figures of compiled XLA executables.

The machines these benchmarks run on are shared and noisy, so absolute times are noise and the
figures are ratios measured in one process: compile everything first, warm up, then call the
candidates in turn (A, B, A, B, ...) and take medians of many calls.

>>> times = interleaved({'a': run_a, 'b': run_b}, steps=30)        # doctest: +SKIP
>>> ratio = median_ms(times['a']) / median_ms(times['b'])           # doctest: +SKIP
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- timing


class DonatingStepper:
  """Calls a donated step ``step(state, *args) -> (state, aux)``, carrying ``state`` along.

  Each call runs one step and returns ``aux``; the state of the previous call is donated and
  replaced by the new one, exactly as a training loop does.

  >>> run_a = DonatingStepper(compiled_step, state, frozen, batch)  # doctest: +SKIP
  """

  def __init__(self, step: Callable, state: Any, *args: Any):
    self.step, self.state, self.args = step, state, args

  def __call__(self) -> Any:
    self.state, aux = self.step(self.state, *self.args)
    return self.state, aux


def interleaved(runners: Mapping[str, Callable[[], Any]], steps: int,
                warmup: int = 3) -> dict[str, np.ndarray]:
  """Wall time in seconds of ``steps`` calls of each runner, called in turn A, B, A, B, ...

  Every runner is called ``warmup`` times first (untimed). Each timed call is followed by
  ``jax.block_until_ready`` on its result, so the time is the whole computation, not the
  dispatch. Interleaving spreads the machine's slow phases evenly over the candidates.
  """
  for fn in runners.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(steps):
    for name, fn in runners.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: np.asarray(t) for name, t in times.items()}


def median_ms(seconds) -> float:
  """Median of a sequence of durations in seconds, in milliseconds."""
  return float(np.median(np.asarray(seconds)) * 1e3)


def spread(seconds) -> dict:
  """``{'median_ms', 'p10_ms', 'p90_ms', 'min_ms', 'n'}`` of durations in seconds."""
  ms = np.asarray(seconds) * 1e3
  return {'median_ms': float(np.median(ms)), 'p10_ms': float(np.percentile(ms, 10)),
          'p90_ms': float(np.percentile(ms, 90)), 'min_ms': float(ms.min()), 'n': int(ms.size)}


def paired_ratio(a_seconds, b_seconds) -> float:
  """Median over rounds of ``a_i / b_i`` for interleaved timings (robust to slow phases)."""
  a, b = np.asarray(a_seconds), np.asarray(b_seconds)
  return float(np.median(a / b))


# ----------------------------------------------------------------------------- the FLOP/s probe


def matmul_probe(n: int = 2048, dtype=jnp.float32) -> tuple[Callable[[], Any], float]:
  """``(run, flops)``: a zero-argument call of a compiled ``(n, n) @ (n, n)`` matmul on the
  default device (inputs made once) and its FLOPs, ``2 n^3``.

  A large float32 matmul is the best sustained rate this device reaches on dense work, so a
  step's FLOPs over (its time x this rate) is its model-FLOPs utilisation (MFU). Time ``run``
  among the candidates of :func:`interleaved`, so that the rate and the step times see the same
  machine load:

  >>> probe, probe_flops = matmul_probe(2048)                           # doctest: +SKIP
  >>> times = interleaved({'step': run_step, 'matmul': probe}, steps=30)  # doctest: +SKIP
  >>> rate = probe_flops / np.median(times['matmul'])                   # doctest: +SKIP
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  return (lambda: matmul(a, b)), 2.0 * n ** 3


def matmul_flops_per_sec(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
  """Median FLOP/s of :func:`matmul_probe` over ``repeats`` calls, timed on their own."""
  run, flops = matmul_probe(n, dtype)
  for _ in range(2):
    jax.block_until_ready(run())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  return flops / float(np.median(times))


# ----------------------------------------------------------------------------- compiled analyses


def compile_fn(jitted, *args, **kwargs):
  """``jitted.lower(*args, **kwargs).compile()``: the executable whose figures are reported.

  Calling the returned object runs exactly that executable (donation included).
  """
  return jitted.lower(*args, **kwargs).compile()


def cost_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable, from XLA's cost analysis.

  ``cost_analysis()`` returns a dict (a one-element list of dicts on older jax versions).
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  if not cost or 'flops' not in cost:
    raise RuntimeError('this backend reports no cost analysis (flops) for compiled programs')
  return float(cost['flops'])


def memory_bytes(compiled) -> dict:
  """Buffer sizes of a compiled executable, from XLA's memory analysis.

  Returns ``{'argument', 'output', 'temp', 'alias', 'generated_code', 'peak'}`` in bytes, where
  ``peak = argument + output + temp - alias`` (donated arguments that alias outputs count once).
  """
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError('this backend reports no memory analysis for compiled programs')
  out = {'argument': int(m.argument_size_in_bytes), 'output': int(m.output_size_in_bytes),
         'temp': int(m.temp_size_in_bytes), 'alias': int(m.alias_size_in_bytes),
         'generated_code': int(m.generated_code_size_in_bytes)}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


# ----------------------------------------------------------------------------- the machine

# The vector and matrix extensions that decide whether bf16 and int8 arithmetic can pay off.
ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'avx_vnni', 'amx_tile', 'amx_bf16',
             'amx_int8')


def cpu_info() -> dict:
  """The CPU that measured: ``{'model', 'logical_cpus', 'isa': {flag: bool}, 'hypervisor'}``.

  The model name and flags come from ``lscpu`` (else ``/proc/cpuinfo``, else
  ``platform.processor()``); ``isa`` says which of :data:`ISA_FLAGS` the CPU has. Ratios
  measured on a CPU without AVX512-BF16 or AMX, say, say nothing of bf16 on one that has them.
  """
  import os  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  fields: dict[str, str] = {}
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10,
                         env={**os.environ, 'LC_ALL': 'C'}, check=False).stdout
    fields = {k.strip().lower(): v.strip() for k, _, v in
              (line.partition(':') for line in out.splitlines()) if v.strip()}
  except (OSError, subprocess.SubprocessError):
    pass
  if 'model name' not in fields or 'flags' not in fields:
    try:
      with open('/proc/cpuinfo', encoding='utf-8') as f:
        for line in f:
          k, _, v = line.partition(':')
          fields.setdefault(k.strip().lower(), v.strip())
    except OSError:
      pass
  flags = set(fields.get('flags', '').split())
  return {'model': fields.get('model name') or platform.processor() or platform.machine(),
          'logical_cpus': os.cpu_count(),
          'isa': {f: f in flags for f in ISA_FLAGS} if flags else 'unknown',
          'hypervisor': fields.get('hypervisor vendor', '')}


def load_average() -> float | None:
  """The 1-minute load average (None where the OS has none): how busy the machine was."""
  import os  # pylint: disable=g-import-not-at-top
  try:
    return round(os.getloadavg()[0], 2)
  except (AttributeError, OSError):
    return None


# ----------------------------------------------------------------------------- reporting


def run_and_publish(run: Callable[[Any], dict], report: Callable[[dict], str], args,
                    default_out) -> dict:
  """A benchmark's ``main`` tail: ``run(args)``, its wall time in ``settings.wall_s``, the CPU
  (:func:`cpu_info`) in ``settings.cpu`` and the load average in ``settings.load_average_1m``,
  then :func:`publish` to ``args.out``, else ``default_out`` (nowhere but stdout with
  ``args.quick``).

  >>> run_and_publish(run, report, args, RESULTS)  # doctest: +SKIP
  """
  t0, load0 = time.perf_counter(), load_average()
  result = run(args)
  settings = result.setdefault('settings', {})
  settings['wall_s'] = time.perf_counter() - t0
  # Which CPU measured, and how loaded the (shared) machine was at the start and the end.
  settings.setdefault('cpu', cpu_info())
  settings['load_average_1m'] = {'start': load0, 'end': load_average()}
  publish(result, report(result), args.out or (None if args.quick else str(default_out)))
  return result


def publish(result: dict, text: str, out: str | None) -> None:
  """Prints a benchmark's readable report, then writes ``result`` to ``out`` atomically (never a
  partial file) or, without ``out``, prints it as JSON."""
  import json  # pylint: disable=g-import-not-at-top
  from peftjax.storage import write_json_atomic  # pylint: disable=g-import-not-at-top
  print(text)
  if out:
    write_json_atomic(out, result)
    print(f'wrote {out}')
  else:
    print(json.dumps(result, indent=2))


def meets(value: float, target: tuple[str, float]) -> bool:
  """Whether ``value`` meets ``target``, an ``('<=', bound)`` or ``('>=', bound)`` pair.

  >>> meets(0.6, ('<=', 0.7)), meets(0.6, ('>=', 0.8))
  (True, False)
  """
  op, bound = target
  if op not in ('<=', '>='):
    raise ValueError(f"target {target!r}: the operator must be '<=' or '>='")
  return value <= bound if op == '<=' else value >= bound


def target_note(key: str, result: dict, targets: dict) -> str:
  """``'<= 0.7 ok'`` / ``'>= 0.8 MISSED'``: a report's target column for ``result[key]``."""
  op, bound = targets[key]
  return f"{op} {bound} {'ok' if result['meets_targets'][key] else 'MISSED'}"


def format_table(rows: list[list[Any]], header: list[str]) -> str:
  """A plain-text table: first column left-aligned, the others right-aligned."""
  cells = [[str(h) for h in header]] + [[_fmt(v) for v in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = []
  for j, r in enumerate(cells):
    lines.append('  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))))
    if j == 0:
      lines.append('  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:,.3f}' if abs(v) < 10 else f'{v:,.1f}'
  if isinstance(v, int):
    return f'{v:,d}'
  return str(v)
