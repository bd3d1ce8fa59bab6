"""Scene perception (`policies.perception`): segmentation targets, the segmenter's training path, and the
scene memory's world-frame estimates on real rendered frames, with the simulator's own segmentation
standing in for a perfect segmenter so that the geometry is tested apart from any learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.perception import (
    GOAL_CLASS,
    SEG_CLASSES,
    SceneMemory,
    SceneSegmenter,
    SegmenterTrainConfig,
    camera_robot_pose,
    class_targets,
    fit_square,
    load_segmenter,
    train_segmenter,
)
from sim.collect import collect
from sim.env import FIRST_OBJECT_SEG_ID, GOAL_SEG_ID, EgoPushEnv
from sim.experts import PushExpert

CALIBRATED = {"centre_offsets": {"box_anchor": 0.056, "box_red": 0.04, "box_green": 0.04, "box_blue": 0.04,
                                 "distractor_0": 0.035, "distractor_1": 0.03}}


class TruthSegmenter:
    """The env's own per-pixel ids as class labels: a perfect segmenter over the real rendered frame."""

    def __init__(self, env: EgoPushEnv, names: list[str]) -> None:
        self.env, self.names = env, names

    def labels(self, rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
        return class_targets(self.env.segmentation(), self.names)


def test_class_targets_map_simulator_ids_to_named_classes():
    names = ["box_anchor", "box_red", "distractor_1"]
    seg = np.array([[0, 1, 2, FIRST_OBJECT_SEG_ID], [FIRST_OBJECT_SEG_ID + 1, FIRST_OBJECT_SEG_ID + 2, GOAL_SEG_ID,
                                                     GOAL_SEG_ID + 2]], np.uint8)
    want = [[0, 0, 0, SEG_CLASSES.index("box_anchor")],
            [SEG_CLASSES.index("box_red"), SEG_CLASSES.index("distractor_1"), GOAL_CLASS, GOAL_CLASS]]
    np.testing.assert_array_equal(class_targets(seg, names), want)


def test_segmenter_keeps_the_frame_size():
    out = SceneSegmenter()(torch.rand(2, 4, 64, 64))
    assert out.shape == (2, len(SEG_CLASSES), 64, 64) and torch.isfinite(out).all()


def test_camera_robot_pose_recovers_the_axle_pose():
    env = EgoPushEnv(task="single", level="easy")
    obs, info = env.reset(seed=3)
    for _ in range(5):
        obs, *_, info = env.step(np.array([0.2, 0.8], np.float32))
    np.testing.assert_allclose(camera_robot_pose(obs["cam_pose"].astype(np.float64)), info["robot_pose"], atol=1e-3)
    env.close()


@pytest.mark.parametrize("formation", ["line", "cross"])
def test_scene_memory_places_objects_and_formation_slots_from_perfect_labels(formation):
    env = EgoPushEnv(task="formation", level="easy", formation=formation)
    obs, info = env.reset(seed=11)
    names = info["object_names"]
    memory = SceneMemory(TruthSegmenter(env, names), CALIBRATED, names, formation)
    expert = PushExpert()
    expert.reset(obs, info)
    placed = []
    for _ in range(40):  # the expert looks around and starts pushing: the memory watches
        est = memory(obs)
        seen = est["visible"] & np.asarray(info["visible"], bool)
        err = np.linalg.norm(est["object_poses"][seen, :2] - info["object_poses"][seen, :2], axis=-1)
        assert (err < 0.06).all(), err
        if memory.anchor_yaw is not None:
            placed.append(np.linalg.norm(est["goal"] - info["goal"], axis=-1).max())
        obs, _, term, trunc, info = env.step(expert.act(obs, info))
        assert not (term or trunc)
    assert placed and np.median(placed) < 0.04, placed
    env.close()


@pytest.mark.parametrize("yaw_deg", [0.0, 20.0, 65.0])
def test_fit_square_finds_a_box_centre_from_two_faces(yaw_deg):
    """Points on the two faces of a 0.1 m box a camera at the origin sees (and a few on its top) give the
    box's centre, although their median lies 3 to 5 cm nearer the camera."""
    rng = np.random.default_rng(0)
    centre, half, yaw = np.array([0.6, 0.15]), 0.05, np.deg2rad(yaw_deg)
    rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    faces = []
    for normal in ([1, 0], [-1, 0], [0, 1], [0, -1]):
        n = rot @ np.array(normal, float)
        if n @ (centre - 0.0) < 0:  # the faces turned towards the camera
            along = rng.uniform(-half, half, 300)
            t = rot @ np.array([-normal[1], normal[0]], float)
            xy = centre + half * n + along[:, None] * t
            faces.append(np.c_[xy, rng.uniform(0.0, 0.09, 300)])
    top = np.c_[centre + rng.uniform(-half, half, (40, 2)) @ rot.T, np.full(40, 0.1)]
    points = np.concatenate(faces + [top])
    assert np.linalg.norm(np.median(points[:, :2], 0) - centre) > 0.02
    got = fit_square(points, half, np.median(points[:, :2], 0), rng)
    assert np.linalg.norm(got - centre) < 0.006, got


def test_scene_memory_refuses_unknown_objects_and_formations():
    seg = SceneSegmenter()
    with pytest.raises(ValueError, match="no segmentation class"):
        SceneMemory(seg, {}, ["box_purple"])
    with pytest.raises(ValueError, match="formation must be one of"):
        SceneMemory(seg, {}, ["box_anchor"], formation="circle")


def test_segmenter_trains_and_reloads(tmp_path):
    data = tmp_path / "seg.zarr"
    collect(out=str(data), task="formation", level="easy", episodes=2, max_steps=12, workers=0, progress=False,
            segmentation=True)
    out = train_segmenter([str(data)], tmp_path / "seg", SegmenterTrainConfig(steps=4, batch_size=4, stride=3),
                          progress=False)
    model, stats = load_segmenter(out)
    assert stats["classes"] == list(SEG_CLASSES)
    assert set(stats["centre_offsets"]) <= set(SEG_CLASSES)
    frame = np.zeros((64, 64, 3), np.uint8), np.ones((64, 64), np.float32)
    labels = model.labels(*frame)
    assert labels.shape == (64, 64) and labels.max() < len(SEG_CLASSES)
    with torch.no_grad():
        again, _ = load_segmenter(out)
        x = torch.rand(1, 4, 64, 64)
        torch.testing.assert_close(model(x), again(x))


def test_segmenter_training_needs_segmentation(tmp_path):
    data = tmp_path / "plain.zarr"
    collect(out=str(data), task="single", level="easy", episodes=1, max_steps=5, workers=0, progress=False)
    with pytest.raises(ValueError, match="segmentation=true"):
        train_segmenter([str(data)], tmp_path / "seg", SegmenterTrainConfig(steps=1), progress=False)
