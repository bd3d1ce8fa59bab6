"""Episode datasets on disk: one zarr v3 store per dataset.

Layout of a dataset directory ``ROOT/``::

    ROOT/zarr.json            root group; attrs = {"format": "egoworld-episodes",
                              "version": 1, "meta": {...caller's meta block...}}
    ROOT/committed.json       THE commit record (see below)
    ROOT/data/<key>           one array per per-step key, all episodes concatenated
                              along axis 0 (time); chunks of ``chunk_steps`` steps
                              and the full extent of the other axes; Blosc-zstd
    ROOT/meta/episode_ends    int64 (E,) cumulative end index per episode, as in
                              diffusion_policy's ReplayBuffer (a mirror, see below)
    ROOT/meta/episode_seeds   int64 (E,) reset seed per episode, -1 = none (mirror)
    ROOT/writer.lock          present while a writer process has the store open

Keys are whatever the caller records, e.g. ``rgb`` uint8 (T, H, W, 3),
``depth`` float32 (T, H, W), ``intrinsics`` (T, 3, 3), ``cam_pose`` (T, 4, 4),
``proprio`` (T, P), ``action`` (T, 2), and privileged state such as
``object_poses`` (T, N, 3), ``robot_pose`` (T, 3), ``reward`` (T,),
``is_success`` (T,) bool. The first committed episode fixes the key set, the
dtypes and the per-step shapes.

Commit protocol (why a crash loses at most the episode being written)
--------------------------------------------------------------------
``committed.json`` holds ``episode_ends`` (the single source of truth for how
many episodes and steps exist), the per-episode seeds and info dicts, and the
schema (dtype and per-step shape per key). It is replaced as a whole with the
classic write-temp, fsync, ``os.replace`` sequence, so on POSIX it is always
either the old or the new version, never a torn mix. ``add_episode``:

1. grows every ``data/<key>`` array and writes the episode's rows behind the
   committed end (invisible to readers, who never read past ``episode_ends[-1]``);
2. writes the new ``committed.json`` -- this rename is the commit point;
3. updates the ``meta/episode_*`` zarr mirrors, for tools that read the zarr
   store alone (like diffusion_policy's ReplayBuffer). zarr grows an array by
   writing its new shape first and the chunk second, so a kill here can leave
   a mirror one entry short or ending in one torn entry (the fill value 0).
   Nothing in this module reads the mirrors; the next writer rewrites them.

A kill before step 2 leaves data arrays longer than ``episode_ends[-1]``;
opening a writer truncates them back (and deletes a half-created first-episode
schema), so a rerun appends cleanly without duplicates. Readers never repair;
they just ignore rows past the committed end.

What this relies on from zarr: the chunk holding the last committed rows is
rewritten (read, merge, write) when the next episode starts inside it, so that
file must be replaced atomically. zarr >= 3.1.3 LocalStore writes every file
to ``<name>.<uuid>.partial`` and renames it into place (zarr-python PR #3412);
older 3.x versions write in place, and the writer warns about them. The commit
record itself does not trust zarr: growing an array is two files (``zarr.json``
with the new shape, then chunks) and zarr does not fsync, so one small file of
our own marks the commit. A killed process leaves zarr's ``.partial`` files
behind; the writer deletes them on open.

These guarantees cover process crashes (kill -9, OOM, exceptions). Against an
OS crash or power loss pass ``durable=True``: the writer then flushes the data
with ``os.sync()`` before each commit.

Concurrency: one writer process per dataset (parallel collectors should send
finished episodes to one writer). The writer holds an ``O_EXCL`` lock file with
its pid and host; a lock whose process is gone is taken over. Any number of
readers may open the store at any time, also while it is being written; each
sees the episodes committed when it opened.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore

FORMAT_NAME = "egoworld-episodes"
FORMAT_VERSION = 1
COMMIT_FILE = "committed.json"
LOCK_FILE = "writer.lock"
DEFAULT_CHUNK_STEPS = 100
# A chunk is the unit of decompression; keep it well below the memory of a
# data-loader worker even for large images (640x480 RGB gives 17 steps/chunk).
MAX_CHUNK_BYTES = 16 * 2**20
# An empty lock file is a writer caught between creating and filling it; only
# after this long is it considered abandoned.
EMPTY_LOCK_GRACE_S = 10.0
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _zarr_replaces_files_atomically() -> bool:
    """True for zarr >= 3.1.3, whose LocalStore writes a temp file and renames it."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", zarr.__version__)
    return match is None or tuple(int(g) for g in match.groups()) >= (3, 1, 3)


class DatasetError(Exception):
    """A dataset path, an episode or a request is invalid; the message says why."""


PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------
# Commit record
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Committed:
    """In-memory form of ``committed.json``. Immutable: a commit builds a new one."""

    schema: dict[str, tuple[np.dtype, tuple[int, ...]]] = field(default_factory=dict)
    episode_ends: tuple[int, ...] = ()
    seeds: tuple[int | None, ...] = ()
    infos: tuple[dict[str, Any], ...] = ()

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return self.episode_ends[-1] if self.episode_ends else 0

    @cached_property
    def seed_set(self) -> frozenset[int]:
        # Collectors ask has_seed() once per seed: keep that O(1).
        return frozenset(s for s in self.seeds if s is not None)

    def appended(
        self,
        schema: dict[str, tuple[np.dtype, tuple[int, ...]]],
        end: int,
        seed: int | None,
        info: dict[str, Any],
    ) -> _Committed:
        return _Committed(
            schema=schema,
            episode_ends=(*self.episode_ends, end),
            seeds=(*self.seeds, seed),
            infos=(*self.infos, info),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "schema": {
                key: {"dtype": dtype.name, "shape": list(shape)}
                for key, (dtype, shape) in self.schema.items()
            },
            "episode_ends": list(self.episode_ends),
            "episode_seeds": list(self.seeds),
            "episode_info": list(self.infos),
        }

    @classmethod
    def from_json(cls, doc: Any, where: Path) -> _Committed:
        def damaged(what: str) -> DatasetError:
            return DatasetError(f"{where}: commit record is damaged: {what}")

        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise damaged("not an egoworld commit record")
        if doc.get("version", 0) > FORMAT_VERSION:
            raise DatasetError(
                f"{where}: written by a newer format version {doc['version']} "
                f"(this code reads up to {FORMAT_VERSION}); update the code"
            )
        try:
            schema = {
                str(k): (np.dtype(v["dtype"]), tuple(int(s) for s in v["shape"]))
                for k, v in doc["schema"].items()
            }
            ends = tuple(int(e) for e in doc["episode_ends"])
            seeds = tuple(None if s is None else int(s) for s in doc["episode_seeds"])
            infos = tuple(dict(i) for i in doc["episode_info"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise damaged(f"{type(exc).__name__}: {exc}") from None
        if not len(ends) == len(seeds) == len(infos):
            raise damaged("episode_ends, episode_seeds and episode_info differ in length")
        if any(b <= a for a, b in zip((0, *ends), ends)):
            raise damaged("episode_ends is not strictly increasing from a positive first end")
        if ends and not schema:
            raise damaged("episodes without a schema")
        return cls(schema=schema, episode_ends=ends, seeds=seeds, infos=infos)


def _read_committed(root: Path) -> _Committed:
    """The commit record of a store; a store with no record has no episodes yet."""
    path = root / COMMIT_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _Committed()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the commit record: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: commit record is not valid JSON: {exc}") from None
    return _Committed.from_json(doc, path)


def _write_committed(root: Path, committed: _Committed) -> None:
    """Atomically replace the commit record. Raises only if nothing was replaced."""
    final = root / COMMIT_FILE
    tmp = root / f"{COMMIT_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(committed.to_json(), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Makes the rename itself durable; some filesystems cannot fsync a directory,
    # and by now the commit has happened either way.
    try:
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------
# Recognising a dataset directory
# --------------------------------------------------------------------------


def _check_dataset_dir(root: Path) -> dict[str, Any]:
    """Root attributes of the dataset at ``root``; DatasetError says what is wrong otherwise."""
    if not root.exists():
        raise DatasetError(f"{root}: no such file or directory, so no episode dataset there")
    if not root.is_dir():
        raise DatasetError(
            f"{root}: is a file; an episode dataset is a directory holding a zarr store"
        )
    marker = root / "zarr.json"
    if not marker.is_file():
        try:
            entries = sorted(p.name for p in root.iterdir() if p.name != LOCK_FILE)
        except OSError as exc:
            raise DatasetError(f"{root}: cannot list the directory: {exc}") from None
        if not entries:
            raise DatasetError(
                f"{root}: is an empty directory, not an episode dataset "
                f"(nothing was recorded there)"
            )
        if (root / ".zgroup").exists() or (root / ".zarray").exists():
            raise DatasetError(
                f"{root}: is a zarr v2 store; episode datasets are zarr v3 stores "
                f"written by sim.dataset.EpisodeWriter"
            )
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise DatasetError(
            f"{root}: is not a zarr store (no zarr.json), so not an episode dataset; "
            f"it contains: {shown}"
        )
    try:
        doc = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{marker}: cannot read the zarr metadata: {exc}") from None
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        kind = doc.get("node_type") if isinstance(doc, dict) else type(doc).__name__
        raise DatasetError(
            f"{root}: zarr.json has node_type {kind!r}, not a zarr group, so not an episode dataset"
        )
    attrs = doc.get("attributes") or {}
    if attrs.get("format") != FORMAT_NAME:
        raise DatasetError(
            f"{root}: is a zarr group but not an episode dataset: root attribute 'format' "
            f"is {attrs.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    version = attrs.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DatasetError(
            f"{root}: dataset format version {version!r} is not readable by this code "
            f"(reads versions up to {FORMAT_VERSION})"
        )
    return attrs


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (numpy scalars and arrays become numbers and lists)."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON-compatible")

    try:
        return json.loads(json.dumps(value, default=convert, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise DatasetError(
            f"{where} must be JSON-compatible (str, int, finite float, bool, None, lists, "
            f"dicts): {exc}"
        ) from None


def _open_array(store: LocalStore, key: str, mode: str, root: Path) -> zarr.Array:
    try:
        arr = zarr.open_array(store=store, path=f"data/{key}", mode=mode)
    except Exception as exc:  # zarr raises many types here; the user needs the path
        raise DatasetError(
            f"{root}: store is damaged: cannot open array data/{key}: {type(exc).__name__}: {exc}"
        ) from None
    return arr


def _check_array(
    arr: zarr.Array,
    key: str,
    schema_entry: tuple[np.dtype, tuple[int, ...]],
    n_steps: int,
    root: Path,
) -> None:
    dtype, shape = schema_entry
    if np.dtype(arr.dtype) != dtype or tuple(arr.shape[1:]) != shape:
        raise DatasetError(
            f"{root}: store is damaged: data/{key} is {np.dtype(arr.dtype).name} "
            f"{tuple(arr.shape)} but the commit record says {dtype.name} (T, *{shape})"
        )
    if arr.shape[0] < n_steps:
        raise DatasetError(
            f"{root}: store is damaged: data/{key} has {arr.shape[0]} steps but "
            f"{n_steps} are committed"
        )


# --------------------------------------------------------------------------
# Writer lock
# --------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _release_lock(lock_path: Path, token: str, owner_pid: int) -> None:
    # A forked child inherits the finalizer but not the lock.
    if os.getpid() != owner_pid:
        return
    try:
        if lock_path.read_text() == token:
            lock_path.unlink()
    except OSError:
        pass


def _acquire_lock(root: Path) -> tuple[Path, str]:
    """Create ``root/writer.lock`` holding ``"<pid> <host>"``; take over a stale one."""
    lock_path = root / LOCK_FILE
    host = socket.gethostname()
    token = f"{os.getpid()} {host}\n"
    for _ in range(3):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(token)
            return lock_path, token
        try:
            content = lock_path.read_text()
            age = time.time() - lock_path.stat().st_mtime
        except FileNotFoundError:
            continue  # released between our attempt and the read: try again
        parts = content.split()
        if not parts:
            if age < EMPTY_LOCK_GRACE_S:
                raise DatasetError(
                    f"{root}: another writer is opening this dataset right now ({lock_path})"
                )
        else:
            try:
                pid, lock_host = int(parts[0]), (parts[1] if len(parts) > 1 else host)
            except ValueError:
                raise DatasetError(
                    f"{root}: unreadable lock file {lock_path} ({content!r}); delete it if no "
                    f"writer is running"
                ) from None
            if lock_host != host:
                raise DatasetError(
                    f"{root}: locked by process {pid} on host {lock_host!r}, which cannot be "
                    f"checked from {host!r}; delete {lock_path} if no writer is running"
                )
            if pid == os.getpid():
                raise DatasetError(
                    f"{root}: already open for writing in this process; close the other "
                    f"EpisodeWriter first"
                )
            if _pid_alive(pid):
                raise DatasetError(
                    f"{root}: another writer (process {pid}) has this dataset open; only one "
                    f"writer at a time is supported (lock file {lock_path})"
                )
        # Stale: its process is gone. Two writers taking over the same stale lock at
        # the same instant could race here; one writer per dataset is the contract.
        lock_path.unlink(missing_ok=True)
    raise DatasetError(f"{root}: could not acquire the writer lock {lock_path}")


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------


def _write_concurrently(columns: list[tuple[zarr.Array, np.ndarray]], start: int, stop: int) -> None:
    """Grow every array to `stop` steps and write rows start:stop, all arrays at once.

    zarr's cost per write is mostly waiting (metadata and chunk files go through its
    event loop and a thread pool); one gathered batch pays it once instead of per array.
    """

    async def write() -> None:
        arrays = [arr.async_array for arr, _ in columns]
        await asyncio.gather(*(a.resize((stop, *a.shape[1:])) for a in arrays))
        await asyncio.gather(*(a.setitem(slice(start, stop), v) for a, (_, v) in zip(arrays, columns)))

    zarr_sync(write())


def _compressor() -> BloscCodec:
    # zstd at a low level: several hundred MB/s, and rendered RGB-D compresses
    # several-fold; byte shuffle groups the bytes of float32 depth.
    return BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle)


class _CommittedView:
    """What the writer and the reader both tell about the committed episodes (`self._committed`)."""

    _committed: _Committed

    def __len__(self) -> int:
        return self._committed.n_episodes

    @property
    def n_episodes(self) -> int:
        return self._committed.n_episodes

    @property
    def n_steps(self) -> int:
        return self._committed.n_steps

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._committed.schema)

    def seeds(self) -> list[int | None]:
        """Reset seed of every committed episode, in order (None where none was given)."""
        return list(self._committed.seeds)

    def committed_seeds(self) -> set[int]:
        """Seeds already on disk: a resuming collector skips these."""
        return set(self._committed.seed_set)

    def has_seed(self, seed: int) -> bool:
        return int(seed) in self._committed.seed_set


class EpisodeWriter(_CommittedView):
    """Appends whole episodes to a dataset, creating it if needed. One per dataset.

    Opening repairs the store after a crash (see the module docstring) and takes
    the writer lock; ``close()`` (or leaving a ``with`` block) releases it.

    Args:
        path: dataset directory; created if missing or empty.
        meta: JSON-compatible block stored in the root attrs (task id, seed,
            sim and code version, camera model, ...). For an existing dataset it
            must equal the stored one unless ``allow_meta_update``; None keeps it.
        allow_meta_update: replace a differing stored meta instead of raising.
        chunk_steps: time steps per chunk (capped so a chunk stays <= 16 MiB).
        durable: ``os.sync()`` before each commit, for power-loss safety.
    """

    def __init__(
        self,
        path: PathLike,
        meta: Mapping[str, Any] | None = None,
        *,
        chunk_steps: int = DEFAULT_CHUNK_STEPS,
        allow_meta_update: bool = False,
        durable: bool = False,
    ) -> None:
        if chunk_steps < 1:
            raise DatasetError(f"chunk_steps must be >= 1, got {chunk_steps}")
        self.path = Path(path)
        self._chunk_steps = int(chunk_steps)
        self._durable = durable
        meta_json = None if meta is None else _jsonable(dict(meta), "meta")
        if not _zarr_replaces_files_atomically():
            warnings.warn(
                f"zarr {zarr.__version__} rewrites chunk files in place: a crash while writing "
                f"an episode can damage the previous one. Use zarr >= 3.1.3.",
                RuntimeWarning,
                stacklevel=2,
            )

        creating = not self.path.exists() or (
            self.path.is_dir() and not any(p.name != LOCK_FILE for p in self.path.iterdir())
        )
        if not creating:
            _check_dataset_dir(self.path)  # never write into something that is not ours
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_path, token = _acquire_lock(self.path)
        self._finalizer = weakref.finalize(
            self, _release_lock, self._lock_path, token, os.getpid()
        )
        try:
            self._store = LocalStore(self.path)
            if creating:
                attrs = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "meta": meta_json or {}}
                self._root = zarr.create_group(self._store, attributes=attrs, zarr_format=3)
            else:
                self._root = zarr.open_group(self._store, mode="r+")
                self._reconcile_meta(meta_json, allow_meta_update)
            self._committed = _read_committed(self.path)
            self._arrays: dict[str, zarr.Array] = {}
            self._remove_leftover_files()
            self._truncate_to_committed()
            self._rewrite_mirrors()
        except BaseException:
            self._finalizer()
            raise

    # -- state ------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._root.attrs.get("meta", {})))

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # -- writing ----------------------------------------------------------

    def add_episode(
        self,
        steps: Mapping[str, np.ndarray],
        seed: int | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> int:
        """Write one whole episode and commit it; returns its index.

        Args:
            steps: key -> array of shape (T, ...), the same T for every key.
            seed: the env reset seed (must not be committed already).
            info: JSON-compatible per-episode info (e.g. success, expert name).
        """
        return self.add_episodes([(steps, seed, info)])[0]

    def add_episodes(
        self, episodes: Sequence[tuple[Mapping[str, np.ndarray], int | None, Mapping[str, Any] | None]]
    ) -> list[int]:
        """Write several whole episodes, `(steps, seed, info)` each, and commit them in one
        atomic commit; returns their indices. Each array is resized and written once for the
        whole batch, which matters: zarr's fixed cost per write dominates for short episodes.
        """
        if self.closed:
            raise DatasetError(f"{self.path}: writer is closed")
        if not episodes:
            return []
        new = self._committed
        batch: dict[str, list[np.ndarray]] = {}
        for steps, seed, info in episodes:
            arrays, schema = self._validate_episode(steps, new.schema)
            if seed is not None:
                if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                    raise DatasetError(f"seed must be an int or None, got {type(seed).__name__}")
                seed = int(seed)
                if seed in new.seed_set:
                    raise DatasetError(
                        f"{self.path}: an episode with seed {seed} is already committed "
                        f"(skip seeds in committed_seeds() when resuming)"
                    )
            stop = new.n_steps + next(iter(arrays.values())).shape[0]
            new = new.appended(schema, stop, seed, _jsonable(dict(info or {}), "info"))
            for key, value in arrays.items():
                batch.setdefault(key, []).append(value)
        start, stop = self._committed.n_steps, new.n_steps
        try:
            if not self._arrays:
                self._create_arrays(new.schema)
            columns = [(self._arrays[k], v[0] if len(v) == 1 else np.concatenate(v)) for k, v in batch.items()]
            _write_concurrently(columns, start, stop)
            if self._durable:
                os.sync()
            _write_committed(self.path, new)  # the commit point
        except BaseException as exc:
            # Nothing was committed; cut the arrays back so the next episode
            # starts at the committed end. Reopening would do the same.
            try:
                self._truncate_to_committed()
            except Exception as rollback_exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11
                    exc.add_note(
                        f"rolling back the uncommitted episodes also failed ({rollback_exc!r}); "
                        f"the next EpisodeWriter on {self.path} repairs the store"
                    )
            raise
        first = self._committed.n_episodes
        self._committed = new
        self._append_mirrors(first)
        return list(range(first, new.n_episodes))

    def close(self) -> None:
        """Release the writer lock. Everything added is already committed."""
        self._finalizer()

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"EpisodeWriter({str(self.path)!r}, {self.n_episodes} episodes, "
            f"{self.n_steps} steps, {state})"
        )

    # -- internals ----------------------------------------------------------

    def _reconcile_meta(self, meta: dict[str, Any] | None, allow_update: bool) -> None:
        if meta is None:
            return
        stored = self._root.attrs.get("meta", {})
        if meta == stored:
            return
        if not allow_update:
            changed = sorted(
                k for k in set(meta) | set(stored) if meta.get(k, None) != stored.get(k, None)
            )
            raise DatasetError(
                f"{self.path}: meta differs from the stored meta in keys {changed}; episodes "
                f"of different setups should go to different datasets (pass "
                f"allow_meta_update=True to overwrite the stored meta)"
            )
        self._root.attrs.update({"meta": meta})

    def _validate_episode(
        self, steps: Mapping[str, np.ndarray], committed: dict[str, tuple[np.dtype, tuple[int, ...]]]
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.dtype, tuple[int, ...]]]]:
        if not isinstance(steps, Mapping) or not steps:
            raise DatasetError("an episode is a non-empty dict of per-step arrays")
        arrays: dict[str, np.ndarray] = {}
        length_key, length = None, None
        for key, value in steps.items():
            if not isinstance(key, str) or not _KEY_RE.match(key) or key.startswith("__"):
                raise DatasetError(
                    f"key {key!r}: keys must be names of letters, digits, '_', '.', '-' "
                    f"(no '/', not starting with '__' or '.')"
                )
            arr = np.asarray(value)
            if arr.dtype.kind not in "biuf":
                raise DatasetError(
                    f"key {key!r}: dtype {arr.dtype} is not storable; use bool, integer or "
                    f"float arrays"
                )
            if arr.ndim == 0:
                raise DatasetError(f"key {key!r}: a scalar; per-step arrays have shape (T, ...)")
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            if length is None:
                length_key, length = key, arr.shape[0]
            elif arr.shape[0] != length:
                raise DatasetError(
                    f"key {key!r} has {arr.shape[0]} steps (shape {arr.shape}) but "
                    f"{length_key!r} has {length}; all keys of an episode need the same T"
                )
            arrays[key] = arr
        if length == 0:
            raise DatasetError("an episode needs at least one step (T=0 given)")

        schema = {k: (a.dtype, tuple(a.shape[1:])) for k, a in arrays.items()}
        if not committed:
            return arrays, schema
        missing, extra = sorted(set(committed) - set(arrays)), sorted(set(arrays) - set(committed))
        if missing or extra:
            raise DatasetError(
                f"{self.path}: episode keys differ from the dataset's: missing {missing}, "
                f"unexpected {extra}"
            )
        for key, arr in arrays.items():
            dtype, shape = committed[key]
            if arr.dtype != dtype or arr.shape[1:] != shape:
                raise DatasetError(
                    f"{self.path}: key {key!r}: episode array is {arr.dtype.name} {arr.shape}, "
                    f"per step {arr.shape[1:]}, but the dataset stores {dtype.name} with "
                    f"per-step shape {shape}"
                )
        return arrays, dict(committed)

    def _create_arrays(self, schema: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
        data = self._root.require_group("data")
        for key, (dtype, shape) in schema.items():
            step_bytes = max(1, dtype.itemsize * math.prod(shape))
            chunk = max(1, min(self._chunk_steps, MAX_CHUNK_BYTES // step_bytes))
            self._arrays[key] = data.create_array(
                key,
                shape=(0, *shape),
                dtype=dtype,
                chunks=(chunk, *shape),
                compressors=_compressor(),
                fill_value=0,
            )

    def _remove_leftover_files(self) -> None:
        # A killed writer leaves our commit temp file and zarr's "<name>.<uuid>.partial"
        # files; nothing reads them, but they would pile up.
        for tmp in self.path.glob(f"{COMMIT_FILE}.*.tmp"):
            tmp.unlink(missing_ok=True)
        for sub in ("data", "meta"):
            for partial in (self.path / sub).rglob("*.partial"):
                partial.unlink(missing_ok=True)

    def _truncate_to_committed(self) -> None:
        """Cut every data array back to the committed length (crash repair, rollback)."""
        committed = self._committed
        data_dir = self.path / "data"
        if not committed.schema:
            # No episode was ever committed: anything under data/ is a half-written
            # first episode, including the key set it would have fixed.
            shutil.rmtree(data_dir, ignore_errors=True)
            self._arrays = {}
            return
        for child in data_dir.iterdir() if data_dir.is_dir() else ():
            if child.is_dir() and child.name not in committed.schema:
                shutil.rmtree(child)  # cannot happen with this writer; uncommitted anyway
        arrays = {}
        for key, entry in committed.schema.items():
            arr = _open_array(self._store, key, "r+", self.path)
            _check_array(arr, key, entry, committed.n_steps, self.path)
            if arr.shape[0] > committed.n_steps:
                arr.resize((committed.n_steps, *arr.shape[1:]))
            arrays[key] = arr
        self._arrays = arrays

    def _rewrite_mirrors(self) -> None:
        ends = np.asarray(self._committed.episode_ends, dtype=np.int64)
        seeds = np.asarray(
            [-1 if s is None else s for s in self._committed.seeds], dtype=np.int64
        )
        group = self._root.require_group("meta")
        for name, values in (("episode_ends", ends), ("episode_seeds", seeds)):
            try:
                current = group[name][:] if name in group else None
            except Exception:  # a damaged mirror is simply rebuilt
                current = None
            if current is None or not np.array_equal(current, values):
                group.create_array(
                    name, shape=values.shape, dtype=np.int64, chunks=(4096,),
                    fill_value=0, overwrite=True,
                )[:] = values
        self._mirrors = {name: group[name] for name in ("episode_ends", "episode_seeds")}

    def _append_mirrors(self, first: int) -> None:
        """Extend the diffusion_policy-style copies with the episodes from index `first` on."""
        c = self._committed
        seeds = [-1 if s is None else s for s in c.seeds[first:]]
        for name, values in (("episode_ends", c.episode_ends[first:]), ("episode_seeds", seeds)):
            arr = self._mirrors[name]
            arr.resize((c.n_episodes,))
            arr[first:] = np.asarray(values, np.int64)


# --------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------


class _ChunkCache:
    """LRU of decoded chunks, bounded in bytes; windows reuse neighbouring frames."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        block = self._items.get(key)
        if block is not None:
            self._items.move_to_end(key)
        return block

    def put(self, key: tuple[str, int], block: np.ndarray) -> None:
        self._items[key] = block
        self._bytes += block.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes


class EpisodeDataset(_CommittedView):
    """Read-only view of the episodes committed when it was opened.

    ``in_memory=True`` decodes every array once (fast random access for small
    datasets); otherwise windows read through an LRU cache of decoded chunks of
    ``cache_bytes`` and ``episode()`` reads just the rows it needs. Picklable
    (it reopens the store), so it can go to data-loader worker processes.
    """

    def __init__(
        self, path: PathLike, *, in_memory: bool = False, cache_bytes: int = 256 * 2**20
    ) -> None:
        self.path = Path(path)
        self._in_memory = in_memory
        self._cache_bytes = cache_bytes
        attrs = _check_dataset_dir(self.path)
        self._meta: dict[str, Any] = attrs.get("meta") or {}
        # Commit record first, arrays second: arrays are at least as long as any
        # record read before them, since writers grow arrays before committing.
        self._committed = _read_committed(self.path)
        self._ends = np.asarray(self._committed.episode_ends, dtype=np.int64)
        self._starts = np.concatenate([[0], self._ends[:-1]]).astype(np.int64)
        store = LocalStore(self.path, read_only=True)
        self._arrays: dict[str, zarr.Array] = {}
        for key, entry in self._committed.schema.items():
            arr = _open_array(store, key, "r", self.path)
            _check_array(arr, key, entry, self.n_steps, self.path)
            self._arrays[key] = arr
        self._cache = _ChunkCache(cache_bytes)
        self._memory: dict[str, np.ndarray] | None = None
        if in_memory:
            self.load()

    @classmethod
    def open(cls, path: PathLike, **kwargs: Any) -> EpisodeDataset:
        """Open a dataset read-only; same arguments as the constructor."""
        return cls(path, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "in_memory": self._in_memory, "cache_bytes": self._cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], in_memory=state["in_memory"], cache_bytes=state["cache_bytes"])

    # -- summary ------------------------------------------------------------

    @property
    def schema(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """key -> (dtype, per-step shape)."""
        return dict(self._committed.schema)

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._meta))

    @property
    def episode_ends(self) -> np.ndarray:
        """int64 (E,): exclusive end step of each episode in the concatenated arrays."""
        return self._ends.copy()

    @property
    def episode_lengths(self) -> np.ndarray:
        """int64 (E,)."""
        return self._ends - self._starts

    def episode_info(self, index: int) -> dict[str, Any]:
        return json.loads(json.dumps(self._committed.infos[self._check_index(index)]))

    def __repr__(self) -> str:
        return (
            f"EpisodeDataset({str(self.path)!r}, {self.n_episodes} episodes, "
            f"{self.n_steps} steps, keys={list(self.keys)})"
        )

    # -- reading ------------------------------------------------------------

    def load(self) -> None:
        """Decode every committed step into memory; later reads do not touch the disk."""
        self._memory = {key: arr[: self.n_steps] for key, arr in self._arrays.items()}
        self._in_memory = True

    def episode(self, index: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of one episode: key -> (T, ...)."""
        i = self._check_index(index)
        start, stop = int(self._starts[i]), int(self._ends[i])
        out = {}
        for key in self._check_keys(keys):
            if self._memory is not None:
                out[key] = self._memory[key][start:stop].copy()
            else:
                out[key] = self._arrays[key][start:stop]
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.episode(i)

    def gather(self, key: str, steps: np.ndarray) -> np.ndarray:
        """Rows of ``key`` at global step indices ``steps`` (K,) -> (K, ...)."""
        steps = np.asarray(steps, dtype=np.int64)
        if steps.size and (steps.min() < 0 or steps.max() >= self.n_steps):
            raise IndexError(f"step indices must lie in [0, {self.n_steps})")
        if self._memory is not None:
            return self._memory[key][steps]
        arr = self._arrays[key]
        chunk_len = arr.chunks[0]
        dtype, shape = self._committed.schema[key]
        out = np.empty((steps.size, *shape), dtype=dtype)
        chunk_ids = steps // chunk_len
        for c in np.unique(chunk_ids):
            block = self._cache.get((key, int(c)))
            if block is None:
                lo = int(c) * chunk_len
                block = arr[lo : min(lo + chunk_len, self.n_steps)]
                self._cache.put((key, int(c)), block)
            rows = chunk_ids == c
            out[rows] = block[steps[rows] - int(c) * chunk_len]
        return out

    def windows(
        self,
        length: int,
        keys: Sequence[str] | None = None,
        stride: int = 1,
        pad: bool = False,
        pad_before: int | None = None,
        pad_after: int | None = None,
        episodes: Sequence[int] | None = None,
    ) -> WindowSampler:
        """Fixed-length windows inside single episodes; see WindowSampler.

        ``pad=True`` pads ``length - 1`` frames on both sides unless
        ``pad_before``/``pad_after`` say otherwise.
        """
        default = length - 1 if pad else 0
        return WindowSampler(
            self,
            length,
            keys=keys,
            stride=stride,
            pad_before=default if pad_before is None else pad_before,
            pad_after=default if pad_after is None else pad_after,
            episodes=episodes,
        )

    def _check_index(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"episode index {index} out of range for {n} episodes")
        return i % n

    def _check_keys(self, keys: Sequence[str] | None) -> tuple[str, ...]:
        if keys is None:
            return self.keys
        if isinstance(keys, str):
            keys = (keys,)
        unknown = [k for k in keys if k not in self._committed.schema]
        if unknown:
            raise DatasetError(
                f"{self.path}: unknown keys {unknown}; the dataset has {list(self.keys)}"
            )
        return tuple(keys)


class WindowSampler:
    """All windows of ``length`` steps that lie inside one episode.

    As diffusion_policy's SequenceSampler: a window may start up to
    ``pad_before`` steps before its episode and end up to ``pad_after`` steps
    after it; those positions repeat the episode's first / last frame. Windows
    never mix frames of two episodes. Window starts step by ``stride``.
    ``index[j] = (episode, start)``, ``start`` relative to the episode.
    """

    def __init__(
        self,
        dataset: EpisodeDataset,
        length: int,
        keys: Sequence[str] | None = None,
        stride: int = 1,
        pad_before: int = 0,
        pad_after: int = 0,
        episodes: Sequence[int] | None = None,
    ) -> None:
        if length < 1 or stride < 1:
            raise DatasetError(f"window length and stride must be >= 1, got {length}, {stride}")
        if not (0 <= pad_before < length and 0 <= pad_after < length):
            raise DatasetError(
                f"pad_before and pad_after must lie in [0, length - 1] = [0, {length - 1}], "
                f"got {pad_before}, {pad_after} (more would allow all-padding windows)"
            )
        self.dataset = dataset
        self.length = int(length)
        self.keys = dataset._check_keys(keys)
        self.pad_before, self.pad_after = int(pad_before), int(pad_after)
        chosen = (
            range(len(dataset)) if episodes is None else [dataset._check_index(e) for e in episodes]
        )
        lengths = dataset.episode_lengths
        parts = []
        for e in chosen:
            starts = np.arange(-self.pad_before, lengths[e] - length + self.pad_after + 1, stride)
            parts.append(np.stack([np.full_like(starts, e), starts], axis=1))
        self.index = (
            np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), dtype=np.int64)
        )

    def __len__(self) -> int:
        return len(self.index)

    def _locate(self, j: int) -> tuple[int, np.ndarray]:
        n = len(self)
        if not -n <= j < n:
            raise IndexError(f"window {j} out of range for {n} windows")
        episode, start = self.index[j]
        return int(episode), start + np.arange(self.length)

    def frame_steps(self, j: int) -> np.ndarray:
        """int64 (length,): global step index of each window row, padding clamped to the edges."""
        episode, rows = self._locate(j)
        last = self.dataset.episode_lengths[episode] - 1
        return np.clip(rows, 0, last) + self.dataset._starts[episode]

    def padding_mask(self, j: int) -> np.ndarray:
        """bool (length,): True where the row repeats an edge frame as padding."""
        episode, rows = self._locate(j)
        return (rows < 0) | (rows >= self.dataset.episode_lengths[episode])

    def window(self, j: int) -> dict[str, np.ndarray]:
        """key -> array (length, ...)."""
        steps = self.frame_steps(j)
        return {key: self.dataset.gather(key, steps) for key in self.keys}

    __getitem__ = window


# --------------------------------------------------------------------------
# Video export
# --------------------------------------------------------------------------


# Viridis at five stops (matplotlib's published values), interpolated to 256.
_VIRIDIS_STOPS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
VIRIDIS_LUT: np.ndarray = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, 5), stop) for stop in _VIRIDIS_STOPS.T],
    axis=1,
).round().astype(np.uint8)


