"""CausalJEPAPredictor: object-level masks, the symplectic step and the priors, causality, rollouts,
bad input, the training loss, and `ego-train-wm stage=predictor` (cache, checkpoint, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.physics import InteractionDynamics, integrate_robot, symplectic_euler
from worldmodel.predictor import (
    CausalJEPAPredictor,
    PredictorConfig,
    frame_causal_attention,
    object_mask,
    predictor_loss,
)

TINY = dict(slot_dim=12, num_slots=4, history=3, future=2, frameskip=2, dim=32, layers=2, heads=2,
            interaction_hidden=16, block=4, topk=2)


def tiny(**kw) -> CausalJEPAPredictor:
    torch.manual_seed(0)
    model = CausalJEPAPredictor(PredictorConfig(**(TINY | kw)))
    # the interaction heads start at zero (nothing moves); give them weights so that the tests see dynamics
    with torch.no_grad():
        for p in model.dynamics.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def camera(b: int, t: int) -> torch.Tensor:
    """Cameras along +x, looking forward (optical z = world x), moving 5 cm a frame."""
    pose = torch.eye(4).repeat(b, t, 1, 1)
    pose[..., :3, :3] = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    pose[..., 0, 3] = torch.arange(t) * 0.05
    pose[..., 2, 3] = 0.15
    return pose


def window_batch(model: CausalJEPAPredictor, b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    t, k = cfg.window, cfg.num_slots
    feats = torch.randn(b, t, k, cfg.feature_dim, generator=g)
    # objects around the robot's path (it drives along +x from the origin), most within contact reach
    near = torch.rand(b, 1, k, 2, generator=g) * torch.tensor([0.3, 0.3]) + torch.tensor([0.1, -0.15])
    feats[..., -5:-3] = near + torch.arange(t).view(1, t, 1, 1) * 0.02
    return {"features": feats, "actions": (torch.rand(b, t, cfg.frameskip, 2, generator=g) - 0.5) * 0.4,
            "cam_pose": camera(b, t), "proprio": torch.zeros(b, t, 4),
            "object_poses": torch.cat([feats[..., :3, -5:-3], torch.zeros(b, t, 3, 1)], -1),
            "object_pixels": torch.full((b, t, 3), 50), "slot_object": torch.tensor([[0, 1, 2, -1]] * b)}


# ---------------------------------------------------------------------------- masks


def test_object_mask_anchor_hidden_slots_and_future():
    b, k, th, tf, m = 64, 6, 4, 3, 2
    vis = object_mask(b, k, th, tf, m, torch.Generator().manual_seed(0))
    assert vis.shape == (b, th + tf, k) and vis.dtype == torch.bool
    assert vis[:, 0].all(), "every slot is visible at the first frame (identity anchor)"
    assert not vis[:, th:].any(), "every future frame is hidden"
    hidden = ~vis[:, 1:th]
    assert (hidden.sum(-1) == m).all(), "exactly M slots hidden in each history frame after the first"
    assert (hidden == hidden[:, :1]).all(), "the same M slots stay hidden over the whole history"
    assert len({tuple(h.nonzero().flatten().tolist()) for h in hidden[:, 0]}) > 5, "masks differ between samples"
    # the same generator seed gives the same masks; M = 0 (masking off) hides only the future
    again = object_mask(b, k, th, tf, m, torch.Generator().manual_seed(0))
    assert torch.equal(vis, again)
    off = object_mask(b, k, th, tf, 0)
    assert off[:, :th].all() and not off[:, th:].any()
    with pytest.raises(ValueError, match="hidden_slots"):
        object_mask(b, k, th, tf, k + 1)


# ---------------------------------------------------------------------------- physics


def test_symplectic_step_hand_computed():
    pos = torch.tensor([1.0, 2.0, 0.5])
    vel = torch.tensor([0.1, 0.0, 0.2])
    acc = torch.tensor([1.0, -1.0, 0.0])
    # v' = v + a dt = (0.2, -0.1, 0.2); p' = p + v' dt = (1.02, 1.99, 0.52): the new velocity moves the position
    p1, v1 = symplectic_euler(pos, vel, acc, 0.1)
    torch.testing.assert_close(v1, torch.tensor([0.2, -0.1, 0.2]))
    torch.testing.assert_close(p1, torch.tensor([1.02, 1.99, 0.52]))
    # keep = 0: the old velocity is dropped (an untouched object under quasi-static pushing)
    p0, v0 = symplectic_euler(pos, vel, torch.zeros(3), 0.1, keep=torch.tensor(0.0))
    torch.testing.assert_close(v0, torch.zeros(3))
    torch.testing.assert_close(p0, pos)


def _closed_gates(dyn: InteractionDynamics) -> None:
    with torch.no_grad():
        for head in (dyn.pair_out, dyn.robot_out):
            head[-1].weight.zero_()
            head[-1].weight[1:].normal_()  # effects, but no gate
            head[-1].bias.zero_()
            head[-1].bias[0] = -60.0  # sigmoid(-60) ~ 1e-26


def _open_gates(dyn: InteractionDynamics) -> None:
    """Every gate wide open (before the contact cut-off), the same strong effect from every head."""
    with torch.no_grad():
        for head in (dyn.pair_out, dyn.robot_out):
            head[-1].weight.zero_()
            head[-1].bias[:] = torch.tensor([30.0, 1.0, 0.5, 0.3])


def test_untouched_slots_keep_position_and_lose_velocity():
    torch.manual_seed(0)
    phys = torch.tensor([[[0.5, 0.2, 0.3, 0.1, -0.1, 1.0], [-0.4, 0.6, -1.0, 0.0, 0.0, 0.0]]])
    h = torch.randn(1, 2, 16)
    robot = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.2, 0.5]])
    dyn = InteractionDynamics(16, 8, dt=0.2)
    _closed_gates(dyn)
    new, info = dyn(phys, h, robot)
    assert info["gate"].max() < 1e-20 and info["robot_gate"].max() < 1e-20
    torch.testing.assert_close(new[..., :3], phys[..., :3])  # pushing is quasi-static: nothing moves
    torch.testing.assert_close(new[..., 3:], torch.zeros_like(phys[..., 3:]))
    # without the quasi-static prior an untouched slot coasts: p + v dt
    coast = InteractionDynamics(16, 8, dt=0.2, quasi_static=False)
    _closed_gates(coast)
    new, _ = coast(phys, h, robot)
    torch.testing.assert_close(new[..., :2], phys[..., :2] + 0.2 * phys[..., 3:5])
    torch.testing.assert_close(new[..., 3:], phys[..., 3:])
    # the bound: accelerations never exceed accel_max, whatever the heads say
    bounded = InteractionDynamics(16, 8, dt=0.2, accel_max=(1.5, 10.0), contact_range=None)
    with torch.no_grad():
        bounded.robot_out[-1].bias[:] = torch.tensor([10.0, 1e3, -1e3, 1e4])
    _, info = bounded(phys, h, robot)
    assert info["acc"][..., :2].abs().max() <= 1.5 + 1e-5 and info["acc"][..., 2].abs().max() <= 10.0 + 1e-4
    assert info["acc"][..., :2].abs().max() > 1.4


def test_contact_reach_closes_the_gates_of_far_slots():
    """Whatever the gate heads say, a slot out of every contact's reach keeps its place; in reach it moves."""
    torch.manual_seed(0)
    dyn = InteractionDynamics(16, 8, dt=0.2, contact_range=(0.10, 0.20))
    _open_gates(dyn)
    robot = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.2, 0.0]])  # at the origin facing +x, driving
    # slot 0 just ahead of the pusher, slot 1 beside it (in reach of slot 0), slot 2 far from everything,
    # slot 3 0.3 m from the axle beside the robot: within the old round reach, but not touching
    phys = torch.tensor([[[0.15, 0.0, 0.0, 0.0, 0.0, 0.0], [0.15, 0.15, 0.0, 0.0, 0.0, 0.0],
                          [0.9, -0.8, 0.0, 0.0, 0.0, 0.0], [0.0, -0.3, 0.0, 0.0, 0.0, 0.0]]])
    new, info = dyn(phys, torch.randn(1, 4, 16), robot)
    assert info["robot_gate"][0, 0] > 0.99 and info["robot_gate"][0, 2] < 1e-9 and info["robot_gate"][0, 3] < 1e-3
    assert info["gate"][0, 0, 1] > 0.9 and info["gate"][0, 2].max() < 1e-9 and info["gate"][0, :, 2].max() < 1e-9
    assert (new[0, 0, :2] - phys[0, 0, :2]).norm() > 1e-3 and (new[0, 1, :2] - phys[0, 1, :2]).norm() > 1e-3
    torch.testing.assert_close(new[0, 2], phys[0, 2], atol=1e-8, rtol=0)
    # without the cut-off the far slot is pushed too
    free = InteractionDynamics(16, 8, dt=0.2, contact_range=None)
    free.load_state_dict(dyn.state_dict())
    new, _ = free(phys, torch.randn(1, 4, 16), robot)
    assert (new[0, 2, :2] - phys[0, 2, :2]).norm() > 1e-3


