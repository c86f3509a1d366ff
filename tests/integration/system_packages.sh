#!/usr/bin/env bash
# The one policy for the system programs the integration tests use (`make test` runs this first):
#   chromium          tests/integration/test_report_html.py renders report.html headless
#   slurm-wlm, munge  tests/integration/test_slurm.py runs a private Slurm (slurmctld, slurmd, sbatch; munged)
#   shellcheck        tests/integration/test_slurm.py lints slurm/*.sh
# Missing ones are installed with apt-get when we are root; otherwise one line names them and the exit is 1.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
declare -A PACKAGE=([chromium]=chromium [slurmctld]=slurm-wlm [slurmd]=slurm-wlm [sbatch]=slurm-wlm
                    [munged]=munge [shellcheck]=shellcheck)
missing=()
for program in "${!PACKAGE[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("${PACKAGE[$program]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: the integration tests need the system packages ${missing[*]}: install them" \
         "(sudo apt-get install ${missing[*]}), or run make test-fast (unit tests only)" >&2
    exit 1
fi
echo "installing the system packages the integration tests use: ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
