#!/usr/bin/env bash
# Run jdpo on every worker of a Cloud TPU VM (a pod slice is several VMs that must all run the same
# program: each worker runs `jdpo train`, and jax.distributed joins them, detected automatically).
# `bash run_tpu.sh --help` documents everything; `--dry-run` prints the gcloud commands instead.
set -euo pipefail

PROG=run_tpu.sh

usage() {
  cat <<'EOF'
Usage: bash run_tpu.sh COMMAND... --name NAME --zone ZONE [options] [-- JDPO_TRAIN_OVERRIDES...]

Run jdpo on every worker of a Cloud TPU VM / pod slice through `gcloud compute tpus tpu-vm`.
Several commands run in the order given, e.g. `create setup launch logs`.

Commands:
  create    Create the TPU VM (needs --accelerator-type; --version defaults from the TPU generation).
  setup     Install jdpo[tpu] in a virtual environment on every worker, from a git ref (--git URL
            [--ref REF]) or a wheel built here and copied up (--wheel FILE).
  launch    Start `jdpo train --config ... [overrides]` on every worker, in the background (nohup,
            its own session), logging to jdpo-runs/RUN/train.log in each worker's home directory.
  logs      Stream worker 0's log (--log-worker N for another worker); Ctrl-C stops watching only.
  status    Show on every worker whether the run is alive, and the last line of its log.
  stop      Stop the run on every worker: SIGTERM (jdpo saves a checkpoint and exits), or SIGKILL
            with --force.
  delete    Delete the TPU VM (gcloud asks for confirmation unless --yes).

Required for every command:
  --name NAME               TPU VM name (lowercase letters, digits, hyphens; starts with a letter).
  --zone ZONE               e.g. us-west4-a.
Common options:
  --project PROJECT         Google Cloud project (default: gcloud's configured project).
  --run RUN                 Run name: the remote directory jdpo-runs/RUN holds its config copy, log and
                            pid file (default: jdpo). Use different names for runs side by side.
  --worker WORKERS          Workers to act on: all (default), or gcloud's 0 / 1,3 / 0-3 forms.
  --venv DIR                Remote virtual environment, relative to the home directory (default: jdpo-venv).
  --dry-run                 Print the exact gcloud commands, one per line, instead of running them.
  -h, --help                Show this help and exit.
create:
  --accelerator-type TYPE   e.g. v5litepod-16, v5p-64, v6e-32, v4-32 (required).
  --version VERSION         TPU runtime (software) version; default by generation: v5litepod ->
                            v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e,
                            v2/v3/v4 -> tpu-ubuntu2204-base.
  --spot                    Create a Spot TPU (cheaper, may be preempted; jdpo resumes from checkpoints).
  --create                  Same as putting `create` before the other commands.
setup:
  --git URL                 Install jdpo[tpu] from this git repository ...
  --ref REF                 ... at this branch, tag or commit (default: main).
  --wheel FILE              ... or from this local wheel (python -m build --wheel), copied to every worker.
  --python PYTHON           Remote Python used to create the virtual environment (default: python3).
  --pip-args ARGS           Extra arguments for the remote pip install (one string, split on spaces).
launch:
  --config FILE             jdpo YAML config, a local file: copied to jdpo-runs/RUN/ on every worker.
  --remote-config PATH      ... or a path that already exists on every worker (e.g. on a mounted bucket).
  --output-dir DIR          Adds --train.output_dir DIR. Must be one directory every worker sees (all of
                            them write the checkpoints): a shared mount (Filestore / NFS / gcsfuse) at
                            the same path on every worker, or a gs:// path (passed through unchanged;
                            jdpo writes it through etils.epath + gcsfs). Never a worker's local disk.
  --env KEY=VALUE           Environment variable for the run on every worker (repeatable), e.g. HF_HOME.
  --no-validate             Skip loading --config + overrides with the local `jdpo` first (when jdpo is
                            installed here, a typo in an override fails before any worker starts).
  -- OVERRIDES...           Everything after `--` is passed to `jdpo train` unchanged, each argument
                            quoted for the remote shell: -- --dpo.beta 0.2 --data.train "a b.jsonl".
logs:
  --log-worker N            Which worker's log to stream (default: 0).
stop:
  --force                   SIGKILL instead of SIGTERM (no final checkpoint).
delete:
  --yes                     Do not ask for confirmation.

Examples:
  bash run_tpu.sh create setup --name dpo-pod --zone us-west4-a --accelerator-type v5litepod-16 \
      --git https://github.com/ORG/jdpo --ref v0.1.0
  bash run_tpu.sh launch logs --name dpo-pod --zone us-west4-a --config experiments/tpu_pod.yaml \
      --output-dir gs://my-bucket/runs/llama3-dpo -- --model.path /mnt/models/llama-3-8b --dpo.beta 0.1
  bash run_tpu.sh stop --name dpo-pod --zone us-west4-a
  bash run_tpu.sh delete --name dpo-pod --zone us-west4-a --yes
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "Run 'bash $PROG --help' for the options." >&2
  exit 2
}

