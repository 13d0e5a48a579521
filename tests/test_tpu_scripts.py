"""The TPU pod scripts in dry-run mode, their remote commands run by a local bash, and the pod planner.

No gcloud call leaves this machine: scripts run with --dry-run, and the gs:// paths are served by
a fake `gcloud storage` (a directory standing in for the bucket).
"""
import importlib.util
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from experiments import pod_sweep
from experiments import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = 'configs/tiny.py'
RUNS = [sweep.run_name(r) for r in sweep.expand(str(ROOT / TINY))]  # 4 runs: rank 2/4 x seed 0/1
BASE = ['--project=proj', '--zone=us-central2-b']

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# gcloud storage ls/cat over $FAKE_GCS: gs://bucket/x is $FAKE_GCS/bucket/x.
[[ $1 == storage ]] || { echo "fake gcloud: unexpected $*" >&2; exit 3; }
url=$3; path=$FAKE_GCS/${url#gs://}
case $2 in
  ls) shopt -s nullglob; found=0
      for f in $path; do echo "gs://${f#"$FAKE_GCS"/}"; found=1; done
      ((found)) || { echo "ERROR: (gcloud.storage.ls) One or more URLs matched no objects." >&2; exit 1; } ;;
  cat) [[ -f $path ]] || { echo "ERROR: (gcloud.storage.cat) The following URLs matched no objects or files: $url" >&2; exit 1; }
       cat "$path" ;;
