#!/usr/bin/env bash
# tpu/sweep.sh: fan a config's sweep out over several slices; each slice runs its share in turn.
#
# Usage:
#   tpu/sweep.sh --project=P --zone=Z --names=tpu-a,tpu-b --config=configs/X.py[:ARG]
#                --workdir=ROOT [--remote-dir=DIR] [--dry-run] [-- MAIN_FLAGS]
#
#   --names    the slices, comma-separated ($TPU_NAMES; default --name / $TPU_NAME)
#   --config   a config file of this repository that defines sweep(add, arg)
#   --workdir  the sweep's root: gs://bucket/prefix (needed on multi-host slices, and to resume
#              on a new slice after preemption) or a path on each worker; run R writes ROOT/R
#   -- FLAGS   peftjax.main flags for every run, e.g. -- --config.train.steps=1000
#
# `python -m experiments.pod_sweep plan` expands the sweep (experiments.sweep.expand) and
# assigns run i to slice i mod N, so the same command sends a run to the same slice again. Runs
# whose ROOT/R/summary.json exists are skipped, here and again on the worker just before the
# run starts; unfinished runs resume from their checkpoints. After a preemption, recreate and set
# up the slice and rerun this same command. On each slice, every worker (--worker=all) runs the
# slice's runs one after the other, detached (setsid nohup), logging to logs/sweep.log and
# logs/<run>.log in the remote checkout. Results: tpu/fetch.sh, then
# `python -m experiments.pod_sweep collect --config=... --workdir=...`.
#
# Environment: PYTHON, the local python that plans (default .venv/bin/python of this checkout).
#
# Example:
#   tpu/sweep.sh --project=my-proj --zone=us-central2-b --names=tpu-a,tpu-b \
#     --config=configs/tiny.py --workdir=gs://my-bucket/sweeps/tiny --dry-run
# shellcheck disable=SC2154  # OPT_* variables are set by parse_args (printf -v)
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "project= zone= names= name= config= workdir= remote-dir=" "$@"
require project TPU_PROJECT my-gcp-project
require zone TPU_ZONE us-central2-b
[[ -z $OPT_names || -z $OPT_name ]] || die "give --names=a,b or --name=a, not both"
OPT_names=${OPT_names:-${OPT_name:-${TPU_NAMES:-${TPU_NAME:-}}}}
[[ -n $OPT_names ]] || die "missing --names (or set \$TPU_NAMES), e.g. --names=tpu-a,tpu-b"
require config TPU_CONFIG configs/tiny.py
require workdir TPU_WORKDIR gs://my-bucket/sweeps/tiny
remote_dir
config=$(repo_config "$OPT_config")
check_workdir "$OPT_workdir"

python=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $python ]] || command -v "$python" >/dev/null ||
  die "no python to plan the sweep: $python is missing; run 'make setup' here or set PYTHON"
plan_cmd=("$python" -m experiments.pod_sweep plan --config="$config" --workdir="$OPT_workdir"
          --slices="$OPT_names" --format=shell)
# A dry run needs no account: if the workdir can't be read here (a gs:// root without gcloud or
# credentials), it plans every run; the workers skip finished runs themselves.
if ((DRY_RUN)); then plan_cmd+=(--if_unreadable=plan_all); fi
plan_cmd+=(-- ${EXTRA[@]+"${EXTRA[@]}"})
notes=$(mktemp "${TMPDIR:-/tmp}/peftjax-plan.XXXXXX")
trap 'rm -f "$notes"' EXIT
if ! plan=$(cd "$ROOT" && "${plan_cmd[@]}" 2> "$notes"); then
  # The planner's own one-line error (or, for a crash, everything it printed).
  reason=$(sed -n 's/^.*error: //p' "$notes" | tail -n 1)
  [[ -n $reason ]] || { cat "$notes" >&2; reason='planning the sweep failed (see above)'; }
  die "$reason"
fi
warn_local_workdir "$OPT_workdir"
echo "# plan (runs locally, also with --dry-run): $(quote "${plan_cmd[@]}")" >&2
cat "$notes" >&2
if [[ -z $plan ]]; then
  echo "every run of the sweep is finished; collect the table with: python -m experiments.pod_sweep collect --config=$config --workdir=$OPT_workdir" >&2
  exit 0
fi

tab=$'\t'
failed=()
while IFS= read -r line; do
  slice=${line%%"$tab"*}
  script=${line#*"$tab"}
  # A slice that cannot start (busy with an earlier job, unreachable) does not stop the others.
  ssh_all "$slice" "$(detached --script "$script" logs/sweep.log)" || failed+=("$slice")
done <<< "$plan"
if ((${#failed[@]})); then
  die "could not start on: ${failed[*]} (see the messages above); the other slices are running"
fi
