# shellcheck shell=bash
# Sourced by tune_single_node.sbatch, tune_multi_node.sbatch and ray_node.sh, never run.
# One private Ray cluster per job: the head on the batch host, a worker on every other node, the
# search as its driver; Slurm's signals passed on to the search, and at the end everything the job
# started (and nothing else) stopped. prepare.sh checks the job's input before any of it starts.
#
# Bad input ends the job at once with ONE line "error: ..." and exit code 2, so that a bad
# submission fails in seconds, not at the wall time; a Ray that does not come up, with exit code 1.
# The settings are in slurm/README.md.

# This file is always sourced from the checkout itself (the sbatch scripts found it), never a copy.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    printf 'error: %s\n' "$1" >&2
    exit "${2:-2}"
}

log() {
    printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${SLURMD_NODENAME:-$(hostname -s)}" "$*"
}

# The GPUs this node may use: the devices Slurm exposed, else the count it granted. Nothing outside
# Slurm without CUDA_VISIBLE_DEVICES: Ray then counts them itself.
granted_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
        local ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif [[ -n ${SLURM_JOB_ID:-} ]]; then
        echo "${SLURM_GPUS_ON_NODE:-0}"
    fi
}

# ---------------------------------------------------------------- Ray

# Every Ray node of the job keeps its sockets, logs and address file in a folder of its own, never
# Ray's shared default /tmp/ray: another Ray on the node (another user's, another job's) never
# mixes with ours, and ours is found by name. Short, as Ray's socket paths must stay < 108 characters.
node_tmpdir() {
    printf '%s-%s\n' "${RAY_JOB_TMPDIR:?}" "${SLURMD_NODENAME:-local}"
}

# Ray >= 2.5x: `ray start` turns token authentication on by itself when it finds ~/.ray/auth_token,
# while a client whose RAY_AUTH_MODE is unset does not, and is then refused. One mode for every
# process of the job (all get this environment): a token of the job's own, so that nobody else on
# the nodes can submit work to this cluster.
pin_ray_auth() {
    [[ -n ${RAY_AUTH_MODE:-} ]] && return 0
    export RAY_AUTH_MODE=token
    if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
        export RAY_AUTH_TOKEN
    fi
}

# Start the Ray head on this node in the background and wait until it runs. Sets RAY_HEAD_ADDRESS.
start_ray_head() {
    local timeout=${RAY_START_TIMEOUT:-180} started=$SECONDS address_file
    address_file=$(node_tmpdir)/ray_current_cluster
    # `ray start` writes the head's address there once its GCS and raylet run: the one sign of
    # readiness no other process can give. (A port probe is answered by whatever holds the port,
    # the GCS of a head that is failing included.) A requeued job reuses its id, hence its folder.
    rm -f "$address_file"
    log "starting the Ray head"
    bash "$REPO/slurm/ray_node.sh" head </dev/null 2>&1 &
    HEAD_PID=$!
    until [[ -s $address_file ]]; do
        kill -0 "$HEAD_PID" 2>/dev/null || die "the Ray head exited before it came up (its log is in the job output above)" 1
        ((SECONDS - started < timeout)) || die "the Ray head did not come up within ${timeout}s (RAY_START_TIMEOUT)" 1
        sleep 1
    done
    RAY_HEAD_ADDRESS=$(<"$address_file")
    export RAY_HEAD_ADDRESS
    log "the Ray head is up at $RAY_HEAD_ADDRESS after $((SECONDS - started))s"
}

# One Ray worker on every other node of the allocation, in one srun step.
start_ray_workers() {
    local workers=$(($1 - 1))
    ((workers > 0)) || return 0
    log "starting $workers Ray worker node(s)"
    # --overlap: the step shares the nodes with the head and the driver.
    srun --nodes="$workers" --ntasks="$workers" --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" --overlap \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" --kill-on-bad-exit=0 \
        bash "$REPO/slurm/ray_node.sh" worker </dev/null 2>&1 &
    WORKERS_PID=$!
}

