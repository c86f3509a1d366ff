# shellcheck shell=bash
# Sourced by the two sbatch scripts after common.sh, never run: a job's input checked before any Ray
# starts (the environment, the search's arguments, the results folder), each failure one line
# "error: ..." with exit code 2 (common.sh's die), so that a bad submission fails in seconds.

# Module loads and/or a virtual environment, then a python that imports ray and tune_llama, and
# whose torch can use the job's GPUs.
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
    require_cuda
}

# `make venv` builds the checkout's .venv, the default environment, with the CPU torch: on a GPU job
# every trial would train on the CPU, many times slower, and nothing would fail. So a job whose Ray
# gets GPUs stops here when its torch cannot use them. TUNE_ALLOW_NO_CUDA=1 runs it all the same
# (a test cluster whose GPUs are stand-ins).
require_cuda() {
    local gpus=${RAY_NUM_GPUS:-$(granted_gpus)} python report version cuda available
    [[ ${gpus:-0} != 0 && ${TUNE_ALLOW_NO_CUDA:-0} != 1 ]] || return 0
    python=$(command -v python)
    local fix="install a CUDA torch in that environment (pip install torch --index-url https://download.pytorch.org/whl/cu124; cu121, cu126... by driver) or point TUNE_VENV at a GPU environment (docs/first-cluster-run.md)"
    report=$(python -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>/dev/null) \
        || die "the job has $gpus GPU(s) but $python cannot import torch: $fix"
    read -r version cuda available <<<"$report"
    [[ $available == True ]] && return 0
    [[ $cuda == None ]] \
        && die "the job has $gpus GPU(s) but $python has torch $version, a CPU build (torch.version.cuda None): $fix"
    die "the job has $gpus GPU(s) but the torch $version (CUDA $cuda) of $python sees none (torch.cuda.is_available() False): check that nvidia-smi works on the node and that its driver supports CUDA $cuda, else $fix"
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
