#!/usr/bin/env bash
# tpu/create.sh: create a TPU VM slice, or queue a request for one (--queued).
#
# Usage:
#   tpu/create.sh --project=P --zone=Z --name=N --accelerator=TYPE [--runtime=V]
#                 [--spot | --preemptible] [--queued [--queued-id=ID] [--wait]] [--dry-run]
#
#   --project      GCP project ($TPU_PROJECT)
#   --zone         zone with TPU capacity, e.g. us-central2-b ($TPU_ZONE)
#   --name         TPU name: lowercase letters, digits, '-' ($TPU_NAME)
#   --accelerator  accelerator type GENERATION-SIZE ($TPU_ACCELERATOR): v2-8, v3-32, v4-8,
#                  v4-32, v5litepod-16 (v5e), v5p-8, v6e-8, ...
#   --runtime      TPU software version ($TPU_RUNTIME; --version is the same option); default:
#                  the one Google documents for the accelerator's generation, from the table
#                  TPU_GENERATIONS in tpu/common.sh (e.g. v5litepod-16: v2-alpha-tpuv5-lite)
#   --spot         Spot VMs: cheap, preemptible at any time (runs resume; see tpu/README.md)
#   --preemptible  preemptible TPU (plain create only; queued resources take --spot)
#   --queued       a queued resource: waits in Google's queue until capacity is free
#   --queued-id    the queued resource's id (default NAME-qr)
#   --wait         with --queued: poll until the slice is ACTIVE (fails if FAILED/SUSPENDED)
#   --dry-run      print the gcloud commands instead of running them
#
# Example:
#   tpu/create.sh --project=my-proj --zone=us-central2-b --name=tpu-a --accelerator=v4-32 --spot --dry-run
# shellcheck disable=SC2154  # OPT_* variables are set by parse_args (printf -v)
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "project= zone= name= accelerator= runtime= version= spot preemptible queued queued-id= wait" "$@"
require project TPU_PROJECT my-gcp-project
require zone TPU_ZONE us-central2-b
require_name
require accelerator TPU_ACCELERATOR v4-32
tpu_generation "$OPT_accelerator"  # GENERATION, GENERATION_RUNTIME (the table in tpu/common.sh)
if [[ -n $OPT_runtime && -n $OPT_version && $OPT_runtime != "$OPT_version" ]]; then
  die "--runtime=$OPT_runtime and --version=$OPT_version disagree; give one of them"
fi
OPT_runtime=${OPT_runtime:-$OPT_version}
default runtime TPU_RUNTIME "${TPU_VERSION:-$GENERATION_RUNTIME}"
[[ $OPT_runtime =~ ^[a-z0-9][-a-z0-9._]*$ ]] ||
  die "--runtime=$OPT_runtime is not a TPU software version; for $GENERATION: $GENERATION_RUNTIME"
if [[ $OPT_runtime != "$GENERATION_RUNTIME" ]]; then
  echo "note: --runtime=$OPT_runtime on a $GENERATION slice; Google documents $GENERATION_RUNTIME for $GENERATION" >&2
fi
[[ -z $OPT_spot || -z $OPT_preemptible ]] || die "--spot and --preemptible exclude each other; choose one"
[[ -n $OPT_queued || -z $OPT_queued_id ]] || die "--queued-id=$OPT_queued_id needs --queued"
[[ -n $OPT_queued || -z $OPT_wait ]] || die "--wait needs --queued (a plain create already waits)"

if [[ -z $OPT_queued ]]; then
  args=(--accelerator-type="$OPT_accelerator" --version="$OPT_runtime")
  [[ -n $OPT_spot ]] && args+=(--spot)
  [[ -n $OPT_preemptible ]] && args+=(--preemptible)
  gcloud_tpu create "$OPT_name" "${args[@]}"
  exit 0
fi

[[ -z $OPT_preemptible ]] || die "--preemptible does not apply to --queued; queued resources take --spot"
qid=${OPT_queued_id:-$OPT_name-qr}
args=(--node-id="$OPT_name" --accelerator-type="$OPT_accelerator" --runtime-version="$OPT_runtime")
[[ -n $OPT_spot ]] && args+=(--spot)
run gcloud compute tpus queued-resources create "$qid" --project="$OPT_project" --zone="$OPT_zone" "${args[@]}"
describe=(gcloud compute tpus queued-resources describe "$qid" --project="$OPT_project" --zone="$OPT_zone" --format='value(state.state)')
if [[ -z $OPT_wait ]]; then
  echo "queued $qid for TPU $OPT_name; check its state with: $(quote "${describe[@]}")" >&2
  exit 0
fi
if ((DRY_RUN)); then
  run "${describe[@]}"  # polled every 60 s until ACTIVE
  exit 0
fi
while true; do
  state=$(run "${describe[@]}")
  echo "queued resource $qid: $state" >&2
  case $state in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDING|SUSPENDED) die "queued resource $qid is $state; delete it with tpu/delete.sh --queued --name=$OPT_name and try another zone or later" ;;
  esac
  sleep 60
done
