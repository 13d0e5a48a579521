#!/usr/bin/env bash
# tpu/run.sh: run one config on every worker of a slice (the same command on each), detached.
#
# Usage:
#   tpu/run.sh --project=P --zone=Z --name=N --config=configs/X.py[:ARG] --workdir=DIR
#              [--config.KEY=VALUE ...] [--job=NAME] [--remote-dir=DIR] [--dry-run] [-- MAIN_FLAGS]
#   tpu/run.sh --project=P --zone=Z --name=N --stop [--dry-run]
#
#   --config      a config file of this repository (path relative to it, or to here inside it)
#   --workdir     the run's directory: gs://bucket/prefix (needed on multi-host slices, survives
#                 the slice) or a path on each worker (relative to the remote checkout)
#   --config.K=V  config overrides, passed on unchanged (checked here first, with the config and
#                 the flags after --, as peftjax.main will parse them)
#   --job         the log's name: logs/JOB.log in the remote checkout (default: the workdir's
#                 last path component)
#   --stop        stop the job started by tpu/run.sh or tpu/sweep.sh on every worker (SIGTERM to
#                 its process group); the run resumes from its last checkpoint when started again
#   -- FLAGS      further peftjax.main flags, e.g. -- --fresh
#
# Every worker (--worker=all) starts, under setsid nohup so it outlives the ssh session:
#   .venv/bin/python -m peftjax.main --config=... --workdir=... <overrides> > logs/JOB.log 2>&1
# JAX finds the other workers of the slice by itself. Restarting the same command resumes the
# run from the checkpoints in --workdir. Follow it with tpu/logs.sh.
#
# Environment: PYTHON, the local python that checks the config (default .venv/bin/python of
# this checkout; without one the check is left to the workers, with a note).
#
# Example:
#   tpu/run.sh --project=my-proj --zone=us-central2-b --name=tpu-a --config=configs/tiny.py \
#     --workdir=gs://my-bucket/runs/tiny --config.peft.lora.rank=8 --dry-run
# shellcheck disable=SC2154  # OPT_* variables are set by parse_args (printf -v)
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "project= zone= name= config= workdir= job= remote-dir= stop overrides" "$@"
require project TPU_PROJECT my-gcp-project
require zone TPU_ZONE us-central2-b
require_name
remote_dir

if [[ -n $OPT_stop ]]; then
  if [[ -n $OPT_config$OPT_workdir$OPT_job ]] || ((${#OVERRIDES[@]} + ${#EXTRA[@]})); then
    die "--stop takes no --config, --workdir, --job or overrides"
  fi
  ssh_all "$OPT_name" "cd $(quote "$OPT_remote_dir") && if [ -f logs/job.pid ] && kill -0 \"\$(cat logs/job.pid)\" 2>/dev/null; then kill -TERM -- -\"\$(cat logs/job.pid)\" && echo \"\$(hostname): stopped job \$(cat logs/job.pid)\"; else echo \"\$(hostname): no job running\"; fi"
  exit 0
fi

require config TPU_CONFIG configs/tiny.py
require workdir TPU_WORKDIR gs://my-bucket/runs/tiny
config=$(repo_config "$OPT_config")
workdir=${OPT_workdir%/}
job=${OPT_job:-${workdir##*/}}
check_workdir "$OPT_workdir"
[[ -n $workdir && $workdir != gs:/ ]] || die "--workdir=$OPT_workdir is a root; give the run's own directory, e.g. gs://my-bucket/runs/tiny"
[[ $job =~ ^[A-Za-z0-9_.,=+-]+$ ]] || die "--job=$job: use letters, digits and _.,=+- only (it names logs/JOB.log)"
warn_local_workdir "$workdir"

# --multihost=true: every worker joins one jax.distributed program (the slice auto-detects).
flags=(--multihost=true ${OVERRIDES[@]+"${OVERRIDES[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})
cmd=(.venv/bin/python -m peftjax.main --config="$config" --workdir="$workdir" "${flags[@]}")

# The config, its variant, the overrides and flags, checked here once (also with --dry-run)
# rather than failing in every worker's log.
python=${PYTHON:-$ROOT/.venv/bin/python}
if [[ -x $python ]] || command -v "$python" >/dev/null; then
  if ! out=$(cd "$ROOT" && "$python" -m experiments.pod_sweep check --config="$config" -- "${flags[@]}" 2>&1); then
    reason=$(printf '%s\n' "$out" | sed -n 's/^.*error: //p' | tail -n 1)
    die "${reason:-checking --config=$config here failed: $(printf '%s\n' "$out" | tail -n 1)}"
  fi
else
  echo "note: no $python here to check the config and overrides (run 'make setup'); the workers will" >&2
fi
ssh_all "$OPT_name" "$(detached "$(quote "${cmd[@]}")" "logs/$job.log")"
