# The two commands of the README. Each sets everything up from nothing first (scripts/bootstrap.sh).
VENV ?= .venv
export MUJOCO_GL ?= egl

.PHONY: setup demo test
setup:
	VENV=$(VENV) bash scripts/bootstrap.sh

# The main job on its built-in default profile (see README): writes runs/pipeline/report.md
demo: setup
	$(VENV)/bin/ego-pipeline

# The whole test suite
test: setup
	$(VENV)/bin/python -m pytest -q tests