esac
'''


def script(name, *args, env=None, check=True):
  """Runs tpu/<name> under bash with a clean environment; returns the CompletedProcess."""
  full_env = {'PATH': os.environ['PATH'], 'HOME': os.environ.get('HOME', '/tmp'),
              'PYTHON': sys.executable, **(env or {})}
  r = subprocess.run(['bash', str(ROOT / 'tpu' / name), *args], capture_output=True, text=True,
                     env=full_env, cwd=ROOT, check=False)
  if check:
    assert r.returncode == 0, r.stderr
  return r


def commands(r):
  """The argv of each command a --dry-run printed."""
  lines = r.stdout.splitlines()
  assert lines and all(line.startswith('+ ') for line in lines), r.stdout
  return [shlex.split(line[2:]) for line in lines]


def flag(argv, name):
  """The value of --name=... in argv (exactly one)."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def detached_job(remote):
  """The job a detached remote command starts: the argv after `setsid nohup`, up to the `>`."""
  words = shlex.split(remote)
  start = words.index('nohup') + 1
  return words[start:words.index('>', start)]


def run_remote(remote, home):
  """Runs a worker's --command with a local bash in `home`; waits for the job it detaches."""
  r = subprocess.run(['bash', '-c', remote], cwd=home, capture_output=True, text=True,
                     env={'PATH': os.environ['PATH'], 'HOME': str(home)}, check=False)
  pid_file = home / 'peftjax' / 'logs' / 'job.pid'
  if r.returncode == 0 and pid_file.exists():
    pid = int(pid_file.read_text())
    for _ in range(200):  # the job is not our child: poll until it is gone (or a zombie)
      try:
        if pathlib.Path(f'/proc/{pid}/stat').read_text().split()[2] == 'Z':
          break
      except FileNotFoundError:
        break
      time.sleep(0.02)
  return r


@pytest.fixture
def worker(tmp_path):
  """A fake worker home: ~/peftjax/.venv/bin/python records its argv and writes summary.json."""
  def make(name='w0'):
    home = tmp_path / name
    py = home / 'peftjax' / '.venv' / 'bin' / 'python'
    py.parent.mkdir(parents=True)
    py.write_text('#!/usr/bin/env bash\n'
                  'printf "%s\\0" "$@" >> "$HOME/calls"; printf "\\n" >> "$HOME/calls"\n'
                  'for a in "$@"; do case $a in --workdir=*) w=${a#--workdir=}; mkdir -p "$w";'
                  ' echo "{}" > "$w/summary.json";; esac; done\n')
    py.chmod(0o755)
    return home
  return make


def calls(home):
  """The argv lists the fake python was started with, in order."""
  path = home / 'calls'
  if not path.exists():
    return []
  return [line.split('\0')[:-1] for line in path.read_text().split('\n') if line]


@pytest.fixture
def fake_gcs(tmp_path):
  """(env with a fake gcloud first on PATH, the directory that holds its buckets)."""
  bin_dir, gcs = tmp_path / 'bin', tmp_path / 'gcs'
  bin_dir.mkdir()
  gcs.mkdir()
  (bin_dir / 'gcloud').write_text(FAKE_GCLOUD)
  (bin_dir / 'gcloud').chmod(0o755)
  return {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'FAKE_GCS': str(gcs)}, gcs


# ---------------------------------------------------------------- create / delete

def test_create_plain_spot_and_preemptible():
  [cmd] = commands(script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v4-32', '--dry-run'))
  assert cmd == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'tpu-a', '--project=proj',
                 '--zone=us-central2-b', '--accelerator-type=v4-32',
                 '--version=tpu-ubuntu2204-base']
  [spot] = commands(script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v4-32', '--spot',
                           '--dry-run'))
  assert spot == [*cmd, '--spot']
  [pre] = commands(script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v5litepod-16',
                          '--version=v2-alpha-tpuv5-lite', '--preemptible', '--dry-run'))
  assert pre[6:] == ['--project=proj', '--zone=us-central2-b', '--accelerator-type=v5litepod-16',
                     '--version=v2-alpha-tpuv5-lite', '--preemptible']


def test_create_queued_resource_with_spot_and_wait():
  out = commands(script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v4-32', '--spot',
                        '--queued', '--wait', '--dry-run'))
  assert out == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'tpu-a-qr', '--project=proj',
       '--zone=us-central2-b', '--node-id=tpu-a', '--accelerator-type=v4-32',
       '--runtime-version=tpu-ubuntu2204-base', '--spot'],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'tpu-a-qr', '--project=proj',
       '--zone=us-central2-b', '--format=value(state.state)']]
  [no_spot] = commands(script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v4-8',
                              '--queued', '--queued-id=q1', '--dry-run'))
  assert no_spot[5] == 'q1' and '--spot' not in no_spot
  r = script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v4-8', '--queued',
             '--preemptible', '--dry-run', check=False)
  assert r.returncode != 0 and '--spot' in r.stderr and not r.stdout


def test_delete_plain_and_queued():
  [plain] = commands(script('delete.sh', *BASE, '--name=tpu-a', '--dry-run'))
  assert plain == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'tpu-a', '--project=proj',
                   '--zone=us-central2-b', '--quiet']
  [queued] = commands(script('delete.sh', *BASE, '--name=tpu-a', '--queued', '--dry-run'))
  assert queued == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'tpu-a-qr',
                    '--project=proj', '--zone=us-central2-b', '--force', '--quiet']


@pytest.mark.parametrize('name,args,missing', [
    ('create.sh', ['--zone=z', '--name=tpu-a', '--accelerator=v4-8'], '--project'),
    ('create.sh', ['--project=p', '--zone=z', '--name=tpu-a'], '--accelerator'),
    ('delete.sh', ['--project=p', '--zone=z'], '--name'),
    ('setup.sh', ['--project=p', '--name=tpu-a', '--source=local'], '--zone'),
    ('run.sh', ['--project=p', '--zone=z', '--name=tpu-a', '--workdir=/w'], '--config'),
    ('run.sh', ['--project=p', '--zone=z', '--name=tpu-a', f'--config={TINY}'], '--workdir'),
    ('sweep.sh', ['--project=p', '--zone=z', f'--config={TINY}', '--workdir=/w'], '--names'),
    ('logs.sh', ['--project=p', '--zone=z'], '--name'),
    ('fetch.sh', ['--workdir=gs://b/s'], '--dest'),
    ('fetch.sh', ['--workdir=/w', '--dest=/d', '--project=p', '--zone=z'], '--name'),
])
def test_a_missing_argument_is_an_error_that_names_it(name, args, missing):
  r = script(name, *args, '--dry-run', check=False)
  assert r.returncode != 0 and not r.stdout
  assert f'missing {missing}' in r.stderr and f'tpu/{name}' in r.stderr


def test_environment_fills_in_and_bad_values_are_named():
  env = {'TPU_PROJECT': 'proj', 'TPU_ZONE': 'us-central2-b', 'TPU_NAME': 'tpu-a'}
  [cmd] = commands(script('delete.sh', '--dry-run', env=env))
  assert cmd[5:8] == ['tpu-a', '--project=proj', '--zone=us-central2-b']
  assert commands(script('delete.sh', '--name=tpu-b', '--dry-run', env=env))[0][5] == 'tpu-b'
  for args, words in [(['--bogus'], ["unknown option '--bogus'", '--queued']),
                      (['--name=Bad_Name'], ['--name=Bad_Name', 'lowercase']),
                      (['--name'], ['--name needs a value']),
                      (['extra'], ["unexpected argument 'extra'"])]:
    r = script('delete.sh', *args, '--dry-run', env=env, check=False)
    assert r.returncode != 0 and not r.stdout
    assert all(w in r.stderr for w in words), r.stderr
  r = script('create.sh', '--accelerator=tpu32', '--dry-run', env=env, check=False)
  assert r.returncode != 0 and '--accelerator=tpu32' in r.stderr and 'v4-32' in r.stderr
  assert script('run.sh', '--help').stdout.startswith('tpu/run.sh: run one config')


# ---------------------------------------------------------------- TPU generations and runtimes

GENERATIONS = [  # accelerator type, the runtime Google documents for its generation
    ('v2-8', 'tpu-ubuntu2204-base'), ('v3-32', 'tpu-ubuntu2204-base'),
    ('v4-32', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e')]


@pytest.mark.parametrize('accelerator,runtime', GENERATIONS)
def test_create_picks_the_runtime_of_the_generation(accelerator, runtime):
  r = script('create.sh', *BASE, '--name=tpu-a', f'--accelerator={accelerator}', '--dry-run')
  [cmd] = commands(r)
  assert cmd[4:] == ['create', 'tpu-a', '--project=proj', '--zone=us-central2-b',
                     f'--accelerator-type={accelerator}', f'--version={runtime}']
  assert r.stderr == ''
  create, _ = commands(script('create.sh', *BASE, '--name=tpu-a', f'--accelerator={accelerator}',
                              '--spot', '--queued', '--wait', '--dry-run'))
  assert flag(create, 'runtime-version') == runtime and flag(create, 'node-id') == 'tpu-a'


def test_an_explicit_runtime_wins_with_a_note():
  for option in ('--runtime', '--version'):
    r = script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v5litepod-16',
               f'{option}=tpu-ubuntu2204-base', '--dry-run')
    assert flag(commands(r)[0], 'version') == 'tpu-ubuntu2204-base'
    assert r.stderr == ('note: --runtime=tpu-ubuntu2204-base on a v5e slice; Google documents '
                        'v2-alpha-tpuv5-lite for v5e\n')
  r = script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v6e-8', '--dry-run',
             env={'TPU_RUNTIME': 'v2-alpha-tpuv6e'})
  assert flag(commands(r)[0], 'version') == 'v2-alpha-tpuv6e' and r.stderr == ''
  r = script('create.sh', *BASE, '--name=tpu-a', '--accelerator=v6e-8', '--runtime=a',
             '--version=b', '--dry-run', check=False)
  assert_refused(r, 'create.sh', '--runtime=a and --version=b disagree')


def assert_refused(r, name, *words):
  """Exit 1, nothing on stdout, stderr = one error line naming `words` + the usage hint."""
  assert r.returncode == 1 and r.stdout == '', (r.returncode, r.stdout, r.stderr)
  lines = r.stderr.splitlines()
  assert len(lines) == 2 and lines[0].startswith(f'error: tpu/{name}: '), r.stderr
  assert lines[1] == f"(run 'tpu/{name} --help' for usage)"
  for w in words:
    assert w in lines[0], (w, lines[0])


VALID_TYPES = 'valid: v2-N, v3-N, v4-N, v5litepod-N (v5e), v5p-N, v6e-N'


@pytest.mark.parametrize('accelerator,words', [
    ('v5e-16', ["v5e's type is v5litepod-N, e.g. v5litepod-16"]),
    ('v7-8', []), ('v4', []), ('v4-0', []), ('tpu32', []), ('V4-8', [])])
def test_create_refuses_an_unknown_accelerator_type(accelerator, words):
  r = script('create.sh', *BASE, '--name=tpu-a', f'--accelerator={accelerator}', '--dry-run',
             check=False)
  assert_refused(r, 'create.sh', f'--accelerator={accelerator} is not an accelerator type',
                 VALID_TYPES, *words)


# ---------------------------------------------------------------- setup / run / logs / fetch

def test_setup_installs_on_every_worker():
  tar, scp, rm, ssh = commands(script('setup.sh', *BASE, '--name=tpu-a', '--source=local',
                                      '--dry-run'))
  tarball = tar[2]
  assert tar[:5] == ['tar', '-czf', tarball, '-C', str(ROOT)] and '--exclude=./.venv' in tar
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 'tpu-a:peftjax-src.tgz',
                 '--project=proj', '--zone=us-central2-b', '--worker=all']
  assert rm == ['rm', '-f', tarball]
  assert ssh[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu-a', '--project=proj',
                     '--zone=us-central2-b', '--worker=all']
  remote = flag(ssh, 'command')
  for step in ['tar -xzf peftjax-src.tgz -C peftjax', 'cd peftjax', 'make setup PYTHON=python3',
               'pip install -q "jax[tpu]==$(', 'python3-venv']:
    assert step in remote
  [git] = commands(script('setup.sh', *BASE, '--name=tpu-a', '--source=https://example.org/p.git',
                          '--ref=v1.0', '--dry-run'))
  remote = flag(git, 'command')
  assert '--worker=all' in git
  assert 'git clone --quiet https://example.org/p.git peftjax' in remote
  assert 'git -C peftjax checkout --quiet --detach v1.0 && cd peftjax && make setup' in remote


def test_run_starts_the_same_command_on_every_worker():
  r = script('run.sh', *BASE, '--name=tpu-a', f'--config={TINY}', '--workdir=gs://b/runs/r8/',
             '--config.peft.lora.rank=8', "--config.peft.prompt.init_text=it's lora", '--dry-run',
             '--', '--fresh')
  [ssh] = commands(r)
  assert ssh[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu-a', '--project=proj',
                     '--zone=us-central2-b', '--worker=all']
  remote = flag(ssh, 'command')
  assert detached_job(remote) == [
      '.venv/bin/python', '-m', 'peftjax.main', f'--config={TINY}', '--workdir=gs://b/runs/r8',
      '--multihost=true', '--config.peft.lora.rank=8', "--config.peft.prompt.init_text=it's lora",
      '--fresh']
  assert remote.startswith('cd peftjax && ') and '> logs/r8.log 2>&1 < /dev/null &' in remote
  assert 'note:' not in r.stderr  # gs:// workdirs need no warning
  local = script('run.sh', *BASE, '--name=tpu-a', f'--config={ROOT / TINY}', '--workdir=/w/a',
                 '--job=smoke', '--dry-run')
  assert 'multi-host slices need a gs:// workdir' in local.stderr
  job = detached_job(flag(commands(local)[0], 'command'))
  assert job[3:5] == [f'--config={TINY}', '--workdir=/w/a']  # repository-relative config
  r = script('run.sh', *BASE, '--name=tpu-a', '--config=/etc/hostname', '--workdir=/w',
             '--dry-run', check=False)
  assert r.returncode != 0 and 'outside the repository' in r.stderr


def test_run_remote_command_runs_once_detached_and_refuses_a_busy_slice(worker):
  home = worker()
  overrides = ['--config.peft.lora.rank=8', "--config.peft.prompt.init_text=it's lora"]
  [ssh] = commands(script('run.sh', *BASE, '--name=tpu-a', f'--config={TINY}',
                          f'--workdir={home}/run', *overrides, '--dry-run'))
  r = run_remote(flag(ssh, 'command'), home)
  assert r.returncode == 0 and 'started job' in r.stdout, r.stderr
  assert calls(home) == [['-m', 'peftjax.main', f'--config={TINY}', f'--workdir={home}/run',
                          '--multihost=true', *overrides]]
  assert (home / 'run' / 'summary.json').exists() and (home / 'peftjax/logs/run.log').exists()
  (home / 'peftjax/logs/job.pid').write_text(str(os.getpid()))  # a live process holds the TPU
  busy = run_remote(flag(ssh, 'command'), home)
  assert busy.returncode == 1 and 'still running' in busy.stderr and len(calls(home)) == 1


def test_stop_terminates_the_job_process_group(worker):
  home = worker()
  (home / 'peftjax' / 'logs').mkdir()
  job = subprocess.Popen(['sleep', '30'], start_new_session=True)
  (home / 'peftjax/logs/job.pid').write_text(str(job.pid))
  [ssh] = commands(script('run.sh', *BASE, '--name=tpu-a', '--stop', '--dry-run'))
  assert '--worker=all' in ssh
  r = subprocess.run(['bash', '-c', flag(ssh, 'command')], cwd=home, capture_output=True,
                     text=True, check=False)
  try:
    assert r.returncode == 0 and 'stopped job' in r.stdout, r.stderr
    assert job.wait(timeout=5) == -signal.SIGTERM
  finally:
    job.kill()
  r = script('run.sh', *BASE, '--name=tpu-a', '--stop', '--config.x=1', '--dry-run', check=False)
  assert r.returncode != 0 and '--stop takes no' in r.stderr


def test_logs_and_fetch_commands(tmp_path):
  [logs] = commands(script('logs.sh', *BASE, '--name=tpu-a', '--log=sweep', '--follow',
                           '--lines=9', '--dry-run'))
  assert '--worker=0' in logs and 'tail -n 9 -F "$f"' in flag(logs, 'command')
  assert 'f=sweep.log' in flag(logs, 'command')
  [every] = commands(script('logs.sh', *BASE, '--name=tpu-a', '--worker=all', '--dry-run'))
  assert '--worker=all' in every and 'ls -t' in flag(every, 'command')
  mkdir, rsync = commands(script('fetch.sh', '--workdir=gs://b/s/', f'--dest={tmp_path}/r',
                                 '--dry-run'))
  assert mkdir == ['mkdir', '-p', f'{tmp_path}/r']
  assert rsync[:4] == ['gcloud', 'storage', 'rsync', '--recursive']
  assert rsync[-2:] == ['gs://b/s', f'{tmp_path}/r'] and 'checkpoints' in rsync[4]
  ssh, _, scp, untar, _ = commands(script('fetch.sh', *BASE, '--name=tpu-a', '--workdir=/w/s',
                                          f'--dest={tmp_path}/r', '--dry-run'))
  assert '--worker=0' in ssh and '--exclude=checkpoints' in flag(ssh, 'command')
  assert scp[5:7] == ['tpu-a:/tmp/peftjax-fetch.tgz', f'{tmp_path}/r/'] and '--worker=0' in scp
  assert untar == ['tar', '-xzf', f'{tmp_path}/r/peftjax-fetch.tgz', '-C', f'{tmp_path}/r']
  assert not (tmp_path / 'r').exists()  # a dry run changes nothing


# ---------------------------------------------------------------- sweeps

def slice_runs(ssh):
  """(slice, [workdirs of the runs it starts, in order]) of one sweep ssh command."""
  body = shlex.split(flag(ssh, 'command'))
  script_text = body[body.index('-c') + 1]  # setsid nohup bash -c SCRIPT
  return ssh[5], [w.split('=', 1)[1] for w in shlex.split(script_text)
                  if w.startswith('--workdir=')]


def test_sweep_fans_every_run_out_once_with_its_own_workdir(tmp_path):
  r = script('sweep.sh', *BASE, '--names=tpu-a,tpu-b,tpu-c', f'--config={TINY}',
             f'--workdir={tmp_path}/sw', '--dry-run', '--', '--config.train.steps=3')
  ssh = commands(r)
  assert all(c[4] == 'ssh' and '--worker=all' in c for c in ssh)
  assigned = dict(slice_runs(c) for c in ssh)
  # Round-robin over the sweep's order: run i on slice i mod 3.
  assert assigned == {'tpu-a': [f'{tmp_path}/sw/{RUNS[0]}', f'{tmp_path}/sw/{RUNS[3]}'],
                      'tpu-b': [f'{tmp_path}/sw/{RUNS[1]}'], 'tpu-c': [f'{tmp_path}/sw/{RUNS[2]}']}
  script_text = shlex.split(flag(ssh[0], 'command'))
  script_text = script_text[script_text.index('-c') + 1]
  assert f'--config={TINY} --workdir={tmp_path}/sw/{RUNS[0]} --config.peft.method=lora ' \
         '--config.peft.lora.rank=2 --config.seed=0 --config.train.progress=False ' \
         '--multihost=true --config.train.steps=3 --compilation_cache=.jax_cache' in script_text
  assert f'> logs/{RUNS[0]}.log 2>&1' in script_text
  assert "'> logs/sweep.log 2>&1" not in r.stdout and 'logs/sweep.log' in flag(ssh[0], 'command')


def test_sweep_skips_finished_runs_and_workers_run_the_rest(tmp_path, worker):
  root = tmp_path / 'sw'
  (root / RUNS[1]).mkdir(parents=True)
  (root / RUNS[1] / 'summary.json').write_text('{}')
  r = script('sweep.sh', *BASE, '--names=tpu-a,tpu-b', f'--config={TINY}', f'--workdir={root}',
             '--dry-run')
  ssh = commands(r)
  assigned = dict(slice_runs(c) for c in ssh)
  assert assigned == {'tpu-a': [f'{root}/{RUNS[0]}', f'{root}/{RUNS[2]}'],
                      'tpu-b': [f'{root}/{RUNS[3]}']}
  assert 'tpu-b: 2 runs, 1 finished (skipped), 1 to run' in r.stderr
  # Each slice is its own machine. A run finished after planning is skipped by the worker.
  (root / RUNS[2]).mkdir()
  (root / RUNS[2] / 'summary.json').write_text('{}')
  homes = {}
  for c in ssh:
    homes[c[5]] = worker(c[5])
    assert run_remote(flag(c, 'command'), homes[c[5]]).returncode == 0
  started = {c[5]: [flag(a, 'workdir') for a in calls(h)] for c, h in zip(ssh, homes.values())}
  assert started == {'tpu-a': [f'{root}/{RUNS[0]}'], 'tpu-b': [f'{root}/{RUNS[3]}']}
  log = (homes['tpu-a'] / 'peftjax/logs/sweep.log').read_text()
  assert f'sweep: done {RUNS[0]}' in log and f'sweep: skip {RUNS[2]} (finished)' in log
  assert all((root / n / 'summary.json').exists() for n in RUNS)
  done = script('sweep.sh', *BASE, '--names=tpu-a,tpu-b', f'--config={TINY}', f'--workdir={root}',
                '--dry-run')
  assert done.stdout == '' and 'every run of the sweep is finished' in done.stderr


@pytest.mark.skipif(bool(importlib.util.find_spec('tensorflow') or importlib.util.find_spec('gcsfs')),
                    reason='gs:// would be read through tensorflow/gcsfs, not the fake gcloud')
def test_sweep_on_a_gs_root_skips_what_the_bucket_has(fake_gcs):
  env, gcs = fake_gcs
  (gcs / 'bkt' / 'sw' / RUNS[0]).mkdir(parents=True)
  (gcs / 'bkt' / 'sw' / RUNS[0] / 'summary.json').write_text('{}')
  ssh = commands(script('sweep.sh', *BASE, '--names=tpu-a,tpu-b', f'--config={TINY}',
                        '--workdir=gs://bkt/sw/', '--dry-run', env=env))
  assert dict(slice_runs(c) for c in ssh) == {'tpu-a': [f'gs://bkt/sw/{RUNS[2]}'],
                                              'tpu-b': [f'gs://bkt/sw/{RUNS[1]}',
                                                        f'gs://bkt/sw/{RUNS[3]}']}
  assert f'gcloud storage ls gs://bkt/sw/{RUNS[2]}/summary.json' in flag(ssh[0], 'command')


# ---------------------------------------------------------------- the planner, pure

def test_plan_local_and_gs_roots():
  local = pod_sweep.plan(str(ROOT / TINY), '/data/sw/', ['tpu-a', 'tpu-b'])
  assert [(p['slice'], p['run']) for p in local] == [
      ('tpu-a', RUNS[0]), ('tpu-b', RUNS[1]), ('tpu-a', RUNS[2]), ('tpu-b', RUNS[3])]
  assert [p['workdir'] for p in local] == [f'/data/sw/{n}' for n in RUNS]
  assert local[0]['overrides'] == {'peft.method': 'lora', 'peft.lora.rank': 2, 'seed': 0}
  assert local[0]['command'] == [
      '.venv/bin/python', '-m', 'peftjax.main', f'--config={TINY}', f'--workdir=/data/sw/{RUNS[0]}',
      '--config.peft.method=lora', '--config.peft.lora.rank=2', '--config.seed=0',
      '--config.train.progress=False', '--multihost=true']
  gs = pod_sweep.plan(TINY, 'gs://bkt/sweeps/tiny', ['tpu-a'], extra=['--fresh'],
                      python='python3')
  assert [p['workdir'] for p in gs] == [f'gs://bkt/sweeps/tiny/{n}' for n in RUNS]
  assert {p['slice'] for p in gs} == {'tpu-a'}
  assert gs[3]['command'][:5] == ['python3', '-m', 'peftjax.main', f'--config={TINY}',
                                  f'--workdir=gs://bkt/sweeps/tiny/{RUNS[3]}']
  assert gs[3]['command'][-1] == '--fresh'
  assert pod_sweep.join('gs://bkt/', 'r') == 'gs://bkt/r' and pod_sweep.join('/', 'r') == '/r'


@pytest.mark.parametrize('slices,message', [
    ([], '--slices is empty'), (['tpu-a', 'tpu-a'], 'names a slice twice'),
    (['TPU_A'], 'is not a TPU name')])
def test_plan_rejects_bad_slices(slices, message):
  with pytest.raises(SystemExit, match=message):
    pod_sweep.plan(TINY, '/w', slices)


def test_plan_rejects_a_config_outside_the_repository(tmp_path):
  outside = tmp_path / 'c.py'
  outside.write_text((ROOT / TINY).read_text())
  with pytest.raises(SystemExit, match='outside the repository'):
    pod_sweep.plan(str(outside), '/w', ['tpu-a'])
  with pytest.raises(SystemExit, match='no such file'):
    pod_sweep.plan('configs/nope.py', '/w', ['tpu-a'])


def _summary(acc):
  return json.dumps({'accuracy_after': acc, 'nll_after': 0.5, 'ece_after': 0.1,
                     'trainable_params': 100, 'trainable_fraction': 0.01, 'train_seconds': 2.0})


def test_collect_local_writes_the_table_and_reports_unfinished(tmp_path, capsys):
  for name, acc in [(RUNS[0], 0.75), (RUNS[3], 0.8)]:
    (tmp_path / name).mkdir()
    (tmp_path / name / 'summary.json').write_text(_summary(acc))
  (tmp_path / RUNS[1]).mkdir()  # started, not finished
  records, unfinished = pod_sweep.main(['collect', f'--config={TINY}', f'--workdir={tmp_path}'])
  assert [(r['run'], r['accuracy_after']) for r in records] == [(RUNS[0], 0.75), (RUNS[3], 0.8)]
  assert unfinished == [RUNS[1], RUNS[2]]
  out = capsys.readouterr()
  assert f'2 finished, 2 unfinished: {RUNS[1]}, {RUNS[2]}' in out.err
  assert (tmp_path / 'results.md').read_text() == out.out
  assert json.loads((tmp_path / 'results.json').read_text()) == records


def test_collect_from_a_gs_root_through_gcloud(fake_gcs, monkeypatch, tmp_path):
  env, gcs = fake_gcs
  monkeypatch.setenv('PATH', env['PATH'])
  monkeypatch.setenv('FAKE_GCS', env['FAKE_GCS'])
  monkeypatch.setattr(pod_sweep, '_gcs_backend', lambda: 'gcloud')
  (gcs / 'bkt' / 'sw' / RUNS[2]).mkdir(parents=True)
  (gcs / 'bkt' / 'sw' / RUNS[2] / 'summary.json').write_text(_summary(0.7))
  records, unfinished = pod_sweep.collect(TINY, 'gs://bkt/sw')
  assert [(r['run'], r['accuracy_after'], r['trainable_params']) for r in records] == [
      (RUNS[2], 0.7, 100)]
  assert unfinished == [RUNS[0], RUNS[1], RUNS[3]]
  assert pod_sweep.read_text(f'gs://bkt/sw/{RUNS[0]}/summary.json') is None
  assert pod_sweep.finished('gs://bkt/none', RUNS) == set()
  pod_sweep.main(['collect', f'--config={TINY}', '--workdir=gs://bkt/sw', f'--out={tmp_path}/o'])
  assert (tmp_path / 'o' / 'results.md').exists()


# ---------------------------------------------------------------- no gcloud, no account

NOT_GCLOUD = {'gcloud', 'gsutil', 'bq', 'docker-credential-gcloud'}


@pytest.fixture(scope='module')
def no_gcloud(tmp_path_factory):
  """A clean environment whose PATH has every tool of this machine but the Cloud SDK, and a HOME
  without gcloud's config: no gcloud, no account, no credentials."""
  bin_dir = tmp_path_factory.mktemp('bin')
  for d in os.environ['PATH'].split(os.pathsep):
    if not os.path.isdir(d):
      continue
    for entry in os.scandir(d):
      if (entry.name not in NOT_GCLOUD and not (bin_dir / entry.name).exists()
          and os.access(entry.path, os.X_OK)):
        (bin_dir / entry.name).symlink_to(entry.path)
  home = tmp_path_factory.mktemp('home')
  env = {'PATH': str(bin_dir), 'HOME': str(home), 'PYTHON': sys.executable,
         'TMPDIR': str(tmp_path_factory.mktemp('tmp'))}
  assert subprocess.run(['bash', '-c', 'command -v gcloud'], env=env,
                        capture_output=True, check=False).returncode == 1
  return env


def bare(name, *args, env):
  """tpu/<name> run with exactly `env` (not the test's environment)."""
  return subprocess.run(['bash', str(ROOT / 'tpu' / name), *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, check=False)


@pytest.mark.parametrize('name,args', [
    ('create.sh', ['--name=tpu-a', '--accelerator=v5litepod-16', '--spot']),
    ('create.sh', ['--name=tpu-a', '--accelerator=v6e-8', '--queued', '--wait']),
    ('setup.sh', ['--name=tpu-a', '--source=local']),
    ('setup.sh', ['--name=tpu-a', '--source=https://example.org/p.git', '--ref=v1']),
    ('run.sh', ['--name=tpu-a', f'--config={TINY}', '--workdir=gs://bkt/runs/tiny']),
    ('run.sh', ['--name=tpu-a', '--stop']),
    ('logs.sh', ['--name=tpu-a', '--follow']),
    ('fetch.sh', ['--workdir=gs://bkt/sweeps/tiny', '--dest=results/tiny']),
    ('fetch.sh', ['--name=tpu-a', '--workdir=/w/s', '--dest=results/tiny']),
    ('delete.sh', ['--name=tpu-a', '--queued']),
])
def test_every_dry_run_needs_no_gcloud_and_no_account(no_gcloud, name, args):
  r = bare(name, *BASE, *args, '--dry-run', env=no_gcloud)
  assert r.returncode == 0, r.stderr
  assert commands(r) and 'error' not in r.stderr
  assert not os.listdir(no_gcloud['TMPDIR'])  # nothing written (setup's tarball is only printed)
  assert not (ROOT / 'results').exists()


def test_sweep_dry_run_on_a_bucket_without_gcloud_plans_every_run(no_gcloud):
  r = bare('sweep.sh', *BASE, '--names=tpu-a,tpu-b', f'--config={TINY}',
           '--workdir=gs://bkt/sweeps/tiny', '--dry-run', env=no_gcloud)
  assert r.returncode == 0, r.stderr
  assert not os.listdir(no_gcloud['TMPDIR'])  # the planner's notes file is gone
  assigned = dict(slice_runs(c) for c in commands(r))
  assert assigned == {'tpu-a': [f'gs://bkt/sweeps/tiny/{RUNS[0]}', f'gs://bkt/sweeps/tiny/{RUNS[2]}'],
                      'tpu-b': [f'gs://bkt/sweeps/tiny/{RUNS[1]}', f'gs://bkt/sweeps/tiny/{RUNS[3]}']}
  [note] = [line for line in r.stderr.splitlines() if line.startswith('note:')]
  assert 'cannot tell here which runs in gs://bkt/sweeps/tiny are finished' in note
  assert 'the gcloud CLI; none is installed' in note and 'each worker skips' in note
  # The workers still check each run's summary.json before starting it.
  assert f'gcloud storage ls gs://bkt/sweeps/tiny/{RUNS[0]}/summary.json' in flag(
      commands(r)[0], 'command')


NO_ACCOUNT = r'''#!/usr/bin/env bash
# gcloud without an account: every storage command fails the way the real one does.
echo "$*" >> "$HOME/gcloud-calls"
[[ $1 == storage ]] || { echo "fake gcloud: unexpected $*" >&2; exit 3; }
cat >&2 <<'MSG'
ERROR: (gcloud.storage.ls) You do not currently have an active account selected.
Please run:

  $ gcloud auth login

