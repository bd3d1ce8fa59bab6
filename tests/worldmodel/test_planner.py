"""CEM / MPPI planners on a model with a known optimum, determinism, bounds, goal costs and their
bad input, and the LatentPlanner controller on a real EgoPush episode with tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodel.planner import (
    CEMPlanner,
    LatentPlanner,
    MPPIPlanner,
    PlannerConfig,
    PositionGoalCost,
    SlotGoalCost,
    SlotTracker,
    around_disc,
    make_planner,
    match_slots,
)
from worldmodel.predictor import CausalJEPAPredictor, PredictorConfig, Rollout

GOAL = torch.tensor([0.6, -0.9])


def linear_rollout(actions: torch.Tensor) -> torch.Tensor:
    """A point moved by x_{t+1} = x_t + B a_t with B = diag(2, 0.5): (N, H, 2) -> states (N, H, 2)."""
    return torch.cumsum(actions * torch.tensor([2.0, 0.5]), dim=1)


def final_distance(states: torch.Tensor) -> torch.Tensor:
    return (states[:, -1] - GOAL).norm(dim=-1)


def small(method: str, **kw) -> PlannerConfig:
    return PlannerConfig(**({"method": method, "samples": 64, "iterations": 8, "elites": 8, "horizon": 4} | kw))


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_planner_lowers_the_cost_to_the_known_optimum(method):
    cfg = small(method)
    planner = make_planner(cfg)
    assert isinstance(planner, CEMPlanner if method == "cem" else MPPIPlanner)
    start = float(final_distance(linear_rollout(torch.zeros(1, 4, 2)))[0])
    result = planner.plan(linear_rollout, final_distance)
    # reachable: x needs sum(v) = 0.3 (bound 0.25 a step), y needs sum(omega) = -1.8 (bound 2): optimum 0
    assert result.cost < 0.05 * start
    assert all(b2 <= b1 for b1, b2 in zip(result.best_costs, result.best_costs[1:]))
    assert float(final_distance(linear_rollout(result.actions[None]))[0]) == pytest.approx(result.cost, abs=1e-6)
    low, high = torch.tensor(cfg.action_low), torch.tensor(cfg.action_high)
    assert result.actions.shape == (4, 2) and (result.actions >= low).all() and (result.actions <= high).all()


def test_planner_respects_bounds_when_the_goal_is_out_of_reach():
    far = lambda s: (s[:, -1] - torch.tensor([50.0, 0.0])).norm(dim=-1)  # noqa: E731
    result = CEMPlanner(small("cem")).plan(linear_rollout, far)
    torch.testing.assert_close(result.actions[:, 0], torch.full((4,), 0.25), atol=0.02, rtol=0)


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_planning_is_deterministic_under_a_seed(method):
    a = make_planner(small(method, seed=7)).plan(linear_rollout, final_distance)
    planner = make_planner(small(method, seed=7))
    b = planner.plan(linear_rollout, final_distance)
    assert torch.equal(a.actions, b.actions) and a.best_costs == b.best_costs
    planner.reset()  # back to the seed
    assert torch.equal(planner.plan(linear_rollout, final_distance).actions, a.actions)
    c = make_planner(small(method, seed=8)).plan(linear_rollout, final_distance)
    assert not torch.equal(a.actions, c.actions)


def test_warm_start_is_never_lost():
    optimum = torch.tensor([[0.075, -1.0], [0.075, -0.8], [0.075, 0.0], [0.075, 0.0]])  # cost 0 exactly
    result = CEMPlanner(small("cem", iterations=1)).plan(linear_rollout, final_distance, warm_start=optimum)
    assert result.cost == pytest.approx(0.0, abs=1e-6)


def test_bad_planner_input():
    planner = CEMPlanner(small("cem"))
    with pytest.raises(ValueError, match="one cost per candidate"):
        planner.plan(linear_rollout, lambda s: s.sum())
    with pytest.raises(ValueError, match="warm_start must be"):
        planner.plan(linear_rollout, final_distance, warm_start=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="method must be"):
        PlannerConfig(method="random")
    with pytest.raises(ValueError, match="elites"):
        PlannerConfig(samples=10, elites=20)
    # a NaN cost never wins
    def nan_cost(s: torch.Tensor) -> torch.Tensor:
        return torch.where(s[:, -1, 0] > 0, torch.full((s.shape[0],), float("nan")), final_distance(s))

    result = planner.plan(linear_rollout, nan_cost)
    assert np.isfinite(result.cost)


# ---------------------------------------------------------------------------- goal costs


def tiny_predictor() -> CausalJEPAPredictor:
    torch.manual_seed(0)
    return CausalJEPAPredictor(PredictorConfig(slot_dim=12, num_slots=4, history=2, future=2, frameskip=2, dim=32,
                                               layers=1, heads=2, interaction_hidden=16)).eval()


def test_goal_costs_and_bad_goal_shapes():
    model = tiny_predictor()
    k, z = 4, 18
    goal = torch.randn(k, z)
    cost = SlotGoalCost(goal, model)
    states = goal.expand(5, 3, k, z).clone()
    states[1:, -1, :, 12:14] += torch.arange(1, 5).view(4, 1, 1) * 0.1  # further and further from the goal
    c = cost(states)
    assert c.shape == (5,) and c[0] == pytest.approx(0.0, abs=1e-6) and (c.diff() > 0).all()
    with pytest.raises(ValueError, match=r"goal slots must be \(K, S \+ 6\) = \(4, 18\)"):
        SlotGoalCost(torch.randn(3, z), model)
    with pytest.raises(ValueError, match="goal slots must be"):
        SlotGoalCost(torch.randn(k, z - 6), model)  # encoder features, not predictor states
    with pytest.raises(ValueError, match="NaN"):
        SlotGoalCost(torch.full((k, z), float("nan")), model)
    # slots of two encodings are matched by appearance
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(match_slots(goal[perm], goal, model.slot_std, 12), perm)

    pos_cost = PositionGoalCost(torch.tensor([[0.5, 0.5]]), [2], num_slots=k, approach_weight=0.0)
    roll = Rollout(states=states, robot=torch.zeros(5, 3, 6), slot_dim=12)
    assert pos_cost(roll).shape == (5,)
    with pytest.raises(ValueError, match=r"goal positions must be \(G, 2\)"):
        PositionGoalCost(torch.zeros(1, 3), [0], num_slots=k)
    with pytest.raises(ValueError, match="one slot per goal position"):
        PositionGoalCost(torch.zeros(2, 2), [0], num_slots=k)
    with pytest.raises(ValueError, match="slot indices"):
        PositionGoalCost(torch.zeros(1, 2), [4], num_slots=k)


def test_pre_push_cost_prefers_the_pusher_behind_the_box():
    """approach="behind": the cost is lowest with the pusher behind the box on the line from the goal,
    facing the goal; with the box at its goal the approach term is off."""
    from sim.env import PUSHER_OFFSET

    k = 4
    cost = PositionGoalCost(torch.tensor([[1.0, 0.0]]), [0], num_slots=k, approach_weight=1.0, running_weight=0.0)
    states = torch.zeros(3, 1, k, 18)
    states[..., 0, 12:14] = torch.tensor([0.5, 0.0])  # the box halfway to its goal at (1, 0)

    def robot(x, y, yaw):
        return torch.tensor([x, y, np.cos(yaw), np.sin(yaw), 0.0, 0.0], dtype=torch.float32)

    axle = 0.5 - cost.standoff - PUSHER_OFFSET
    robots = torch.stack([robot(axle, 0.0, 0.0), robot(axle, 0.0, np.pi / 2), robot(0.5 + 0.2, 0.0, np.pi)])
    c = cost(Rollout(states=states, robot=robots.view(3, 1, 6), slot_dim=12))
    assert c[0] == pytest.approx(0.5, abs=1e-4)  # only the box's distance to its goal remains
    assert c[0] < c[1] < c[2]  # turned away costs the heading term; in front of the box, the way back round
    states[..., 0, 12:14] = torch.tensor([0.98, 0.0])  # at its goal: no approach term...
    no_look = PositionGoalCost(torch.tensor([[1.0, 0.0]]), [0], num_slots=k, approach_weight=1.0, running_weight=0.0,
                               look_m=0.0)
    c = no_look(Rollout(states=states, robot=robots.view(3, 1, 6), slot_dim=12))
    torch.testing.assert_close(c, torch.full((3,), 0.02), atol=1e-4, rtol=0)
    # ... but a look term: the robot standing look_m from the box, facing it, is where it is best seen
    lookers = torch.stack([robot(0.98 - cost.look_m, 0.0, 0.0), robot(0.98 - 0.1, 0.0, 0.0),
                           robot(0.98 - cost.look_m, 0.0, np.pi)])
    c = cost(Rollout(states=states, robot=lookers.view(3, 1, 6), slot_dim=12))
    assert c[0] == pytest.approx(0.02, abs=1e-4) and c[0] < c[1] and c[0] < c[2]
    with pytest.raises(ValueError, match="approach"):
        PositionGoalCost(torch.zeros(1, 2), [0], num_slots=k, approach="around")


def test_around_disc_against_hand_computed_paths():
    """Straight when the segment clears the disc; else two tangents and the arc between them."""
    c, r = torch.zeros(2), 0.5
    p, q = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0])
    wrapped = 2 * np.sqrt(1 - r ** 2) + r * (np.pi - 2 * np.arccos(r))  # tangents 0.866 each, arc pi/3 x 0.5
    assert float(around_disc(p, q, c, r)) == pytest.approx(wrapped, abs=1e-5)
    assert float(around_disc(p, torch.tensor([0.0, 1.0]), c, r)) == pytest.approx(np.sqrt(2), abs=1e-5)
    assert float(around_disc(torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 1.0]), c, r)) == pytest.approx(2.0)
    # from inside the disc: out radially first (0.3), then round
    from_rim = np.sqrt(1 - r ** 2) + r * (np.pi - np.arccos(r))
    assert float(around_disc(torch.tensor([-0.2, 0.0]), q, c, r)) == pytest.approx(0.3 + from_rim, abs=1e-5)


def test_approach_phase_earns_nothing_from_imagined_pushes_and_engages_behind_the_box():
    """Approaching, a forecast move of the box towards its goal does not lower the cost (a move away
    raises it); the pusher at the push point, facing the goal, engages the full cost; it is released
    only once the pusher is release_m away. From the goal's side the way round the box is charged."""
    from sim.env import PUSHER_OFFSET

    k = 4
    cost = PositionGoalCost(torch.tensor([[1.0, 0.0]]), [0], num_slots=k, running_weight=0.0)

    def robot(x, y, yaw):
        return torch.tensor([x, y, np.cos(yaw), np.sin(yaw), 0.0, 0.0], dtype=torch.float32)

    box = torch.tensor([[0.5, 0.0]])
    far = robot(0.0, 0.5, 0.0)
    assert not cost.update_phase(box, far)
    states = torch.zeros(3, 1, k, 18)
    states[:, 0, 0, 12:14] = torch.tensor([[0.5, 0.0], [0.7, 0.0], [0.3, 0.0]])  # stays, pushed on, pushed back
    c = cost(Rollout(states=states, robot=far.expand(3, 1, 6), slot_dim=12))
    assert c[1] >= c[0] - 0.05  # no reward for the imagined push (its push point also moved away)
    assert c[2] > c[0] + 0.1  # the box pushed 0.2 m back from its goal costs (less its push point now nearer)
    at_point = robot(0.5 - cost.standoff - PUSHER_OFFSET, 0.0, 0.0)
    assert cost.update_phase(box, at_point)
    c = cost(Rollout(states=states, robot=at_point.expand(3, 1, 6), slot_dim=12))
    assert c[1] < c[0] < c[2]  # pushing: progress counts
    assert cost.update_phase(box, robot(0.5 - cost.standoff - PUSHER_OFFSET - 0.05, 0.0, 0.0))  # still within release
    assert not cost.update_phase(box, far)
    # in front of the box (the goal's side) is further than beside it, by the way round
    nearest = PositionGoalCost(torch.tensor([[1.0, 0.0]]), [0], num_slots=k, approach="nearest")
    assert not nearest.update_phase(box, far)
    assert nearest.update_phase(box, robot(0.5, -cost.standoff - PUSHER_OFFSET, np.pi / 2))  # at a side face: any will do
    front = cost.approach_gap(box, robot(0.8 - PUSHER_OFFSET, 0.0, np.pi))[0]
    side = cost.approach_gap(box, robot(0.5 - PUSHER_OFFSET, 0.25, 0.0))[0]
    assert float(front) > float(side) + 0.1


