"""The object tracker's presets (`observation.TRACKERS`): which slots are objects, how colours compare,
and which preset a policy checkpoint runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.observation import TRACKERS, SlotMemory, chromaticity, slot_tokens
from policies.policy import PolicyConfig, config_from_dict, policy_config_dict

RED_LIT, RED_DARK = [0.85, 0.15, 0.12], [0.55, 0.1, 0.08]  # a box's top and its side in shade
GREEN, FLOOR, FLOOR_SCRAP = [0.2, 0.75, 0.3], [0.55, 0.5, 0.45], [0.45, 0.41, 0.37]


def _camera_along_x() -> torch.Tensor:
    cam = torch.eye(4)
    cam[:3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # optical z = world +x
    return cam


def _frame(memory, centre, pixels, colour, spread=None, camera=None, sides=None, axis=None):
    """One frame of K slots for one stream -> the memory's (slot tag, colour, centre, shown, age) per track."""
    k = len(centre)

    def batch(x):
        return None if x is None else torch.tensor([x], dtype=torch.float32)

    out = memory(torch.arange(k, dtype=torch.float32).view(1, k, 1), torch.tensor([colour]), torch.tensor([centre]),
                 batch(pixels), batch(spread), batch(camera), batch(sides), batch(axis))
    return [a[0] for a in out]


def test_chromaticity_ignores_brightness():
    np.testing.assert_allclose(chromaticity(np.array([0.2, 0.4, 0.2])), chromaticity(np.array([0.4, 0.8, 0.4])))
    assert np.linalg.norm(chromaticity(np.array(RED_LIT)) - chromaticity(np.array(RED_DARK))) < 0.01
    assert np.isfinite(chromaticity(np.zeros(3))).all()  # black is a dim grey, not NaN
    t = chromaticity(torch.tensor([[0.3, 0.3, 0.3]]))
    torch.testing.assert_close(t, torch.full((1, 3), 1 / 3))


def test_objects_drops_the_floor_and_its_scraps_and_keeps_the_box_and_the_disc():
    """Slot 0 holds the floor (wide spread), slot 1 a scrap of it (compact, the floor's colour in shade),
    slot 2 the box, slot 3 the goal disc. The objects preset keeps 2 and 3; legacy keeps all four; with
    no spread given every slot counts as compact and the floor's scrap stays."""
    colour = torch.tensor([[FLOOR, FLOOR_SCRAP, RED_LIT, GREEN]])
    pixels = torch.tensor([[3000.0, 40.0, 300.0, 30.0]])
    spread = torch.tensor([[0.6, 0.05, 0.03, 0.04]])
    torch.testing.assert_close(SlotMemory("objects").objects(colour, pixels, spread),
                               torch.tensor([[0.0, 0.0, 300.0, 30.0]]))
    torch.testing.assert_close(SlotMemory("legacy").objects(colour, pixels, spread), pixels)
    torch.testing.assert_close(SlotMemory("objects").objects(colour, pixels, None), pixels)
    tiny = torch.tensor([[3000.0, 40.0, 3.0, 30.0]])  # below MIN_SEEN_PIXELS: not a detection either way
    assert SlotMemory("objects").objects(colour, tiny, spread)[0, 2] == 0


def test_objects_preset_tracks_a_box_in_light_and_shade_as_one_object():
    """The box's lit top and shaded side, won by two slots 5 cm apart, are one object when colours compare
    as chromaticity (one track, fed by the larger slot); in RGB (legacy) they are 0.3 apart and make two."""
    centre = [[1.0, 0.0, 0.08], [1.03, 0.04, 0.04], [0.0, 0.0, 0.0]]
    for tracker, n_tracks in (("objects", 1), ("legacy", 2)):
        mem = SlotMemory(tracker)
        tag, _, where, shown, age = _frame(mem, centre, [300, 120, 0], [RED_LIT, RED_DARK, FLOOR])
        assert int((shown > 0).sum()) == n_tracks, tracker
    np.testing.assert_allclose(tag[0].numpy(), [0.0])  # legacy: slot 0's own track
    mem = SlotMemory("objects")
    tag, _, where, shown, _ = _frame(mem, centre, [300, 120, 0], [RED_LIT, RED_DARK, FLOOR])
    k = int(np.flatnonzero(shown.numpy() > 0)[0])
    assert tag[k, 0] == 0 and shown[k] == 420  # the larger slot's vector, both slots' pixels
    np.testing.assert_allclose(where[k, :2].numpy(), (300 * np.array([1.0, 0.0]) + 120 * np.array([1.03, 0.04])) / 420,
                               atol=1e-6)


