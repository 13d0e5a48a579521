# shellcheck shell=bash disable=SC2034,SC2154  # OPT_*, EXTRA, ... are used by the scripts
# tpu/common.sh: helpers sourced by the tpu/*.sh scripts (not run on its own).
#
#   parse_args SPEC "$@"   options --key=value and flags, from SPEC ("project= zone= spot ...")
#   require KEY ENV EXAMPLE   a required option, from --KEY or else $ENV; a clear error otherwise
#   run CMD...              prints "+ CMD" (shell-quoted); runs it unless --dry-run
#                           (without --dry-run, parse_args first checks that gcloud is there)
#   gcloud_tpu SUB NAME ... gcloud compute tpus tpu-vm SUB NAME --project=.. --zone=.. ...
#   quote ARGS...           the args as one line a POSIX shell reads back as the same args
#   tpu_generation TYPE     an accelerator type's generation and runtime, from TPU_GENERATIONS
#
# Works with bash >= 3.2 (macOS): no associative arrays, no mapfile.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT="tpu/$(basename "$0")"
DRY_RUN=0
OVERRIDES=()  # --config.KEY=VALUE options, in order
EXTRA=()      # everything after --, passed on to peftjax.main

usage() {  # the comment block at the top of the calling script
  sed -n '2,/^[^#]/{/^# shellcheck/d;/^#/s/^# \{0,1\}//p;}' "$0"
}

die() {
  printf 'error: %s: %s\n' "$SCRIPT" "$*" >&2
  printf "(run '%s --help' for usage)\n" "$SCRIPT" >&2
  exit 1
}

quote() {
  local out='' a
  for a in "$@"; do
    if [[ -n $a && $a != *[!A-Za-z0-9_./:=,@%+-]* ]]; then
      out+="$a "
    else
      out+="'${a//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote "$@")" >&2
  "$@"
}

_opt_var() { local k=${1//-/_}; printf 'OPT_%s' "$k"; }

_valid_opts() {  # SPEC -> "--a=... --b ..." for error messages
  local w out=''
  for w in $1; do
    case $w in
      overrides) out+='--config.KEY=VALUE ' ;;
      *=) out+="--${w}VALUE " ;;
      *) out+="--$w " ;;
    esac
  done
  printf '%s--dry-run --help' "$out"
}

parse_args() {
  local spec=" $1 " w key value
  shift
  for w in $spec; do
    [[ $w == overrides ]] && continue
    printf -v "$(_opt_var "${w%=}")" '%s' ''
  done
  while (($#)); do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; EXTRA=("$@"); break ;;
      --config.*=*)
        [[ $spec == *" overrides "* ]] || die "unknown option '$1'; valid: $(_valid_opts "$spec")"
        OVERRIDES+=("$1") ;;
      --*=*)
        key=${1%%=*}; key=${key#--}; value=${1#*=}
        if [[ $spec == *" $key "* || $key == dry-run || $key == help ]]; then
          die "--$key is a flag and takes no value: give --$key, not $1"
        fi
        [[ $spec == *" $key= "* ]] || die "unknown option '--$key'; valid: $(_valid_opts "$spec")"
        [[ -n $value ]] || die "--$key is empty; give --$key=VALUE"
        printf -v "$(_opt_var "$key")" '%s' "$value" ;;
      --config.*)
        [[ $spec == *" overrides "* ]] || die "unknown option '$1'; valid: $(_valid_opts "$spec")"
        die "$1 needs a value: $1=VALUE" ;;
      --*)
        key=${1#--}
        if [[ $spec == *" $key "* ]]; then
          printf -v "$(_opt_var "$key")" '%s' 1
        elif [[ $spec == *" $key= "* ]]; then
          die "--$key needs a value: --$key=VALUE"
        else
          die "unknown option '$1'; valid: $(_valid_opts "$spec")"
        fi ;;
      *) die "unexpected argument '$1' (options are --key=value; flags for peftjax.main go after --)" ;;
    esac
    shift
  done
  # Every script ends in gcloud commands; --dry-run only prints them (no gcloud, no account).
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or add --dry-run to print the commands"
  fi
}

opt() { local v; v=$(_opt_var "$1"); printf '%s' "${!v}"; }

require() {  # KEY ENV EXAMPLE
  local var env=$2
  var=$(_opt_var "$1")
  if [[ -z ${!var} && -n ${!env:-} ]]; then printf -v "$var" '%s' "${!env}"; fi
  [[ -n ${!var} ]] || die "missing --$1 (or set \$$env), e.g. --$1=$3"
}

default() {  # KEY ENV VALUE: --KEY, else $ENV, else VALUE
  local var env=$2
  var=$(_opt_var "$1")
  if [[ -z ${!var} ]]; then printf -v "$var" '%s' "${!env:-$3}"; fi
}

