"""The checkpoint: the run's stateful parts, saved together and resumed together; its layout; the mirror.

Parts: the DeepSpeed engine (model, optimizer and ZeRO partitions), the
EMA (one shard per rank under ZeRO 1-3, one file at stage 0), and the
client state: step, counters, the world size, the data stream's cursor
(world-free, `stream.py`), every rank's RNG states, the run config. Layout
of `RUN/checkpoints/`:

    global_step<N>/            DeepSpeed's files, the client state inside its model-states file(s)
    global_step<N>/ema_rank<R:05d>.pt
    latest                     the tag of the newest complete checkpoint, written last, by rename

A checkpoint cut short by a crash is never the one resumed from. The
optional S3 mirror holds `<mirror>/<tag>/<files>`, uploaded by each rank in
the background, `<mirror>/uploaded/<tag>/rank<R>` per rank once its files
are up, and then `<mirror>/latest` (its commit point); a run folder lost
with its node resumes from it.

On the ranks that wrote it, a checkpoint is resumed through DeepSpeed's own
loader. On another number of ranks (ZeRO 1-3: as many optimizer files as
ranks wrote them), every rank reads the partitions into whole fp32
tensors (`read_checkpoint`: the weights, the Adam moments and step counts,
the EMA) and takes its new share of them (`zero_state.py`); at stage 0 the
files do not depend on the ranks and DeepSpeed's loader serves. The stream
continues from its cursor; the RNG states are reseeded from (seed, step,
rank) when the ranks changed (so the latent noise differs from an
uninterrupted run's; nothing else does).

Nothing here unpickles code: every file is read with
`torch.load(weights_only=True)`, allowing only the few plain DeepSpeed
classes its checkpoints hold (`SAFE_DEEPSPEED_GLOBALS`); our own parts hold
tensors and plain containers only. A file that does not load that way
fails with `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from data_prep.storage import LocalStore, open_store

from .config import RunConfig
from .stream import legacy_cursor
from .weights import UnsafeFileError
from .weights import safe_load as _safe_load
from .zero_state import MOMENTS, AdamState, load_adam_state, load_whole_ema

LATEST = "latest"
TAG_PREFIX = "global_step"
UPLOAD_NICENESS = 10
"""The mirror's upload threads' nice value: they yield the CPU to the training loop."""
UPLOADED = "uploaded"
"""The mirror's folder of per-rank "all my files are up" markers, one folder per checkpoint tag."""
SAFE_DEEPSPEED_GLOBALS = [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]
"""The classes DeepSpeed 0.19 pickles into its checkpoints (optimizer states): plain data, no code."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, of another run, or unsafe to load."""


def owner_rank(name: str) -> int:
    """The rank that writes a checkpoint file: `zero_pp_rank_<R>_...` (DeepSpeed's partitions, and
    each rank's model states under ZeRO-3) and `ema_rank<R>.pt` are rank R's; the rest rank 0's."""
    found = re.search(r"(?:zero_pp_rank_|ema_rank)(\d+)", name)
    return int(found.group(1)) if found else 0


def _all_names(store, folder: str) -> list[str]:
    """Every object under `folder` of `store`, as names relative to the store."""
    sub = open_store(f"{store.url.rstrip('/')}/{folder}")
    return [f"{folder}/{n}" for n in sub.list()] + [n for f in sub.list_folders()
                                                     for n in _all_names(store, f"{folder}/{f}")]


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def step_of(tag: str) -> int | None:
    number = tag.removeprefix(TAG_PREFIX)
    return int(number) if tag.startswith(TAG_PREFIX) and number.isdigit() else None


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | os.PathLike) -> str | None:
    """The tag of the newest complete checkpoint of a run folder, None when it has none."""
    path = checkpoints_dir(run_dir) / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    if step_of(tag) is None:
        raise CheckpointError(f"{path} names {tag!r}, not a checkpoint tag ({TAG_PREFIX}<step>)")
    return tag


def ema_file(rank: int) -> str:
    return f"ema_rank{rank:05d}.pt"


