"""The policy end to end on real demonstrations: observations, windows, training, the controller,
ego-eval and checkpoint checks. Tiny models, a few real MuJoCo episodes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from policies.controller import CheckpointMismatch, DiffusionPolicyController
from policies.data import DemoData, load_demos
from policies.evaluate import run as run_eval
from policies.observation import (
    NEVER_SEEN_AGE,
    TOKEN_EXTRA_DIM,
    SlotMemory,
    frame_tokens,
    odometry,
    rgbd_image,
    slot_tokens,
)
from policies.train import PolicyDataConfig, demo_paths, load_policy, train
from sim.env import EgoPushEnv
from sim.evaluate import evaluate
from worldmodel.checkpoint import save_checkpoint
from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder, default_stats

TINY_POLICY = {"down_dims": [16, 32], "n_groups": 4, "cond_dim": 32, "set_hidden": 32, "set_layers": 1, "cnn_width": 8}


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> str:
    from sim.collect import collect

    out = Path(tmp_path_factory.mktemp("demos")) / "single_easy.zarr"
    collect(out=str(out), task="single", level="easy", policy="expert", episodes=3, max_steps=30, workers=0,
            progress=False)
    return str(out)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = EncoderConfig(dim=32, layers=1, heads=2, slot_dim=16, decoder_hidden=32, num_slots=4, pixel_embed=0)
    d = Path(tmp_path_factory.mktemp("enc")) / "wm_encoder"
    save_checkpoint(d, ObjectCentricEncoder(cfg), {"stage": "encoder", "model": asdict(cfg)}, default_stats(), {})
    return d


def _train(out: Path, demos: str, encoder_dir: Path, obs: str = "slots", steps: int = 30, distill: int = 10,
           train_overrides: dict | None = None, **extra) -> dict:
    return train({"out": str(out), "encoder": str(encoder_dir), "progress": False,
                  "data": {"paths": [demos], "task": "single", "level": "easy"},
                  "policy": {**TINY_POLICY, "obs": obs},
                  "train": {"steps": steps, "distill_steps": distill, "batch_size": 16, "warmup": 2, "lr": 1e-3,
                            "log_every": 1, "ckpt_every": 1000, "time_budget_min": 0, **(train_overrides or {})},
                  **extra})


@pytest.fixture(scope="module")
def slots_policy(tmp_path_factory, demos, encoder_dir) -> Path:
    out = Path(tmp_path_factory.mktemp("pol")) / "policy_slots"
    _train(out, demos, encoder_dir, steps=60)
    return out


# ---------------------------------------------------------------------------- observations and data


def _tokens(centre, pixels, cam, memory=None, colour=None, tag=None):
    """Tokens of one stream's K slots at world `centre` (K, 3) with `pixels` (K,): slot vector (1,) = `tag`; no
    slot is cut by the image's side (`sides` all 0)."""
    k = len(centre)
    tag = torch.arange(k, dtype=torch.float32) if tag is None else torch.tensor(tag, dtype=torch.float32)
    colour = torch.full((k, 3), 0.5) if colour is None else torch.tensor(colour, dtype=torch.float32)
    return slot_tokens(tag.view(1, k, 1), colour[None], torch.tensor(centre, dtype=torch.float32)[None],
                       torch.tensor([pixels], dtype=torch.float32), cam[None] if cam.dim() == 2 else cam, 4096,
                       memory, sides=torch.zeros(1, k, 5))[0]