def test_the_floor_does_not_take_a_remembered_discs_track():
    """A disc seen once and then out of view stays remembered while the floor, in all its scraps, fills
    the view for 100 steps: with the objects preset no scrap of floor becomes a track."""
    mem = SlotMemory("objects", forget_steps=5)
    _frame(mem, [[1.5, 0.3, 0.0], [1.0, -1.0, 0.0]], [40, 3000], [GREEN, FLOOR], [0.04, 0.7])
    rng = np.random.default_rng(0)
    for _ in range(100):
        scrap = [float(rng.uniform(0.5, 2.0)), float(rng.uniform(-1, 1)), 0.0]
        _, colour, where, shown, age = _frame(mem, [scrap, [1.0, -1.0, 0.0]], [50, 3000], [FLOOR_SCRAP, FLOOR],
                                              [0.05, 0.7])
    assert (shown == 0).all()
    disc = int(np.flatnonzero(age.numpy() < 1000)[0])
    np.testing.assert_allclose(where[disc, :2].numpy(), [1.5, 0.3], atol=1e-6)
    np.testing.assert_allclose(colour[disc].numpy(), GREEN, atol=1e-6)
    assert int((age.numpy() < 1000).sum()) == 1


def test_slot_tokens_pass_the_spread_to_the_tracker():
    cam = _camera_along_x()[None]
    colour = torch.tensor([[FLOOR, RED_LIT]])
    centre = torch.tensor([[[1.0, 0.5, 0.0], [1.0, -0.2, 0.05]]])
    pixels = torch.tensor([[3000.0, 200.0]])
    tok = slot_tokens(torch.zeros(1, 2, 1), colour, centre, pixels, cam, 4096, SlotMemory("objects"),
                      torch.tensor([[0.6, 0.03]]))
    assert (tok[0, :, 9] > 0).sum() == 1  # one track sees something now: the box's
    np.testing.assert_allclose(tok[0, tok[0, :, 9].argmax(), 1:4].numpy(), RED_LIT, atol=1e-6)


def test_tracker_presets_and_checkpoints():
    assert PolicyConfig().tracker == "amodal"
    old = policy_config_dict(PolicyConfig())
    del old["tracker"]  # a checkpoint written before the option
    assert config_from_dict(old).tracker == "legacy"
    assert config_from_dict(policy_config_dict(PolicyConfig())).tracker == "amodal"
    assert config_from_dict(policy_config_dict(PolicyConfig(tracker="objects"))).tracker == "objects"
    with pytest.raises(ValueError, match="policy.tracker"):
        PolicyConfig(tracker="sort").check()
    with pytest.raises(ValueError, match="tracker must be one of"):
        SlotMemory("sort")
    with pytest.raises(ValueError, match="unknown tracker settings"):
        SlotMemory("objects", gating=2.0)
    assert set(TRACKERS) == {"legacy", "objects", "occlusion", "amodal"}
    with pytest.raises(ValueError, match="camera="):
        _frame(SlotMemory("occlusion"), [[1.0, 0.0, 0.0]], [40], [GREEN])
    mem = SlotMemory("objects", max_spread_m=None)  # a setting overridden: the floor counts again
    assert mem.objects(torch.tensor([[FLOOR]]), torch.tensor([[3000.0]]), torch.tensor([[0.7]]))[0, 0] == 3000


def _shown_track(where, shown):
    """The centre of the (last) track that shows its object now."""
    k = int(np.flatnonzero(shown.numpy() > 0)[-1])
    return where[k, :2].numpy()