def test_slot_tracker_keeps_a_handed_over_object_in_its_slot_and_remembers_it():
    k, f = 4, 9
    feats = torch.zeros(k, f)
    feats[:, :4] = torch.eye(k)  # slot vectors tell slots apart
    feats[:, -5:-3] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    colour = torch.tensor([[0.2, 0.2, 0.2], [0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    pixels = torch.full((k,), 50)
    tracker = SlotTracker()
    tracker.start(feats, colour, [1])  # the red object in slot 1
    torch.testing.assert_close(tracker(feats, colour, pixels), feats)  # nothing moved
    # the encoder hands the red object (moved 3 cm) to slot 3: the tracker swaps it back into slot 1
    handed = feats[[0, 3, 2, 1]].clone()
    handed[3, -5:-3] += torch.tensor([0.03, 0.0])
    out = tracker(handed, colour[[0, 3, 2, 1]], pixels)
    torch.testing.assert_close(out[1], handed[3])
    torch.testing.assert_close(out[3], handed[1])
    assert tracker.seen == [True]
    # out of view (no pixels): slot 1 holds the memory, where the object was last seen
    gone = pixels.clone()
    gone[3] = 0
    out = tracker(handed, colour[[0, 3, 2, 1]], gone)
    assert tracker.seen == [False]
    torch.testing.assert_close(out[1], handed[3])
    # a red thing far from where the object was is not it
    far = handed.clone()
    far[3, -5:-3] = torch.tensor([-1.0, -1.0])
    out = tracker(far, colour[[0, 3, 2, 1]], pixels)
    assert tracker.seen == [False]
    torch.testing.assert_close(out[1, -5:-3], handed[3, -5:-3])
    # an orange thing where it was is not it either; the red object in shade is
    near = handed.clone()
    tinted = colour[[0, 3, 2, 1]].clone()
    tinted[3] = torch.tensor([0.9, 0.45, 0.1])
    tracker(near, tinted, pixels)
    assert tracker.seen == [False]
    tinted[3] = torch.tensor([0.45, 0.05, 0.05])
    out = tracker(near, tinted, pixels)
    assert tracker.seen == [True]
    torch.testing.assert_close(out[1], near[3])


def test_slot_tracker_retarget_moves_a_track_onto_another_slot_and_keeps_it_home():
    """A track started on the wrong slot (a grey floor slot beside the red box, as a stream's first frame
    gives) is re-pointed at the right one: from then on that slot sits in the track's home slot."""
    k, f = 4, 9
    feats = torch.zeros(k, f)
    feats[:, :4] = torch.eye(k)
    feats[:, -5:-3] = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.62, 0.1]])
    colour = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.48, 0.45], [0.1, 0.9, 0.1], [0.9, 0.1, 0.1]])
    pixels = torch.full((k,), 50)
    tracker = SlotTracker()
    tracker.start(feats, colour, [1])  # the floor slot
    torch.testing.assert_close(tracker(feats, colour, pixels)[1], feats[1])  # it follows the floor
    tracker.retarget(feats, colour, [3])  # the red box's slot
    out = tracker(feats, colour, pixels)
    assert tracker.seen == [True] and tracker.slots == [1]
    torch.testing.assert_close(out[1], feats[3])  # the box now in the track's home slot
    torch.testing.assert_close(out[3], feats[1])
    # and it stays with the box, not the grey slot, when the encoder reorders the slots
    perm = torch.tensor([0, 3, 2, 1])
    out = tracker(feats[perm], colour[perm], pixels)
    torch.testing.assert_close(out[1], feats[3])
    tracker.retarget(feats, colour, [None])  # None leaves the track as it is
    torch.testing.assert_close(tracker.memory[0], feats[3])


