"""`ego-dataset info` / `export` on a real collected dataset, and its error path."""

from __future__ import annotations

import json

import imageio.v2 as imageio

from sim.collect import collect
from sim.dataset_cli import main


def test_info_and_export(tmp_path, capsys):
    path = tmp_path / "d.zarr"
    collect(out=str(path), episodes=2, workers=0, max_steps=12, progress=False)
    assert main(["info", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 2 and summary["steps"] == 24
    assert summary["keys"]["rgb"] == "uint8 (64, 64, 3)"
    assert summary["meta"]["task"] == "single"

    out = tmp_path / "ep.mp4"
    assert main(["export", str(path), "--episode", "1", "--out", str(out)]) == 0
    reader = imageio.get_reader(out)
    assert sum(1 for _ in reader) == 12  # one frame per step of the 12-step episode


def test_not_a_dataset_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(["info", str(tmp_path / "junk")]) == 2
    err = capsys.readouterr().err
    assert "junk" in err and "Traceback" not in err