# Block until the cluster has $1 live nodes, or fail after RAY_START_TIMEOUT.
wait_for_nodes() {
    local want=$1 timeout=${RAY_START_TIMEOUT:-180} out seen resources
    out=$(mktemp)
    # In the background: `wait` lets a trapped signal through at once, a foreground command holds it.
    timeout "$((timeout + 60))" python - "$RAY_HEAD_ADDRESS" "$want" "$timeout" >"$out" 2>/dev/null <<'EOF' &
import sys, time
import ray

address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + timeout
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < want and time.monotonic() < deadline:
    time.sleep(2)
total = ray.cluster_resources()
print(len(alive), f"resources: CPU={total.get('CPU', 0):g} GPU={total.get('GPU', 0):g} on",
      *sorted(n["NodeManagerAddress"] for n in alive))
EOF
    WAITER_PID=$!
    wait "$WAITER_PID"
    WAITER_PID=""
    read -r seen resources <"$out"
    rm -f "$out"
    kill -0 "$HEAD_PID" 2>/dev/null || die "the Ray head exited (its log is in the job output above)" 1
    ((${seen:-0} >= want)) \
        || die "only ${seen:-0} of $want Ray nodes joined within ${timeout}s (RAY_START_TIMEOUT); see the worker logs in the job output" 1
    log "all $want Ray node(s) joined; $resources"
}

# ---------------------------------------------------------------- the search, signals, the end

# Slurm's wall-time warning (#SBATCH --signal=B:TERM@...) reaches only this shell: pass it on to
# the search, which saves its state and exits (TUNE_STOP_SIGNAL=USR1: Ray Tune's own stop signal).
forward_signal() {
    STOP_SIGNAL=$1
    if [[ -z ${DRIVER_PID:-} ]]; then
        log "got SIG$1 before the search started: stopping"
        exit $((128 + $(kill -l "$1")))
    fi
    log "got SIG$1: asking the search to stop and save its state (SIG${TUNE_STOP_SIGNAL:-TERM})"
    kill -s "${TUNE_STOP_SIGNAL:-TERM}" "$DRIVER_PID" 2>/dev/null || true
}

run_search() {
    log "search: python -m tune_llama.search ${SEARCH_ARGS[*]}"
    log "resume after a wall-time kill: sbatch $1 --resume $EXPERIMENT"
    RAY_ADDRESS=$RAY_HEAD_ADDRESS python -m tune_llama.search "${SEARCH_ARGS[@]}" </dev/null &
    DRIVER_PID=$!
    local rc
    while :; do
        wait "$DRIVER_PID"
        rc=$?
        # A trapped signal interrupts `wait` while the search runs on.
        kill -0 "$DRIVER_PID" 2>/dev/null || break
    done
    DRIVER_PID=""
    log "search exited with code $rc${STOP_SIGNAL:+ after SIG$STOP_SIGNAL}"
    return "$rc"
}

# Stop what the job started, and only that: never `ray stop`, which stops every Ray of this user on
# the node. On SIGTERM a Ray node (`ray start --block`) ends its own processes; RAY_STOP_TIMEOUT
# seconds later it is killed, and its processes die with it (Ray ties their lives to it).
stop_pid() {
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $2"
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < ${RAY_STOP_TIMEOUT:-60}; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}

cleanup() {
    local rc=$?
    trap - TERM INT USR1
    stop_pid "${DRIVER_PID:-}" "the search"
    stop_pid "${WAITER_PID:-}" "waiting for the nodes"
    stop_pid "${WORKERS_PID:-}" "the Ray workers"  # srun ends its step when it gets SIGTERM
    stop_pid "${HEAD_PID:-}" "the Ray head"
    exit "$rc"
}

# The job once prepare.sh has checked its input, both scripts: run_job SCRIPT NODES.
run_job() {
    local script=$1 nodes=$2
    ((nodes >= 1)) || die "not inside a Slurm allocation (SLURM_JOB_NUM_NODES is unset): submit with sbatch"
    trap cleanup EXIT
    trap 'forward_signal TERM' TERM
    trap 'forward_signal INT' INT
    trap 'forward_signal USR1' USR1
    export RAY_USAGE_STATS_ENABLED=0 RAY_JOB_TMPDIR=${RAY_TMPDIR:-/tmp}/ray-${SLURM_JOB_ID:-$$}
    pin_ray_auth
    start_ray_head
    start_ray_workers "$nodes"
    wait_for_nodes "$nodes"
    run_search "$script"
}