def test_occlusion_holds_a_half_hidden_discs_centre_and_objects_follows_it():
    """Camera at the origin looking along +x. The disc at 1.5 m shows 40 pixels; then the box, nearer on the
    same bearing, hides its near half: 10 pixels whose centroid lies 6 cm further. The `occlusion` tracker
    keeps the disc's centre (a part shows, behind a nearer object); `objects` follows the sliver. Once the
    disc shows whole again, both follow it."""
    cam = [0.0, 0.0, 0.0]
    for tracker, expected in (("occlusion", [1.5, 0.0]), ("objects", [1.56, 0.0])):
        mem = SlotMemory(tracker)
        _frame(mem, [[1.5, 0.0, 0.0], [0.0, 0.0, 0.0]], [40, 0], [GREEN, RED_LIT], camera=cam)
        _, _, where, shown, _ = _frame(mem, [[1.56, 0.0, 0.0], [1.25, 0.0, 0.05]], [10, 300], [GREEN, RED_LIT],
                                       camera=cam)
        disc = int(np.flatnonzero(np.linalg.norm(where[:, :2].numpy() - [1.5, 0.0], axis=1) < 0.1)[0])
        assert shown[disc] == 10  # the disc's track is seen now: only its centre is held
        np.testing.assert_allclose(where[disc, :2].numpy(), expected, atol=1e-6, err_msg=tracker)
        _, _, where, shown, _ = _frame(mem, [[1.52, 0.0, 0.0], [0.0, 0.0, 0.0]], [45, 0], [GREEN, RED_LIT],
                                       camera=cam)
        np.testing.assert_allclose(_shown_track(where, shown), [1.52, 0.0], atol=1e-6, err_msg=tracker)


def test_occlusion_lets_a_box_pushed_out_of_the_frame_move():
    """The box shows less and less as it is pushed (it leaves the frame at the bottom) with nothing nearer
    the camera: its track follows it, as under `objects`."""
    mem = SlotMemory("occlusion")
    for x, px in ((0.5, 400), (0.55, 250), (0.6, 120), (0.65, 60)):
        _, _, where, shown, _ = _frame(mem, [[x, 0.0, 0.05]], [px], [RED_LIT], camera=[0.0, 0.0, 0.0])
    np.testing.assert_allclose(_shown_track(where, shown), [0.65, 0.0], atol=1e-6)


def test_occlusion_passes_a_held_centre_to_a_new_track_of_the_same_object():
    """Behind the box, the disc's sliver (its colour mixed with the box's edge) is once beyond the gate and
    starts a track of its own; the next frame it is within the merge of the disc's old track, which is
    then that object's copy and is forgotten. Under `occlusion` the new track, showing less than half of
    what the old one saw, takes the old one's centre; under `objects` it keeps the sliver's."""
    cam = [0.0, 0.0, 0.0]
    g = np.array(GREEN) / sum(GREEN)  # colours given as chromaticities (sum 1)
    u = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    sliver, nearer = (g + 0.12 * u).tolist(), (g + 0.07 * u).tolist()
    box = [1.25, 0.0, 0.05]
    for tracker, expected in (("occlusion", [1.5, 0.0]), ("objects", [1.63, 0.0])):
        mem = SlotMemory(tracker)
        _frame(mem, [[1.5, 0.0, 0.0], [0.0, 0.0, 0.0]], [40, 0], [g.tolist(), RED_LIT], camera=cam)
        *_, age = _frame(mem, [[1.62, 0.0, 0.0], box], [10, 300], [sliver, RED_LIT], camera=cam)
        assert int((age.numpy() == 1).sum()) == 1  # the old disc track, unseen, is still remembered
        _, _, where, _, age = _frame(mem, [[1.63, 0.0, 0.0], box], [10, 300], [nearer, RED_LIT], camera=cam)
        disc = np.flatnonzero((np.abs(where[:, 0].numpy() - 1.55) < 0.1) & (age.numpy() < 1000))
        assert len(disc) == 1, tracker  # no copy left behind
        np.testing.assert_allclose(where[disc[0], :2].numpy(), expected, atol=1e-6, err_msg=tracker)


# the camera at the origin looking along world +x: its right is world -y
RIGHT = [0.0, -1.0]


def _completed(tracker, centre, sides):
    """One box detection (one slot) at `centre` with the encoder's `sides` -> the centre its track keeps."""
    _, _, where, shown, _ = _frame(SlotMemory(tracker), [centre], [300], [RED_LIT], camera=[0.0, 0.0, 0.15],
                                   sides=[sides], axis=RIGHT)
    return _shown_track(where, shown)


