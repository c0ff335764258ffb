"""`vdvae train` on 2 real DeepSpeed ranks (gloo, CPU): the tiny model on a small prepared dataset."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, gradient_photos
from data_prep.prep import prep
from model.vdvae import conv1x1_form

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 photographs-like 8 px images (smooth gradients plus noise: learnable), prepared as shards."""
    tmp = tmp_path_factory.mktemp("train-data")
    prep("folder", gradient_photos(tmp / "src"), str(tmp / "data"), samples_per_shard=16, resolution=8,
         num_valid=8, progress=False)
    model_json = tmp / "tiny.json"
    model_json.write_text(json.dumps(asdict(TINY)))
    return {"data": str(tmp / "data"), "model_json": str(model_json)}


def launch(data, run_dir: Path, port: int, *settings: str, world: int = 2, wait: bool = True,
           from_config: bool = False):
    """`vdvae train` on `world` ranks; from_config: relaunch RUN/config.json (`--config`) with `settings`."""
    if from_config:
        cmd = [sys.executable, "-m", "launch.cli", "train", "--config", str(run_dir / "config.json"), *settings]
    else:
        cmd = [sys.executable, "-m", "launch.cli", "train", "--preset", "cifar10", "--data", data["data"],
               "--run-dir", str(run_dir), f"model_json={data['model_json']}", "batch_per_gpu=4", "lr=2e-3",
               "warmup_iters=2", "workers=0", "log_every=1", *settings]
    procs = []
    for rank in range(world):
        env = dict(os.environ, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=ROOT))
    if not wait:
        return procs
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (out[-2000:], err[-4000:])
    return procs


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if f"{kind}/elbo" in r]


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> ELBO from the jsonl log (the last record of a step, if a resume repeated it)."""
    return {r["step"]: r["train/elbo"] for r in records(run_dir)}


def test_loss_falls_and_tensorboard_has_every_tag(data, tmp_path, free_port):
    run = tmp_path / "run"
    launch(data, run, free_port, "zero_stage=2", "max_steps=30", "checkpoint_every=100", "eval_every=15",
           "ema_rate=0.8")  # the preset's 0.9999 would barely move in 30 steps
    elbo = losses(run)
    evals = records(run, "eval")
    assert [e["step"] for e in evals] == [15, 30] and all(e["eval/images"] == 8 for e in evals)  # each once
    assert evals[1]["eval/elbo"] < evals[0]["eval/elbo"]
    assert sorted(elbo) == list(range(1, 31))
    first, last = np.mean([elbo[s] for s in range(1, 6)]), np.mean([elbo[s] for s in range(26, 31)])
    assert last < first - 0.2, (first, last)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/elbo", "train/distortion", "train/rate", "train/bpd", "train/grad_norm",
            "train/skipped_updates", "train/nan_losses", "train/lr", "train/images_per_s", "train/step_time_s",
            "train/data_wait_fraction", "memory/host_rss_gb", "train/skipped_samples", "eval/elbo", "eval/bpd"} <= tags
    assert [e.step for e in events.Scalars("train/elbo")] == list(range(1, 31))
    assert events.Scalars("train/elbo")[-1].value == pytest.approx(elbo[30], rel=1e-5)
    assert "config/text_summary" in events.Tags()["tensors"]
    assert {"samples", "reconstructions"} <= set(events.Tags()["images"])
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step00000030-reconstructions.png",
                                                                   "step00000030-samples.png"]
    assert json.loads((run / "config.json").read_text())["zero_stage"] == 2
    assert (run / "checkpoints" / "latest").read_text() == "global_step30"


@pytest.mark.parametrize("stage", [1])  # (stage 3 trains and evaluates in test_resize.py and the mirror test)
def test_other_zero_stages_train(data, tmp_path, free_port, stage):
    run = tmp_path / "run"
    launch(data, run, free_port, f"zero_stage={stage}", "max_steps=4")
    elbo = losses(run)
    assert sorted(elbo) == [1, 2, 3, 4] and all(np.isfinite(list(elbo.values())))
    (evaluation,) = records(run, "eval")  # with the EMA swapped in (sharded at stage 3), each image once
    assert evaluation["eval/images"] == 8 and np.isfinite(evaluation["eval/elbo"])
    assert (run / "checkpoints" / "global_step4").is_dir()


@pytest.mark.parametrize("stage", [3])  # (stage 2: test_kill_9_then_restart...; other world sizes: test_resize.py)
def test_resume_from_the_s3_mirror_gives_the_losses_of_an_uninterrupted_run(data, tmp_path, free_port, stage,
                                                                            bucket, s3_server):
    """Checkpoints mirrored to S3 (each rank its files, in the background; the job waits for them;
    pruned), the node's disk lost, the run resumed from the mirror: every step's loss exactly."""
    import shutil

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    mirror = f"s3://{bucket}/runs/a"
    launch(data, whole, free_port, f"zero_stage={stage}", "max_steps=10", "checkpoint_every=100")
    launch(data, cut, free_port, f"zero_stage={stage}", "max_steps=6", "checkpoint_every=2", "keep_checkpoints=1",
           f"checkpoint_mirror={mirror}")
    keys = {o["Key"] for o in s3_server["client"].list_objects_v2(Bucket=bucket, Prefix="runs/a/")["Contents"]}
    assert {k.removeprefix("runs/a/global_step6/") for k in keys if k.startswith("runs/a/global_step6/")} == \
        {p.name for p in (cut / "checkpoints" / "global_step6").iterdir() if p.is_file()}
    assert {"runs/a/latest", "runs/a/uploaded/global_step6/rank00000", "runs/a/uploaded/global_step6/rank00001"} <= keys
    assert not any("global_step2/" in k or "global_step4/" in k for k in keys)  # pruned to the last one
    shutil.rmtree(cut / "checkpoints")  # the node and its disk are gone; on the new one, a crash's leftover:
    (cut / "checkpoints" / "global_step8").mkdir(parents=True)  # a folder that no `latest` names
    (cut / "checkpoints" / "global_step8" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    launch(data, cut, free_port, f"zero_stage={stage}", "max_steps=10", "checkpoint_every=100",
           f"checkpoint_mirror={mirror}")
    last_start = json.loads((cut / "starts.jsonl").read_text().splitlines()[-1])
    assert last_start["started_from"] == {"checkpoint": "global_step6", "step": 6}  # fetched from the mirror
    assert losses(cut) == losses(whole)  # every step, exactly (fixed seeds, restored stream and RNG)
    assert (cut / "checkpoints" / "latest").read_text() == "global_step10"


def test_a_run_folder_refuses_other_settings(data, tmp_path, free_port):
    run = tmp_path / "run"
    launch(data, run, free_port, "zero_stage=2", "max_steps=1")
    procs = launch(data, run, free_port, "zero_stage=3", "max_steps=2", wait=False)
    for proc in procs:  # every rank refuses; none is left waiting for the others
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "holds a run with other zero_stage" in err


def test_sigusr1_on_one_rank_saves_and_exits_for_requeue_on_all(data, tmp_path, free_port):
    import signal
    import time

    from pipeline.distributed import REQUEUE_EXIT_CODE

    run = tmp_path / "run"
    procs = launch(data, run, free_port, "zero_stage=2", "max_steps=100000", "checkpoint_every=100000", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "log.jsonl").exists() and
                                          len((run / "log.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGUSR1)  # as Slurm's --signal=B:USR1 reaches one task first
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [REQUEUE_EXIT_CODE] * 2, [p.stderr.read()[-2000:] for p in procs]
    last = max(losses(run))
    assert (run / "checkpoints" / "latest").read_text() == f"global_step{last}"
    # and the requeued job continues from there, relaunched from the run's saved config
    launch(data, run, free_port, f"max_steps={last + 2}", from_config=True)
    assert max(losses(run)) == last + 2
    # each start is on record: what it ran, on what, from what
    first, second = [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]
    assert first["started_from"] == {} and second["started_from"] == {"checkpoint": f"global_step{last}",
                                                                      "step": last}
    import hashlib
    import importlib.metadata

    for start in (first, second):
        assert start["world_size"] == 2 and start["packages"]["torch"] == importlib.metadata.version("torch")
        assert start["deepspeed"]["train_batch_size"] == 8 and start["deepspeed"]["zero_optimization"]["stage"] == 2
        assert start["manifests_sha256"] == {
            split: hashlib.sha256((Path(data["data"]) / split / "manifest.json").read_bytes()).hexdigest()
            for split in ("train", "valid")}
        assert len(start["code"]["commit"] or "") == 40 and isinstance(start["code"]["dirty"], bool)
        assert start["conv1x1_form"] == conv1x1_form("cpu")  # the ranks ran on this machine's CPU


@pytest.mark.parametrize("stage", [2])  # (stage 3, reentrant: tests/test_zero3.py against plain PyTorch)
def test_activation_checkpointing_gives_the_same_losses(data, tmp_path, free_port, stage):
    launch(data, tmp_path / "plain", free_port, f"zero_stage={stage}", "max_steps=4")
    launch(data, tmp_path / "ckpt", free_port, f"zero_stage={stage}", "max_steps=4", "activation_checkpointing=all")
    plain, ckpt = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert sorted(plain) == [1, 2, 3, 4]
    assert ckpt == pytest.approx(plain, rel=1e-5)


# (ZeRO-2 and ZeRO-3 bf16 runs are exported, sampled and evaluated by tests/gpu/check.sh --cpu: test_gpu_check.py)
@pytest.mark.parametrize("settings", [("zero_stage=2",)])
def test_export_then_sample_and_eval_without_deepspeed(data, tmp_path, free_port, settings):
    import torch

    from pipeline.checkpoint import consolidate
    from pipeline.weights import load_weights

    run = tmp_path / "run"
    launch(data, run, free_port, *settings, "max_steps=3", "ema_rate=0")  # EMA = the fp32 master weights
    config, tag, model_sd, ema_sd = consolidate(run)
    assert tag == "global_step3" and model_sd.keys() == ema_sd.keys()
    assert all(torch.equal(model_sd[k], ema_sd[k]) for k in model_sd)  # the ZeRO-3 EMA shards join exactly
    launch(data, run, free_port, *settings, "max_steps=6", "ema_rate=0.5")
    _, _, model_sd, ema_sd = consolidate(run)
    assert any(not torch.equal(model_sd[k], ema_sd[k]) for k in model_sd)
    out = tmp_path / "export"
    cli = [sys.executable, "-m", "launch.cli"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([*cli, "export", "--run-dir", str(run), "--out", str(out)], check=True, env=env, cwd=ROOT)
    assert {p.name for p in out.iterdir()} == {"model.pt", "model-ema.pt", "cifar10-model.th", "cifar10-model-ema.th"}
    model, preset = load_weights(out / "model-ema.pt")
    assert preset == "cifar10" and all(torch.equal(model.state_dict()[k], ema_sd[k]) for k in ema_sd)
    official = torch.load(out / "cifar10-model-ema.th", weights_only=True)
    assert "decoder.gain" in official  # the official key layout
    sample = subprocess.run([*cli, "sample", str(out / "model-ema.pt"), "--out", str(tmp_path / "s.png"),
                             "--temperatures", "1.0,0.5", "--num", "3"], capture_output=True, text=True, env=env,
                            cwd=ROOT)
    assert sample.returncode == 0, sample.stderr
    assert Image.open(tmp_path / "s.png").size == (3 * 10 + 2, 2 * 10 + 2)
    for source in (str(run), str(out / "model.pt")):
        ev = subprocess.run([*cli, "eval", source, "--data", data["data"], "--split", "valid", "--batch", "3",
                             "--workers", "0"], capture_output=True, text=True, env=env, cwd=ROOT)
        assert ev.returncode == 0, ev.stderr
        assert "on 8 images" in ev.stdout  # every valid image, once


def test_kill_9_then_restart_gives_the_losses_of_an_uninterrupted_run(data, tmp_path, free_port):
    import signal
    import time

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    launch(data, whole, free_port, "zero_stage=2", "max_steps=9", "checkpoint_every=3")
    procs = launch(data, killed, free_port, "zero_stage=2", "max_steps=100000", "checkpoint_every=3", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((killed / "log.jsonl").exists() and
                                          max(losses(killed), default=0) >= 5):
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert max(losses(killed)) < 9
    launch(data, killed, free_port, "zero_stage=2", "max_steps=9", "checkpoint_every=3")
    assert losses(killed) == losses(whole)
    # every step logged once: the jsonl truncated, TensorBoard purged past the resumed checkpoint
    assert [r["step"] for r in records(killed)] == list(range(1, 10))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(killed / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/elbo")] == list(range(1, 10))
    assert [e.value for e in events.Scalars("train/elbo")] == pytest.approx([losses(whole)[s] for s in range(1, 10)])


def test_started_by_mpirun(data, tmp_path, free_port):
    """Ranks from Open MPI's environment (as under mpirun, or srun with PMI)."""
    run = tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", f"MASTER_PORT={free_port}",
           "-x", "DS_ACCELERATOR=cpu", "-x", "OMP_NUM_THREADS=1", "-x", f"PYTHONPATH={ROOT}",
           sys.executable, "-m", "launch.cli", "train", "--preset", "cifar10", "--data", data["data"],
           "--run-dir", str(run), f"model_json={data['model_json']}", "batch_per_gpu=4", "workers=0",
           "log_every=1", "max_steps=2", "zero_stage=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PMIX_MCA_psec"] = "native"  # not munge: without munged, mpirun waits 2.3 s for it
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2]
    states = torch_load_states(run / "checkpoints" / "global_step2")
    assert states["world"] == 2 and states["stream"]["consumed"] == 2 * 2 * 4  # two ranks' batches of 4, twice