to obtain new credentials.
MSG
exit 1
'''


def test_sweep_without_an_account_dry_runs_and_a_real_run_fails_in_one_line(no_gcloud, tmp_path):
  bin_dir = tmp_path / 'sdk'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(NO_ACCOUNT)
  (bin_dir / 'gcloud').chmod(0o755)
  env = {**no_gcloud, 'PATH': f'{bin_dir}:{no_gcloud["PATH"]}', 'HOME': str(tmp_path)}
  args = [*BASE, '--names=tpu-a,tpu-b', f'--config={TINY}', '--workdir=gs://bkt/sw']
  r = bare('sweep.sh', *args, '--dry-run', env=env)
  assert r.returncode == 0, r.stderr
  assert sum(len(runs) for _, runs in (slice_runs(c) for c in commands(r))) == len(RUNS)
  [note] = [line for line in r.stderr.splitlines() if line.startswith('note:')]
  assert ('You do not currently have an active account selected. '
          "(run 'gcloud auth login', or give a local --workdir)") in note
  # Without --dry-run the same account problem stops the sweep before any slice is touched.
  r = bare('sweep.sh', *args, env=env)
  assert_refused(r, 'sweep.sh', 'gcloud storage ls gs://bkt/sw failed',
                 'You do not currently have an active account selected', 'gcloud auth login')
  assert [c.split()[:2] for c in (tmp_path / 'gcloud-calls').read_text().splitlines()] == [
      ['storage', 'ls']] * 2  # the two plans; no ssh


@pytest.mark.parametrize('name,args', [
    ('delete.sh', ['--name=tpu-a']),
    ('setup.sh', ['--name=tpu-a', '--source=local']),
    ('sweep.sh', ['--names=tpu-a', f'--config={TINY}', '--workdir=/data/sw']),
])
def test_without_gcloud_a_real_run_stops_in_one_line(no_gcloud, name, args):
  r = bare(name, *BASE, *args, env=no_gcloud)
  assert_refused(r, name, 'gcloud not found on PATH', 'add --dry-run')
  assert not os.listdir(no_gcloud['TMPDIR'])  # no tarball made for an upload that can't happen


# ---------------------------------------------------------------- bad flags: one line, exit 1

@pytest.mark.parametrize('name,args,words', [
    ('fetch.sh', ['--workdir=gs://b/s', '--dest=/tmp/r', '--with-checkpoints=1'],
     ['--with-checkpoints is a flag and takes no value']),
    ('delete.sh', ['--name=tpu-a', '--dry-run=yes'], ['--dry-run is a flag and takes no value']),
    ('fetch.sh', ['--workdir=gs:/b/s', '--dest=/tmp/r'], ['--workdir=gs:/b/s is not a bucket path']),
    ('fetch.sh', ['--workdir=gs://', '--dest=/tmp/r'], ['--workdir=gs:// is not a bucket path']),
    ('run.sh', ['--name=tpu-a', f'--config={TINY}', '--workdir=gs://My_Bucket/r'],
     ['--workdir=gs://My_Bucket/r is not a bucket path', 'gs://BUCKET/PREFIX']),
    ('sweep.sh', ['--names=tpu-a', f'--config={TINY}', '--workdir=gs:/b/sw'],
     ['--workdir=gs:/b/sw is not a bucket path']),
    ('run.sh', ['--name=tpu-a', f'--config={TINY}', '--workdir=/'], ['--workdir=/ is a root']),
    ('fetch.sh', ['--workdir=gs://b/s', f'--dest={ROOT / "README.md"}'],
     ['README.md is a file; give a directory']),
    ('logs.sh', ['--name=tpu-a', '--list', '--follow'], ['--list', 'takes no --log or --follow']),
    ('logs.sh', ['--name=tpu-a', '--list', '--log=sweep'], ['takes no --log or --follow']),
    ('logs.sh', ['--name=tpu-a', '--worker=w1'], ['--worker=w1; valid: 0, 1, ... or all']),
    ('run.sh', ['--name=tpu-a', f'--config={TINY}', '--workdir=/w', '--job=my job'],
     ['--job=my job: use letters, digits']),
    ('sweep.sh', ['--names=tpu-a,TPU_B', f'--config={TINY}', '--workdir=/data/sw'],
     ["--slices: 'TPU_B' is not a TPU name"]),
    ('sweep.sh', ['--names=tpu-a,tpu-a', f'--config={TINY}', '--workdir=/data/sw'],
     ['--slices=tpu-a,tpu-a names a slice twice']),
    ('sweep.sh', ['--names=tpu-a', '--config=configs/nope.py', '--workdir=/data/sw'],
     ['--config=configs/nope.py: no such file']),
    ('run.sh', ['--name=tpu-a', f'--config={TINY}', '--workdir=/w', '--config.peft.lora.rank'],
     ['--config.peft.lora.rank needs a value: --config.peft.lora.rank=VALUE']),
    ('delete.sh', ['--name=tpu-a', '--config.peft.lora.rank=8'],
     ["unknown option '--config.peft.lora.rank=8'"]),
    # run.sh checks the config and the overrides here, as peftjax.main on the workers would.
    ('run.sh', ['--name=tpu-a', f'--config={TINY}', '--workdir=gs://b/r',
                '--config.peft.lora.rnak=8'],
     ["--config.peft.lora.rnak: unknown field 'rnak' in section 'peft.lora' (did you mean "
      "'rank'?)"]),
    ('run.sh', ['--name=tpu-a', f'--config={TINY}:big', '--workdir=gs://b/r'],
     [f"--config={TINY}:big: unknown variant 'big'"]),
])
def test_a_bad_flag_is_one_line_and_exit_1(name, args, words):
  r = script(name, *BASE, *args, '--dry-run', check=False)
  assert_refused(r, name, *words)


def test_run_checks_the_flags_for_peftjax_main_here_and_without_a_venv_leaves_it_to_workers():
  args = [*BASE, '--name=tpu-a', f'--config={TINY}', '--workdir=gs://b/r', '--dry-run']
  r = script('run.sh', *args, '--', '--fersh', check=False)
  assert_refused(r, 'run.sh', "Unknown command line flag 'fersh'")
  r = script('run.sh', *args, '--', '--fersh', env={'PYTHON': '/nonexistent/python'})
  assert detached_job(flag(commands(r)[0], 'command'))[-1] == '--fersh'
  assert r.stderr == ("note: no /nonexistent/python here to check the config and overrides "
                      "(run 'make setup'); the workers will\n")


def test_setup_outside_a_git_checkout_names_the_project_repository(tmp_path):
  """A copy of the repository without .git (an unpacked archive): no 'origin' to clone from."""
  (tmp_path / 'tpu').mkdir()
  for f in ('setup.sh', 'common.sh'):
    (tmp_path / 'tpu' / f).write_text((ROOT / 'tpu' / f).read_text())
  (tmp_path / 'pyproject.toml').write_text((ROOT / 'pyproject.toml').read_text())
  repository = re.search(r'^Repository = "([^"]+)"', (ROOT / 'pyproject.toml').read_text(),
                         re.M)[1]
  r = subprocess.run(['bash', str(tmp_path / 'tpu' / 'setup.sh'), *BASE, '--name=tpu-a',
                      '--dry-run'], capture_output=True, text=True, cwd=tmp_path, check=False,
                     env={'PATH': os.environ['PATH'], 'HOME': str(tmp_path),
                          'GIT_CEILING_DIRECTORIES': str(tmp_path.parent)})
  assert_refused(r, 'setup.sh', "missing --source: this checkout has no 'origin' remote",
                 '--source=local', f"the project's {repository}")