def safe_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """`torch.load` that cannot run code: tensors, plain containers and SAFE_DEEPSPEED_GLOBALS only."""
    try:
        return _safe_load(path, SAFE_DEEPSPEED_GLOBALS, map_location, mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{os.fspath(path)} does not exist: the checkpoint is incomplete") from None
    except UnsafeFileError as err:
        raise CheckpointError(f"checkpoint file {err} Remove the checkpoint, or resume from another "
                              "one") from None


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _reseed(seed: int, step: int, rank: int) -> None:
    """Fresh RNG states for a rank of a job whose ranks changed: from (seed, step, rank)."""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(mixed)
    np.random.seed(mixed)
    random.seed(mixed)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Resumed:
    tag: str
    step: int
    counters: dict
    world: int
    """The ranks that wrote the checkpoint."""


class Checkpointer:
    """Saves and resumes the run's parts on every rank together (`save` and `resume` are collective)."""

    def __init__(self, config: RunConfig, engine, ema, stream, rank: int, world: int):
        self.config, self.engine, self.ema, self.stream = config, engine, ema, stream
        self.rank, self.world = rank, world
        self.folder = checkpoints_dir(config.run_dir)
        self.store = LocalStore(self.folder)
        # DeepSpeed reads its files through its checkpoint engine: make that read safe
        engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)
        self.mirror = Mirror(config.checkpoint_mirror, rank, world, config.keep_checkpoints,
                             config.mirror_wait_s) if config.checkpoint_mirror else None

    def save(self, step: int, counters: dict) -> Path:
        if self.mirror is not None:
            self.mirror.wait()  # this rank's upload of the previous checkpoint, whose files prune may delete
        tag = tag_for(step)
        folder = self.folder / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.ema.sharded or self.rank == 0:
            LocalStore(folder).write_with(ema_file(self.rank if self.ema.sharded else 0),
                                          lambda f: torch.save(self.ema.state_dict(), f))
        streams, rngs = [None] * self.world, [None] * self.world
        dist.all_gather_object(streams, self.stream.state_dict())
        dist.all_gather_object(rngs, _rng_state())
        cursor = dict(streams[0], skipped=sum(int(s["skipped"]) for s in streams))  # the same on every rank
        client = {"step": step, "world": self.world, "stream": cursor, "rng": rngs, "counters": dict(counters),
                  "config": self.config.to_json()}
        # DeepSpeed's own `latest` is written by rank 0 before the other ranks are known to have
        # finished, and not atomically: ours is written after a barrier, by rename.
        self.engine.save_checkpoint(str(self.folder), tag=tag, client_state=client, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            self.store.write_bytes(LATEST, tag.encode())
            self.prune()
        dist.barrier()
        if self.mirror is not None:
            self.mirror.start_upload(folder)  # this rank's files, in the background
        return folder

    def finish_uploads(self) -> bool:
        """Wait, at the end of the job, for this rank's pending mirror upload (up to mirror_wait_s);
        whether it finished."""
        return self.mirror is None or self.mirror.wait(self.config.mirror_wait_s)

    def prune(self) -> None:
        """Keep the newest `keep_checkpoints` (never the one `latest` names)."""
        latest = latest_tag(self.config.run_dir)
        tags = sorted((step_of(p.name), p) for p in self.folder.glob(f"{TAG_PREFIX}*") if step_of(p.name) is not None)
        for _, path in tags[:-self.config.keep_checkpoints]:
            if path.name != latest:
                shutil.rmtree(path, ignore_errors=True)

    def resume(self) -> Resumed | None:
        """Restore every part from `latest` (fetched from the mirror when the folder has none)."""
        if self.config.checkpoint_mirror and latest_tag(self.config.run_dir) is None:
            if self.rank == 0:  # a run folder lost with its node: continue from the mirror
                Mirror(self.config.checkpoint_mirror).download(self.folder)
            dist.barrier()
        tag = latest_tag(self.config.run_dir)
        if tag is None:
            return None
        folder, stage = self.folder / tag, self.engine.zero_optimization_stage()
        written_by = saved_world(folder, stage)
        if written_by in (None, self.world):
            # DeepSpeed reads its files through the safe load set in __init__, so nothing there is read twice
            path, client = self.engine.load_checkpoint(str(self.folder), tag=tag)
            if path is None:
                raise CheckpointError(f"{self.folder}/{LATEST} names {tag}, which cannot be loaded")
            self.ema.load_state_dict(safe_load(folder / ema_file(self.rank if self.ema.sharded else 0)))
        else:
            client = self._repartition(folder, stage, written_by)
        written_by = int(client.get("world", len(client["rng"])))
        self.stream.load_state_dict(client["stream"] if "stream" in client else legacy_cursor(client["streams"]))
        if written_by == self.world:
            _set_rng_state(client["rng"][self.rank])
        else:
            _reseed(self.config.seed, int(client["step"]), self.rank)
        return Resumed(tag, int(client["step"]), dict(client["counters"]), written_by)

    def _repartition(self, folder: Path, stage: int, written_by: int) -> dict:
        """Resume a checkpoint of `written_by` ranks on this job's: every rank reads it whole and takes
        its share. The client state."""
        started = time.perf_counter()
        saved = read_checkpoint(folder, stage)
        load_adam_state(self.engine, saved.adam)
        load_whole_ema(self.ema, saved.ema)
        for name, value in saved.engine_counters.items():  # DeepSpeed's own step and sample counts
            setattr(self.engine, name, value)
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        for name in _SCALER_FIELDS if saved.loss_scaler is not None and scaler is not None else ():
            if hasattr(saved.loss_scaler, name) and hasattr(scaler, name):
                setattr(scaler, name, getattr(saved.loss_scaler, name))
        dist.barrier()
        if self.rank == 0:
            print(f"{folder.name}: written by {written_by} rank{'s' * (written_by != 1)}, re-partitioned for "
                  f"{self.world} in {time.perf_counter() - started:.1f} s", flush=True)
        return saved.client


_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""An fp16 dynamic loss scale's state (DeepSpeed's DynamicLossScaler)."""


class Mirror:
    """The checkpoint mirror on S3: `<url>/<tag>/<files>`, then `<url>/latest` (the commit point).

    Every rank uploads the files it wrote (`owner_rank`) in a background
    thread while training goes on; large files go up in parallel multipart
    parts (boto3's transfer manager). A rank that has all of its files up
    writes `<url>/uploaded/<tag>/rank<R>`; rank 0's thread, once every
    rank's marker is there, writes `latest` and deletes the older
    checkpoints (batch deletes), keeping `keep`. A crash midway leaves
    `latest` on the previous complete checkpoint. The next checkpoint, and
    the end of the job, wait for a rank's pending upload first (up to
    `wait_s` at the end). A failed upload is reported and training goes on:
    the local checkpoint is whole, and the mirror keeps its last complete one.
    """

    def __init__(self, url: str, rank: int = 0, world: int = 1, keep: int = 3, wait_s: float = 600):
        self.url = url.rstrip("/")
        self.rank, self.world, self.keep, self.wait_s = rank, world, keep, wait_s
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        """Why the last upload did not complete (None: it did, or none ran)."""

    def start_upload(self, folder: Path) -> None:
        """Upload this rank's files of the checkpoint `folder` in the background (after the previous
        upload, which this waits for)."""
        self.wait()
        files = sorted(p for p in folder.iterdir() if p.is_file() and owner_rank(p.name) == self.rank)
        self.failure = None
        self._thread = threading.Thread(target=self._upload, args=(folder.name, files), daemon=True,
                                        name=f"mirror-{folder.name}")
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for this rank's pending upload (at most `timeout` s); whether none is left."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                print(f"mirror: the upload of {self._thread.name.removeprefix('mirror-')} to {self.url} is still "
                      f"running after {timeout:.0f} s; leaving it (the mirror's latest stays on the previous "
                      "complete checkpoint)", file=sys.stderr, flush=True)
                return False
            self._thread = None
        return True

    def _upload(self, tag: str, files: list[Path]) -> None:
        try:  # below the training in the CPU's queue (Linux: per thread, inherited by the transfer threads)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
        except (OSError, AttributeError):
            pass
        try:
            markers = open_store(f"{self.url}/{UPLOADED}/{tag}")
            marker = f"rank{self.rank:05d}"
            markers.delete(marker)  # an earlier attempt's (a run that crashed mid-upload and saved this step again)
            store = open_store(f"{self.url}/{tag}")
            for path in files:
                store.put_file(path.name, path)
            markers.write_bytes(marker, json.dumps({p.name: p.stat().st_size for p in files}).encode())
            if self.rank == 0:
                self._commit(tag, markers)
        except Exception as err:  # reported, not raised: training goes on with its local checkpoint
            self.failure = f"{type(err).__name__}: {err}"
            print(f"mirror: checkpoint {tag} was not mirrored to {self.url}: {self.failure}", file=sys.stderr,
                  flush=True)

    def _commit(self, tag: str, markers) -> None:
        """Once every rank's files are up: `latest`, then the older checkpoints go."""
        deadline, pause = time.monotonic() + self.wait_s, 0.1
        while len(markers.list()) < self.world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(markers.list())} of {self.world} ranks uploaded {tag} within "
                                   f"{self.wait_s:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
        root = open_store(self.url)
        root.write_bytes(LATEST, tag.encode())
        tags = sorted((step_of(t), t) for t in root.list_folders() if step_of(t) is not None)
        old = [t for _, t in tags[:-self.keep] if t != tag]
        root.delete_many([name for t in old for name in _all_names(root, t) + _all_names(root, f"{UPLOADED}/{t}")])

    def download(self, folder: Path) -> str | None:
        """Fetch the mirror's latest checkpoint into `folder` (a run's checkpoints/); its tag, or None."""
        root = open_store(self.url)
        if LATEST not in root.list():
            return None
        tag = root.read_bytes(LATEST).decode().strip()
        if step_of(tag) is None:
            raise CheckpointError(f"{self.url}/{LATEST} names {tag!r}, not a checkpoint tag")

        def fetch(url: str, into: Path) -> None:
            store = open_store(url)
            into.mkdir(parents=True, exist_ok=True)
            for name in store.list() + store.list_folders():
                if name in (".", "..") or "/" in name or "\\" in name:  # never outside the run folder
                    raise CheckpointError(f"{url}: refusing the name {name!r}")
            for name in store.list():
                store.download(name, into / name)
            for sub in store.list_folders():
                fetch(f"{url}/{sub}", into / sub)
        fetch(f"{self.url}/{tag}", folder / tag)
        LocalStore(folder).write_bytes(LATEST, tag.encode())
        print(f"fetched checkpoint {tag} from {self.url}", flush=True)
        return tag


