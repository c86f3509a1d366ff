#!/usr/bin/env bash
# One Ray node of a tune-llama job: `ray_node.sh head` on the batch host (common.sh starts it),
# `ray_node.sh worker` on every other node (one srun task per node). Ray's documented Slurm pattern,
# `ray start --head` / `ray start --address` with --block: the node lives exactly as long as this
# process, and SIGTERM to this process stops the node and only it.
#
# Shared nodes often run other Rays (other users', other jobs'): nothing here may collide with them.
# So every port is one the operating system picks when Ray binds it (0), not one of `ray start`'s
# fixed defaults (6379, 8265, 52365, workers 10002-19999), which every other Ray on the node wants too;
# and not a "free" port looked up beforehand either, which someone else may take before Ray binds it.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The address this node is reached at: Slurm's NodeAddr for it (what slurmctld itself uses to
# reach the node), else the host name's first IPv4 address.
node_ip() {
    local addr=""
    if [[ -n ${SLURMD_NODENAME:-} ]]; then
        addr=$(scontrol show node "$SLURMD_NODENAME" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    fi
    [[ -n $addr ]] || addr=$(hostname)
    [[ $addr =~ ^[0-9.]+$ ]] || addr=$(getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}')
    [[ -n $addr ]] || addr=$(hostname -I | awk '{print $1}')
    printf '%s\n' "$addr"
}

cpus=${RAY_NUM_CPUS:-${SLURM_CPUS_ON_NODE:-}}
gpus=${RAY_NUM_GPUS:-$(granted_gpus)}
options=(--block --disable-usage-stats --node-ip-address="$(node_ip)" --temp-dir="$(node_tmpdir)"
    --dashboard-agent-listen-port=0
    --min-worker-port="${RAY_MIN_WORKER_PORT:-0}" --max-worker-port="${RAY_MAX_WORKER_PORT:-0}")
[[ -n $cpus ]] && options+=(--num-cpus="$cpus")
[[ -n $gpus ]] && options+=(--num-gpus="$gpus")
read -r -a extra <<<"${RAY_START_ARGS:-}"

case ${1:-} in
    head)
        # The head's GCS port (6379) and dashboard (8265) too. Its address, with the port it got,
        # is in ray_current_cluster in its temp folder, where common.sh reads it.
        options+=(--head --port="${RAY_PORT:-0}" --dashboard-port="${RAY_DASHBOARD_PORT:-0}")
        [[ -n ${RAY_DASHBOARD:-} ]] && options+=(--include-dashboard="$RAY_DASHBOARD")
        # Where Ray Client is installed (grpc), `ray start` serves it on 10001 and accepts no 0: a port
        # looked up here, the one race left, and only where the client is installed.
        if [[ -n ${RAY_CLIENT_PORT:-} ]] || python -c 'import grpc' 2>/dev/null; then
            options+=(--ray-client-server-port="${RAY_CLIENT_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}")
        fi
        ;;
    worker)
        log "joining the Ray cluster at ${RAY_HEAD_ADDRESS:?}"
        options+=(--address="$RAY_HEAD_ADDRESS")
        ;;
    *) die "usage: ray_node.sh head|worker (got '${1:-}')" ;;
esac
# The job stops its nodes once the search is over: nothing is left to drain, and Ray's drain on
# SIGTERM (up to 30 s by default) would only hold up the end of the job.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
exec ray start "${options[@]}" "${extra[@]}"
