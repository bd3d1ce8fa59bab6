"""`ego-pipeline profile=tiny` end to end: every stage runs for real at toy sizes, and a rerun resumes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policies.pipeline import _timed, load_config, run_pipeline, stage_seconds


def test_tiny_pipeline_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "pipe"
    cfg = load_config(["profile=tiny", f"out_dir={out}", "progress=false"])
    m = run_pipeline(cfg)
    for f in ("report.md", "metrics.json", "config.yaml", "wm_encoder/model.safetensors",
              "wm_predictor/model.safetensors", "policy/model.safetensors", "policy/encoder/model.safetensors",
              "media/policy_loss.png", "eval/single_easy/metrics.json"):
        assert (out / f).is_file(), f
    assert Path(m["video"]).is_file()
    r = m["evaluation"]["single_easy"]
    assert r["episodes"] == 2 and 0.0 <= r["success_rate"] <= 1.0
    assert m["encoder"]["step"] == 2 and m["predictor"]["step"] == 2 and m["policy"]["diffusion_steps"] == 2
    report = (out / "report.md").read_text()
    assert "| single_easy | single | easy | as trained | one sample | 2 |" in report and "profile=tiny" in report
    assert "| single_easy_select | single | easy | 2 steps | predictor's best of 2 | 1 |" in report
    assert m["evaluation"]["single_easy_replan2"]["controller"]["n_action"] == 2  # the same policy re-planning
    assert "| single_easy_replan2 | single | easy | 2 steps | one sample | 2 |" in report
    stamp = (out / "policy" / "model.safetensors").stat().st_mtime
    t0 = time.perf_counter()
    again = run_pipeline(cfg)
    assert time.perf_counter() - t0 < 30  # nothing retrains, nothing re-evaluates
    assert (out / "policy" / "model.safetensors").stat().st_mtime == stamp
    assert again["evaluation"] == m["evaluation"]
    assert json.loads((out / "metrics.json").read_text())["evaluation"] == m["evaluation"]
    assert set(again["stage_seconds"]) == set(m["stage_seconds"])
    assert all(again["stage_seconds"][k] >= m["stage_seconds"][k] for k in m["stage_seconds"])  # resumes add
    # the policy trained afresh (another seed, the same step counts): its evaluations are redone, not reused
    cached = out / "stages" / "eval_single_easy.json"
    before = cached.stat().st_mtime_ns
    shutil.rmtree(out / "policy")
    cfg.policy["train"]["seed"] = 1
    run_pipeline(cfg)
    assert cached.stat().st_mtime_ns != before


def test_stage_times_add_up_over_resumes_and_restart_for_new_settings(tmp_path):
    def work(seconds):
        return lambda: time.sleep(seconds) or "done"

    assert _timed(tmp_path, "train", work(0.2), {"steps": 10, "progress": True}) == "done"
    _timed(tmp_path, "train", work(0.2), {"steps": 10, "progress": False})  # the same work, resumed
    assert stage_seconds(tmp_path)["train"] == pytest.approx(0.4, abs=0.1)
    _timed(tmp_path, "train", work(0.1), {"steps": 20})  # redone for new settings: the old run does not count
    assert stage_seconds(tmp_path)["train"] == pytest.approx(0.1, abs=0.05)
    # a times.json written before the settings were recorded keeps adding up
    (tmp_path / "stages" / "times.json").write_text(json.dumps({"old": 5.0}))
    _timed(tmp_path, "old", work(0.0), {"steps": 1})
    assert stage_seconds(tmp_path)["old"] == pytest.approx(5.0, abs=0.05)


def test_a_trainer_stage_is_timed_by_its_resolved_settings(tmp_path):
    """A default the code changed restarts the stage's time as an option changed by hand does; writing
    the default out, or running with other workers or without progress bars, does not."""
    from policies.observation import DEFAULT_TRACKER, TRACKERS
    from policies.pipeline import _resolved
    from policies.train import TrainPolicyConfig

    def timed(seconds, settings):
        _timed(tmp_path, "policy", lambda: time.sleep(seconds), _resolved(TrainPolicyConfig, settings))
        return stage_seconds(tmp_path)["policy"]

    assert _resolved(TrainPolicyConfig, {"out": "p"})["policy"]["tracker"] == DEFAULT_TRACKER
    timed(0.2, {"out": "p"})
    explicit = {"out": "p", "progress": False, "data": {"workers": 1}, "policy": {"tracker": DEFAULT_TRACKER}}
    assert timed(0.2, explicit) == pytest.approx(0.4, abs=0.1)
    other = next(t for t in TRACKERS if t != DEFAULT_TRACKER)
    assert timed(0.1, {"out": "p", "policy": {"tracker": other}}) == pytest.approx(0.1, abs=0.05)


def test_a_cached_evaluation_is_reused_whatever_the_workers_and_progress(tmp_path):
    from sim.pipeline import cached_stage

    calls = []

    def run(result):
        return lambda: calls.append(result) or {"r": result}

    path = tmp_path / "eval.json"
    assert cached_stage(path, {"episodes": 3, "workers": 2, "progress": True}, run(1)) == {"r": 1}
    assert cached_stage(path, {"episodes": 3, "workers": 1, "progress": False}, run(2)) == {"r": 1}
    assert cached_stage(path, {"episodes": 4, "workers": 2, "progress": True}, run(3)) == {"r": 3}
    assert len(calls) == 2


def test_yaml_defaults_match_the_dataclass_and_the_cpu_budget():
    cfg = load_config([])
    assert cfg.task == "single" and cfg.suites["single_easy"].episodes == 100
    assert cfg.suites["single_easy"].n_action is None and cfg.suites["single_easy_replan2"].n_action == 2
    assert cfg.suites["single_easy_replan1"].n_action == 1
    # training within the 60-minute main job, with about 9 minutes of evaluation and 3 of demonstrations
    # and encoding
    train = cfg.policy["train"]
    assert cfg.encoder["train"]["time_budget_min"] + cfg.predictor["predictor"]["time_budget_min"] \
        + train["time_budget_min"] + train["distill_time_budget_min"] <= 40


def test_bad_options_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="suites.x evaluates task 'formation'"):
        run_pipeline({"out_dir": str(tmp_path), "suites": {"x": {"task": "formation", "level": "easy"}}})
    with pytest.raises(ValueError, match="suites.x.n_action must be >= 1"):
        run_pipeline({"out_dir": str(tmp_path), "suites": {"x": {"n_action": 0}}})
    with pytest.raises(ValueError, match="suites.x.select must be >= 0"):
        run_pipeline({"out_dir": str(tmp_path), "suites": {"x": {"select": -1}}})
    r = subprocess.run([sys.executable, "-m", "policies.pipeline", f"out_dir={tmp_path}", "task=nope"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "task" in r.stderr and "nope" in r.stderr
    assert not (tmp_path / "data").exists()