# ---- arguments ------------------------------------------------------------------------------------

COMMANDS=()
NAME="" ZONE="" PROJECT="" RUN="jdpo" WORKER="all" VENV="jdpo-venv" DRY_RUN=0
ACCELERATOR="" VERSION="" SPOT=0
GIT_URL="" GIT_REF="main" WHEEL="" PYTHON="python3" PIP_ARGS=""
CONFIG="" REMOTE_CONFIG="" OUTPUT_DIR="" ENVS=() OVERRIDES=()
LOG_WORKER=0 FORCE=0 YES=0 VALIDATE=1

# An option's value: the next argument, which must exist and must not look like another option.
need_value() {
  if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
    die "$1 needs a value"
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    create | setup | launch | logs | status | stop | delete) COMMANDS+=("$1"); shift ;;
    --create) COMMANDS=(create "${COMMANDS[@]+"${COMMANDS[@]}"}"); shift ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --run) need_value "$@"; RUN="$2"; shift 2 ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --accelerator-type) need_value "$@"; ACCELERATOR="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --git) need_value "$@"; GIT_URL="$2"; shift 2 ;;
    --ref) need_value "$@"; GIT_REF="$2"; shift 2 ;;
    --wheel) need_value "$@"; WHEEL="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --pip-args) [[ $# -ge 2 ]] || die "--pip-args needs a value"; PIP_ARGS="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --remote-config) need_value "$@"; REMOTE_CONFIG="$2"; shift 2 ;;
    --output-dir) need_value "$@"; OUTPUT_DIR="$2"; shift 2 ;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
    --no-validate) VALIDATE=0; shift ;;
    --log-worker) need_value "$@"; LOG_WORKER="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --yes) YES=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$1' (jdpo train overrides go after '--')" ;;
  esac
done

# ---- validation (everything is checked before the first command runs) ------------------------------

