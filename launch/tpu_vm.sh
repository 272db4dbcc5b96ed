#!/usr/bin/env bash
# The life of a Cloud TPU VM slice for tapo_jax: create, setup, run, logs, ssh, stop, delete.
#
#   launch/tpu_vm.sh create --name=tapo --zone=us-east5-a --type=v5p-32 [--spot] [--queued]
#   launch/tpu_vm.sh setup  --name=tapo --zone=us-east5-a
#   launch/tpu_vm.sh ssh    --name=tapo --zone=us-east5-a --worker=all -- \
#     "sudo mkdir -p /mnt/models && sudo chown \$USER /mnt/models && \
#      gcloud storage cp -r gs://BUCKET/Qwen2.5-7B /mnt/models/"
#   launch/tpu_vm.sh run    --name=tapo --zone=us-east5-a --type=v5p-32 \
#     --config=configs/qwen7b.py --workdir=gs://BUCKET/run1 -- --config.rollout.n=8
#   launch/tpu_vm.sh logs   --name=tapo --zone=us-east5-a --type=v5p-32 [--worker=all]
#   launch/tpu_vm.sh stop   --name=tapo --zone=us-east5-a
#   launch/tpu_vm.sh delete --name=tapo --zone=us-east5-a [--queued]
#
# Options may also come from the environment: TPU_NAME, TPU_ZONE, TPU_TYPE, TPU_PROJECT.
# --dry-run prints every command (gcloud, and the local tar/python ones) instead of running it.
#
# A slice of W workers (hosts) runs one process per worker, all started by `run` at once with
# --config.distributed=True. On a TPU VM jax.distributed.initialize() needs no arguments: it
# reads the coordinator (worker 0), the process count and this worker's id from the TPU metadata
# server. What a pod adds: the same checkout and venv on every worker (setup / run sync them),
# the model and data at the same paths on every worker (copy them with `ssh --worker=all`), a
# --workdir every worker shares (gs://...: Orbax checkpoints are written collectively), and one
# command to see or end all W processes (logs --worker=all, stop).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=tapo_jax  # under the home directory, where each ssh command starts
DRY_RUN=0
NAME=${TPU_NAME:-} ZONE=${TPU_ZONE:-} TYPE=${TPU_TYPE:-} PROJECT=${TPU_PROJECT:-}
VERSION='' SPOT=0 QUEUED=0 VALID_FOR='' CONFIG='' WORKDIR='' WORKER='' PLAN=1
EXTRA=()

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  echo "error: $1" >&2
  exit 2
}

parse() {
  COMMAND=''
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --name=*) NAME=${1#*=} ;;
      --zone=*) ZONE=${1#*=} ;;
      --type=*) TYPE=${1#*=} ;;
      --project=*) PROJECT=${1#*=} ;;
      --version=*) VERSION=${1#*=} ;;
      --spot) SPOT=1 ;;
      --queued) QUEUED=1 ;;
      --valid-for=*) VALID_FOR=${1#*=} ;;
      --config=*) CONFIG=${1#*=} ;;
      --workdir=*) WORKDIR=${1#*=} ;;
      --worker=*) WORKER=${1#*=} ;;
      --no-plan) PLAN=0 ;;
      --) shift; EXTRA=("$@"); break ;;
      -*) usage "unknown option $1" ;;
      *) [ -z "$COMMAND" ] || usage "unexpected argument $1"; COMMAND=$1 ;;
    esac
    shift
  done
  [ -n "$COMMAND" ] || usage "no command"
  [ -n "$NAME" ] || usage "--name (or TPU_NAME) is required"
  [ -n "$ZONE" ] || usage "--zone (or TPU_ZONE) is required"
}

