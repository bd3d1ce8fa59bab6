"""Checkpoint directories (DESIGN layout): config.yaml, model.safetensors, stats.json, metrics.json.

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint. A checkpoint loads from its directory alone. `train_state.pt` (optimiser, step, RNG)
sits beside them for resuming and is not needed for inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

PathLike = str | os.PathLike


def weights_digest(run_dir: PathLike) -> str:
    """SHA-256 (hex) of a checkpoint's model.safetensors, read in 1 MiB chunks: what identifies its weights."""
    h = hashlib.sha256()
    with open(Path(run_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: PathLike, data: Any) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(directory: PathLike, model: nn.Module, config: Any, stats: dict[str, Any],
                    metrics: dict[str, Any], train_state: dict[str, Any] | None = None) -> Path:
    """Write (or overwrite) a checkpoint directory; the weights are written last but one so that a
    reader never pairs new weights with an old config."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = config if isinstance(config, dict) else OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    _atomic_write(d / "config.yaml", lambda tmp: Path(tmp).write_text(OmegaConf.to_yaml(OmegaConf.create(cfg))))
    write_json(d / "stats.json", stats)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(d / "model.safetensors", lambda tmp: save_file(state, tmp))
    write_json(d / "metrics.json", metrics)
    if train_state is not None:
        _atomic_write(d / "train_state.pt", lambda tmp: torch.save(train_state, tmp))
    return d


def read_checkpoint(directory: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state_dict, stats) of a checkpoint directory, with errors that name what is missing."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    missing = [f for f in ("config.yaml", "model.safetensors", "stats.json") if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(f"{d} is not a complete checkpoint: missing {missing}")
    config = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=True)
    return config, load_file(str(d / "model.safetensors")), read_json(d / "stats.json")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: PathLike) -> None:
    """load_state_dict with a message that lists what does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: weights do not match the model built from its config.yaml: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict(state)
