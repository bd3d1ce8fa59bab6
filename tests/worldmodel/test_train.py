"""ego-train-wm stage=encoder: CLI, checkpoints, resume, DDP on 2 CPU processes, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.checkpoint import read_checkpoint
from worldmodel.data import Clips
from worldmodel.metrics import (
    adjusted_rand_index,
    apply_linear_probe,
    fg_ari,
    fit_linear_probe,
    fit_linear_probe_cv,
    identity_consistency,
    identity_losses,
    match_objects,
)
from worldmodel.train import load_encoder, train

TINY_MODEL = {"dim": 32, "layers": 1, "heads": 2, "slot_dim": 32, "decoder_hidden": 32, "num_slots": 4}
TINY_TRAIN = {"batch_size": 2, "clip_len": 2, "log_every": 1, "ckpt_every": 2, "warmup": 1, "threads": 1}


def run_train(out: Path, dataset: str, steps: int, stop_at: int = 0, **extra):
    return train(out=str(out), progress=False, data={"paths": [dataset]}, model=TINY_MODEL,
                 train=TINY_TRAIN | {"steps": steps, "stop_at": stop_at}, **extra)


def test_checkpoint_layout_reload_and_resume(tmp_path, wm_dataset):
    out = tmp_path / "run"
    m = run_train(out, wm_dataset, steps=4, stop_at=2)  # a 4-step schedule, stopped half way
    assert m["step"] == 2
    for f in ("config.yaml", "model.safetensors", "stats.json", "metrics.json", "train_state.pt", "report.md",
              "loss.png"):
        assert (out / f).exists(), f
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    config, _, stats = read_checkpoint(out)
    assert config["stage"] == "encoder" and config["model"]["rope"] == "3d-world"
    assert len(stats["rgbd_mean"]) == 4

    # a checkpoint reloads from its directory alone to identical outputs
    a, b = load_encoder(out), load_encoder(out)
    clips = Clips.load([wm_dataset])
    x = clips.batch(np.array([0]), 2)
    with torch.no_grad():
        torch.manual_seed(0)
        ya = a(x["rgb"], x["depth"], x["intrinsics"], x["cam_pose"])
        torch.manual_seed(0)
        yb = b(x["rgb"], x["depth"], x["intrinsics"], x["cam_pose"])
    assert torch.equal(ya.slots, yb.slots) and torch.equal(ya.masks, yb.masks)

    # rerunning without the stop resumes where it stopped
    m = run_train(out, wm_dataset, steps=4)
    assert m["step"] == 4
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]


def test_center_stage_refits_only_the_head_on_frame_evidence(tmp_path, wm_dataset):
    base = tmp_path / "enc"
    run_train(base, wm_dataset, steps=2)
    config, weights, _ = read_checkpoint(base)
    del config["model"]["center_inputs"]  # as saved before the option existed: the head read the slot
    (base / "config.yaml").write_text(__import__("yaml").safe_dump(config))
    assert load_encoder(base).cfg.center_inputs == "slot"
    out = tmp_path / "center"
    m = train(stage="center", encoder=str(base), out=str(out), progress=False, data={"paths": [wm_dataset]},
              model=TINY_MODEL, train=TINY_TRAIN, center={"steps": 30, "lr": 3e-3, "batch_size": 4, "clip_len": 4})
    assert m["step"] == 30
    hist = [h["center"] for h in m["history"]]
    assert np.mean(hist[-5:]) < np.mean(hist[:5])  # the head learns
    new_config, new_weights, _ = read_checkpoint(out)
    assert new_config["stage"] == "center" and new_config["encoder"] == str(base)
    assert new_config["model"]["center_inputs"] == "frame"
    for k, v in new_weights.items():  # everything but the head is the base encoder's, bit for bit
        if not k.startswith("center."):
            assert torch.equal(v, weights[k]), k
    assert weights["center.mlp.0.weight"].shape != new_weights["center.mlp.0.weight"].shape  # other inputs
    enc = load_encoder(out)
    x = Clips.load([wm_dataset]).batch(np.array([0]), 3)
    with torch.no_grad():
        torch.manual_seed(0)
        y = enc(x["rgb"], x["depth"], x["intrinsics"], x["cam_pose"])
        torch.manual_seed(0)
        s, _ = enc.step(x["rgb"][:, 0], x["depth"][:, 0], x["intrinsics"][:, 0], x["cam_pose"][:, 0])
    assert torch.isfinite(y.geometry).all()
    torch.testing.assert_close(s.geometry[:, 0], y.geometry[:, 0], atol=1e-4, rtol=1e-4)  # streaming agrees
    with pytest.raises(FileNotFoundError, match="trained encoder"):
        train(stage="center", encoder=str(tmp_path / "none"), out=str(tmp_path / "c2"), progress=False,
              data={"paths": [wm_dataset]})
    with pytest.raises(ValueError, match="center.inputs"):
        train(stage="center", encoder=str(base), out=str(tmp_path / "c3"), progress=False,
              data={"paths": [wm_dataset]}, center={"inputs": "pixels"})


def test_resume_refuses_a_different_model(tmp_path, wm_dataset):
    out = tmp_path / "run"
    run_train(out, wm_dataset, steps=1)
    with pytest.raises(ValueError, match="different run"):
        train(out=str(out), progress=False, data={"paths": [wm_dataset]}, model=TINY_MODEL | {"rope": "2d"},
              train=TINY_TRAIN | {"steps": 2})


def test_bad_options_and_data(tmp_path, wm_dataset):
    with pytest.raises(ValueError, match="stage must be one of"):
        train(out=str(tmp_path / "x"), stage="decoder", data={"paths": [wm_dataset]})
    bare = tmp_path / "bare.zarr"
    from sim.collect import collect

    collect(out=str(bare), task="single", level="easy", policy="random", episodes=1, max_steps=5, workers=0,
            progress=False)
    with pytest.raises(ValueError, match="segmentation=true"):
        run_train(tmp_path / "y", str(bare), steps=1)


def test_cli_trains_and_a_checkpoint_loads(tmp_path, wm_dataset):
    out = tmp_path / "cli"
    args = [f"out={out}", f"data.paths=[{wm_dataset}]", "train.steps=2", "progress=false"]
    args += [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [f"train.{k}={v}" for k, v in TINY_TRAIN.items()]
    r = subprocess.run([sys.executable, "-m", "worldmodel.train", *args], capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_encoder(out).cfg.num_slots == 4
    r = subprocess.run([sys.executable, "-m", "worldmodel.train", f"out={tmp_path / 'z'}", "model.rope=3d"],
                       capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode != 0 and "rope" in r.stderr


def test_ddp_two_cpu_processes(tmp_path, wm_dataset):
    """torchrun with 2 processes on gloo: both step in lockstep, rank 0 writes one checkpoint."""
    out = tmp_path / "ddp"
    args = [f"out={out}", f"data.paths=[{wm_dataset}]", "train.steps=2", "progress=false"]
    args += [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [f"train.{k}={v}" for k, v in TINY_TRAIN.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                        "-m", "worldmodel.train", *args], capture_output=True, text=True, check=False, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["step"] == 2
    assert metrics["clips_seen"] == 2 * 2 * TINY_TRAIN["batch_size"]


# ---------------------------------------------------------------------------- metrics


def test_adjusted_rand_index_known_values():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    assert adjusted_rand_index(a, 5 - a) == pytest.approx(1.0)  # label names do not matter
    # hand-computed: contingency [[2,0],[1,1],[0,2]] -> index 2, rows 3, cols 6, expected 1.2, max 4.5
    assert adjusted_rand_index(a, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx((2 - 1.2) / (4.5 - 1.2))
    assert adjusted_rand_index(a, np.array([0, 1, 0, 1, 0, 1])) < 0.0


def test_fg_ari_and_matching_on_masks():
    seg = np.zeros((4, 4), int)
    seg[:2, :2], seg[2:, 2:] = 3, 4  # two objects, rest background
    masks = np.zeros((3, 4, 4))
    masks[0] = 1.0
    masks[1][seg == 3] = 2.0
    masks[2][seg == 4] = 2.0
    assert fg_ari(masks, seg) == pytest.approx(1.0)
    assert match_objects(masks, seg, n_objects=2, min_pixels=1) == {0: 1, 1: 2}
    merged = masks.copy()
    merged[2] = 0.0  # both objects in slot 1
    merged[1][seg == 4] = 2.0
    assert fg_ari(merged, seg) == pytest.approx(0.0)
    assert fg_ari(masks, np.zeros((4, 4), int)) is None
    assert identity_consistency([{0: 1, 1: 2}, {0: 1, 1: 0}, {0: 1}]) == (4, 5)
    # object 0 starts in slot 1, settles in slot 2 (its most frequent), flickers back once, small then
    matches = [{0: 1}, {0: 2}, {0: 2}, {0: 1, 1: 3}, {0: 2, 1: 3}]
    pixels = [{0: 100}, {0: 100}, {0: 100}, {0: 30, 1: 80}, {0: 100, 1: 80}]
    assert identity_losses(matches, pixels) == {"off": 2, "small": 1, "start": 1}
    assert identity_losses(matches, pixels, small_px=10) == {"off": 2, "small": 0, "start": 1}


def test_collected_segmentation_matches_the_objects(wm_dataset):
    """`ego-collect segmentation=true` stores uint8 ids, object i as 3 + i, aligned with object_poses,
    and goal marker k as GOAL_SEG_ID + k."""
    from sim.dataset import EpisodeDataset

    ds = EpisodeDataset.open(wm_dataset)
    ep = ds.episode(0, ["segmentation", "object_poses", "visible", "rgb"])
    seg = ep["segmentation"]
    assert seg.dtype == np.uint8 and seg.shape == ep["rgb"].shape[:3]
    n_obj = ep["object_poses"].shape[1]
    from sim.env import GOAL_SEG_ID

    # objects 3 .. 3 + n_obj - 1, goal markers from GOAL_SEG_ID, nothing else
    assert set(np.unique(seg).tolist()) <= set(range(3 + n_obj)) | set(range(GOAL_SEG_ID, GOAL_SEG_ID + 4))
    # an object flagged visible with a clear line of sight shows up in the segmentation of most such frames
    shown = [(seg[t] == 3 + o).any() for t in range(len(seg)) for o in range(n_obj) if ep["visible"][t, o]]
    assert shown and np.mean(shown) > 0.8
    assert "segmentation_ids" in ds.meta


def test_huber_probe_ignores_outliers_and_cv_picks_a_ridge():
    """A linear map with 10% gross outliers (a slot that holds another object): the Huber fit finds
    the map, plain least squares is tilted by the outliers."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (400, 3))
    true_w = np.array([[1.0, 0.0], [0.0, 1.0], [0.3, -0.2]])
    y = x @ true_w + 0.1 + rng.normal(0, 0.005, (400, 2))
    bad = rng.random(400) < 0.1
    y[bad] += rng.uniform(0.5, 1.5, (bad.sum(), 2))
    x_test = rng.uniform(-1, 1, (200, 3))
    y_test = x_test @ true_w + 0.1
    err = lambda w: np.median(np.linalg.norm(apply_linear_probe(w, x_test) - y_test, axis=1))
    assert err(fit_linear_probe(x, y, 1e-4, huber_m=0.05)) < 0.01 < err(fit_linear_probe(x, y, 1e-4))
    groups = np.arange(400) // 20
    w, ridge = fit_linear_probe_cv(x, y, groups)
    assert ridge in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) and err(w) < 0.01
    w2, ridge2 = fit_linear_probe_cv(x, y, groups)
    assert ridge2 == ridge and np.array_equal(w, w2)  # deterministic


