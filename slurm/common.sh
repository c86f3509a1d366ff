# shellcheck shell=bash
# Shared by tune_single_node.sbatch, tune_multi_node.sbatch and ray_node.sh: sourced, never run.
#
# Every check that can fail before Ray starts ends the job with ONE line on stderr
# ("error: ...") and exit code 2, so a bad submission fails in seconds instead of
# hanging until the wall time.

# Kinds of filesystem that only the node itself sees (what `stat -f -c %T` prints).
LOCAL_FS_TYPES=" ext2/ext3 ext4 xfs btrfs tmpfs ramfs overlayfs overlay f2fs zfs jfs reiserfs "

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

log() {
    printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${SLURMD_NODENAME:-$(hostname -s)}" "$*"
}

# Slurm runs a *copy* of the batch script from its spool folder, so the script's
# own path says nothing about where the repository is.
# $TUNE_LLAMA_DIR wins; else the folder above this file.
find_repo() {
    local here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    REPO=${TUNE_LLAMA_DIR:-$(dirname "$here")}
    [[ -f $REPO/slurm/common.sh ]] || die "TUNE_LLAMA_DIR=$REPO is not a tune-llama checkout (no slurm/common.sh)"
    SLURM_SCRIPTS=$REPO/slurm
}

# Split the script's arguments into the spec and the search's own flags; read the
# few flags the script needs to know about (where the experiment folder will be).
# Sets SPEC, NAME, STORAGE, RESUME (0/1), RESUME_DIR and SEARCH_ARGS.
parse_search_args() {
    SPEC=${TUNE_SPEC:-}
    NAME=${TUNE_NAME:-}
    STORAGE=${TUNE_RESULTS:-}
    RESUME=0
    RESUME_DIR=""
    SEARCH_ARGS=()
    local args=("$@")
    # Extra search arguments from the environment come after the command line's.
    if [[ -n ${TUNE_SEARCH_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$TUNE_SEARCH_ARGS"
        args+=("${extra[@]}")
    fi
    local i=0 n=${#args[@]} arg
    while ((i < n)); do
        arg=${args[i]}
        case $arg in
            --name) NAME=${args[i + 1]:-}; i=$((i + 2)); continue ;;
            --name=*) NAME=${arg#--name=} ;;
            --storage) STORAGE=${args[i + 1]:-}; i=$((i + 2)); continue ;;
            --storage=*) STORAGE=${arg#--storage=} ;;
            --resume=*) RESUME=1; RESUME_DIR=${arg#--resume=} ;;
            --resume)
                RESUME=1
                # Like argparse's nargs="?": a following word that is not a flag is the folder.
                if ((i + 1 < n)) && [[ ${args[i + 1]} != -* ]]; then
                    RESUME_DIR=${args[i + 1]}
                    i=$((i + 2))
                    continue
                fi
                ;;
            --set)
                SEARCH_ARGS+=("$arg" "${args[i + 1]:-}")
                i=$((i + 2))
                continue
                ;;
            -*) SEARCH_ARGS+=("$arg") ;;
            *)
                if [[ -z $SPEC || $i -eq 0 ]]; then SPEC=$arg; else SEARCH_ARGS+=("$arg"); fi
                ;;
        esac
        i=$((i + 1))
    done
}

