#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: paper-mode dilated attention over 64K tokens on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m dilated_attention.demo "$@"
