#!/usr/bin/env bash
# Create the two TRL virtual environments that bench/vs_trl.py runs TRL in (never committed: see .gitignore).
#
#   bench/.venvs/trl-ppo   trl==1.12.0, the last release with PPOTrainer/PPOConfig
#   bench/.venvs/trl-grpo  the newest trl release (GRPOTrainer)
#
# torch==2.13.0 (the CPU wheel this machine has on disk) is installed first in each venv, so that pip does
# not resolve trl's torch requirement to a multi-GB CUDA build; pip then resolves transformers / accelerate /
# datasets for the trl release. Re-running the script reuses an existing venv (pip install is idempotent).
#
#   bash bench/setup_trl.sh [PYTHON]      # PYTHON: the interpreter to build the venvs from (default python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${1:-python3}"
TRL_PPO_VERSION="1.12.0"

make_venv() {
    local dir="$1"
    shift
    if [ ! -x "$dir/bin/python" ]; then
        "$PYTHON" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    "$dir/bin/python" -m pip install --quiet "torch==2.13.0"
    "$dir/bin/python" -m pip install --quiet "$@"
    # a check that torch stayed the CPU wheel and trl imports
    "$dir/bin/python" - <<'PY'
import torch, transformers, trl
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"  torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
}

mkdir -p "$HERE/.venvs"
echo "bench/.venvs/trl-ppo (trl==$TRL_PPO_VERSION)"
make_venv "$HERE/.venvs/trl-ppo" "trl==$TRL_PPO_VERSION"
echo "bench/.venvs/trl-grpo (newest trl)"
make_venv "$HERE/.venvs/trl-grpo" "trl"