def test_amodal_completes_a_box_cut_by_the_images_side_from_its_inner_side():
    """A 10 cm box 10 cm right of the optical axis, its right half beyond the image's right side: its pixels
    above the floor reach from 5 cm (its left side, whole) to the border (cut), so the visible centroid lies
    at 7.5 cm. `amodal` puts it 5 cm beyond its inner side, at 10 cm; mirrored on the left; `occlusion`
    keeps the centroid. Cut on both sides (it fills the frame's width), flat (no pixel above the floor) or
    whole, nothing moves; nor does a detection whose centroid already lies beyond the completion (a turned
    box shows more than 10 cm): the completion never moves a centre inward."""
    right_cut = [0.05, 0.075, 0.0, 1.0, 200]
    np.testing.assert_allclose(_completed("amodal", [0.3, -0.075, 0.05], right_cut), [0.3, -0.10], atol=1e-6)
    np.testing.assert_allclose(_completed("occlusion", [0.3, -0.075, 0.05], right_cut), [0.3, -0.075], atol=1e-6)
    left_cut = [-0.075, -0.05, 1.0, 0.0, 200]
    np.testing.assert_allclose(_completed("amodal", [0.3, 0.075, 0.05], left_cut), [0.3, 0.10], atol=1e-6)
    for sides in ([-0.2, 0.2, 1.0, 1.0, 900], [0.0, 0.0, 0.0, 0.0, 0], [0.05, 0.15, 0.0, 0.0, 200],
                  [-0.02, 0.075, 0.0, 1.0, 200]):
        np.testing.assert_allclose(_completed("amodal", [0.3, -0.075, 0.05], sides), [0.3, -0.075], atol=1e-6,
                                   err_msg=str(sides))
    with pytest.raises(ValueError, match="sides="):
        _frame(SlotMemory("amodal"), [[0.3, 0.0, 0.05]], [300], [RED_LIT], camera=[0.0, 0.0, 0.15])
    assert SlotMemory("amodal", cut_half_width_m=0.06).cut_half_width_m == 0.06


def test_amodal_places_a_rendered_box_on_the_plates_edge():
    """Real MuJoCo frames of a box in front of the pusher plate, 0 / 6 / 10 cm off its centre line, with the
    simulator's segmentation as the slots' masks (box, goal disc, the rest). Off the line the image's side
    cuts the box; the encoder's `mask_geometry` sides see it, and the `amodal` track lies within 1 cm of the box
    sideways where the visible centroid (`occlusion`) is 2 to 5 cm inward. The rest (floor, walls) is
    background and the disc, flat, has no pixel above the floor."""
    from sim.env import FIRST_OBJECT_SEG_ID, GOAL_SEG_ID, EgoPushEnv
    from worldmodel.encoder import mask_geometry

    env = EgoPushEnv(task="single", level="easy", segmentation=True)
    try:
        _, info = env.reset(seed=0)
        rx, ry, yaw = info["robot_pose"]
        c, s = np.cos(yaw), np.sin(yaw)
        for left in (0.0, 0.06, 0.10, -0.10):
            box = np.array([rx + c * 0.165 - s * left, ry + s * 0.165 + c * left])
            obs, info = env.place_object(0, box[0], box[1], yaw)
            seg = info["segmentation"]
            masks = np.stack([seg == FIRST_OBJECT_SEG_ID, seg == GOAL_SEG_ID, seg == 0, seg == 1])
            won = torch.from_numpy(masks).float()[None, None]
            frame = [torch.from_numpy(obs[k]).float()[None, None] for k in ("depth", "intrinsics", "cam_pose")]
            geometry, pixels, spread, sides = mask_geometry(won, *frame)
            sides = sides[:, 0]
            assert sides[0, 2, 4] == 0 and sides[0, 1, 4] == 0  # floor and disc: nothing stands above the floor
            assert (sides[0, 0, 2:4].sum() == 1) == (left != 0), left  # the box is cut on one side off the line
            cam_pose = frame[2][:, 0]
            colour = torch.tensor([[RED_LIT, GREEN, FLOOR, FLOOR]])
            lateral = {}
            for tracker in ("occlusion", "amodal"):
                tok = slot_tokens(torch.zeros(1, 4, 1), colour, geometry[:, 0, :, :3], pixels[:, 0], cam_pose, 4096,
                                  SlotMemory(tracker), spread[:, 0], sides)
                box_track = int(np.flatnonzero(tok[0, :, 1:4].numpy()[:, 0] > 0.5)[0])  # the red one
                lateral[tracker] = float(tok[0, box_track, 5])  # its centre, to the robot's left
            assert abs(lateral["amodal"] - left) < 0.01, (left, lateral)
            if left != 0:
                assert 0.02 < abs(lateral["occlusion"] - left) < 0.06, (left, lateral)
                assert abs(lateral["occlusion"]) < abs(left)  # inward
    finally:
        env.close()