# -- reading a run without DeepSpeed's engine: export, eval, sample ---------------------------------


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    return RunConfig.from_json(path.read_bytes(), str(path))


_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")  # (bf16_: bf16 runs)
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def _model_states_file(folder: Path, stage: int) -> Path:
    return folder / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt")


def _optim_files(folder: Path) -> list[Path]:
    """The ZeRO optimizer files of a checkpoint, in rank order; refused when a rank's is missing."""
    files = {int(m.group(1)): p for p in folder.iterdir() if (m := _OPTIM_FILE.fullmatch(p.name))}
    missing = sorted(set(range(max(files, default=-1) + 1)) - set(files))
    if missing:
        raise CheckpointError(f"{folder}: the optimizer files of ranks {missing} are missing: the checkpoint is "
                              "incomplete")
    return [files[r] for r in sorted(files)]


def saved_world(folder: Path, stage: int) -> int | None:
    """How many ranks wrote a ZeRO 1-3 checkpoint (one optimizer file each); None at stage 0, whose
    files are the same for any number of ranks."""
    if stage == 0:
        return None
    return len(_optim_files(folder)) or None


@dataclass
class SavedCheckpoint:
    """A checkpoint read whole, world-free: what any number of ranks can resume from."""

    adam: AdamState
    ema: dict[str, torch.Tensor]
    client: dict
    """Our client state: step, world, stream, rng, counters, config."""
    engine_counters: dict[str, int]
    loss_scaler: object | None


