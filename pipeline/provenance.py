"""What each start of a run was: one line of `RUN/starts.jsonl` per start, written by rank 0.

A run folder outlives many jobs (requeues, resumes on other allocations,
fine-tunes started from it), so the folder records, for every start: when,
on how many ranks, from which code (the git commit and whether the tree
had uncommitted changes), with which versions of the packages whose
behaviour the numbers depend on, on which data (the sha256 of each split's
manifest, which names every shard and its digest), with which DeepSpeed
JSON, in which form the model's 1x1 convs ran on its device (matmul or
convolution: the same result within float rounding), and from what it
continued (a checkpoint, a weights file, nothing).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from datetime import datetime
from pathlib import Path

from data_prep.shards import MANIFEST
from data_prep.storage import open_store

STARTS_NAME = "starts.jsonl"
PACKAGES = ("torch", "deepspeed", "webdataset", "boto3")
_SOURCE = Path(__file__).resolve().parents[1]


def code_version(source: Path = _SOURCE) -> dict:
    """{"commit": sha or None, "dirty": bool or None}: None where the code is not a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0 or status.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def manifest_digests(data: str) -> dict[str, str]:
    """{split: sha256 of its manifest's bytes} for the train and valid splits of a prepared dataset."""
    return {split: hashlib.sha256(open_store(f"{data.rstrip('/')}/{split}").read_bytes(MANIFEST)).hexdigest()
            for split in ("train", "valid")}


def start_record(config, world: int, deepspeed_json: dict, started_from: dict, conv1x1_form: str) -> dict:
    """The line for this start. `started_from`: {"checkpoint": tag, "step": n}, or what the run was
    initialised from, or {} for a run from scratch."""
    return {"time": datetime.now().astimezone().isoformat(timespec="seconds"), "world_size": world,
            "code": code_version(), "packages": package_versions(), "data": config.data,
            "manifests_sha256": manifest_digests(config.data), "deepspeed": deepspeed_json,
            "conv1x1_form": conv1x1_form, "started_from": started_from}


def record_start(run_dir: str | Path, record: dict) -> None:
    """Append one start's line to RUN/starts.jsonl (one write of one line; `read_starts` passes over a
    line torn by a crash)."""
    with open(Path(run_dir) / STARTS_NAME, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_starts(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / STARTS_NAME
    starts = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            starts.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return starts
