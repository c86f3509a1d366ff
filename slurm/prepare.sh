# shellcheck shell=bash
# Sourced by the two sbatch scripts after common.sh, never run: a job's input checked before any Ray
# starts (the environment, the search's arguments, the results folder), each failure one line
# "error: ..." with exit code 2 (common.sh's die), so that a bad submission fails in seconds.

# Module loads and/or a virtual environment, then a python that imports ray and tune_llama.
activate_env() {
    if [[ -n ${TUNE_MODULES:-} ]]; then
        local init modules
        for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
            type module >/dev/null 2>&1 && break
            # shellcheck disable=SC1090
            [[ -f $init ]] && source "$init"
        done
        type module >/dev/null 2>&1 || die "TUNE_MODULES=$TUNE_MODULES but this node has no 'module' command"
        read -r -a modules <<<"$TUNE_MODULES"
        module load "${modules[@]}" >&2 || die "module load $TUNE_MODULES failed"
    fi
    # Unset: the checkout's .venv if there is one; set but empty: the python on PATH (TUNE_MODULES').
    local venv=${TUNE_VENV-}
    [[ -z ${TUNE_VENV+set} && -f $REPO/.venv/bin/activate ]] && venv=$REPO/.venv
    if [[ -n $venv ]]; then
        [[ -f $venv/bin/activate ]] || die "TUNE_VENV=$venv is not a virtual environment (no bin/activate)"
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    python -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("ray") and u.find_spec("tune_llama")))' \
        2>/dev/null || die "$(command -v python || echo 'no python on PATH'): cannot import ray and tune_llama (TUNE_VENV, TUNE_MODULES)"
    command -v ray >/dev/null 2>&1 || die "no 'ray' command next to $(command -v python)"
}

# SEARCH_ARGS and EXPERIMENT from the script's arguments. The search itself parses and checks them
# and prints its folder (--print-experiment): the job never reads its arguments. The environment's
# settings go first, so that the command line's own --name and --storage win (argparse keeps the
# last), except TUNE_SEARCH_ARGS, which comes last.
resolve_search() {
    SEARCH_ARGS=()
    # TUNE_SPEC stands in for the first argument when that is not a spec (an option, or nothing).
    [[ -n ${TUNE_SPEC:-} && ${1:--} == -* ]] && SEARCH_ARGS+=("$TUNE_SPEC")
    [[ -n ${TUNE_NAME:-} ]] && SEARCH_ARGS+=(--name "$TUNE_NAME")
    [[ -n ${TUNE_RESULTS:-} ]] && SEARCH_ARGS+=(--storage "$TUNE_RESULTS")
    SEARCH_ARGS+=("$@")
    local extra
    read -r -a extra <<<"${TUNE_SEARCH_ARGS:-}"
    SEARCH_ARGS+=("${extra[@]}")
    EXPERIMENT=$(python -m tune_llama.search "${SEARCH_ARGS[@]}" --print-experiment) || exit
    EXPERIMENT=${EXPERIMENT##*$'\n'}
    # The same folder for the search itself: without --name it would name itself by the time it starts.
    SEARCH_ARGS+=(--name "${EXPERIMENT##*/}" --storage "${EXPERIMENT%/*}")
}

# Trials on every node write into the experiment folder: with more than one node it must be on a
# filesystem that all of them see, not one of the kinds (`stat -f -c %T`) only the node itself sees.
check_results_shared() {
    local nodes=$1 probe=$EXPERIMENT fstype
    ((nodes > 1)) && [[ ${TUNE_ALLOW_LOCAL_RESULTS:-0} != 1 ]] || return 0
    while [[ ! -e $probe ]]; do probe=$(dirname "$probe"); done
    fstype=$(stat -f -c %T "$probe")
    [[ " ext2/ext3 ext4 xfs btrfs tmpfs ramfs overlayfs overlay f2fs zfs jfs reiserfs " != *" $fstype "* ]] \
        || die "results folder ${EXPERIMENT%/*} is on a node-local filesystem ($fstype) but the job has $nodes nodes: put it on a shared filesystem (TUNE_RESULTS=...), or set TUNE_ALLOW_LOCAL_RESULTS=1 if it is shared after all"
}