def _walk_flat(flat: torch.Tensor, shapes: dict, paddings: list[int] | None, where: Path) -> dict:
    """ZeRO 1-2: a parameter group's flat values (the ranks' partitions end to end) as tensors."""
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        if offset + n > flat.numel():
            raise CheckpointError(f"{where}: the partitions hold {flat.numel()} values, fewer than the parameters "
                                  "they should hold: the checkpoint is damaged or of another layout")
        out[name] = flat.narrow(0, offset, n).reshape(tuple(shape)).clone()
        offset += n + (paddings[i] if paddings else 0)
    return out


def _zero12(osds: list[dict], shapes: list[dict], key: str | None, where: Path) -> dict:
    """Whole tensors from the ranks' ZeRO 1-2 partitions: the fp32 master (`key` None) or a moment."""
    out = {}
    for g, group_shapes in enumerate(shapes):
        pieces = []
        for osd in osds:
            master = osd["single_partition_of_fp32_groups"][g]  # (saved without the last rank's padding)
            if key is None:
                pieces.append(master.float())
                continue
            base = osd["base_optimizer_state"]
            slot = base["state"][g] if isinstance(base, dict) else base[g]
            pieces.append(slot[key].float()[:master.numel()])
        paddings = osds[0].get("param_alignment_paddings")
        out.update(_walk_flat(torch.cat(pieces), group_shapes, paddings[g] if paddings else None, where))
    return out


