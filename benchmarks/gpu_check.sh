#!/usr/bin/env bash
# The GPU check (issue 19 item 6): training images/s and MFU, the DP step ratio, site predict
# exams/s and patient fine-tuning s/patient, as one markdown table (benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh [--small] [--json FILE] [--peak-tflops N]
#
# Uses the repository's .venv when there is one. On a GPU the run is cut off after 480 s
# (it takes about half that); --small (CPU / CI) needs no limit. Exit code non-zero when any
# row failed (the table still prints, with the failure in that row).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
[[ -x "$python" ]] || python="$(command -v python3 || command -v python)"

small=0
for arg in "$@"; do
    [[ "$arg" == "--small" ]] && small=1
done

export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
if [[ "$small" == 0 ]] && "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    exec timeout 480 "$python" "$root/benchmarks/gpu_check.py" "$@"
fi
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