def colorize_depth(
    depth: np.ndarray, near: float | None = None, far: float | None = None
) -> np.ndarray:
    """Depth (..., H, W) metres -> uint8 (..., H, W, 3); near is bright, 0/non-finite black.

    ``near``/``far`` default to the 2nd/98th percentile of the valid values, so
    a whole episode passed at once keeps one colour scale across frames.
    """
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    if near is None or far is None:
        values = depth[valid]
        lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        near = lo if near is None else near
        far = hi if far is None else far
    span = max(far - near, 1e-6)
    t = np.clip((far - np.where(valid, depth, far)) / span, 0.0, 1.0)
    out = VIRIDIS_LUT[(t * 255).round().astype(np.int64)]
    out[~valid] = 0
    return out


def _render_panel(key: str, frames: np.ndarray) -> np.ndarray:
    """One key of an episode (T, ...) -> uint8 (T, H, W, 3)."""
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    if frames.ndim == 4 and frames.shape[-1] == 3:
        if frames.dtype == np.uint8:
            return frames
        return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if frames.ndim == 3:
        if frames.dtype == np.uint8:
            return np.repeat(frames[..., None], 3, axis=-1)
        return colorize_depth(frames)
    raise DatasetError(
        f"cannot render key {key!r} with per-step shape {frames.shape[1:]}: expected an image "
        f"(H, W, 3) or a single-channel map (H, W)"
    )