def test_slot_tracker_keeps_two_objects_apart_when_both_are_handed_over():
    k, f = 5, 10
    feats = torch.zeros(k, f)
    feats[:, :5] = torch.eye(k)
    feats[:, -5:-3] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    colour = torch.tensor([[0.2, 0.2, 0.2], [0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.5, 0.5, 0.5]])
    tracker = SlotTracker()
    tracker.start(feats, colour, [1, 2])  # red in slot 1, green in slot 2
    # the encoder exchanges their slots, then moves them on round a cycle of three slots
    for perm in (torch.tensor([0, 2, 1, 3, 4]), torch.tensor([0, 3, 1, 2, 4])):
        out = tracker(feats[perm], colour[perm], torch.full((k,), 50))
        assert tracker.seen == [True, True]
        torch.testing.assert_close(out[1], feats[1])  # red back in its slot
        torch.testing.assert_close(out[2], feats[2])  # green back in its slot
        assert sorted(int(torch.argmax(out[i, :5])) for i in range(k)) == list(range(k))  # nothing lost or doubled


def test_planning_with_a_predictor_rollout_lowers_the_cost():
    """CEM through the predictor's batched rollout: the goal is where the robot's pusher ends, which
    the rollout gets from the commands by the robot's kinematics (known exactly)."""
    model = tiny_predictor()
    b = 1
    feats = torch.randn(b, 2, 4, 17)
    cam = torch.eye(4).repeat(b, 2, 1, 1)
    cam[..., :3, :3] = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    target = torch.tensor([0.06, 0.04])  # 0.1 m from the axle: reachable in 0.6 s at 0.25 m/s

    def rollout_fn(cand: torch.Tensor) -> Rollout:
        r = model.rollout(feats, cand.repeat_interleave(2, 1)[None], cam_pose=cam)
        return Rollout(states=r.states[0], robot=r.robot[0], slot_dim=12)

    cost_fn = lambda r: (r.robot[:, -1, :2] - target).norm(dim=-1)  # noqa: E731
    cfg = PlannerConfig(samples=48, iterations=5, elites=6, horizon=3)
    start = float(cost_fn(rollout_fn(torch.zeros(1, 3, 2)))[0])
    result = CEMPlanner(cfg).plan(rollout_fn, cost_fn)
    assert result.cost < 0.5 * start