def test_probe_fitted_on_episodes_of_its_own_has_less_variance_than_the_half_split():
    """Many noisy features, few held-out episodes: fitted on a larger set of other episodes, the
    probe's error on every held-out sample is lower than the half-split's, and the slot's own centre
    (the geometric part's first two features) is scored with no probe."""
    from worldmodel.evaluate import probe_metrics

    rng = np.random.default_rng(1)

    def samples(episodes: int, per: int) -> dict[str, np.ndarray]:
        y = rng.uniform(-1, 1, (episodes * per, 2))
        noise = rng.normal(0, 1.0, (len(y), 60))
        geometry = np.concatenate([y + rng.normal(0, 0.02, y.shape), rng.normal(0, 1, (len(y), 3))], 1)
        x = np.concatenate([noise + 0.05 * y @ rng.normal(0, 1, (2, 60)), geometry], 1)
        return {"x": x, "y": y, "group": np.repeat(np.arange(episodes), per)}

    test, fit = samples(6, 15), samples(40, 30)
    half = probe_metrics(test)
    both = probe_metrics(test, fit)
    assert half["probe_median_err_m"] == half["half_probe_median_err_m"] and half["probe_test_samples"] == 45
    assert both["probe_train_samples"] == 1200 and both["probe_test_samples"] == 90
    assert both["half_probe_median_err_m"] == half["half_probe_median_err_m"]
    assert both["probe_median_err_m"] < 0.8 * half["probe_median_err_m"]
    assert both["center_median_err_m"] < 0.05 and both["probe_geometry_median_err_m"] < 0.05
