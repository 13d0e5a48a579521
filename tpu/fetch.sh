#!/usr/bin/env bash
# tpu/fetch.sh: copy a run's or a sweep's results to this machine (without checkpoints).
#
# Usage:
#   tpu/fetch.sh --workdir=gs://BUCKET/PREFIX --dest=DIR [--with-checkpoints] [--dry-run]
#   tpu/fetch.sh --project=P --zone=Z --name=N --workdir=DIR --dest=DIR [--with-checkpoints]
#                [--remote-dir=DIR] [--dry-run]
#
#   --workdir           a run's or a sweep's root: gs:// (copied with gcloud storage rsync; no
#                       slice needed) or a path on the slice's worker 0 (relative paths are
#                       relative to the remote checkout; tar + scp)
#   --dest              local directory to copy into (created; existing files are overwritten)
#   --with-checkpoints  also copy checkpoints/ (large); by default only summaries, metrics,
#                       TensorBoard files and adapters come back
#
# Then: python -m experiments.pod_sweep collect --config=configs/X.py --workdir=DIR
#
# Example:
#   tpu/fetch.sh --workdir=gs://my-bucket/sweeps/tiny --dest=results/tiny --dry-run
# shellcheck disable=SC2154  # OPT_* variables are set by parse_args (printf -v)
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "project= zone= name= workdir= dest= with-checkpoints remote-dir=" "$@"
require workdir TPU_WORKDIR gs://my-bucket/sweeps/tiny
require dest TPU_DEST results/tiny
workdir=${OPT_workdir%/}
if [[ -e $OPT_dest && ! -d $OPT_dest ]]; then
  die "--dest=$OPT_dest is a file; give a directory to copy the results into"
fi

check_workdir "$OPT_workdir"

if [[ $workdir == gs://* ]]; then
  [[ -z $OPT_name ]] || echo "note: --name is not used for a gs:// --workdir" >&2
  exclude=()
  [[ -n $OPT_with_checkpoints ]] || exclude=(--exclude='(.*/)?checkpoints/.*|\.jax_cache/.*')
  run mkdir -p "$OPT_dest"
  run gcloud storage rsync --recursive ${exclude[@]+"${exclude[@]}"} "$workdir" "$OPT_dest"
  exit 0
fi

require project TPU_PROJECT my-gcp-project
require zone TPU_ZONE us-central2-b
require_name
remote_dir
tar_args=(-czf /tmp/peftjax-fetch.tgz)
[[ -n $OPT_with_checkpoints ]] || tar_args+=(--exclude=checkpoints)
tar_args+=(--exclude=.jax_cache -C "$workdir" .)
gcloud_tpu ssh "$OPT_name" --worker=0 --command="cd $(quote "$OPT_remote_dir") && tar $(quote "${tar_args[@]}")"
run mkdir -p "$OPT_dest"
run gcloud compute tpus tpu-vm scp "$OPT_name:/tmp/peftjax-fetch.tgz" "$OPT_dest/" \
  --project="$OPT_project" --zone="$OPT_zone" --worker=0
run tar -xzf "$OPT_dest/peftjax-fetch.tgz" -C "$OPT_dest"
run rm -f "$OPT_dest/peftjax-fetch.tgz"
