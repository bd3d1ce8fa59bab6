"""Tests for sim.dataset: round trip, windows, validation, crash safety, lock, export."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from sim.dataset import (
    DatasetError,
    EpisodeDataset,
    EpisodeWriter,
    colorize_depth,
    export_episode,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
META = {
    "task_id": "push-block-v0",
    "seed": 7,
    "sim_version": "mujoco-3.2.0",
    "code_version": "abc123",
    "camera": {"model": "pinhole", "width": 64, "height": 64, "fovy_deg": 60.0},
}


def make_episode(seed: int, length: int | None = None, size: int = 64) -> dict:
    """Deterministic synthetic episode for ``seed`` (also run inside child processes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    T = int(length if length is not None else 5 + seed % 26)
    return {
        "rgb": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8),
        "depth": rng.uniform(0.2, 5.0, (T, size, size)).astype(np.float32),
        "intrinsics": np.repeat(np.eye(3, dtype=np.float32)[None], T, axis=0),
        "cam_pose": rng.normal(size=(T, 4, 4)).astype(np.float32),
        "proprio": rng.normal(size=(T, 4)).astype(np.float32),
        "action": rng.uniform(-1, 1, (T, 2)).astype(np.float32),
        "object_poses": rng.normal(size=(T, 3, 3)).astype(np.float32),
        "goal": rng.normal(size=(T, 3)).astype(np.float32),
        "robot_pose": rng.normal(size=(T, 3)).astype(np.float32),
        "reward": rng.normal(size=T).astype(np.float32),
        "is_success": rng.random(T) > 0.5,
        # Global bookkeeping that lets the window tests see where frames came from.
        "episode_id": np.full(T, seed, dtype=np.int64),
        "t": np.arange(T, dtype=np.int64),
    }


def assert_episode_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        assert np.array_equal(got[key], want[key]), key


def write_dataset(path: Path, seeds=(0, 1, 2), lengths=(5, 17, 30)) -> dict[int, dict]:
    episodes = {s: make_episode(s, n) for s, n in zip(seeds, lengths)}
    with EpisodeWriter(path, META) as writer:
        for s, ep in episodes.items():
            writer.add_episode(ep, seed=s, info={"success": bool(ep["is_success"][-1])})
    return episodes


def run_child(code: str) -> subprocess.Popen:
    """A Python child that imports this repo's code and ``make_episode``."""
    source = "import numpy as np\n" + inspect.getsource(make_episode) + textwrap.dedent(code)
    pythonpath = str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.Popen(
        [sys.executable, "-c", source], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 30.0) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else "<timeout>"  # a dead child gives ""
    if line.strip() != expected:
        proc.kill()
        raise AssertionError(f"child said {line!r}; stderr:\n{proc.stderr.read()}")


# --------------------------------------------------------------------------
# Round trip and reading
# --------------------------------------------------------------------------


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    episodes = write_dataset(path)

    ds = EpisodeDataset.open(path)
    assert len(ds) == 3
    assert ds.n_steps == 5 + 17 + 30
    assert list(ds.episode_lengths) == [5, 17, 30]
    assert list(ds.episode_ends) == [5, 22, 52]
    assert ds.keys == tuple(episodes[0])  # order of the first episode
    assert ds.meta == META
    assert ds.seeds() == [0, 1, 2] and ds.committed_seeds() == {0, 1, 2}
    assert ds.has_seed(1) and not ds.has_seed(3)
    assert ds.schema["rgb"] == (np.dtype(np.uint8), (64, 64, 3))
    for i, seed in enumerate([0, 1, 2]):
        assert_episode_equal(ds.episode(i), episodes[seed])
        assert ds.episode_info(i) == {"success": bool(episodes[seed]["is_success"][-1])}
    assert_episode_equal(ds.episode(-1), episodes[2])
    assert set(ds.episode(1, keys=["rgb", "action"])) == {"rgb", "action"}
    with pytest.raises(IndexError):
        ds.episode(3)
    with pytest.raises(DatasetError, match="unknown keys"):
        ds.episode(0, keys=["nope"])

    # The diffusion_policy-style mirrors agree with the commit record.
    root = zarr.open_group(str(path), mode="r")
    assert list(root["meta/episode_ends"][:]) == [5, 22, 52]
    assert list(root["meta/episode_seeds"][:]) == [0, 1, 2]
    assert root.attrs["format"] == "egoworld-episodes" and root.attrs["version"] == 1

    # In-memory and unpickled readers give the same bits.
    mem = EpisodeDataset(path, in_memory=True)
    clone = pickle.loads(pickle.dumps(ds))
    for i, seed in enumerate([0, 1, 2]):
        assert_episode_equal(mem.episode(i), episodes[seed])
        assert_episode_equal(clone.episode(i), episodes[seed])