quote() {  # one word, single-quoted for a shell when it needs quoting
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {  # the arguments as one shell-quoted string, for a remote command line
  local out='' arg
  for arg in "$@"; do out+=" $(quote "$arg")"; done
  echo "${out# }"
}

# Prints (dry run) or runs a command; printed words are shell-quoted, ready to paste.
do_run() {
  if [ "$DRY_RUN" = 1 ]; then
    quote_all "$@"
  else
    "$@"
  fi
}

gcloud_tpu() {
  local project=()
  [ -z "$PROJECT" ] || project=(--project="$PROJECT")
  do_run gcloud compute tpus "$@" --zone="$ZONE" "${project[@]}"
}

on_workers() {  # on_workers WORKER COMMAND: one ssh to worker N, or to all of them at once
  gcloud_tpu tpu-vm ssh "$NAME" --worker="$1" --command="$2"
}

# Sets GEN, ACCEL (gcloud's name), CHIPS, WORKERS and DEFAULT_VERSION from TYPE (e.g. v5p-32).
topology() {
  [ -n "$TYPE" ] || usage "--type (or TPU_TYPE) is required for $COMMAND, e.g. v5p-32 or v5e-8"
  local gen=${TYPE%-*} size=${TYPE##*-}
  [[ $size =~ ^[0-9]+$ ]] || usage "--type=$TYPE: expected GENERATION-SIZE, e.g. v5p-32"
  case $gen in
    v4) GEN=v4 CHIPS=$((size / 2)) DEFAULT_VERSION=tpu-ubuntu2204-base ;;
    v5p) GEN=v5p CHIPS=$((size / 2)) DEFAULT_VERSION=v2-alpha-tpuv5 ;;
    v5e | v5litepod) GEN=v5e CHIPS=$size DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
    v6e) GEN=v6e CHIPS=$size DEFAULT_VERSION=v2-alpha-tpuv6e ;;
    *) usage "--type=$TYPE: expected a v4, v5e (v5litepod), v5p or v6e slice" ;;
  esac
  # v4 and v5p names count TensorCores (2 per chip); hosts have 4 chips, except the single-host
  # v5e / v6e slices of up to 8 chips
  [ "$CHIPS" -ge 1 ] || usage "--type=$TYPE: no whole chip in it"
  if [ "$GEN" = v5e ] || [ "$GEN" = v6e ]; then
    WORKERS=$((CHIPS <= 8 ? 1 : CHIPS / 4))
  else
    WORKERS=$(((CHIPS + 3) / 4))
  fi
  ACCEL=$TYPE
  [ "$GEN" != v5e ] || ACCEL=v5litepod-$size
  echo "# $TYPE: $CHIPS chips, $WORKERS worker(s), runtime ${VERSION:-$DEFAULT_VERSION}"
}

# Copies this checkout (no .git, venv or runs) into ~/tapo_jax on every worker.
sync_checkout() {
  local tarball=${TMPDIR:-/tmp}/tapo_jax-$NAME.tgz
  do_run tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
    -czf "$tarball" .
  gcloud_tpu tpu-vm scp "$tarball" "$NAME:/tmp/tapo_jax.tgz" --worker=all
  on_workers all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/tapo_jax.tgz"
}

cmd_create() {
  topology
  local version=${VERSION:-$DEFAULT_VERSION} spot=()
  [ "$SPOT" = 0 ] || spot=(--spot)
  if [ -n "$CONFIG" ]; then  # before a long queue wait: does the config fit these chips?
    do_run python -m tapo_jax.main --config="$CONFIG" --config.mode=plan \
      --config.plan.device="$GEN" --config.plan.chips="$CHIPS" "${EXTRA[@]}"
  fi
  if [ "$QUEUED" = 1 ]; then
    local until=()
    [ -z "$VALID_FOR" ] || until=(--valid-until-duration="$VALID_FOR")
    gcloud_tpu queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$ACCEL" \
      --runtime-version="$version" "${spot[@]}" "${until[@]}"
    echo "# queued; state: launch/tpu_vm.sh status --queued --name=$NAME --zone=$ZONE"
  else
    [ -z "$VALID_FOR" ] || usage "--valid-for needs --queued"
    gcloud_tpu tpu-vm create "$NAME" --accelerator-type="$ACCEL" --version="$version" "${spot[@]}"
  fi
}

