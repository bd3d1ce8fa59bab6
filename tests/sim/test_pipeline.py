"""Tests for sim.pipeline: the tiny profile end to end (report, plot, video, metrics),
a rerun that reuses every finished stage, and the config."""

from __future__ import annotations

import json
from pathlib import Path

import sim  # noqa: F401  (first: picks the headless GL backend)

import imageio.v2 as imageio
import pytest

from sim.dataset import EpisodeDataset
from sim.pipeline import PipelineConfig, SuiteConfig, load_config, run_pipeline


def test_tiny_profile_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(["profile=tiny", f"out_dir={out}", "progress=false"])
    assert cfg.max_steps == 40 and cfg.demos.episodes == 2
    result = run_pipeline(cfg)

    report = (out / "report.md").read_text()
    plot, video = out / "media" / "summary.png", Path(result["video"])
    for path in (plot, video, out / "metrics.json", out / "config.yaml"):
        assert path.is_file() and path.stat().st_size > 0, path
    assert "(media/summary.png)" in report and f"(media/{video.name})" in report
    assert "profile=tiny" in report and "| single_hard | single | hard | 2 |" in report
    reader = imageio.get_reader(video, format="FFMPEG")
    frames = [frame for frame in reader]
    reader.close()
    recorded = json.loads((out / "stages" / "video.json").read_text())["result"]["results"][0]
    assert len(frames) == recorded["length"] > 0
    assert frames[0].shape == (256, 768, 3)

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["evaluation"]) == {"single_easy", "single_hard", "formation_easy"}
    assert metrics["demos"]["episodes"] == EpisodeDataset.open(out / "data" / "demos.zarr").n_episodes == 2
    assert metrics["demos"]["steps_per_s"] > 0
    for r in metrics["evaluation"].values():
        assert r["episodes"] == 2 and r["ci95_low"] <= r["success_rate"] <= r["ci95_high"]

    # A rerun finds every stage done: nothing is evaluated or recorded again.
    stamps = {p: p.stat().st_mtime_ns for p in [*(out / "eval").glob("*.json"), video]}
    again = run_pipeline(cfg)
    assert again["evaluation"] == result["evaluation"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_yaml_defaults_match_the_dataclass():
    assert load_config() == PipelineConfig()
    tiny = load_config(["profile=tiny", "~suites.formation_easy"])
    assert set(tiny.suites) == {"single_easy", "single_hard"}


def test_bad_config_fails_before_any_work(tmp_path):
    cfg = PipelineConfig(out_dir=str(tmp_path / "run"), suites={"walk": SuiteConfig("walk", "easy", 1)})
    with pytest.raises(ValueError, match="suites.walk.task must be one of 'single', 'formation'"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()