# Check the inputs and build SEARCH_CMD, the command the driver runs.
prepare_search() {
    if ((RESUME)) && [[ -n $RESUME_DIR ]]; then
        [[ -d $RESUME_DIR ]] || die "--resume $RESUME_DIR: no such search folder"
        RESUME_DIR=$(cd "$RESUME_DIR" && pwd)
        EXPERIMENT=$RESUME_DIR
        RESULTS=$(dirname "$RESUME_DIR")
    else
        if ((!RESUME)); then
            [[ -n $SPEC ]] || die "no spec: pass one (e.g. search_spaces/tiny.yaml) as the first argument or set TUNE_SPEC"
        fi
        if [[ -n $SPEC ]]; then
            [[ -f $SPEC ]] || die "spec $SPEC: no such file (relative paths are read from $PWD)"
            SPEC=$(cd "$(dirname "$SPEC")" && pwd)/$(basename "$SPEC")
        fi
        if [[ -z $NAME ]]; then
            ((!RESUME)) || die "--resume needs the search's --name NAME (or --resume results/NAME)"
            # A name fixed at submission, so that the resubmission can say --name too.
            NAME=$(basename "${SPEC%.*}")-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}
        fi
        RESULTS=${STORAGE:-$PWD/results}
        [[ $RESULTS == /* ]] || RESULTS=$PWD/$RESULTS
        EXPERIMENT=$RESULTS/$NAME
        if ((RESUME)); then
            [[ -d $EXPERIMENT ]] || die "--resume: $EXPERIMENT does not exist (wrong --name or TUNE_RESULTS?)"
        fi
    fi
    SEARCH_CMD=(python -m tune_llama.search)
    [[ -n $SPEC ]] && SEARCH_CMD+=("$SPEC")
    SEARCH_CMD+=("${SEARCH_ARGS[@]}")
    if ((RESUME)) && [[ -n $RESUME_DIR ]]; then
        SEARCH_CMD+=(--resume "$RESUME_DIR")
    else
        SEARCH_CMD+=(--name "$NAME" --storage "$RESULTS")
        ((RESUME)) && SEARCH_CMD+=(--resume)
    fi
}

# Trials on every node write into the experiment folder: with more than one node
# it must be on a filesystem all of them see.
check_results_shared() {
    local nodes=${SLURM_JOB_NUM_NODES:-1} probe=$RESULTS fstype
    ((nodes > 1)) || return 0
    [[ ${TUNE_ALLOW_LOCAL_RESULTS:-0} == 1 ]] && return 0
    while [[ ! -e $probe ]]; do probe=$(dirname "$probe"); done
    fstype=$(stat -f -c %T "$probe")
    if [[ $LOCAL_FS_TYPES == *" $fstype "* ]]; then
        die "results folder $RESULTS is on a node-local filesystem ($fstype) but the job has $nodes nodes: put it on a shared filesystem (TUNE_RESULTS=...), or set TUNE_ALLOW_LOCAL_RESULTS=1 if it is shared after all"
    fi
}

# Module loads and/or a virtual environment; then make sure python sees the package.
activate_env() {
    if [[ -n ${TUNE_MODULES:-} ]]; then
        if ! type module >/dev/null 2>&1; then
            local init
            for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
                # shellcheck disable=SC1090
                [[ -f $init ]] && source "$init" && break
            done
        fi
        type module >/dev/null 2>&1 || die "TUNE_MODULES=$TUNE_MODULES but this node has no 'module' command"
        local modules
        read -r -a modules <<<"$TUNE_MODULES"
        module load "${modules[@]}" >&2 || die "module load $TUNE_MODULES failed"
    fi
    local venv=${TUNE_VENV:-}
    if [[ -z ${TUNE_VENV+set} && -f $REPO/.venv/bin/activate ]]; then
        venv=$REPO/.venv
    fi
    if [[ -n $venv ]]; then
        [[ -f $venv/bin/activate ]] || die "TUNE_VENV=$venv is not a virtual environment (no bin/activate)"
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    command -v python >/dev/null 2>&1 || die "no python on PATH: set TUNE_VENV or TUNE_MODULES"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    python -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("ray") and u.find_spec("tune_llama")))' \
        || die "$(command -v python) cannot import ray and tune_llama: check TUNE_VENV / TUNE_MODULES"
    command -v ray >/dev/null 2>&1 || die "no 'ray' command next to $(command -v python)"
}

# ---------------------------------------------------------------- Ray

# The address this node is reached at: Slurm's NodeAddr for it (what slurmctld
# itself uses to reach the node), else the first address of the host name.
node_ip() {
    local addr=""
    if [[ -n ${SLURMD_NODENAME:-} ]] && command -v scontrol >/dev/null 2>&1; then
        addr=$(scontrol show node "$SLURMD_NODENAME" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    fi
    [[ -n $addr ]] || addr=$(hostname)
    if [[ ! $addr =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        addr=$(getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}')
    fi
    [[ -n $addr ]] || addr=$(hostname -I | awk '{print $1}')
    printf '%s\n' "$addr"
}

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# GPUs this process may use: the devices Slurm exposed, else the count it granted.
# Empty outside Slurm without CUDA_VISIBLE_DEVICES: Ray then detects them itself.
granted_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
        local ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${SLURM_JOB_ID:-} ]]; then
        echo 0
    fi
}

# Options of `ray start` that are the same on every kind of node. Every port a
# node opens is either given or a free one, so that two clusters (two users, or
# two jobs of one user) on the same nodes never collide.
ray_node_options() {
    local cpus=${RAY_NUM_CPUS:-${SLURM_CPUS_ON_NODE:-}} gpus=${RAY_NUM_GPUS:-$(granted_gpus)}
    RAY_OPTS=(
        --block --disable-usage-stats
        --node-ip-address="$(node_ip)"
        --temp-dir="${RAY_TMPDIR:-/tmp}/ray-${SLURM_JOB_ID:-$$}-${SLURMD_NODENAME:-local}"
        --dashboard-agent-listen-port="${RAY_DASHBOARD_AGENT_PORT:-$(free_port)}"
    )
    [[ -n $cpus ]] && RAY_OPTS+=(--num-cpus="$cpus")
    [[ -n $gpus ]] && RAY_OPTS+=(--num-gpus="$gpus")
    if [[ -n ${RAY_MIN_WORKER_PORT:-}${RAY_MAX_WORKER_PORT:-} ]]; then
        [[ -n ${RAY_MIN_WORKER_PORT:-} && -n ${RAY_MAX_WORKER_PORT:-} ]] \
            || die "RAY_MIN_WORKER_PORT and RAY_MAX_WORKER_PORT go together"
        RAY_OPTS+=(--min-worker-port="$RAY_MIN_WORKER_PORT" --max-worker-port="$RAY_MAX_WORKER_PORT")
    fi
    if [[ -n ${RAY_START_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$RAY_START_ARGS"
        RAY_OPTS+=("${extra[@]}")
    fi
}

# Ray >= 2.5x: `ray start` turns token authentication on by itself when it finds
# ~/.ray/auth_token, while a client whose RAY_AUTH_MODE is unset does not, and is
# then refused. One mode for every process of the job (all get this environment):
# token auth with a token of this job's own, so that nobody else on the nodes can
# submit work to this cluster.
pin_ray_auth() {
    [[ -n ${RAY_AUTH_MODE:-} ]] && return 0
    export RAY_AUTH_MODE=token
    if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
        export RAY_AUTH_TOKEN
    fi
}

# Start the Ray head in the background on this node (the batch host) and wait
# until it answers. Sets RAY_HEAD_ADDRESS and HEAD_PID.
start_ray_head() {
    local timeout=${RAY_START_TIMEOUT:-180} port=${RAY_PORT:-$(free_port)} started
    RAY_HEAD_ADDRESS=$(node_ip):$port
    export RAY_HEAD_ADDRESS
    log "starting the Ray head at $RAY_HEAD_ADDRESS"
    RAY_PORT=$port bash "$SLURM_SCRIPTS/ray_node.sh" head </dev/null 2>&1 &
    HEAD_PID=$!
    started=$SECONDS
    # The head's port answers once its GCS runs (`ray health-check` would block
    # for tens of seconds on a port where nothing listens); wait_for_nodes then
    # waits for the head's raylet.
    until (exec 3<>"/dev/tcp/${RAY_HEAD_ADDRESS%:*}/$port") 2>/dev/null; do
        kill -0 "$HEAD_PID" 2>/dev/null \
            || fail "the Ray head exited before it came up (its log is in the job output above; port $port taken?)"
        ((SECONDS - started < timeout)) \
            || fail "the Ray head did not come up within ${timeout}s at $RAY_HEAD_ADDRESS (RAY_START_TIMEOUT)"
        sleep 1
    done
    log "the Ray head answers after $((SECONDS - started))s"
}

# Start one Ray worker on every other node of the allocation (one srun step).
start_ray_workers() {
    local workers=$(($1 - 1))
    ((workers > 0)) || return 0
    log "starting $workers Ray worker node(s)"
    # --overlap: the step shares the nodes with the head and the driver.
    srun --nodes="$workers" --ntasks="$workers" --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" --overlap \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" --kill-on-bad-exit=0 \
        bash "$SLURM_SCRIPTS/ray_node.sh" worker </dev/null 2>&1 &
    WORKERS_PID=$!
}

# Block until the cluster has $1 live nodes, or fail after RAY_START_TIMEOUT.
wait_for_nodes() {
    local want=$1 timeout=${RAY_START_TIMEOUT:-180} seen resources out
    out=$(mktemp)
    # In the background: `wait` lets a signal through at once, a foreground command would hold it.
    timeout "$((timeout + 60))" python - "$RAY_HEAD_ADDRESS" "$want" "$timeout" >"$out" 2>/dev/null <<'EOF' &
import sys, time
import ray

address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
while True:
    alive = [node for node in ray.nodes() if node["Alive"]]
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(2)
total = ray.cluster_resources()
print(f"resources: CPU={total.get('CPU', 0):g} GPU={total.get('GPU', 0):g} on", *sorted(n["NodeManagerAddress"] for n in alive))
print(len(alive))
EOF
    WAITER_PID=$!
    wait "$WAITER_PID"
    WAITER_PID=""
    seen=$(<"$out")
    rm -f "$out"
    resources=${seen%$'\n'*}
    resources=${resources##*$'\n'}
    seen=${seen##*$'\n'}
    [[ $seen =~ ^[0-9]+$ ]] || seen=0
    if [[ $seen -lt $want ]] && ! kill -0 "$HEAD_PID" 2>/dev/null; then
        fail "the Ray head exited (its log is in the job output above; port ${RAY_HEAD_ADDRESS##*:} taken?)"
    fi
    [[ $seen -ge $want ]] \
        || fail "only $seen of $want Ray nodes joined within ${timeout}s (RAY_START_TIMEOUT); see the worker logs in the job output"
    log "all $want Ray node(s) joined; $resources"
}

# ---------------------------------------------------------------- the driver and signals

# Slurm's wall-time warning (#SBATCH --signal=B:TERM@...) reaches only this
# shell: pass it to the search, which then saves its state, and wait for it.
# The search stops gracefully on SIGTERM; TUNE_STOP_SIGNAL=USR1 sends Ray Tune's
# own stop signal instead.
forward_signal() {
    local sig=$1
    STOP_SIGNAL=$sig
    if [[ -n ${DRIVER_PID:-} ]]; then
        log "got SIG$sig: asking the search to stop and save its state (SIG${TUNE_STOP_SIGNAL:-TERM})"
        kill -s "${TUNE_STOP_SIGNAL:-TERM}" "$DRIVER_PID" 2>/dev/null || true
    else
        log "got SIG$sig before the search started: stopping"
        exit $((128 + $(kill -l "$sig")))
    fi
}

run_search() {
    log "search: ${SEARCH_CMD[*]}"
    log "experiment folder: $EXPERIMENT"
    log "resume after a wall-time kill: sbatch $SCRIPT_NAME --resume $EXPERIMENT"
    RAY_ADDRESS=$RAY_HEAD_ADDRESS "${SEARCH_CMD[@]}" </dev/null &
    DRIVER_PID=$!
    local rc
    while :; do
        wait "$DRIVER_PID"
        rc=$?
        # A trapped signal interrupts `wait`; the search is then still running.
        kill -0 "$DRIVER_PID" 2>/dev/null || break
    done
    DRIVER_PID=""
    log "search exited with code $rc${STOP_SIGNAL:+ after SIG$STOP_SIGNAL}"
    return "$rc"
}

# A failure once Ray is starting: one line on stderr, exit 1 (cleanup runs on EXIT).
fail() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Stop what this job started, and only that: never `ray stop`, which would also
# stop every other Ray of this user on the node. SIGTERM lets a Ray node drain.
stop_pid() {
    local pid=$1 what=$2 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $what"
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < ${RAY_STOP_TIMEOUT:-60}; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - TERM INT USR1
    [[ -n ${DRIVER_PID:-} ]] && stop_pid "$DRIVER_PID" "the search"
    stop_pid "${WAITER_PID:-}" "waiting for the nodes"
    # srun ends its step (the Ray workers) when it gets SIGTERM.
    stop_pid "${WORKERS_PID:-}" "the Ray workers"
    stop_pid "${HEAD_PID:-}" "the Ray head"
    exit "$rc"
}

# The whole job, both scripts: run_job SCRIPT NODES SEARCH_ARGS...
run_job() {
    SCRIPT_NAME=$1
    local nodes=$2
    shift 2
    find_repo
    parse_search_args "$@"
    prepare_search
    activate_env
    check_results_shared
    ((nodes >= 1)) || die "not inside a Slurm allocation (SLURM_JOB_NUM_NODES is unset): submit with sbatch"
    trap cleanup EXIT
    trap 'forward_signal TERM' TERM
    trap 'forward_signal INT' INT
    trap 'forward_signal USR1' USR1
    export RAY_USAGE_STATS_ENABLED=0
    pin_ray_auth
    start_ray_head
    start_ray_workers "$nodes"
    wait_for_nodes "$nodes"
    run_search
}