require_name() {  # the TPU name, as gcloud accepts it
  require name TPU_NAME my-tpu
  [[ $OPT_name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name=$OPT_name is not a TPU name: lowercase letters, digits and '-', starting with a letter"
}

remote_dir() {  # --remote-dir, relative to the remote home: the repository's checkout on each worker
  default remote-dir TPU_REMOTE_DIR peftjax
  OPT_remote_dir=${OPT_remote_dir#\~/}
  [[ $OPT_remote_dir != *\~* ]] || die "--remote-dir=$OPT_remote_dir: give a path relative to the remote home or an absolute one, without '~'"
}

# TPU generations: the accelerator type's prefix (TYPE = PREFIX-SIZE), the generation's name and
# the TPU software version (runtime) Google documents for JAX on it
# (https://cloud.google.com/tpu/docs/runtimes). The one table tpu/create.sh picks from.
TPU_GENERATIONS='v2 v2 tpu-ubuntu2204-base
v3 v3 tpu-ubuntu2204-base
v4 v4 tpu-ubuntu2204-base
v5litepod v5e v2-alpha-tpuv5-lite
v5p v5p v2-alpha-tpuv5
v6e v6e v2-alpha-tpuv6e'

tpu_generation() {  # TYPE -> sets GENERATION and GENERATION_RUNTIME, or fails naming the valid types
  local prefix generation runtime valid=''
  while read -r prefix generation runtime; do
    if [[ $1 =~ ^$prefix-[1-9][0-9]*$ ]]; then
      GENERATION=$generation GENERATION_RUNTIME=$runtime
      return 0
    fi
    valid+="$prefix-N"
    [[ $generation == "$prefix" ]] || valid+=" ($generation)"
    valid+=', '
  done <<< "$TPU_GENERATIONS"
  local hint=''
  [[ $1 == v5e-* ]] && hint=" (v5e's type is v5litepod-N, e.g. v5litepod-${1#v5e-})"
  die "--accelerator=$1 is not an accelerator type of a known TPU generation$hint; valid: ${valid%, } (N: the slice's size, e.g. v4-32, v5litepod-16, v5p-8, v6e-8)"
}

gcloud_tpu() {  # SUB NAME ARGS...
  local sub=$1 name=$2
  shift 2
  run gcloud compute tpus tpu-vm "$sub" "$name" --project="$OPT_project" --zone="$OPT_zone" "$@"
}

ssh_all() {  # NAME REMOTE_COMMAND: the same command on every worker of the slice
  gcloud_tpu ssh "$1" --worker=all --command="$2"
}

repo_config() {  # CONFIG[:ARG] -> the config's path relative to the repository (what workers see)
  local spec=$1 path arg='' abs rel
  path=${spec%%:*}
  [[ $spec == *:* ]] && arg=":${spec#*:}"
  if [[ -f $path ]]; then
    abs="$(cd "$(dirname "$path")" && pwd -P)/$(basename "$path")"
  elif [[ -f $ROOT/$path ]]; then
    abs="$(cd "$(dirname "$ROOT/$path")" && pwd -P)/$(basename "$path")"
  else
    die "--config=$spec: no such file (give a config file of this repository, e.g. configs/tiny.py)"
  fi
  rel=${abs#"$(cd "$ROOT" && pwd -P)"/}
  [[ $rel != "$abs" ]] || die "--config=$spec is outside the repository $ROOT; the workers run a copy of the repository, so the config must live in it"
  printf '%s%s' "$rel" "$arg"
}

# The remote shell text that starts a job detached from the ssh session, in the repository
# directory, with its output in LOG: `setsid nohup CMD` when CMD is a simple command (already
# quoted), or `setsid nohup bash -c SCRIPT` with --script. Its process group id goes to
# logs/job.pid. A job still running there is an error: one job per slice holds the TPU.
detached() {  # [--script] CMD_OR_SCRIPT LOG
  local busy job
  if [[ $1 == --script ]]; then job="bash -c $(quote "$2")"; shift; else job=$1; fi
  # shellcheck disable=SC2016  # expanded on the worker
  busy='if [ -f logs/job.pid ] && kill -0 "$(cat logs/job.pid)" 2>/dev/null; then'
  busy+=" echo \"error: \$(hostname): a job started by tpu/run.sh or tpu/sweep.sh is still running (pid \$(cat logs/job.pid)); stop it with: tpu/run.sh --stop ...\" >&2; exit 1; fi"
  printf '%s' "cd $(quote "$OPT_remote_dir") && mkdir -p logs && $busy && { setsid nohup $job > $(quote "$2") 2>&1 < /dev/null & echo \$! > logs/job.pid; echo \"\$(hostname): started job \$! (log: $OPT_remote_dir/$2)\"; }"
}

check_workdir() {  # WORKDIR: a gs:// URL must name a bucket (a typo like gs:/b would be a local path)
  [[ $1 != gs:* || ${1%/} =~ ^gs://[a-z0-9]([-a-z0-9_.]*[a-z0-9])?(/.*)?$ ]] ||
    die "--workdir=$1 is not a bucket path; give gs://BUCKET/PREFIX, e.g. gs://my-bucket/sweeps/tiny"
}

warn_local_workdir() {  # WORKDIR
  [[ $1 == gs://* ]] && return 0
  printf '%s\n' "note: --workdir=$1 is a path on each worker's own disk: multi-host slices need a gs:// workdir for their checkpoints, and a deleted or preempted slice takes a local workdir with it." >&2
}