def _zero3(osds: list[dict], shapes: list[dict], key: str | None, where: Path) -> dict:
    """Whole tensors from the ranks' ZeRO-3 partitions: parameter i is the ranks' ceil(n / world)
    values each, end to end, at the same offset of every rank's flat buffers."""
    world = len(osds)
    flats = []
    for osd in osds:
        groups = osd["fp32_flat_groups"]
        if key is None:
            flats.append(torch.cat([t.float().reshape(-1) for t in groups]))
            continue
        state = osd["optimizer_state_dict"]["state"]
        if len(state) != len(groups):
            raise CheckpointError(f"{where}: {len(state)} optimizer states for {len(groups)} ZeRO-3 sub-groups")
        flats.append(torch.cat([state[i][key].float().reshape(-1) for i in range(len(groups))]))
    out, offset = {}, 0
    for name, shape in ((k, v) for group in shapes for k, v in group.items()):
        n = math.prod(shape)
        size = math.ceil(n / world)
        if offset + size > flats[0].numel():
            raise CheckpointError(f"{where}: the ZeRO-3 partitions are shorter than the parameters they should hold")
        out[name] = torch.cat([flat.narrow(0, offset, size) for flat in flats])[:n].reshape(tuple(shape)).clone()
        offset += size
    return out


def _step_of_slots(slots, where: Path) -> int:
    steps = {int(float(slot["step"])) for slot in slots if "step" in slot}
    if len(steps) > 1:
        raise CheckpointError(f"{where}: the optimizer states disagree on the step count ({sorted(steps)})")
    return steps.pop() if steps else 0


def _whole_ema(shards: list[dict], shapes: dict[str, tuple], where: Path) -> dict[str, torch.Tensor]:
    """The EMA, whole, from its files: at ZeRO 1-3 each rank's piece of every parameter and where the
    piece starts in the parameter's flattened values (`EMA.starts`) put in place (under ZeRO-3 rank r
    holds [r * ceil(n / world), ...), the last one padded beyond n)."""
    if not shards:
        raise FileNotFoundError(f"{where} holds no EMA (ema_rank*.pt)")
    ema = {}
    for i, name in enumerate(shards[0]["names"]):
        n = math.prod(shapes[name])
        flat = torch.zeros(n)
        for shard in shards:  # each rank's piece in place (a partition's padding falls beyond n)
            piece, start = shard["shadow"][i].reshape(-1), shard["starts"][i]
            k = max(0, min(piece.numel(), n - start))
            flat[start:start + k] = piece[:k].float()
        ema[name] = flat.reshape(tuple(shapes[name]))
    return ema