def test_reader_sees_snapshot_and_writer_resumes(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    write_dataset(path, seeds=(0, 1), lengths=(6, 7))
    before = EpisodeDataset(path)
    with EpisodeWriter(path) as writer:  # meta=None keeps the stored meta
        assert writer.committed_seeds() == {0, 1} and writer.n_steps == 13
        with pytest.raises(DatasetError, match="seed 1 is already committed"):
            writer.add_episode(make_episode(1, 7), seed=1)
        assert writer.add_episode(make_episode(2, 8), seed=2) == 2
        writer.add_episode(make_episode(99, 3))  # no seed: allowed
        assert writer.seeds() == [0, 1, 2, None]
    assert len(before) == 2  # opened earlier: its snapshot
    after = EpisodeDataset(path)
    assert len(after) == 4 and after.meta == META
    assert_episode_equal(after.episode(2), make_episode(2, 8))
    assert list(zarr.open_group(str(path), mode="r")["meta/episode_seeds"][:]) == [0, 1, 2, -1]


def test_meta_must_match_unless_updated(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    write_dataset(path, seeds=(0,), lengths=(5,))
    with pytest.raises(DatasetError, match=r"meta differs.*code_version"):
        EpisodeWriter(path, {**META, "code_version": "def456"})
    with EpisodeWriter(path, {**META, "code_version": "def456"}, allow_meta_update=True):
        pass
    assert EpisodeDataset(path).meta["code_version"] == "def456"
    with pytest.raises(DatasetError, match="JSON-compatible"):
        EpisodeWriter(tmp_path / "other", {"bad": object()})


def test_windows_stay_inside_episodes_and_match_slicing(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    lengths = (5, 17, 30, 3)
    episodes = write_dataset(path, seeds=(0, 1, 2, 3), lengths=lengths)
    ds = EpisodeDataset(path, cache_bytes=2**20)  # small cache: evictions happen
    eps = [episodes[s] for s in (0, 1, 2, 3)]

    for length, stride in [(1, 1), (6, 1), (6, 4), (30, 1)]:
        sampler = ds.windows(length, stride=stride)
        expected = sum(len(range(0, n - length + 1, stride)) for n in lengths)
        assert len(sampler) == expected
        for j in range(len(sampler)):
            e, start = sampler.index[j]
            win = sampler.window(j)
            assert win["rgb"].shape == (length, 64, 64, 3)
            assert np.all(win["episode_id"] == e)  # never crosses an episode
            for key in ("rgb", "depth", "action", "t"):
                assert np.array_equal(win[key], eps[e][key][start : start + length])
            assert not sampler.padding_mask(j).any()

    # Padded windows repeat the edge frames, like diffusion_policy's SequenceSampler.
    sampler = ds.windows(8, keys=["t", "episode_id", "rgb"], pad=True)
    assert len(sampler) == sum(n + 8 - 1 for n in lengths)
    for j in range(len(sampler)):
        e, start = sampler.index[j]
        win = sampler[j]
        rows = np.clip(np.arange(start, start + 8), 0, lengths[e] - 1)
        assert set(win) == {"t", "episode_id", "rgb"}
        assert np.all(win["episode_id"] == e)
        assert np.array_equal(win["t"], rows)
        assert np.array_equal(win["rgb"], eps[e]["rgb"][rows])
        assert np.array_equal(sampler.padding_mask(j), (np.arange(start, start + 8) < 0)
                              | (np.arange(start, start + 8) >= lengths[e]))

    # Asymmetric padding (obs history before, action horizon after) and episode subsets.
    sampler = ds.windows(4, pad_before=1, pad_after=3, episodes=[1, 3])
    assert set(sampler.index[:, 0]) == {1, 3}
    assert sampler.index[:, 1].min() == -1
    assert len(sampler) == (17 - 4 + 3 + 1 + 1) + (3 - 4 + 3 + 1 + 1)
    with pytest.raises(DatasetError, match="pad_before"):
        ds.windows(4, pad_before=4)
    with pytest.raises(IndexError):
        sampler.window(len(sampler))


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def test_mismatched_episodes_are_rejected_and_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    write_dataset(path, seeds=(0,), lengths=(5,))
    good = make_episode(1, 6)
    with EpisodeWriter(path) as writer:
        with pytest.raises(DatasetError, match=r"'rgb'.*\(6, 32, 32, 3\).*\(64, 64, 3\)"):
            writer.add_episode({**good, "rgb": make_episode(1, 6, size=32)["rgb"]})
        with pytest.raises(DatasetError, match=r"'depth'.*float64.*float32"):
            writer.add_episode({**good, "depth": good["depth"].astype(np.float64)})
        with pytest.raises(DatasetError, match=r"missing \['goal'\], unexpected \['extra'\]"):
            rest = {k: v for k, v in good.items() if k != "goal"}
            writer.add_episode({**rest, "extra": good["goal"]})
        with pytest.raises(DatasetError, match="'action' has 5 steps"):
            writer.add_episode({**good, "action": good["action"][:5]})
        with pytest.raises(DatasetError, match="at least one step"):
            writer.add_episode({k: v[:0] for k, v in good.items()})
        with pytest.raises(DatasetError, match="not storable"):
            writer.add_episode({**good, "action": np.array([None] * 6)})
        with pytest.raises(DatasetError, match="keys must be names"):
            writer.add_episode({**good, "a/b": good["goal"]})
        with pytest.raises(DatasetError, match="seed must be an int"):
            writer.add_episode(good, seed="1")
        assert writer.n_episodes == 1 and writer.n_steps == 5
        writer.add_episode(good, seed=1)
    ds = EpisodeDataset(path)
    assert list(ds.episode_lengths) == [5, 6]
    assert_episode_equal(ds.episode(1), good)


def _zarr_without_marker(path: Path) -> None:
    zarr.create_group(str(path), attributes={"hello": "world"})


def _zarr_array(path: Path) -> None:
    zarr.create_array(str(path), shape=(3,), dtype="f4")


def _random_files(path: Path) -> None:
    path.mkdir()
    for name in ("notes.txt", "data.bin", "sub"):
        (path / name).write_bytes(os.urandom(64))


def _garbage_zarr_json(path: Path) -> None:
    path.mkdir()
    (path / "zarr.json").write_bytes(b"\x00\xffnot json")


def _plain_file(path: Path) -> None:
    path.write_text("hello")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "no such file or directory"),
        (_plain_file, "is a file"),
        (lambda p: p.mkdir(), "empty directory"),
        (_zarr_without_marker, "not an episode dataset: root attribute 'format'"),
        (_zarr_array, "not a zarr group"),
        (_random_files, r"not a zarr store \(no zarr.json\).*data.bin"),
        (_garbage_zarr_json, "cannot read the zarr metadata"),
    ],
    ids=["missing", "file", "empty-dir", "zarr-no-marker", "zarr-array", "random-files", "garbage"],
)
def test_not_a_dataset_raises_clear_error(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "thing"
    if make is not None:
        make(path)
    with pytest.raises(DatasetError, match=message) as info:
        EpisodeDataset.open(path)
    assert str(path) in str(info.value)
    if make is not None and not (path.is_dir() and not any(path.iterdir())):
        before = sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes()
        with pytest.raises(DatasetError, match=message):
            EpisodeWriter(path)  # never writes into something that is not a dataset
        after = sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes()
        assert before == after


def test_empty_dataset_and_damaged_store(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    EpisodeWriter(path, META).close()
    ds = EpisodeDataset(path)
    assert len(ds) == 0 and ds.n_steps == 0 and ds.keys == () and ds.meta == META
    assert len(ds.windows(4)) == 0

    write_dataset(tmp_path / "ds2", seeds=(0,), lengths=(5,))
    (tmp_path / "ds2" / "committed.json").write_text('{"format": "egoworld-episodes"}')
    with pytest.raises(DatasetError, match="commit record is damaged"):
        EpisodeDataset(tmp_path / "ds2")


# --------------------------------------------------------------------------
# Crash safety
# --------------------------------------------------------------------------

CHILD_KILLED_BEFORE_COMMIT = """
import sys, time
import sim.dataset as d
path, n_before = PATH, N_BEFORE
w = d.EpisodeWriter(path, {"task_id": "push"})
for s in range(n_before):
    w.add_episode(make_episode(s), seed=s)
def stall(*args, **kwargs):
    print("DATA_WRITTEN", flush=True)
    time.sleep(60)
d._write_committed = stall  # the data arrays are written, the commit never happens
w.add_episode(make_episode(n_before), seed=n_before)
"""


def _data_length_on_disk(path: Path, key: str) -> int:
    return json.loads((path / "data" / key / "zarr.json").read_text())["shape"][0]


@pytest.mark.parametrize("n_before", [2, 0], ids=["later-episode", "first-episode"])
def test_kill_between_data_write_and_commit(tmp_path: Path, n_before: int) -> None:
    path = tmp_path / "ds"
    proc = run_child(CHILD_KILLED_BEFORE_COMMIT.replace("PATH", repr(str(path)))
                     .replace("N_BEFORE", str(n_before)))
    wait_for_line(proc, "DATA_WRITTEN")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sum(len(make_episode(s)["t"]) for s in range(n_before))
    # The torn state is real: data arrays hold the uncommitted episode.
    assert _data_length_on_disk(path, "rgb") == committed + len(make_episode(n_before)["t"])
    assert (path / "writer.lock").exists()  # and the killed writer's lock is stale
    (path / "data" / "rgb" / "c" / "0.deadbeef.partial").parent.mkdir(parents=True, exist_ok=True)
    (path / "data" / "rgb" / "c" / "0.deadbeef.partial").write_bytes(b"torn")

    # Readers work on the torn store without repairing it.
    ds = EpisodeDataset(path)
    assert len(ds) == n_before and ds.seeds() == list(range(n_before))
    for i in range(n_before):
        assert_episode_equal(ds.episode(i), make_episode(i))

    # A writer repairs it and the rerun appends the lost episode exactly once.
    with EpisodeWriter(path, {"task_id": "push"}) as writer:
        assert writer.n_steps == committed
        if n_before:
            assert _data_length_on_disk(path, "rgb") == committed
        else:
            assert not (path / "data").exists()  # the half-made schema is gone too
        assert not list(path.rglob("*.partial"))
        for s in range(n_before + 2):
            if not writer.has_seed(s):
                writer.add_episode(make_episode(s), seed=s)
    ds = EpisodeDataset(path)
    assert ds.seeds() == list(range(n_before + 2))
    for i in range(n_before + 2):
        assert_episode_equal(ds.episode(i), make_episode(i))
    assert _data_length_on_disk(path, "rgb") == ds.n_steps


CHILD_RESUMING_COLLECTOR = """
import sys
from sim.dataset import EpisodeWriter
with EpisodeWriter(PATH, {"task_id": "push"}) as w:
    todo = [s for s in range(N_SEEDS) if not w.has_seed(s)]
    print("READY", flush=True)
    for s in todo:
        w.add_episode(make_episode(s, length=3 + s % 9, size=32), seed=s)
print("DONE", flush=True)
"""


def test_kills_at_random_moments_never_break_the_store(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    n_seeds = 30
    code = CHILD_RESUMING_COLLECTOR.replace("PATH", repr(str(path)))
    code = code.replace("N_SEEDS", str(n_seeds))
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(4):
        proc = run_child(code)
        wait_for_line(proc, "READY")
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ds = EpisodeDataset(path)
        seeds = ds.seeds()
        assert seeds == list(range(len(seeds)))  # resumed in order, no duplicates, no gaps
        assert len(seeds) >= seen
        # The zarr mirror is updated after the commit: after a kill it may lag by one
        # entry or end in one torn entry, never lead; the next writer rewrites it.
        mirror = list(zarr.open_group(str(path), mode="r")["meta/episode_ends"][:])
        assert len(mirror) <= len(seeds)
        assert mirror[:-1] == list(ds.episode_ends[: len(mirror) - 1])
        seen = len(seeds)
        for i in rng.choice(len(seeds), size=min(3, len(seeds)), replace=False):
            assert_episode_equal(ds.episode(i), make_episode(int(i), 3 + int(i) % 9, size=32))
    proc = run_child(code)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    ds = EpisodeDataset(path)
    assert ds.seeds() == list(range(n_seeds))
    mirror = zarr.open_group(str(path), mode="r")["meta/episode_ends"][:]
    assert np.array_equal(mirror, ds.episode_ends)
    for i in range(n_seeds):
        assert_episode_equal(ds.episode(i), make_episode(i, 3 + i % 9, size=32))


def test_failed_write_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sim.dataset as dataset_module

    path = tmp_path / "ds"
    write_dataset(path, seeds=(0,), lengths=(5,))
    with EpisodeWriter(path) as writer:
        original = dataset_module._write_committed

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(dataset_module, "_write_committed", disk_full)
        with pytest.raises(OSError, match="No space"):
            writer.add_episode(make_episode(1, 9), seed=1)
        assert writer.n_steps == 5 and _data_length_on_disk(path, "rgb") == 5
        monkeypatch.setattr(dataset_module, "_write_committed", original)
        writer.add_episode(make_episode(1, 9), seed=1)
    assert list(EpisodeDataset(path).episode_lengths) == [5, 9]


# --------------------------------------------------------------------------
# Writer lock
# --------------------------------------------------------------------------


def test_lock_allows_one_live_writer(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    writer = EpisodeWriter(path, META)
    with pytest.raises(DatasetError, match="already open for writing in this process"):
        EpisodeWriter(path)
    EpisodeDataset(path)  # readers ignore the lock
    writer.close()
    assert not (path / "writer.lock").exists()
    EpisodeWriter(path).close()

    host = socket.gethostname()
    lock = path / "writer.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(f"{sleeper.pid} {host}\n")
        with pytest.raises(DatasetError, match=f"another writer \\(process {sleeper.pid}\\)"):
            EpisodeWriter(path)
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its process is gone now: the lock is stale and is taken over.
    with EpisodeWriter(path) as w:
        assert lock.read_text().split()[0] == str(os.getpid())
        w.add_episode(make_episode(0, 4), seed=0)

    lock.write_text("123 some-other-host\n")
    with pytest.raises(DatasetError, match="on host 'some-other-host'"):
        EpisodeWriter(path)
    lock.write_text("")  # a writer between creating and filling its lock
    with pytest.raises(DatasetError, match="opening this dataset right now"):
        EpisodeWriter(path)
    old = time.time() - 60
    os.utime(lock, (old, old))
    EpisodeWriter(path).close()


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def test_export_mp4_and_gif(tmp_path: Path) -> None:
    import imageio.v2 as imageio

    path = tmp_path / "ds"
    write_dataset(path, seeds=(0, 1), lengths=(7, 12))
    mp4 = export_episode(path, 1, tmp_path / "videos" / "ep1.mp4", fps=10)
    frames = imageio.mimread(mp4, memtest=False)
    assert len(frames) == 12
    assert frames[0].shape == (256, 512, 3)  # rgb | depth, 64 px upscaled 4x

    ds = EpisodeDataset(path)
    gif = export_episode(ds, 0, tmp_path / "ep0.gif", fps=5, keys=("depth",))
    frames = imageio.mimread(gif)
    assert len(frames) == 7
    assert frames[0].shape[:2] == (256, 256)
    assert not list(tmp_path.rglob("*.partial*"))

    with pytest.raises(DatasetError, match="unknown video extension '.avi'"):
        export_episode(ds, 0, tmp_path / "ep0.avi")
    with pytest.raises(DatasetError, match="out of range"):
        export_episode(ds, 5, tmp_path / "ep5.mp4")
    with pytest.raises(DatasetError, match="cannot render key 'action'"):
        export_episode(ds, 0, tmp_path / "a.mp4", keys=("action",))


def test_export_odd_sizes_become_even(tmp_path: Path) -> None:
    import imageio.v2 as imageio

    rng = np.random.default_rng(0)
    T, H, W = 4, 45, 63
    with EpisodeWriter(tmp_path / "ds") as writer:
        writer.add_episode({
            "rgb": rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8),
            "depth": rng.uniform(0.5, 3.0, (T, H, W)).astype(np.float32),
        })
    video = export_episode(tmp_path / "ds", 0, tmp_path / "odd.mp4")
    frames = imageio.mimread(video, memtest=False)
    assert len(frames) == T
    h, w = frames[0].shape[:2]
    assert h >= 256 and h % 2 == 0 and w % 2 == 0


def test_colorize_depth_marks_invalid_black_and_near_bright() -> None:
    depth = np.array([[0.0, 1.0, 2.0, np.nan]], dtype=np.float32)
    rgb = colorize_depth(depth, near=1.0, far=2.0)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert np.all(rgb[0, 0] == 0) and np.all(rgb[0, 3] == 0)
    assert rgb[0, 1].astype(int).sum() > rgb[0, 2].astype(int).sum()


def test_batch_commit_matches_one_by_one_and_is_all_or_nothing(tmp_path: Path) -> None:
    episodes = {s: make_episode(s, n) for s, n in zip((3, 4, 5), (7, 12, 4))}
    one_by_one = write_dataset(tmp_path / "a.zarr", seeds=(3, 4, 5), lengths=(7, 12, 4))
    with EpisodeWriter(tmp_path / "b.zarr", META) as writer:
        indices = writer.add_episodes(
            [(ep, s, {"success": bool(ep["is_success"][-1])}) for s, ep in episodes.items()]
        )
        assert indices == [0, 1, 2]
        # a duplicate seed anywhere in a batch rejects the whole batch
        with pytest.raises(DatasetError, match="seed 7 is already committed"):
            writer.add_episodes([(make_episode(7, 3), 7, None), (make_episode(7, 3), 7, None)])
        assert writer.n_episodes == 3
    a, b = EpisodeDataset.open(tmp_path / "a.zarr"), EpisodeDataset.open(tmp_path / "b.zarr")
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    assert a.seeds() == b.seeds() == [3, 4, 5]
    for i, s in enumerate((3, 4, 5)):
        assert_episode_equal(b.episode(i), one_by_one[s])
        assert b.episode_info(i) == a.episode_info(i)
    mirror = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["meta/episode_ends"][:]
    np.testing.assert_array_equal(mirror, b.episode_ends)
