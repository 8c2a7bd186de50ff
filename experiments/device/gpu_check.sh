#!/usr/bin/env bash
# The GPU check in one go (see gpu_check.py): installs jdpo without dependencies into this Python, runs
# every check, prints the summary table and leaves every result under OUT_DIR.
#   experiments/device/gpu_check.sh OUT_DIR [--dry-run] [--budget-s SECONDS]
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [--dry-run] [--budget-s SECONDS]}
shift
cd "$(dirname "$0")/../.."
exec python experiments/device/gpu_check.py "$out" "$@"
