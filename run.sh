#!/usr/bin/env bash
# The README's two commands. Each one sets everything up from nothing first (scripts/bootstrap.sh:
# EGL/Mesa libraries if missing, a virtual environment in .venv, this package with its test extras).
#   ./run.sh demo [overrides]   the main job on its default profile (ego-pipeline), see README
#   ./run.sh test [pytest args] the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
export VENV=${VENV:-.venv}
export MUJOCO_GL=${MUJOCO_GL:-egl}
command=${1:-}
shift || true
case "$command" in
  demo) bash scripts/bootstrap.sh && exec "$VENV/bin/ego-pipeline" "$@" ;;
  test) bash scripts/bootstrap.sh && exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
  *) echo "usage: ./run.sh demo [ego-pipeline overrides] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