def resize_nearest(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W, C) -> (..., height, width, C) by nearest neighbour (keeps real pixels visible)."""
    h, w = frames.shape[-3:-1]
    if (h, w) == (height, width):
        return frames
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return frames[..., rows, :, :][..., cols, :]


class VideoFile:
    """An H.264 MP4 (yuv420p) streamed to a temporary name: `commit()` renames it into place,
    `discard()` drops it, so a crash never leaves a half-written video under the final name."""

    def __init__(self, path: PathLike, fps: float = 10) -> None:
        import imageio.v2 as imageio  # heavy, and only needed here

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:8]}.partial.mp4")
        self._writer = imageio.get_writer(self._tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                          pixelformat="yuv420p", macro_block_size=1)

    def append(self, frame: np.ndarray) -> None:
        self._writer.append_data(frame)

    def commit(self) -> Path:
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def export_episode(
    path_or_dataset: PathLike | EpisodeDataset,
    index: int,
    out_path: PathLike,
    fps: float = 10,
    keys: Sequence[str] = ("rgb", "depth"),
    min_height: int = 256,
) -> Path:
    """Write episode ``index`` as an MP4 (H.264, yuv420p) or GIF, chosen by extension.

    The keys are shown side by side (depth colour-mapped), upscaled by nearest
    neighbour to at least ``min_height`` pixels and padded to even sizes, which
    H.264 players require. Returns the written path.
    """
    out = Path(out_path)
    suffix = out.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise DatasetError(f"{out}: unknown video extension {out.suffix!r}; use .mp4 or .gif")
    if fps <= 0:
        raise DatasetError(f"fps must be positive, got {fps}")
    dataset = (
        path_or_dataset
        if isinstance(path_or_dataset, EpisodeDataset)
        else EpisodeDataset(path_or_dataset)
    )
    if not len(dataset):
        raise DatasetError(f"{dataset.path}: the dataset has no episodes to export")
    try:
        episode = dataset.episode(index, keys)
    except IndexError as exc:
        raise DatasetError(f"{dataset.path}: {exc}") from None

    panels = [_render_panel(k, episode[k]) for k in keys]
    height = max(p.shape[1] for p in panels)
    panels = [resize_nearest(p, height, p.shape[2] * height // p.shape[1]) for p in panels]
    frames = np.concatenate(panels, axis=2)
    scale = max(1, math.ceil(min_height / height))
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")

    if suffix == ".mp4":
        video = VideoFile(out, fps=fps)
        try:
            for frame in frames:
                video.append(frame)
        except BaseException:
            video.discard()
            raise
        return video.commit()

    import imageio.v3 as iio  # heavy, and only needed here

    out.parent.mkdir(parents=True, exist_ok=True)
    # Same suffix, so the encoder picks the same format; renamed when complete.
    tmp = out.with_name(f".{out.stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        # pillow plugin: duration per frame in milliseconds; loop=0 repeats forever
        iio.imwrite(tmp, frames, plugin="pillow", duration=1000.0 / fps, loop=0)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


__all__ = [
    "DatasetError",
    "EpisodeDataset",
    "EpisodeWriter",
    "VideoFile",
    "WindowSampler",
    "colorize_depth",
    "export_episode",
    "resize_nearest",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]