def test_pairs_off_leaves_only_the_robot_acting():
    """With `pairs=False` (the same weights) the slot next to a pushed slot stays; the pushed one still moves."""
    torch.manual_seed(0)
    dyn = InteractionDynamics(16, 8, dt=0.2, contact_range=(0.02, 0.20))
    _open_gates(dyn)
    robot = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.2, 0.0]])
    # slot 0 just ahead of the pusher; slot 1 beside it, out of the robot's reach but in slot 0's
    phys = torch.tensor([[[0.12, 0.0, 0.0, 0.0, 0.0, 0.0], [0.12, 0.19, 0.0, 0.0, 0.0, 0.0]]])
    h = torch.randn(1, 2, 16)
    alone = InteractionDynamics(16, 8, dt=0.2, contact_range=(0.02, 0.20), pairs=False)
    alone.load_state_dict(dyn.state_dict())
    new, info = dyn(phys, h, robot)
    new_alone, info_alone = alone(phys, h, robot)
    assert info["gate"][0, 1, 0] > 0.5 and info_alone["gate"].abs().max() == 0
    assert (new[0, 1, :2] - phys[0, 1, :2]).norm() > 1e-3  # pushed by slot 0
    assert (new_alone[0, 1, :3] - phys[0, 1, :3]).abs().max() < 1e-4  # out of the robot's reach: stays
    assert (new_alone[0, 0, :2] - phys[0, 0, :2]).norm() > 1e-3
    torch.testing.assert_close(info_alone["robot_gate"], info["robot_gate"])


