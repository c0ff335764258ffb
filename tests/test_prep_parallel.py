"""Parallel and interrupted prep: real MPI ranks (mpirun) on a real S3 server, Slurm-array-style
tasks with a finalize step, and `kill -9` followed by a rerun."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


from data_prep.parallel import assign_shards
from data_prep.prep import prep
from data_prep.parallel import Ranks
from pipeline.distributed import detect_ranks

ROOT = Path(__file__).resolve().parents[1]
VDVAE = [sys.executable, "-m", "launch.cli"]

def env_with(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) and k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    env["PMIX_MCA_psec"] = "native"  # not munge: without munged, mpirun waits 2.3 s for it
    env.update(extra)
    return env


def test_rank_detection():
    assert detect_ranks({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == Ranks(1, 2, "mpi")
    assert detect_ranks({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                         "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == \
        Ranks(1, 3, "slurm-array")
    assert detect_ranks({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == Ranks(3, 4, "slurm")
    # srun --mpi=pmix: MPI ranks (PMIx gives the rank, Slurm the size)
    assert detect_ranks({"PMIX_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == Ranks(1, 2, "mpi")
    assert detect_ranks({"RANK": "0", "WORLD_SIZE": "2"}) == Ranks(0, 2, "env")
    assert detect_ranks({}) == Ranks(0, 1, "single")


def test_shards_are_shared_by_sample_count_across_splits():
    # ffhq256-like: train's last shard short, valid one shard; i % world per split gave rank 0 94 of 160
    owners = assign_shards({"train": 146, "valid": 14}, 16, 2)
    assert owners == {"train": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1], "valid": [1]}
    sizes = {"train": [16] * 9 + [2], "valid": [14]}
    load = [sum(n for split in owners for n, r in zip(sizes[split], owners[split], strict=True) if r == rank)
            for rank in (0, 1)]
    assert load == [80, 80]
    # every shard once, whatever the world size; one rank takes all
    assert assign_shards({"train": 100, "valid": 7}, 10, 1) == {"train": [0] * 10, "valid": [0]}
    many = assign_shards({"train": 95, "valid": 30}, 10, 4)
    assert [len(v) for v in many.values()] == [10, 3] and set(many["train"] + many["valid"]) == {0, 1, 2, 3}


def test_two_mpi_ranks_to_s3_equal_one_process(cifar_src, tmp_path, bucket, s3_server):
    src, _ = cifar_src
    prep("cifar10", src, str(tmp_path / "one"), samples_per_shard=500, progress=False)
    out = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", *VDVAE, "prep", "cifar10",
         "--src", str(src), "--out", f"s3://{bucket}/c", "--samples-per-shard", "500"],
        env=env_with(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # rank 0 built half of the valid shards (its bar counts 2500 of 5000); rank 1 the rest
    assert re.search(r"cifar10/valid rank 0/2: 100%.* 2500/2500 ", out.stderr), out.stderr[-1500:]
    client = s3_server["client"]
    listing = client.list_objects_v2(Bucket=bucket, Prefix="c/valid/")["Contents"]
    assert len([o for o in listing if o["Key"].endswith(".tar")]) == 10
    for split in ("train", "valid", "test"):
        got = client.get_object(Bucket=bucket, Key=f"c/{split}/manifest.json")["Body"].read()
        assert got == (tmp_path / "one" / split / "manifest.json").read_bytes()


def test_slurm_array_tasks_then_finalize(cifar_src, tmp_path):
    src, _ = cifar_src
    prep("cifar10", src, str(tmp_path / "one"), samples_per_shard=700, progress=False)
    cmd = [*VDVAE, "prep", "cifar10", "--src", str(src), "--out", str(tmp_path / "arr"),
           "--samples-per-shard", "700"]
    array = dict(SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_COUNT="3", SLURM_ARRAY_JOB_ID="77")
    for task in ("1", "3"):  # task 2 has not run yet
        out = subprocess.run(cmd, env=env_with(SLURM_ARRAY_TASK_ID=task, **array), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "--finalize" in out.stdout
    assert not (tmp_path / "arr" / "valid" / "manifest.json").exists()
    early = subprocess.run([*cmd, "--finalize"], env=env_with(), capture_output=True, text=True)
    sizes = {split: json.loads((tmp_path / "one" / split / "manifest.json").read_text())["num_samples"]
             for split in ("train", "valid", "test")}
    task_2 = [i for i, rank in enumerate(assign_shards(sizes, 700, 3)["valid"]) if rank == 1]
    assert early.returncode == 2 and "shards are not complete" in early.stderr
    assert f"{len(task_2)} of" in early.stderr and f"valid-{task_2[0]:06d}.tar" in early.stderr
    assert subprocess.run(cmd, env=env_with(SLURM_ARRAY_TASK_ID="2", **array)).returncode == 0
    assert subprocess.run([*cmd, "--finalize"], env=env_with(), capture_output=True).returncode == 0
    for split in ("train", "valid", "test"):
        assert (tmp_path / "arr" / split / "manifest.json").read_bytes() == \
            (tmp_path / "one" / split / "manifest.json").read_bytes()


def test_kill_9_then_rerun_equals_a_clean_run(cifar_src, tmp_path):
    src, _ = cifar_src
    # small shards: many commit points, so the kill lands mid-split
    prep("cifar10", src, str(tmp_path / "clean"), samples_per_shard=50, progress=False)
    cmd = [*VDVAE, "prep", "cifar10", "--src", str(src), "--out", str(tmp_path / "killed"),
           "--samples-per-shard", "50"]
    proc = subprocess.Popen(cmd, env=env_with(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    valid = tmp_path / "killed" / "valid"
    deadline = time.time() + 120
    while len(list(valid.glob("*.done.json"))) < 3 and time.time() < deadline:  # mid-split
        time.sleep(0.02)
    assert proc.poll() is None, "the prep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (valid / "manifest.json").exists()
    # what a process killed mid-write leaves: a hidden temporary named by host and pid
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = valid / f".valid-000090.tar-encoded.{socket.gethostname()}.{dead.pid}.tmp"
    stale.write_bytes(b"partial")
    other_host = valid / f".valid-000090.tar-encoded.some-other-node.{dead.pid}.tmp"
    other_host.write_bytes(b"another node's, maybe still running")
    assert subprocess.run(cmd, env=env_with(), capture_output=True).returncode == 0
    assert not stale.exists() and other_host.exists()
    other_host.unlink()
    assert not list((tmp_path / "killed").rglob(".*.tmp"))
    for split in ("train", "valid", "test"):
        folder = tmp_path / "killed" / split
        assert (folder / "manifest.json").read_bytes() == (tmp_path / "clean" / split / "manifest.json").read_bytes()
        for shard in (tmp_path / "clean" / split).glob("*.tar"):
            assert (folder / shard.name).read_bytes() == shard.read_bytes()


def test_kill_9_mid_upload_to_s3_then_rerun_equals_a_clean_run(tmp_path, bucket, s3_server):
    """Shards bigger than a part stream to S3 in parts. A prep killed with a shard's parts sent leaves an
    unfinished upload, never an object under the shard's name; the rerun aborts it and ends with the same
    shards and manifests as a clean run."""
    import numpy as np
    from PIL import Image

    from data_prep.storage import PART_BYTES

    folder = tmp_path / "src" / "images1024x1024" / "00000"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(24):  # 3 MiB each, stored: a 4-image shard is two parts
        Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(folder / f"{n:05d}.png",
                                                                                    compress_level=0)
    prep("ffhq1024", tmp_path / "src", str(tmp_path / "clean"), samples_per_shard=4, progress=False)
    assert PART_BYTES < (tmp_path / "clean" / "train" / "train-000000.tar").stat().st_size < 2 * PART_BYTES
    client = s3_server["client"]
    cmd = [*VDVAE, "prep", "ffhq1024", "--src", str(tmp_path / "src"), "--out", f"s3://{bucket}/f",
           "--samples-per-shard", "4"]
    proc = subprocess.Popen(cmd, env=env_with(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uploads = lambda: client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])  # noqa: E731
    caught = []
    deadline = time.time() + 120
    while not caught and proc.poll() is None and time.time() < deadline:
        if uploads():
            proc.send_signal(signal.SIGSTOP)  # hold it still, then look again: is an upload open now?
            caught = uploads()
            proc.send_signal(signal.SIGKILL if caught else signal.SIGCONT)
        time.sleep(0.005)
    proc.wait()
    assert caught, "the prep finished before it could be killed with an upload open"
    names = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="f/").get("Contents", [])]
    assert all(u["Key"] not in names for u in caught)  # the shard being sent is not listed
    assert "f/train/manifest.json" not in names
    rerun = subprocess.run(cmd, env=env_with(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert uploads() == []
    for path in (tmp_path / "clean" / "train").iterdir():
        assert client.get_object(Bucket=bucket, Key=f"f/train/{path.name}")["Body"].read() == path.read_bytes()
    assert client.head_object(Bucket=bucket, Key="f/train/train-000000.tar")["ETag"].endswith('-2"')  # parts


def test_s3_down_mid_prep_then_back_completes_like_a_clean_run(cifar_src, tmp_path):
    """The server is killed after the first shards and comes back 8 s later: the prep waits and finishes."""
    from services import SeaweedFS

    src, _ = cifar_src
    prep("cifar10", src, str(tmp_path / "clean"), samples_per_shard=250, progress=False)
    server = SeaweedFS(tmp_path / "weed")
    try:
        client = server.client()
        client.create_bucket(Bucket="outage")
        # an upload that a killed process left unfinished: aborted by the next run
        stale = client.create_multipart_upload(Bucket="outage", Key="c10/valid/valid-000003.tar")["UploadId"]
        client.upload_part(Bucket="outage", Key="c10/valid/valid-000003.tar", UploadId=stale, PartNumber=1,
                           Body=b"half a shard")
        proc = subprocess.Popen([*VDVAE, "prep", "cifar10", "--src", str(src), "--out", "s3://outage/c10",
                                 "--samples-per-shard", "250"], env=env_with(**server.env),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and client.list_objects_v2(
                Bucket="outage", Prefix="c10/train/").get("KeyCount", 0) < 4:
            time.sleep(0.05)
        assert proc.poll() is None, "the prep finished before the outage"
        server.stop()
        time.sleep(8)
        assert proc.poll() is None, "the prep gave up during the outage"
        server.start()
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
        assert client.list_multipart_uploads(Bucket="outage").get("Uploads", []) == []
        for split in ("train", "valid", "test"):
            ours = json.loads(client.get_object(Bucket="outage", Key=f"c10/{split}/manifest.json")["Body"].read())
            clean = json.loads((tmp_path / "clean" / split / "manifest.json").read_text())
            assert ours["shards"] == clean["shards"]
    finally:
        server.stop()
