"""The checkpoint: the run's stateful parts, saved together and resumed together; its layout; the mirror.

Parts: the DeepSpeed engine (model, optimizer and ZeRO partitions), the
EMA (one shard per rank under ZeRO 1-3, one file at stage 0), and the
client state: step, counters, every rank's data-stream position and RNG
states, the run config. Layout of `RUN/checkpoints/`:

    global_step<N>/            DeepSpeed's files, the client state inside its model-states file(s)
    global_step<N>/ema_rank<R:05d>.pt
    latest                     the tag of the newest complete checkpoint, written last, by rename

A checkpoint cut short by a crash is never the one resumed from. The
optional S3 mirror holds `<mirror>/<tag>/<files>`, uploaded by each rank in
the background, `<mirror>/uploaded/<tag>/rank<R>` per rank once its files
are up, and then `<mirror>/latest` (its commit point); a run folder lost
with its node resumes from it.

Nothing here unpickles code: every file is read with
`torch.load(weights_only=True)`, allowing only the few plain DeepSpeed
classes its checkpoints hold (`SAFE_DEEPSPEED_GLOBALS`); our own parts hold
tensors and plain containers only. A file that does not load that way
fails with `CheckpointError` naming it.
"""

from __future__ import annotations

import json
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
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from data_prep.storage import LocalStore, open_store

from .config import RunConfig
from .weights import UnsafeFileError
from .weights import safe_load as _safe_load

LATEST = "latest"
TAG_PREFIX = "global_step"
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


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """`torch.load` that cannot run code: tensors, plain containers and SAFE_DEEPSPEED_GLOBALS only."""
    try:
        return _safe_load(path, SAFE_DEEPSPEED_GLOBALS, map_location)
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
        client = {"step": step, "streams": streams, "rng": rngs, "counters": dict(counters),
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
        # DeepSpeed reads its files through the safe load set in __init__, so nothing there is read twice
        path, client = self.engine.load_checkpoint(str(self.folder), tag=tag)
        if path is None:
            raise CheckpointError(f"{self.folder}/{LATEST} names {tag}, which cannot be loaded")
        if len(client["streams"]) != self.world:
            raise CheckpointError(f"checkpoint {tag} was written by {len(client['streams'])} ranks, this job has "
                                  f"{self.world}: resume with the same number of ranks")
        self.ema.load_state_dict(safe_load(self.folder / tag / ema_file(self.rank if self.ema.sharded else 0)))
        self.stream.load_state_dict(client["streams"][self.rank])
        _set_rng_state(client["rng"][self.rank])
        return Resumed(tag, int(client["step"]), dict(client["counters"]))


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


def consolidate(run_dir: str | os.PathLike, tag: str | None = None) -> tuple[RunConfig, str, dict, dict]:
    """(config, tag, model state dict, EMA state dict) of a run's checkpoint, whole, fp32, on the CPU.

    The model comes from DeepSpeed's own consolidation (`zero_to_fp32`) at
    ZeRO 1-3, or its model-states file at stage 0; every file is first
    checked to load safely. The EMA at ZeRO 1-3 is one file per rank, each
    holding its piece of every parameter and where that piece starts in the
    parameter's flattened values (`EMA.starts`); the pieces are put in place
    (under ZeRO-3 rank r holds [r * ceil(n / world), ...), the last one padded
    beyond n).
    """
    config = load_run_config(run_dir)
    folder_root = checkpoints_dir(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{folder_root} has no `{LATEST}`: no finished checkpoint to export")
    folder = folder_root / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    files = {}  # every file checked before DeepSpeed's own reader (not a safe one) opens it; kept: ours
    for path in sorted(folder.glob("*.pt")):
        state = safe_load(path)
        if path.name.startswith("ema_rank") or path.name == "mp_rank_00_model_states.pt":
            files[path.name] = state
        del state  # (the optimizer states are large: not held while DeepSpeed reads them again)
    if config.zero_stage == 0:
        if "mp_rank_00_model_states.pt" not in files:
            raise CheckpointError(f"{folder} has no mp_rank_00_model_states.pt")
        model = files["mp_rank_00_model_states.pt"]["module"]
    else:
        model = get_fp32_state_dict_from_zero_checkpoint(str(folder_root), tag=tag)
    model = {k: v.float() for k, v in model.items()}
    shards = [files[name] for name in sorted(files) if name.startswith("ema_rank")]
    if not shards:
        raise FileNotFoundError(f"{folder} holds no EMA (ema_rank*.pt)")
    ema = {}
    for i, name in enumerate(shards[0]["names"]):
        n = model[name].numel()
        flat = torch.zeros(n)
        for shard in shards:  # each rank's piece in place (a partition's padding falls beyond n)
            piece, start = shard["shadow"][i].reshape(-1), shard["starts"][i]
            k = max(0, min(piece.numel(), n - start))
            flat[start:start + k] = piece[:k]
        ema[name] = flat.reshape(model[name].shape)
    return config, tag, model, ema
