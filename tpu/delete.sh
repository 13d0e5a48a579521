#!/usr/bin/env bash
# tpu/delete.sh: delete a TPU VM slice (or its queued resource, with --queued). No prompt.
#
# Usage:
#   tpu/delete.sh --project=P --zone=Z --name=N [--queued [--queued-id=ID]] [--dry-run]
#
#   --queued     the slice was created with tpu/create.sh --queued: delete the queued resource
#                and its TPU (gcloud ... queued-resources delete --force)
#   --queued-id  the queued resource's id (default NAME-qr)
#
# Copy results back first (tpu/fetch.sh): a local --workdir on the slice is deleted with it.
#
# Example:
#   tpu/delete.sh --project=my-proj --zone=us-central2-b --name=tpu-a --dry-run
# shellcheck disable=SC2154  # OPT_* variables are set by parse_args (printf -v)
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "project= zone= name= queued queued-id=" "$@"
require project TPU_PROJECT my-gcp-project
require zone TPU_ZONE us-central2-b
require_name
[[ -n $OPT_queued || -z $OPT_queued_id ]] || die "--queued-id=$OPT_queued_id needs --queued"

if [[ -n $OPT_queued ]]; then
  run gcloud compute tpus queued-resources delete "${OPT_queued_id:-$OPT_name-qr}" \
    --project="$OPT_project" --zone="$OPT_zone" --force --quiet
else
  gcloud_tpu delete "$OPT_name" --quiet
fi