def torch_load_states(folder: Path) -> dict:
    import torch

    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    return states


# (ZeRO-2 bf16 on one rank: tests/gpu/check.sh --cpu)
@pytest.mark.parametrize("settings", [("zero_stage=2", "grad_accum=2"), ("zero_stage=3", "precision=bf16")])
def test_gradient_accumulation_and_bf16_train(data, tmp_path, free_port, settings):
    run = tmp_path / "run"
    launch(data, run, free_port, *settings, "max_steps=8")
    elbo = losses(run)
    assert sorted(elbo) == list(range(1, 9)) and all(np.isfinite(list(elbo.values())))
    assert np.mean([elbo[s] for s in (7, 8)]) < np.mean([elbo[s] for s in (1, 2)])


def test_sample_from_an_official_checkpoint(tmp_path):
    """`vdvae sample` on an official-layout *-model.th (here: a fresh cifar10 model saved that way)."""
    import torch

    from model import VDVAE, get_preset, official_state_dict

    torch.manual_seed(0)
    torch.save(official_state_dict(VDVAE(get_preset("cifar10").model)), tmp_path / "cifar10-model-ema.th")
    out = subprocess.run([sys.executable, "-m", "launch.cli", "sample", str(tmp_path / "cifar10-model-ema.th"),
                          "--preset", "cifar10", "--out", str(tmp_path / "g.png"), "--num", "2",
                          "--temperatures", "0.8"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert Image.open(tmp_path / "g.png").size == (2 * 34 + 2, 34 + 2)
    missing = subprocess.run([sys.executable, "-m", "launch.cli", "sample", str(tmp_path / "cifar10-model-ema.th"),
                              "--out", str(tmp_path / "h.png")], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert missing.returncode == 2 and "give its --preset" in missing.stderr
