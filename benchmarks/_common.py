"""Shared by the benchmark scripts: import path, and one JSON object per line on stdout."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a plain checkout: python benchmarks/<name>.py
    sys.path.insert(0, str(REPO_ROOT))


def machine() -> dict[str, Any]:
    """Conditions every figure is reported with."""
    import mujoco

    return {
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "mujoco": mujoco.__version__,
        "gl": os.environ.get("MUJOCO_GL", "egl"),
    }


def emit(bench: str, metric: str, value: float | None, unit: str, **conditions: Any) -> None:
    """Print one figure as a JSON line: bench, metric, value, unit, then its conditions."""
    record = {"bench": bench, "metric": metric, "value": value, "unit": unit, **conditions}
    print(json.dumps(record), flush=True)