# ---------------------------------------------------------------------------- the controller


def test_latent_planner_drives_an_episode():
    from sim.env import ACTION_HIGH, ACTION_LOW, EgoPushEnv
    from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder

    torch.manual_seed(0)
    enc = ObjectCentricEncoder(EncoderConfig(dim=32, layers=1, heads=2, slot_dim=12, decoder_hidden=32,
                                             num_slots=4, pixel_embed=0))
    model = tiny_predictor()
    cfg = PlannerConfig(samples=16, iterations=2, elites=4, horizon=3, execute=1)
    env = EgoPushEnv(task="single", level="easy")
    try:
        runs, first = [], []
        for run in range(2):
            obs, info = env.reset(seed=3)
            torch.manual_seed(run)  # torch's global generator differs: the planner seeds the encoder's draw itself
            ctrl = LatentPlanner(enc, model, cfg)
            ctrl.reset(obs, info)
            first.append(ctrl.features[0].clone())
            acts = []
            for _ in range(5):
                a = ctrl.act(obs)
                assert a.shape == (2,) and a.dtype == np.float32
                assert (a >= ACTION_LOW - 1e-6).all() and (a <= ACTION_HIGH + 1e-6).all()
                acts.append(a)
                obs, _, _, _, info = env.step(a)
            runs.append(np.stack(acts))
            assert ctrl.last_plan is not None and len(ctrl.features) == 5  # reset + 4 later observations
            hist = ctrl.history()
            assert hist["features"].shape == (1, 2, 4, 17) and hist["past_actions"].shape == (1, 1, 2, 2)
        with pytest.raises(ValueError, match="settle_steps and settle_m must be >= 0"):
            LatentPlanner(enc, model, cfg, settle_steps=-1)
        # scoring proposals from elsewhere (a policy's chunks): the replan's cost of the same candidates
        cand = torch.rand(5, 5, 2) * 0.4 - 0.2  # 5 env steps: cut to the 2 whole predictor frames
        cost = ctrl.score(cand)
        assert cost.shape == (5,) and torch.isfinite(cost).all() and cost.std() > 0
        rollout = ctrl._rollout(ctrl.history(), cand[:, :4])
        torch.testing.assert_close(cost, ctrl.cost(rollout))
        for bad, msg in ((cand[:, :1], "env-step actions"), (cand[..., :1], "env-step actions"),
                         (cand.masked_fill(cand > 0.1, float("nan")), "NaN")):
            with pytest.raises(ValueError, match=msg):
                ctrl.score(bad)
        torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)  # the same slots from the first frame
        np.testing.assert_array_equal(runs[0], runs[1])  # the same planner seed, the same actions
        # a goal observation instead of a goal state
        obs, info = env.reset(seed=4)
        ctrl = LatentPlanner(enc, model, cfg, goal="observation")
        ctrl.reset(obs, info)
        with pytest.raises(RuntimeError, match="no goal"):
            ctrl.act(obs)
        ctrl.set_goal_observation(obs)
        assert ctrl.act(obs).shape == (2,)
    finally:
        env.close()


