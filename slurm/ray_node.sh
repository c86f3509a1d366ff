#!/usr/bin/env bash
# One Ray node of a tune-llama job: `ray_node.sh head` on the batch host (started
# by the sbatch script), `ray_node.sh worker` on every other node (one srun task
# per node). This is Ray's documented Slurm pattern, `ray start --head` /
# `ray start --address` with --block: the node lives exactly as long as this
# process, and SIGTERM to this process stops the node.
#
# Reads RAY_HEAD_ADDRESS (workers), RAY_PORT (head) and the RAY_* settings that
# the sbatch scripts document.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

role=${1:-}
case $role in
    head)
        ray_node_options
        # Ray Client (port 10001 by default) runs only where grpc is installed.
        if [[ -n ${RAY_CLIENT_PORT:-} ]] || python -c 'import grpc' 2>/dev/null; then
            RAY_OPTS+=(--ray-client-server-port="${RAY_CLIENT_PORT:-$(free_port)}")
        fi
        exec ray start --head --port="${RAY_PORT:?}" \
            --include-dashboard="${RAY_DASHBOARD:-true}" --dashboard-port="${RAY_DASHBOARD_PORT:-$(free_port)}" \
            "${RAY_OPTS[@]}"
        ;;
    worker)
        ray_node_options
        log "joining the Ray cluster at ${RAY_HEAD_ADDRESS:?}"
        exec ray start --address="$RAY_HEAD_ADDRESS" "${RAY_OPTS[@]}"
        ;;
    *)
        die "usage: ray_node.sh head|worker (got '$role')"
        ;;
esac