def _camera_along_x(x: float = 0.0) -> torch.Tensor:
    cam = torch.eye(4)
    cam[:3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # optical z = world +x
    cam[0, 3] = x
    return cam


def test_slot_tokens_put_a_point_ahead_of_the_camera_forward():
    # a camera at (1, 2) looking along world +y: optical x (right) = world -x, y (down) = world -z,
    # z (forward) = world +y. A slot 0.5 m further along +y and 0.2 m towards world +x (the camera's
    # right) is at forward 0.5, left -0.2.
    cam = torch.eye(4)
    cam[:3, 0] = torch.tensor([-1.0, 0, 0])
    cam[:3, 1] = torch.tensor([0, 0, -1.0])
    cam[:3, 2] = torch.tensor([0, 1.0, 0])
    cam[:2, 3] = torch.tensor([1.0, 2.0])
    tok = _tokens([[0.8, 2.5, 0.1]], [100.0], cam, colour=[[0.9, 0.1, 0.1]])
    assert tok.shape == (1, 1 + TOKEN_EXTRA_DIM)
    np.testing.assert_allclose(tok[0, 1:4].numpy(), [0.9, 0.1, 0.1], atol=1e-6)  # colour
    np.testing.assert_allclose(tok[0, 4:7].numpy(), [0.5, 0.2, 0.1], atol=1e-6)
    np.testing.assert_allclose(tok[0, 7:9].numpy(), np.array([0.5, 0.2]) / math.hypot(0.2, 0.5), atol=1e-6)
    assert 0 < tok[0, 9] < 1 and tok[0, 10] == 0  # some pixels; seen now
    np.testing.assert_allclose(odometry(cam, cam).numpy(), [0, 0, 1, 0], atol=1e-6)
    turned = cam.clone()
    turned[:2, 3] = torch.tensor([1.0, 3.0])  # 1 m ahead of the start pose, same heading
    np.testing.assert_allclose(odometry(turned, cam).numpy(), [1, 0, 1, 0], atol=1e-6)


def test_slot_memory_keeps_the_last_seen_centre_in_the_robots_frame():
    mem = SlotMemory()
    # slot 0 sees an object 1 m ahead, 0.5 m left; slot 1 holds nothing
    t0 = _tokens([[1.0, 0.5, 0.05], [0.0, 0.0, 0.0]], [50.0, 0.0], _camera_along_x(), mem)
    np.testing.assert_allclose(t0[0, 4:6].numpy(), [1.0, 0.5], atol=1e-6)
    assert t0[0, 10] == 0 and t0[1, 10] == pytest.approx(1.0)  # track 1: never seen
    # the robot drives 0.4 m forward and the object leaves the view (0 pixels, centre = camera)
    t1 = _tokens([[0.4, 0.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0], _camera_along_x(0.4), mem)
    np.testing.assert_allclose(t1[0, 4:7].numpy(), [0.6, 0.5, 0.05], atol=1e-6)  # remembered, robot frame
    assert t1[0, 9] == 0 and 0 < t1[0, 10] < 0.2  # no pixels now; seen one step ago
    no_memory = _tokens([[0.4, 0.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0], _camera_along_x(0.4))
    np.testing.assert_allclose(no_memory[0, 4:6].numpy(), [0.0, 0.0], atol=1e-6)
    assert no_memory[0, 10] == pytest.approx(1.0) and NEVER_SEEN_AGE > 100


def test_slot_memory_follows_an_object_that_changes_slot():
    """Slot indices are not identities: the tracks are. A red box handed from slot 0 to slot 2 over a
    few frames (both holding part of it on the way) stays on one track, with no copy left behind; a
    green disc that leaves the view keeps its track while its slot goes on to the floor."""
    red, green, grey = [0.8, 0.1, 0.1], [0.2, 0.7, 0.3], [0.55, 0.5, 0.45]
    mem, cam = SlotMemory(), _camera_along_x()
    frames = [  # slot 0, 1, 2: (centre, pixels, colour)
        ([[1.0, 0.0, 0.05], [1.5, 0.3, 0.0], [2.0, 0.0, 0.0]], [300, 40, 0], [red, green, grey]),
        ([[1.02, 0.0, 0.05], [1.5, 0.3, 0.0], [1.05, 0.02, 0.05]], [200, 40, 100], [red, green, red]),
        ([[1.5, -0.5, 0.0], [1.5, 0.3, 0.0], [1.04, 0.0, 0.05]], [3000, 0, 300], [grey, grey, red]),
        ([[1.5, -0.5, 0.0], [1.4, -0.6, 0.0], [1.06, 0.0, 0.05]], [3000, 500, 300], [grey, grey, red]),
    ]
    for centre, pixels, colour in frames:
        tok = _tokens(centre, pixels, cam, mem, colour, tag=[0, 1, 2])
    box = [k for k in range(3) if np.allclose(tok[k, 1:4].numpy(), red)]
    disc = [k for k in range(3) if np.allclose(tok[k, 1:4].numpy(), green)]
    assert box == [0] and tok[0, 0] == 2  # the box kept its first track, now fed by slot 2
    np.testing.assert_allclose(tok[0, 4:6].numpy(), [1.06, 0.0], atol=1e-5)
    assert disc == [1] and tok[1, 9] == 0 and tok[1, 10] > 0  # remembered, unseen for two frames
    np.testing.assert_allclose(tok[1, 4:6].numpy(), [1.5, 0.3], atol=1e-5)
    assert tok[2, 10] == 0 and not np.allclose(tok[2, 1:4].numpy(), red)  # the floor took the third track


@pytest.mark.parametrize("forget_steps", [5, 50])
def test_slot_memory_hands_an_unseen_track_to_a_new_object_only_after_forget_steps(forget_steps):
    """Two tracks, both used: a green disc out of view, a red box in view. A blue object that comes
    into view takes the disc's track once the disc has gone unseen for over `forget_steps` steps;
    before that it goes untracked and the disc stays remembered."""
    red, green, blue = [0.8, 0.1, 0.1], [0.2, 0.7, 0.3], [0.1, 0.2, 0.8]
    mem, cam = SlotMemory(forget_steps=forget_steps), _camera_along_x()
    _tokens([[1.5, 0.3, 0.0], [1.0, 0.0, 0.05]], [40, 300], cam, mem, [green, red])
    for step in range(1, 21):  # the disc is gone; from step 3 on, slot 0 sees a blue object far from it
        new = step >= 3
        tok = _tokens([[1.2, -0.6, 0.05] if new else [0.0, 0.0, 0.0], [1.0, 0.0, 0.05]], [60 if new else 0, 300],
                      cam, mem, [blue if new else green, red])
    if forget_steps < 20:
        np.testing.assert_allclose(tok[0, 1:4].numpy(), blue, atol=1e-6)
        assert tok[0, 10] == 0
    else:
        np.testing.assert_allclose(tok[0, 1:4].numpy(), green, atol=1e-6)
        np.testing.assert_allclose(tok[0, 4:6].numpy(), [1.5, 0.3], atol=1e-5)
    with pytest.raises(ValueError, match="forget_steps"):
        SlotMemory(forget_steps=0)


def test_token_tail_reads_only_a_tracks_colour_and_geometry():
    from policies.policy import DiffusionPolicy, PolicyConfig

    dim, k = 16 + TOKEN_EXTRA_DIM, 4
    stats = {"token_mean": [0.0] * dim, "token_std": [1.0] * dim, "state_mean": [0.0] * 8, "state_std": [1.0] * 8,
             "action_min": [-0.25, -2.0], "action_max": [0.25, 2.0]}
    torch.manual_seed(0)
    pol = DiffusionPolicy(PolicyConfig(obs="slots", token_dim=dim, num_slots=k, state_dim=8,
                                       token_tail=TOKEN_EXTRA_DIM), stats).eval()
    obs, state = torch.randn(1, 2, k, dim), torch.randn(1, 2, 8)
    other_vectors = obs.clone()
    other_vectors[..., :16] = torch.randn(1, 2, k, 16)
    other_colour = obs.clone()
    other_colour[..., 16:19] += 1.0
    with torch.no_grad():
        c = pol.condition(obs, state)
        assert torch.equal(c, pol.condition(other_vectors, state))
        assert not torch.allclose(c, pol.condition(other_colour, state))
    with pytest.raises(ValueError, match="token_tail"):
        DiffusionPolicy(PolicyConfig(obs="slots", token_dim=dim, num_slots=k, state_dim=8, token_tail=dim + 1), stats)


def test_rgbd_image_scales_and_zeroes_invalid_depth():
    rgb = np.full((4, 4, 3), 255, np.uint8)
    depth = np.full((4, 4), 1.5, np.float32)
    depth[0, 0] = np.nan
    x = rgbd_image(rgb, depth)
    assert x.shape == (4, 4, 4)
    assert float(x[:3].min()) == 1.0 and float(x[3, 0, 0]) == 0.0 and float(x[3, 1, 1]) == pytest.approx(0.5)


def test_windows_clamp_to_their_episode():
    d = DemoData(state=np.zeros((10, 8), np.float32), action=np.arange(20, dtype=np.float32).reshape(10, 2),
                 starts=np.array([0, 4]), ends=np.array([4, 10]))
    obs, act = d.window_index(np.array([0, 3, 4, 9]), n_obs=2, horizon=4)
    np.testing.assert_array_equal(obs, [[0, 0], [2, 3], [4, 4], [8, 9]])
    np.testing.assert_array_equal(act, [[0, 0, 1, 2], [2, 3, 3, 3], [4, 4, 5, 6], [8, 9, 9, 9]])
    d.chunk = np.full((10, 3, 2), np.nan, np.float32)  # step 3 labelled with a chunk of its own (DAgger)
    d.chunk[3] = [[-1, -1], [-2, -2], [-3, -3]]
    d.tokens = np.zeros((10, 1, 3), np.float32)
    a = d.sample(np.array([3, 4]), n_obs=2, horizon=4, kind="slots")["action"].numpy()[..., 0]
    np.testing.assert_array_equal(a, [[4, -1, -2, -3], [8, 8, 10, 12]])  # past label, then the chunk


def test_remembered_positions_hold_the_last_seen_place_in_the_robots_frame():
    """The auxiliary targets: where each object was last seen, in the robot's current frame, and nothing
    for what has not been seen yet."""
    from policies.data import remembered_positions

    ep = {"robot_pose": np.array([[0.0, 0.0, 0.0], [0.5, 0.0, math.pi / 2]]),
          "object_poses": np.array([[[1.0, 0.0, 0.0]], [[2.0, 2.0, 0.0]]]),  # moved out of view at step 1
          "goal": np.array([[[3.0, 1.0]], [[3.0, 1.0]]]),
          "visible": np.array([[True], [False]]), "goal_visible": np.array([[False], [False]])}
    aux = remembered_positions(ep)
    assert aux.shape == (2, 2, 3) and aux.dtype == np.float32
    np.testing.assert_allclose(aux[0, 0], [1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(aux[1, 0], [0.0, -0.5, 1.0], atol=1e-6)  # 0.5 m behind the turned robot's right
    np.testing.assert_array_equal(aux[:, 1], 0.0)  # the goal: never in view


def test_slot_tokens_of_the_demos_equal_the_controllers(demos, encoder_dir):
    """Training reads the slots the controller computes on the robot: the same encoder stream gives
    the same tokens."""
    from policies.data import FRAME_KEYS, encode_episodes
    from sim.dataset import EpisodeDataset
    from worldmodel.train import load_encoder

    enc = load_encoder(encoder_dir)
    ep = EpisodeDataset.open(demos).episode(0, [*FRAME_KEYS, "action"])
    offline = encode_episodes(enc, [ep], batch=1, seed=3, progress=False)
    torch.manual_seed(3)
    state, online, memory = None, [], SlotMemory()
    for t in range(len(ep["rgb"])):
        frame = {k: torch.from_numpy(ep[k][t:t + 1]) for k in ("rgb", "depth", "intrinsics", "cam_pose")}
        out, state = enc.step(frame["rgb"], frame["depth"].float(), frame["intrinsics"].float(),
                              frame["cam_pose"].float(), state)
        online.append(frame_tokens(out, frame["cam_pose"].float(), memory)[0].numpy())
    np.testing.assert_allclose(offline, np.stack(online), atol=1e-5)
    data = load_demos([demos], "slots", enc, progress=False)
    assert data.tokens.shape == (data.n_steps, 4, 16 + TOKEN_EXTRA_DIM) and np.isfinite(data.tokens).all()


# ---------------------------------------------------------------------------- training and checkpoints


def test_training_lowers_the_loss_and_writes_a_complete_checkpoint(slots_policy):
    m = json.loads((slots_policy / "metrics.json").read_text())
    losses = [h["diffusion"] for h in m["history"]]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    assert m["finished"] and m["distill_steps"] == 10
    for f in ("config.yaml", "model.safetensors", "stats.json", "metrics.json", "report.md", "loss.png",
              "encoder/model.safetensors"):
        assert (slots_policy / f).is_file(), f
    stats = json.loads((slots_policy / "stats.json").read_text())
    model, _ = load_policy(slots_policy)
    a = torch.tensor([[stats["action_min"][0], stats["action_max"][1]], [0.1, -0.5]])
    np.testing.assert_allclose(model.unnormalise_action(model.normalise_action(a)).numpy(), a.numpy(), atol=1e-6)
    assert bool(model.distilled) and model.cfg.aux_targets == 0  # no auxiliary head by default


def test_auxiliary_read_out_of_the_objects_learns(tmp_path, demos, encoder_dir):
    m = _train(tmp_path / "policy_aux", demos, encoder_dir, steps=40, distill=0, train_overrides={"aux_weight": 1.0})
    aux = [h["aux"] for h in m["history"]]  # where the 3 objects and the goal were last seen, from the conditioning
    assert np.mean(aux[-10:]) < 0.7 * np.mean(aux[:5])
    model, _ = load_policy(tmp_path / "policy_aux")
    assert model.cfg.aux_targets == 4


def test_rerun_of_a_finished_run_resumes_without_training(slots_policy, demos, encoder_dir):
    before = (slots_policy / "model.safetensors").read_bytes()
    m = _train(slots_policy, demos, encoder_dir, steps=60)
    assert m["diffusion_steps"] == 60 and (slots_policy / "model.safetensors").read_bytes() == before


def test_a_run_that_finds_its_demonstrations_encoded_trains_the_same_weights(tmp_path, demos, encoder_dir):
    """The first run encodes the demonstrations into its cache (drawing the slots' first-frame noise), the
    second finds them there: both start from the same weights and train the same policy."""
    cache = tmp_path / "cache"
    for name in ("encoded", "cached"):
        _train(tmp_path / name, demos, encoder_dir, steps=5, distill=0, cache_dir=str(cache))
    assert len(list(cache.glob("*.npy"))) == 1
    assert (tmp_path / "encoded" / "model.safetensors").read_bytes() == \
        (tmp_path / "cached" / "model.safetensors").read_bytes()


def test_the_distillation_phase_keeps_a_time_budget_of_its_own(tmp_path, demos, encoder_dir):
    # the diffusion phase unbounded (0), the distillation's budget spent by its first step
    m = _train(tmp_path / "p", demos, encoder_dir, obs="cnn", steps=3, distill=50,
               train_overrides={"distill_time_budget_min": 1e-6})
    assert m["diffusion_steps"] == 3 and m["distill_steps"] == 1


def test_default_demonstrations_of_another_expert_go_to_a_dataset_of_their_own(tmp_path):
    """data.expert: the expert's settings reach the collector and name the default dataset, so demonstrations
    of the plain expert are never reused for another one (nor appended to)."""
    from sim.dataset import EpisodeDataset

    cfg = PolicyDataConfig(root=str(tmp_path), episodes=1, max_steps=20, workers=0, expert={"goal_range_m": 1.2})
    (path,) = demo_paths(cfg, progress=False)
    assert Path(path).name == "single_easy_goal_range_m1.2.zarr"
    assert EpisodeDataset.open(path).meta["policy"]["expert"] == {"goal_range_m": 1.2}
    (plain,) = demo_paths(PolicyDataConfig(root=str(tmp_path), episodes=1, max_steps=20, workers=0), progress=False)
    assert Path(plain).name == "single_easy.zarr"


def test_rerun_after_the_demonstrations_changed_refuses_to_resume(demos, encoder_dir, tmp_path):
    """A finished run would otherwise be taken as done although its datasets gained episodes since."""
    import shutil

    from sim.collect import collect

    mine = str(tmp_path / "demos.zarr")
    shutil.copytree(demos, mine)
    _train(tmp_path / "p", mine, encoder_dir, obs="cnn", steps=2, distill=0)
    _train(tmp_path / "p", mine, encoder_dir, obs="cnn", steps=2, distill=0)  # unchanged: resumes as finished
    collect(out=mine, task="single", level="easy", policy="expert", episodes=4, max_steps=30, workers=0,
            progress=False)  # one episode more
    with pytest.raises(ValueError, match="trained on other demonstrations"):
        _train(tmp_path / "p", mine, encoder_dir, obs="cnn", steps=2, distill=0)


def _episode_obs(seed: int = 1000, n: int = 6):
    env = EgoPushEnv(task="single", level="easy")
    obs, info = env.reset(seed=seed)
    frames = [(obs, info)]
    for _ in range(n - 1):
        obs, *_, info = env.step(np.array([0.1, 0.3], np.float32))
        frames.append((obs, info))
    env.close()
    return frames


@pytest.mark.parametrize("sampler,steps", [("ddim", 8), ("consistency", 1), ("consistency", 2)])
def test_controller_actions_are_bounded_deterministic_and_survive_reloading(slots_policy, sampler, steps):
    frames = _episode_obs()
    runs = []
    for _ in range(2):  # two fresh loads of the checkpoint
        c = DiffusionPolicyController(slots_policy, task="single", sampler=sampler, steps=steps)
        c.reset(*frames[0])
        runs.append(np.stack([c.act(o, i) for o, i in frames]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert runs[0].shape == (len(frames), 2)
    model, _ = load_policy(slots_policy)
    lo, hi = model.action_min.numpy(), model.action_max.numpy()
    assert (runs[0] >= lo - 1e-6).all() and (runs[0] <= hi + 1e-6).all()
    assert len(c.planned_actions()) == c.n_action - len(frames) % c.n_action or len(frames) % c.n_action == 0


def test_cnn_policy_trains_and_drives(tmp_path, demos, encoder_dir):
    out = tmp_path / "policy_cnn"
    m = _train(out, demos, encoder_dir, obs="cnn", steps=4, distill=2)
    assert m["diffusion_steps"] == 4 and not (out / "encoder").exists()
    frames = _episode_obs(n=3)
    c = DiffusionPolicyController(out)
    c.reset(*frames[0])
    acts = np.stack([c.act(o, i) for o, i in frames])
    assert acts.shape == (3, 2) and np.isfinite(acts).all()


def test_checkpoint_from_another_task_or_image_size_is_refused(slots_policy):
    with pytest.raises(CheckpointMismatch, match="trained on task 'single', not 'formation'"):
        DiffusionPolicyController(slots_policy, task="formation")
    env = EgoPushEnv(task="single", level="easy", image_size=96)
    obs, info = env.reset(seed=0)
    env.close()
    c = DiffusionPolicyController(slots_policy)
    with pytest.raises(CheckpointMismatch, match="expects 64x64 images, the env gives 96x96"):
        c.reset(obs, info)


def test_weights_that_do_not_match_the_config_are_named(slots_policy, tmp_path):
    import shutil

    import yaml

    bad = tmp_path / "bad"
    shutil.copytree(slots_policy, bad)
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["policy"]["cond_dim"] = 48
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_policy(bad)


# ---------------------------------------------------------------------------- ego-eval


def test_ego_eval_of_the_expert_reproduces_the_experts_success(tmp_path):
    ours = run_eval(controller="expert", task="single", level="easy", episodes=3, workers=0, videos="none",
                    out=str(tmp_path / "e"), progress=False)
    direct = evaluate("sim.experts.PushExpert", "single", "easy", 3, seed=1000, workers=0, progress=False)
    assert [r["success"] for r in ours["results"]] == [r["success"] for r in direct["results"]]
    assert ours["success_rate"] == direct["success_rate"] == 1.0
    report = (tmp_path / "e" / "report.md").read_text()
    assert (tmp_path / "e" / "metrics.json").is_file() and "success rate" in report
    assert "episodes by goals filled at the end: 0: 0, 1: 3" in report


def test_ego_eval_of_a_policy_writes_failure_videos(slots_policy, tmp_path):
    r = run_eval(checkpoint=str(slots_policy), episodes=2, workers=0, max_steps=12, out=str(tmp_path / "e"),
                 progress=False)
    assert r["episodes"] == 2 and 0.0 <= r["success_rate"] <= 1.0
    failed = [x for x in r["results"] if not x["success"]]
    assert all(Path(x["video"]).is_file() for x in failed)


def test_ego_eval_passes_n_action_to_the_controller(slots_policy):
    from hydra.utils import instantiate

    from policies.evaluate import EvalConfig, controller_target

    target = controller_target(EvalConfig(checkpoint=str(slots_policy), n_action=2))
    assert target["n_action"] == 2 and instantiate(target).n_action == 2
    assert "n_action" not in controller_target(EvalConfig(checkpoint=str(slots_policy)))
    # the tracker's memory: the policy's own, or what ego-eval says
    assert instantiate(target).forget_steps == 50
    assert instantiate(controller_target(EvalConfig(checkpoint=str(slots_policy), forget_steps=300))).forget_steps == 300


def test_ego_eval_builds_the_token_controller(slots_policy, tmp_path):
    from hydra.utils import instantiate

    from policies.evaluate import EvalConfig, controller_target
    from policies.task_tokens import TokenPolicyController

    target = controller_target(EvalConfig(controller="tokens", checkpoint=str(slots_policy), n_action=2, plan=True))
    assert target["perception"] is None and target["plan"] is True
    controller = instantiate(target)
    assert isinstance(controller, TokenPolicyController) and controller.n_action == 2 and controller.plan
    assert controller.sampler is None  # the checkpoint's own sampler
    ddim = instantiate(controller_target(EvalConfig(controller="tokens", checkpoint=str(slots_policy), sampler="ddim",
                                                    steps=3)))
    assert (ddim.sampler, ddim.steps) == ("ddim", 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenPolicyController(str(slots_policy), perception=str(tmp_path / "no_segmenter"))


def test_same_noise_draws_every_chunk_of_an_episode_from_one_noise(slots_policy):
    from policies.evaluate import EvalConfig, controller_target

    frames = _episode_obs(n=1)
    chunks = {}
    for same in (False, True):
        c = DiffusionPolicyController(slots_policy, same_noise=same, sampler="ddim", steps=2)
        c.reset(*frames[0])
        c.act(*frames[0])
        chunks[same] = (c.sample_chunks(1), c.sample_chunks(1))
    assert not np.allclose(*chunks[False])  # fresh noise: the same observation gives another chunk
    np.testing.assert_array_equal(*chunks[True])
    assert controller_target(EvalConfig(checkpoint=str(slots_policy), same_noise=True))["same_noise"] is True


def test_coherence_runs_the_sample_that_best_continues_the_current_chunk(slots_policy):
    from policies.evaluate import EvalConfig, controller_target

    frames = _episode_obs(n=5)
    c = DiffusionPolicyController(slots_policy, coherence=8, n_action=2, sampler="ddim", steps=2)
    c.reset(*frames[0])
    c.act(*frames[0])  # the first chunk: the medoid of 8 samples
    first = c.last_selection
    assert first["cost"].shape == (8,) and first["best"] == int(np.argmin(first["cost"]))
    rest = c._rest.copy()
    assert len(rest) == c.policy.cfg.horizon - c.policy.cfg.n_obs + 1 - 2
    state = c._gen.get_state()
    c.act(*frames[1])
    c.act(*frames[2])  # a new chunk is due: 8 samples, the one nearest the rest of the last chunk runs
    sel = c.last_selection
    c._gen.set_state(state)  # the same 8 samples again, to check the choice by hand
    span = (c.policy.action_max - c.policy.action_min).numpy()
    ahead = c.sample_chunks(8)[:, c.policy.cfg.n_obs - 1:]
    n = len(rest)
    w = 0.9 ** np.arange(n)
    dist = ((((ahead[:, :n] - rest) / span) ** 2).sum(-1) * w).sum(-1)
    assert sel["best"] == int(np.argmin(dist)) and np.ptp(dist) > 0
    np.testing.assert_allclose(sel["cost"], dist / w.sum(), rtol=1e-5)
    assert controller_target(EvalConfig(checkpoint=str(slots_policy), coherence=8))["coherence"] == 8
    with pytest.raises(ValueError, match="choose one way"):
        DiffusionPolicyController(slots_policy, coherence=4, select=4, predictor="x")
    with pytest.raises(ValueError, match="coherence_decay"):
        DiffusionPolicyController(slots_policy, coherence=4, coherence_decay=0.0)


def test_ego_eval_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(ValueError, match="not a policy directory"):
        run_eval(checkpoint=str(tmp_path / "nothing"), episodes=1, workers=0)


def test_world_model_guided_selection_executes_the_chunk_the_predictor_scores_best(slots_policy, encoder_dir,
                                                                                   tmp_path):
    from worldmodel.predictor import CausalJEPAPredictor, PredictorConfig

    pcfg = PredictorConfig(slot_dim=16, num_slots=4, history=3, future=2, frameskip=2, dim=32, layers=1, heads=2,
                           interaction_hidden=16)
    torch.manual_seed(0)
    model = CausalJEPAPredictor(pcfg)
    with torch.no_grad():  # the interaction heads start at zero (nothing would move)
        for p in model.dynamics.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    pred = tmp_path / "wm_predictor"
    save_checkpoint(pred, model, {"stage": "predictor", "encoder": str(encoder_dir),
                                  "predictor": {"model": asdict(pcfg)}},
                    {"slot_mean": [0.0] * 16, "slot_std": [1.0] * 16}, {})
    frames = _episode_obs(n=10)
    c = DiffusionPolicyController(slots_policy, select=6, predictor=str(pred), sampler="ddim", steps=2)
    c.reset(*frames[0])
    acts = [c.act(o, i) for o, i in frames]
    sel = c.last_selection
    assert sel["cost"].shape == (6,) and np.isfinite(sel["cost"]).all()
    assert sel["best"] == int(np.argmin(sel["cost"])) and sel["cost"].std() > 0  # candidates differ
    assert len(c.selector.executed) == len(frames) == len(c.selector.features)
    assert np.isfinite(np.stack(acts)).all()
    with pytest.raises(ValueError, match="needs predictor"):
        DiffusionPolicyController(slots_policy, select=4)


# -- DAgger and fine-tuning ------------------------------------------------------


def test_dagger_controller_drives_with_the_learner_and_labels_with_the_expert(slots_policy):
    from policies.dagger import DAggerController
    from sim.experts import PushExpert

    frames = _episode_obs(n=5)
    learner = DiffusionPolicyController(slots_policy, task="single")
    expert = PushExpert()
    learner.reset(*frames[0])
    expert.reset(*frames[0])
    want_exec = [learner.act(o, i) for o, i in frames]
    want_label = [expert.act(o, i) for o, i in frames]
    for beta, executed in ((0.0, want_exec), (1.0, want_label)):
        c = DAggerController(str(slots_policy), beta=beta, task="single", labels="step")
        c.reset(*frames[0])
        for (o, i), e, lab in zip(frames, executed, want_label):
            np.testing.assert_array_equal(c.act(o, i), e)
            np.testing.assert_array_equal(c.label, lab)
    with pytest.raises(ValueError, match="beta"):
        DAggerController(str(slots_policy), beta=1.5)
    # the labelling expert has the demonstrations' settings (ego-dagger passes the base policy's data.expert)
    assert DAggerController(str(slots_policy), expert={"goal_range_m": 1.2}).expert.cfg.goal_range_m == 1.2
    with pytest.raises(ValueError, match="unknown expert settings"):
        DAggerController(str(slots_policy), expert={"goal_rang": 1.2})
    c = DAggerController(str(slots_policy))
    c.reset(*frames[0])
    with pytest.raises(RuntimeError, match="bind_env"):  # chunk labels look ahead in the env
        c.act(*frames[0])


def test_dagger_chunk_labels_are_what_the_expert_would_drive_from_the_learners_state(slots_policy):
    """The chunk label of a state the learner reached equals the actions of an expert (that saw the same
    frames) driving from that state, and labelling leaves the simulator where it was."""
    from policies.dagger import DAggerController
    from sim.experts import PushExpert

    env = EgoPushEnv(task="single", level="easy")
    obs, info = env.reset(seed=1003)
    c = DAggerController(str(slots_policy), task="single")
    c.bind_env(env)
    shadow = PushExpert()  # sees every frame c's expert sees
    c.reset(obs, info)
    shadow.reset(obs, info)
    for _ in range(4):  # the learner drives
        shadow.act(obs, info)
        obs, _, _, _, info = env.step(c.act(obs, info))
    pose, steps = env.robot_pose(), info["step"]
    c.act(obs, info)
    chunk = c.label_chunk
    assert chunk.shape == (15, 2) and np.array_equal(chunk[0], c.label)
    np.testing.assert_array_equal(env.robot_pose(), pose)  # rewound
    driven = []
    for _ in range(15):  # now the shadow expert drives
        driven.append(shadow.act(obs, info))
        obs, _, _, _, info = env.step(driven[-1])
    np.testing.assert_allclose(np.stack(driven), chunk, atol=1e-6)
    assert info["step"] == steps + 15
    assert not np.allclose(chunk, chunk[:1])  # a plan, not one action repeated


def test_ego_dagger_round_labels_learner_episodes_and_fine_tunes_from_the_learner(slots_policy, demos, tmp_path):
    from policies.dagger import run_dagger
    from sim.dataset import EpisodeDataset

    train_opts = {"steps": 3, "distill_steps": 2, "batch_size": 8, "warmup": 1, "log_every": 1,
                  "time_budget_min": 0}
    args = dict(policy=str(slots_policy), out=str(tmp_path / "dagger"), demos=[demos], episodes=2, max_steps=12,
                workers=0, train=train_opts, progress=False)
    m = run_dagger(**args)
    (r,) = m["rounds"]
    ds = EpisodeDataset.open(r["data"])
    assert ds.n_episodes == 2 and ds.meta["policy"]["controller"]["checkpoint"] == str(slots_policy)
    ep = ds.episode(0)
    assert len(ep["action"]) == 12 and not np.allclose(ep["action"], ep["executed_action"])  # learner drove
    assert ep["action_chunk"].shape == (12, 15, 2) and np.array_equal(ep["action_chunk"][:, 0], ep["action"])
    assert r["demo_steps"] == len(load_demos([demos], "cnn").action) + 24  # demos + both rollouts
    policy, config = load_policy(r["policy"])
    assert config["init"] == str(slots_policy) and bool(policy.distilled)
    again = run_dagger(**args)  # a rerun resumes: nothing new collected or trained
    assert again["rounds"][0]["steps"] == 0 and again["rounds"][0]["train_steps"] == 3
    with pytest.raises(ValueError, match="not a policy checkpoint"):
        run_dagger(**args | {"policy": str(Path(slots_policy) / "encoder")})


def test_init_starts_from_the_checkpoint_and_refuses_another_shape(slots_policy, demos, encoder_dir, tmp_path):
    out = tmp_path / "ft"
    _train(out, demos, encoder_dir, steps=1, distill=0, init=str(slots_policy),
           train_overrides={"lr": 0.0})
    ours, theirs = load_policy(out)[0].state_dict(), load_policy(slots_policy)[0].state_dict()
    for k in ours:
        if k.startswith(("unet.", "obs_encoder.", "action_")):
            torch.testing.assert_close(ours[k], theirs[k], msg=k)
    with pytest.raises(ValueError, match="down_dims"):
        train({"out": str(tmp_path / "other"), "encoder": str(encoder_dir), "progress": False, "init": str(slots_policy),
               "data": {"paths": [demos], "task": "single", "level": "easy"},
               "policy": {**TINY_POLICY, "down_dims": [8, 16]}, "train": {"steps": 1, "time_budget_min": 0}})
