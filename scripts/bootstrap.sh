#!/usr/bin/env bash
# Set up everything from nothing on a Debian/Ubuntu machine with Python >= 3.10:
# system libraries for headless MuJoCo rendering (EGL/Mesa) and the viewer tests (Xvfb, ImageMagick,
# xdotool), a virtual environment in .venv,
# and the project with its test extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || need_apt+=(libegl1 libegl-mesa0 libgl1-mesa-dri)
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || need_apt+=(libgl1)
# the interactive viewer's tests (ego-view under a virtual display): Xvfb, ImageMagick's `import`, xdotool
command -v Xvfb >/dev/null || need_apt+=(xvfb)
command -v import >/dev/null || need_apt+=(imagemagick)
command -v xdotool >/dev/null || need_apt+=(xdotool)
# Debian's own python3 ships venv without ensurepip: that is the python3-venv package
if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  need_apt+=("python3-venv")
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${need_apt[*]} (headless rendering, viewer tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "bootstrap: please install ${need_apt[*]} (EGL/Mesa for headless MuJoCo rendering, venv, viewer tests)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.egoworld-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # PyTorch first, so that the project's `torch>=2.2` finds it installed: a bare requirement would
  # pull the newest CUDA build (several GB). TORCH_SPEC picks another build, e.g. for a GPU machine:
  #   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" scripts/bootstrap.sh
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
  fi
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