[[ ${#COMMANDS[@]} -gt 0 ]] || die "no command given (create, setup, launch, logs, status, stop, delete)"
if [[ $(printf '%s\n' "${COMMANDS[@]}" | sort | uniq -d) ]]; then
  die "a command is given twice: ${COMMANDS[*]}"
fi
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name '$NAME': use lowercase letters, digits and hyphens, starting with a letter"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' does not look like a zone (e.g. us-west4-a)"
[[ "$RUN" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run '$RUN': use letters, digits, '.', '_' and '-' only"
[[ "$WORKER" =~ ^(all|[0-9]+([-,][0-9]+)*)$ ]] || die "--worker '$WORKER': expected all, N, N,M or N-M"
[[ "$LOG_WORKER" =~ ^[0-9]+$ ]] || die "--log-worker '$LOG_WORKER': expected a worker number"
[[ "$VENV" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--venv '$VENV': use a plain path (letters, digits, . _ / -)"

has_command() {
  local c
  for c in "${COMMANDS[@]}"; do [[ "$c" == "$1" ]] && return 0; done
  return 1
}

if has_command create; then
  [[ -n "$ACCELERATOR" ]] || die "create needs --accelerator-type (e.g. v5litepod-16)"
  if [[ -z "$VERSION" ]]; then
    case "$ACCELERATOR" in
      v5litepod-* | v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
      v5p-*) VERSION="v2-alpha-tpuv5" ;;
      v6e-*) VERSION="v2-alpha-tpuv6e" ;;
      v2-* | v3-* | v4-*) VERSION="tpu-ubuntu2204-base" ;;
      *) die "no default runtime --version for accelerator type '$ACCELERATOR'; give --version" ;;
    esac
  fi
fi
if has_command setup; then
  if [[ -n "$GIT_URL" && -n "$WHEEL" ]]; then die "setup: give --git or --wheel, not both"; fi
  if [[ -z "$GIT_URL" && -z "$WHEEL" ]]; then die "setup needs --git URL [--ref REF] or --wheel FILE"; fi
  if [[ -n "$WHEEL" ]]; then
    [[ -f "$WHEEL" ]] || die "--wheel '$WHEEL' does not exist"
    [[ "$WHEEL" == *.whl ]] || die "--wheel '$WHEEL' is not a .whl file"
  fi
fi
if has_command launch; then
  if [[ -n "$CONFIG" && -n "$REMOTE_CONFIG" ]]; then die "launch: give --config or --remote-config, not both"; fi
  if [[ -z "$CONFIG" && -z "$REMOTE_CONFIG" ]]; then die "launch needs --config FILE (or --remote-config PATH)"; fi
  if [[ -n "$CONFIG" && ! -f "$CONFIG" ]]; then die "--config '$CONFIG' does not exist"; fi
  if [[ -n "$OUTPUT_DIR" && "$OUTPUT_DIR" != gs://* && "$OUTPUT_DIR" != /* ]]; then
    die "--output-dir '$OUTPUT_DIR' must be shared by all workers: a gs:// path or an absolute mounted path"
  fi
  for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv': expected KEY=VALUE"
  done
fi
# The config and overrides, loaded by the local jdpo (if installed) exactly as the workers will load them:
# an unknown field or a bad value fails here, with jdpo's message, instead of on every worker.
if has_command launch && [[ -n "$CONFIG" && $VALIDATE -eq 1 ]]; then
  if JDPO_BIN="$(command -v jdpo)"; then
    check=("$JDPO_BIN" train --config "$CONFIG" --print-config)
    [[ -n "$OUTPUT_DIR" ]] && check+=(--train.output_dir "$OUTPUT_DIR")
    if ! message="$("${check[@]}" "${OVERRIDES[@]+"${OVERRIDES[@]}"}" 2>&1 >/dev/null)"; then
      die "the config does not load: ${message##*$'\n'}"
    fi
  else
    echo "$PROG: note: no local jdpo to check the config with; the workers will check it" >&2
  fi
fi
if [[ $DRY_RUN -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); --dry-run works without it"
fi

# ---- command construction ---------------------------------------------------------------------------

# Quote each argument for a POSIX shell: plain words as they are, anything else in single quotes
# (a ' inside becomes '\''), so values with spaces, quotes or $ reach the remote shell unchanged
# and the --dry-run output can be pasted into a terminal.
quote() {
  local out=() a sq="'" esc="'\\''"
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//$sq/$esc}'")
    fi
  done
  local IFS=" "
  printf '%s' "${out[*]}"
}

GCLOUD=(gcloud compute tpus tpu-vm)
SCOPE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && SCOPE+=(--project="$PROJECT")
RUN_DIR="jdpo-runs/$RUN"

# Run (or, with --dry-run, print) one command, given as separate arguments.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    quote "$@"
    echo
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# A shell script run on the chosen workers.
on_workers() {
  local workers="$1" script="$2"
  run "${GCLOUD[@]}" ssh "$NAME" "${SCOPE[@]}" --worker="$workers" --command "$script"
}

do_create() {
  local args=("${GCLOUD[@]}" create "$NAME" "${SCOPE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  [[ $SPOT -eq 1 ]] && args+=(--spot)
  run "${args[@]}"
}

do_setup() {
  local spec jdpo_only pip venv_pip
  venv_pip="$VENV/bin/pip"
  if [[ -n "$WHEEL" ]]; then
    local base
    base="$(basename "$WHEEL")"
    run "${GCLOUD[@]}" scp "$WHEEL" "$NAME:$base" "${SCOPE[@]}" --worker="$WORKER"
    spec="./${base}[tpu]" jdpo_only="./$base"
  else
    spec="jdpo[tpu] @ git+$GIT_URL@$GIT_REF" jdpo_only="jdpo @ git+$GIT_URL@$GIT_REF"
  fi
  pip="$(quote "$venv_pip") install"
  if [[ -n "$PIP_ARGS" ]]; then
    local extra
    read -r -a extra <<<"$PIP_ARGS"
    pip+=" $(quote "${extra[@]}")"
  fi
  # One virtual environment per worker, reused by later setups; the TPU runtime (libtpu) comes with
  # jax[tpu] through jdpo's [tpu] extra. jdpo itself is then reinstalled without its dependencies:
  # pip skips a package whose version number did not change, and a new commit usually keeps it.
  # `jdpo --version` proves the console script works.
  on_workers "$WORKER" "set -euo pipefail; $(quote "$PYTHON") -m venv $(quote "$VENV"); \
$(quote "$venv_pip") install --upgrade pip; $pip --upgrade $(quote "$spec"); \
$pip --force-reinstall --no-deps $(quote "$jdpo_only"); $(quote "$VENV/bin/jdpo") --version"
}

do_launch() {
  local remote_config train env_prefix=""
  if [[ -n "$CONFIG" ]]; then
    # A plain remote file name: scp hands remote paths to the remote shell unquoted.
    local base
    base="$(basename "$CONFIG")"
    remote_config="$RUN_DIR/${base//[^A-Za-z0-9._-]/_}"
    on_workers "$WORKER" "mkdir -p $(quote "$RUN_DIR")"
    run "${GCLOUD[@]}" scp "$CONFIG" "$NAME:$remote_config" "${SCOPE[@]}" --worker="$WORKER"
  else
    remote_config="$REMOTE_CONFIG"
  fi
  train=("$VENV/bin/jdpo" train --config "$remote_config")
  [[ -n "$OUTPUT_DIR" ]] && train+=(--train.output_dir "$OUTPUT_DIR")
  train+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
  [[ ${#ENVS[@]} -gt 0 ]] && env_prefix="env $(quote "${ENVS[@]}") "
  # setsid: the run gets its own session and process group, so it survives the ssh session and `stop`
  # can signal the whole group; every stream is redirected so ssh returns at once. A run still alive
  # under the same name is an error (two runs would fight over the TPU chips).
  on_workers "$WORKER" "set -euo pipefail; cd ~; mkdir -p $(quote "$RUN_DIR"); \
if [ -f $(quote "$RUN_DIR/train.pid") ] && kill -0 \"\$(cat $(quote "$RUN_DIR/train.pid"))\" 2>/dev/null; then \
echo \"\$(hostname): run $(quote "$RUN") is already running; stop it first\" >&2; exit 1; fi; \
setsid nohup ${env_prefix}$(quote "${train[@]}") > $(quote "$RUN_DIR/train.log") 2>&1 < /dev/null & \
echo \$! > $(quote "$RUN_DIR/train.pid"); echo \"\$(hostname): started run $(quote "$RUN") (pid \$!)\""
}

do_logs() {
  on_workers "$LOG_WORKER" "tail -n 200 -F $(quote "$RUN_DIR/train.log")"
}

do_status() {
  on_workers "$WORKER" "pid=\$(cat $(quote "$RUN_DIR/train.pid") 2>/dev/null || true); \
if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null; then s=running; else s=stopped; fi; \
echo \"\$(hostname): \$s: \$(tail -n 1 $(quote "$RUN_DIR/train.log") 2>/dev/null || true)\""
}

do_stop() {
  local sig=TERM
  [[ $FORCE -eq 1 ]] && sig=KILL
  on_workers "$WORKER" "pid=\$(cat $(quote "$RUN_DIR/train.pid") 2>/dev/null || true); \
if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null; then kill -$sig -- \"-\$pid\"; \
echo \"\$(hostname): sent SIG$sig to run $(quote "$RUN")\"; else echo \"\$(hostname): run $(quote "$RUN") is not running\"; fi"
}

do_delete() {
  local args=("${GCLOUD[@]}" delete "$NAME" "${SCOPE[@]}")
  [[ $YES -eq 1 ]] && args+=(--quiet)
  run "${args[@]}"
}

for command in "${COMMANDS[@]}"; do
  "do_$command"
done