def read_checkpoint(folder: Path, stage: int, moments: bool = True) -> SavedCheckpoint:
    """A checkpoint folder of any ZeRO stage and world size, whole, fp32, on the CPU, every file read
    safely (tensors memory-mapped: what is not used is not read). `moments=False`: weights only."""
    states = safe_load(_model_states_file(folder, stage), mmap=True)
    client = {k: v for k, v in states.items() if k in ("step", "world", "stream", "streams", "rng", "counters",
                                                        "config")}
    counters = {k: states[k] for k in _ENGINE_COUNTERS if k in states}
    scaler = None
    if stage == 0:
        module, buffers = states["module"], set(states.get("buffer_names") or ())
        names = [k for k in module if k not in buffers]
        weights = {k: module[k].float().clone() for k in names}
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        optimizer = states.get("optimizer") or {"state": {}, "param_groups": []}
        ids = [i for group in optimizer["param_groups"] for i in group["params"]]
        slots = [optimizer["state"].get(i, {}) for i in ids]
        adam = AdamState(weights, step=_step_of_slots(slots, folder))
        if moments and slots and all(key in slot for slot in slots for key in MOMENTS):
            if len(ids) != len(names):
                raise CheckpointError(f"{folder}: {len(ids)} optimizer states for {len(names)} parameters")
            adam.exp_avg, adam.exp_avg_sq = ({name: slot[key].float().clone()
                                              for name, slot in zip(names, slots, strict=True)} for key in MOMENTS)
    else:
        files = _optim_files(folder)
        osds = [safe_load(path, mmap=True)["optimizer_state_dict"] for path in files]
        count = osds[0].get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if count != len(files):
            raise CheckpointError(f"{folder}: {len(files)} optimizer files, written by {count} ranks")
        shapes_by_group = states["param_shapes"]
        shapes = {k: tuple(v) for group in shapes_by_group for k, v in group.items()}
        unflatten = _zero3 if stage == 3 else _zero12
        adam = AdamState(unflatten(osds, shapes_by_group, None, folder))
        if stage == 3:
            slots = [slot for osd in osds for slot in osd["optimizer_state_dict"]["state"].values()]
        else:
            slots = [slot for osd in osds for slot in (osd["base_optimizer_state"]["state"].values()
                     if isinstance(osd["base_optimizer_state"], dict) else osd["base_optimizer_state"])]
        adam.step = _step_of_slots(slots, folder)
        if moments and slots and all(key in slot for slot in slots for key in MOMENTS):
            adam.exp_avg, adam.exp_avg_sq = (unflatten(osds, shapes_by_group, key, folder) for key in MOMENTS)
        scaler = osds[0].get("loss_scaler")
    shards = [safe_load(path, mmap=True) for path in sorted(folder.glob("ema_rank*.pt"))]
    return SavedCheckpoint(adam, _whole_ema(shards, shapes, folder), client, counters, scaler)


def consolidate(run_dir: str | os.PathLike, tag: str | None = None) -> tuple[RunConfig, str, dict, dict]:
    """(config, tag, model state dict, EMA state dict) of a run's checkpoint, whole, fp32, on the CPU
    (`read_checkpoint`: the fp32 master weights joined from the ZeRO partitions, the EMA from its
    per-rank pieces)."""
    config = load_run_config(run_dir)
    folder_root = checkpoints_dir(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{folder_root} has no `{LATEST}`: no finished checkpoint to export")
    folder = folder_root / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    if not _model_states_file(folder, config.zero_stage).is_file():
        raise CheckpointError(f"{folder} has no {_model_states_file(folder, config.zero_stage).name}")
    saved = read_checkpoint(folder, config.zero_stage, moments=False)
    return config, tag, saved.adam.weights, saved.ema