def test_settling_searches_for_a_box_out_of_view_until_a_slot_comes_near_its_start():
    """Box 0 is near a slot from frame 1 (settled on frames 1..3 only); box 1 is out of view until frame
    6, then settled on frames 6..8; a slot far from a box's start is never taken for it."""
    from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder

    enc = ObjectCentricEncoder(EncoderConfig(dim=32, layers=1, heads=2, slot_dim=12, decoder_hidden=32,
                                             num_slots=4, pixel_embed=0))
    ctrl = LatentPlanner(enc, tiny_predictor(), PlannerConfig(samples=4, iterations=1, elites=2, horizon=2),
                         settle_steps=3, settle_m=0.1)
    ctrl._start_positions, ctrl._found_at = np.zeros((2, 2), np.float32), [None, None]
    calls = []
    ctrl.tracker.retarget = lambda features, colour, targets: calls.append(targets)
    for frame in range(1, 12):
        far = 0.5 if frame < 6 else 0.05  # box 1's nearest slot: far away until frame 6
        ctrl._match_near = lambda positions, features, far=far: ([2, 3], np.array([0.02, far]))
        calls.append(frame)
        ctrl._settle(torch.zeros(4, 17), torch.zeros(4, 3), frame=frame)
    settled = {}
    for i, c in enumerate(calls):
        if isinstance(c, list):
            settled[calls[i - 1]] = c
    assert settled == {1: [2, None], 2: [2, None], 3: [2, None], 6: [None, 3], 7: [None, 3], 8: [None, 3]}
    assert ctrl._found_at == [1, 6]
