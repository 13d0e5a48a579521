#!/usr/bin/env bash
# tpu/logs.sh: show the end of a job's log on one worker (or all), optionally following it.
#
# Usage:
#   tpu/logs.sh --project=P --zone=Z --name=N [--worker=0|all] [--log=NAME] [--lines=50]
#               [--follow] [--list] [--remote-dir=DIR] [--dry-run]
#
#   --worker  which worker: 0 (default), 1, ... or all (output of all workers interleaved)
#   --log     logs/NAME.log in the remote checkout: a tpu/run.sh --job, 'sweep', or a sweep
#             run's name (default: the newest log)
#   --lines   how many lines (default 50)
#   --follow  keep printing new lines (tail -F) until Ctrl-C
#   --list    list the logs instead
#
# Example:
#   tpu/logs.sh --project=my-proj --zone=us-central2-b --name=tpu-a --log=sweep --follow --dry-run
# shellcheck disable=SC2154  # OPT_* variables are set by parse_args (printf -v)
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "project= zone= name= worker= log= lines= follow list remote-dir=" "$@"
require project TPU_PROJECT my-gcp-project
require zone TPU_ZONE us-central2-b
require_name
remote_dir
default worker TPU_WORKER 0
default lines TPU_LOG_LINES 50
[[ $OPT_worker == all || $OPT_worker =~ ^[0-9]+$ ]] || die "--worker=$OPT_worker; valid: 0, 1, ... or all"
[[ $OPT_lines =~ ^[0-9]+$ ]] || die "--lines=$OPT_lines; valid: a number of lines, e.g. --lines=100"
[[ -z $OPT_log || $OPT_log =~ ^[A-Za-z0-9_.,=+-]+$ ]] || die "--log=$OPT_log; valid: a log's name as --list shows it, without logs/ and .log"

if [[ -n $OPT_list && -n $OPT_log$OPT_follow ]]; then
  die "--list lists the logs; it takes no --log or --follow"
fi

cd_logs="cd $(quote "$OPT_remote_dir/logs")"
if [[ -n $OPT_list ]]; then
  remote="$cd_logs && ls -lt"
else
  follow=''
  [[ -n $OPT_follow ]] && follow=' -F'
  if [[ -n $OPT_log ]]; then
    file=$(quote "$OPT_log.log")
  else
    # shellcheck disable=SC2016  # expanded on the worker
    file='"$(ls -t -- *.log 2>/dev/null | head -n 1)"'
  fi
  remote="$cd_logs && f=$file && { [ -f \"\$f\" ] || { echo \"\$(hostname): no log \${f:-yet} in \$PWD\" >&2; exit 1; }; } && echo \"==> \$(hostname): \$PWD/\$f <==\" && tail -n $OPT_lines$follow \"\$f\""
fi
gcloud_tpu ssh "$OPT_name" --worker="$OPT_worker" --command="$remote"