cmd_setup() {
  sync_checkout
  # the TPU images' Ubuntu may lack python3-venv
  on_workers all "set -e; cd $REMOTE_DIR; python3 -m venv .venv || { sudo apt-get update -qq && \
sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }; \
.venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e . 'jax[tpu]'; \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
}

cmd_run() {
  topology
  [ -n "$CONFIG" ] || usage "run needs --config=FILE"
  [ -n "$WORKDIR" ] || usage "run needs --workdir=DIR"
  if [ "$WORKERS" -gt 1 ] && [[ $WORKDIR != gs://* ]]; then
    usage "--workdir=$WORKDIR: a $TYPE has $WORKERS workers; use a gs:// path they all share"
  fi
  sync_checkout
  local args
  args=$(quote_all --config="$CONFIG" --workdir="$WORKDIR" --config.distributed=True "${EXTRA[@]}")
  if [ "$PLAN" = 1 ]; then  # the memory plan on worker 0 first: stop here if it does not fit
    on_workers 0 "cd $REMOTE_DIR && .venv/bin/python -m tapo_jax.main $args --config.mode=plan \
--config.plan.device=$GEN --config.plan.chips=$CHIPS"
  fi
  on_workers all "cd $REMOTE_DIR && if [ -f run.pid ] && kill -0 \$(cat run.pid) 2>/dev/null; \
then echo \"\$(hostname): a run is in progress (launch/tpu_vm.sh stop)\" >&2; exit 1; fi; \
nohup .venv/bin/python -m tapo_jax.main $args > run.log 2>&1 < /dev/null & echo \$! > run.pid"
  echo "# started on $WORKERS worker(s); logs: launch/tpu_vm.sh logs --name=$NAME --zone=$ZONE --type=$TYPE"
}

cmd_logs() {
  topology
  local tail="tail -n 200 -F $REMOTE_DIR/run.log"
  if [ "${WORKER:-0}" != all ]; then
    on_workers "${WORKER:-0}" "$tail"
    return
  fi
  local i
  for ((i = 0; i < WORKERS; i++)); do  # one stream per worker, each line tagged with its worker
    if [ "$DRY_RUN" = 1 ]; then
      on_workers "$i" "$tail"
    else
      on_workers "$i" "$tail" 2>&1 | sed -u "s/^/[worker $i] /" &
    fi
  done
  wait
}

cmd_ssh() {
  if [ ${#EXTRA[@]} -gt 0 ]; then
    on_workers "${WORKER:-0}" "${EXTRA[*]}"
  else
    gcloud_tpu tpu-vm ssh "$NAME" --worker="${WORKER:-0}"
  fi
}

cmd_stop() {  # SIGTERM: the run checkpoints and exits as on a preemption
  on_workers all "cd $REMOTE_DIR && if [ -f run.pid ]; then kill \$(cat run.pid) 2>/dev/null \
|| true; rm -f run.pid; fi"
}

cmd_status() {
  if [ "$QUEUED" = 1 ]; then
    gcloud_tpu queued-resources describe "$NAME" --format='value(state.state)'
  else
    gcloud_tpu tpu-vm describe "$NAME" --format='value(state,acceleratorType)'
  fi
}

cmd_delete() {
  if [ "$QUEUED" = 1 ]; then
    gcloud_tpu queued-resources delete "$NAME" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$NAME" --quiet
  fi
}

parse "$@"
case $COMMAND in
  create | setup | run | logs | ssh | stop | status | delete) "cmd_$COMMAND" ;;
  *) usage "unknown command $COMMAND (create, setup, run, logs, ssh, stop, status, delete)" ;;
esac
