#!/usr/bin/env bash
# ppo.py against TRL's PPOTrainer, side by side, and the compute floor: see benchmark/speed.py (--help).
#
#     bash benchmark/speed.sh --setup_trl --quick     # install TRL 1.9.0 into /tmp/trl-venv, then a short check
#     bash benchmark/speed.sh --write                 # 4 rounds x 30 updates; the table into benchmark/RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmark/speed.py "$@"