def test_load_predictor_switches_pairs_and_refuses_other_overrides(world_model):
    from worldmodel.train_predictor import load_predictor

    _, pred_dir = world_model
    assert load_predictor(pred_dir).dynamics.pairs
    model = load_predictor(pred_dir, overrides={"pairs": False})
    assert not model.cfg.pairs and not model.dynamics.pairs
    with pytest.raises(ValueError, match="only \\['pairs'\\] can be changed"):
        load_predictor(pred_dir, overrides={"num_slots": 3})


def test_probe_position_is_the_encoder_centre_without_offset():
    from worldmodel.physics import PhysicalProbe

    feats = torch.randn(5, 3, 17)
    probe = PhysicalProbe(17, offset=False)
    with torch.no_grad():
        for p in probe.parameters():
            p.normal_()
    pos, heading = probe(feats)
    torch.testing.assert_close(pos, feats[..., -5:-3])
    torch.testing.assert_close(heading.norm(dim=-1), torch.ones(5, 3))
    learned = PhysicalProbe(17, offset=True)
    learned.load_state_dict(probe.state_dict())
    assert not torch.allclose(learned(feats)[0], feats[..., -5:-3])


def test_robot_kinematics_hand_computed():
    start = torch.tensor([1.0, 0.5, 1.0, 0.0, 0.0, 0.0])  # at (1, 0.5) facing +x
    straight = integrate_robot(start, torch.tensor([[0.2, 0.0]] * 4), 0.1, 2)
    assert straight.shape == (2, 6)
    torch.testing.assert_close(straight[:, :2], torch.tensor([[1.04, 0.5], [1.08, 0.5]]))
    # a quarter circle of radius v / omega = 0.1 m: 10 steps of 0.1 s at omega = pi/2 rad/s
    arc = integrate_robot(start, torch.tensor([[0.1 * math.pi / 2, math.pi / 2]] * 10), 0.1, 10)
    torch.testing.assert_close(arc[0, :4], torch.tensor([1.1, 0.6, 0.0, 1.0]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- causality and rollouts


@pytest.mark.parametrize("sparse", [False, True])
def test_frame_causal_attention(sparse):
    torch.manual_seed(0)
    b, h, t, n, d = 2, 2, 4, 6, 8
    q, k, v = (torch.randn(b, h, t * n, d) for _ in range(3))
    out = frame_causal_attention(q, k, v, t, sparse=sparse, block=4, topk=2)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2 * n:] += 5.0  # change frames 2 and 3
    v2[:, :, 2 * n:] -= 3.0
    out2 = frame_causal_attention(q, k2, v2, t, sparse=sparse, block=4, topk=2)
    torch.testing.assert_close(out[:, :, :2 * n], out2[:, :, :2 * n])  # frames 0, 1 never see them
    assert not torch.allclose(out[:, :, 2 * n:], out2[:, :, 2 * n:])
    if sparse:  # with every allowed block kept, block-sparse is the dense causal attention
        full = frame_causal_attention(q, k, v, t, sparse=True, block=4, topk=t * n // 4)
        torch.testing.assert_close(full, frame_causal_attention(q, k, v, t), atol=1e-5, rtol=1e-5)


def test_model_is_causal_over_frames():
    model = tiny()
    batch = window_batch(model)
    cfg = model.cfg
    states = model.encode_states(batch["features"])
    vis = object_mask(3, cfg.num_slots, cfg.history, cfg.future, 0)
    robot = model.robot_states(batch["cam_pose"], batch["proprio"], batch["actions"], cfg.history)
    with torch.no_grad():
        a, _ = model(states, vis, batch["actions"], robot)
        acts = batch["actions"].clone()
        acts[:, -1] += 0.3  # a different command into the last frame
        b, _ = model(states, vis, acts, robot)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_rollout_shapes_batching_and_chunks():
    model = tiny()
    cfg = model.cfg
    batch = window_batch(model, b=2)
    th = cfg.history
    hist = {"features": batch["features"][:, :th], "cam_pose": batch["cam_pose"][:, :th],
            "proprio": batch["proprio"][:, :th]}
    g = torch.Generator().manual_seed(1)
    horizon = 5  # more than `future`: three chunks of 2, 2, 1 frames
    acts = (torch.rand(2, 3, horizon * cfg.frameskip, 2, generator=g) - 0.5) * 0.4
    r = model.rollout(**hist, actions=acts)
    z = cfg.slot_dim + 6
    assert r.states.shape == (2, 3, horizon, cfg.num_slots, z) and r.robot.shape == (2, 3, horizon, 6)
    assert r.positions.shape == (2, 3, horizon, cfg.num_slots, 2) and torch.isfinite(r.states).all()
    # candidates are independent: one alone gives the same prediction as within the batch
    one = model.rollout(**{k: v[1:] for k, v in hist.items()}, actions=acts[1:, 2:3])
    torch.testing.assert_close(one.states[0, 0], r.states[1, 2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(r.states[:, 0], r.states[:, 1])  # different actions, different futures
    # the history computed once for all candidates gives what recomputing it per candidate gives
    plain = model.rollout(**hist, actions=acts, share_history=False)
    torch.testing.assert_close(r.states, plain.states, atol=1e-5, rtol=1e-5)
    short_hist = {k: v[:, 1:] for k, v in hist.items()}
    torch.testing.assert_close(model.rollout(**short_hist, actions=acts).states,
                               model.rollout(**short_hist, actions=acts, share_history=False).states,
                               atol=1e-5, rtol=1e-5)
    # causal rollouts: a longer horizon leaves the first frames as they were
    short = model.rollout(**hist, actions=acts[:, :, :2 * cfg.frameskip])
    torch.testing.assert_close(short.states, r.states[:, :, :2], atol=1e-5, rtol=1e-5)
    # the block-sparse path gives the same shapes; a one-frame history works (padded)
    model.set_sparse(True)
    assert model.rollout(**hist, actions=acts).states.shape == r.states.shape
    model.set_sparse(False)
    first = model.rollout(**{k: v[:, :1] for k, v in hist.items()}, actions=acts)
    assert first.states.shape == r.states.shape and torch.isfinite(first.states).all()


def test_rollout_bad_input_is_a_clear_error():
    model = tiny()
    cfg = model.cfg
    batch = window_batch(model, b=2)
    hist = {"features": batch["features"][:, :3], "cam_pose": batch["cam_pose"][:, :3]}
    ok = torch.zeros(2, 4, 3 * cfg.frameskip, 2)
    with pytest.raises(ValueError, match="horizon of 4 frames needs"):
        model.rollout(**hist, actions=ok, horizon=4)
    with pytest.raises(ValueError, match="whole number of predictor frames"):
        model.rollout(**hist, actions=ok[:, :, :5])
    nan = ok.clone()
    nan[0, 1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.rollout(**hist, actions=nan)
    with pytest.raises(ValueError, match=r"actions must be \(B=2"):
        model.rollout(**hist, actions=ok[:1])
    with pytest.raises(ValueError, match="history features must be"):
        model.rollout(features=hist["features"][..., :-1], cam_pose=hist["cam_pose"], actions=ok)
    with pytest.raises(ValueError, match="past_actions must be"):
        model.rollout(**hist, actions=ok, past_actions=torch.zeros(2, 1, cfg.frameskip, 2))


# ---------------------------------------------------------------------------- training loss


@pytest.mark.parametrize("variant", [{}, {"physics": False, "constant_appearance": False, "masking": False},
                                     {"ema_target": True}])
def test_loss_parts_and_training_lowers_it(variant):
    model = tiny(**variant).train()
    batch = window_batch(model, b=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(12):
        loss, parts = predictor_loss(model, batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target()
        losses.append(parts["loss"])
    assert {"position", "probe", "loss", "future_pos_err_m"} <= set(parts)
    assert ("gates" in parts) == model.cfg.physics and ("latent" in parts) == (not model.cfg.constant_appearance)
    assert ("anti_collapse" in parts) == model.cfg.ema_target
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_results_are_deterministic_under_a_seed():
    a, b = tiny(), tiny()
    batch = window_batch(a)
    la, _ = predictor_loss(a, batch, torch.Generator().manual_seed(3))
    lb, _ = predictor_loss(b, batch, torch.Generator().manual_seed(3))
    assert la.item() == lb.item()
    acts = torch.ones(3, 2, 4, 2) * 0.1
    hist = {"features": batch["features"][:, :3], "cam_pose": batch["cam_pose"][:, :3], "actions": acts}
    assert torch.equal(a.rollout(**hist).states, b.rollout(**hist).states)


# ---------------------------------------------------------------------------- ego-train-wm stage=predictor


def test_train_stage_cache_checkpoint_and_resume(tmp_path, wm_dataset):
    from worldmodel.train import train
    from worldmodel.train_predictor import load_predictor

    enc = tmp_path / "enc"
    train(out=str(enc), progress=False, data={"paths": [wm_dataset]},
          model={"dim": 32, "layers": 1, "heads": 2, "slot_dim": 16, "decoder_hidden": 32, "num_slots": 4},
          train={"batch_size": 1, "clip_len": 2, "steps": 1, "warmup": 1, "threads": 1})
    out = tmp_path / "pred"
    predictor = {"model": {"history": 2, "future": 2, "frameskip": 1, "dim": 32, "layers": 1, "heads": 2,
                           "interaction_hidden": 16, "mask_slots": 1},
                 "steps": 3, "stop_at": 2, "batch_size": 4, "segment_len": 8, "log_every": 1, "ckpt_every": 1,
                 "warmup": 1, "threads": 1}
    run = dict(stage="predictor", out=str(out), encoder=str(enc), progress=False, data={"paths": [wm_dataset]})
    m = train(**run, predictor=predictor)
    assert m["step"] == 2 and m["stage"] == "predictor"
    for f in ("config.yaml", "model.safetensors", "stats.json", "metrics.json", "train_state.pt", "report.md",
              "loss.png"):
        assert (out / f).exists(), f
    assert list((out / "tb").iterdir())
    caches = list((out / "cache").glob("slots_*.npz"))
    assert len(caches) == 1
    with np.load(caches[0]) as z:
        assert z["features"].shape[1:] == (8, 4, 16 + 5) and z["slot_object"].shape[1] == 4
    stamp = caches[0].stat().st_mtime_ns

    model = load_predictor(out)
    assert model.cfg.slot_dim == 16 and model.cfg.num_slots == 4 and not model.training
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["slot_mean"]) == 16 and Path(stats["encoder"]) == enc

    m = train(**run, predictor=predictor | {"stop_at": 0})  # resumes, reusing the cache
    assert m["step"] == 3
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2, 3]
    assert caches[0].stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="different run"):
        train(**run, predictor=predictor | {"model": predictor["model"] | {"dim": 64}})
    with pytest.raises(ValueError, match="not an encoder checkpoint directory"):
        train(**run | {"encoder": str(tmp_path / "none")}, predictor=predictor)
