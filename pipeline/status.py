"""How a run is doing, on one screen: `run_status(run_dir)` reads it, `format_status` lays it out.

It reads the run folder (`config.json`, `log.jsonl`, `checkpoints/latest`),
the checkpoint mirror's `latest`, and for a run submitted with `vdvae submit
train` (`RUN/jobs.jsonl`, written by `record_job`) what Slurm says of its
jobs: `squeue`, then `sacct` for a job no longer queued, and `scontrol show
job` for its restarts. Nothing is written. What cannot be read (no log yet,
a storage error, a Slurm command that is missing, fails or hangs) becomes a
line of the report, not an exception; only a folder that is no run folder
is an error (FileNotFoundError, naming it).

From the log: the step is the last train record's (or the latest
checkpoint's, when a signal saved a step the log never reached); the global
batch is `train/images_per_s * train/step_time_s` of a record (the images
of its window over its steps: batch per GPU x ranks x accumulation), so
images seen = step x global batch; the skip and NaN rates are the growth of
the cumulative `train/skipped_updates` and `train/nan_losses` over the last
`window` steps; the ETA is the steps left times the mean step time of those
records (which includes the evaluations and checkpoints in them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from data_prep.storage import Retry, S3Store, StorageError, open_store

JOBS_NAME = "jobs.jsonl"
"""RUN/jobs.jsonl: one `{"job": id, "submitted": iso time}` line per `vdvae submit train` of the run."""
ACTIVE_GROUPS = "latents/active_groups"
WINDOW_STEPS = 100
"""The skip and NaN rates, and the step time behind the ETA, are over the last this many steps."""
SLURM_TIMEOUT_S = 10.0
JOBS_SHOWN = 5
"""The newest jobs of a run that Slurm is asked about (a run resubmitted often has many)."""
MIRROR_RETRY = Retry(attempts=2, backoff=0.5)
"""A status report asks the mirror once more, not for the minute that training waits."""


def record_job(run_dir: str | os.PathLike, job: str) -> None:
    """Append a submitted Slurm job to RUN/jobs.jsonl (`vdvae submit train` calls it after sbatch)."""
    line = json.dumps({"job": str(job), "submitted": datetime.now().astimezone().isoformat(timespec="seconds")})
    with open(Path(run_dir) / JOBS_NAME, "a") as f:
        f.write(line + "\n")


def _run_readers():
    """pipeline.checkpoint and pipeline.metrics, imported on first use."""
    # (here, not at the top: they import deepspeed, torch and tensorboard, seconds, and `vdvae submit`
    # imports this module for record_job; DeepSpeed's import-time notice goes to stdout: sent to stderr,
    # so that `vdvae status --json` prints one JSON object and nothing else)
    with contextlib.redirect_stdout(sys.stderr):
        from . import checkpoint, metrics
    return checkpoint, metrics


# -- the log ----------------------------------------------------------------------------------------


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):  # a line being written, or cut by a crash
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _lines_backwards(path: Path, chunk: int = 1 << 20):
    """The lines of a file, last first, read in chunks from its end."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            lines = (f.read(end - start) + rest).split(b"\n")
            rest = lines.pop(0) if start > 0 else b""
            end = start
            yield from (line for line in reversed(lines) if line.strip())


def read_log(path: Path, window: int = WINDOW_STEPS) -> dict:
    """From the end of a jsonl log: the train records of the last `window` steps (oldest first), the
    one before them, the last eval record and the last one with the active latent groups."""
    found = {"window": [], "before": None, "eval": None, "groups": None}
    if not path.is_file():
        return found
    newest = None
    for line in _lines_backwards(path):
        if found["before"] is not None and b'"eval/' not in line and ACTIVE_GROUPS.encode() not in line:
            continue  # (only the eval and groups records are still wanted: no need to decode the others)
        record = _record(line)
        if record is None:
            continue
        if "train/elbo" in record and found["before"] is None:
            newest = record["step"] if newest is None else newest
            if record["step"] > newest - window:
                found["window"].append(record)
            else:
                found["before"] = record
        if found["eval"] is None and "eval/bpd" in record:
            found["eval"] = record
        if found["groups"] is None and ACTIVE_GROUPS in record:
            found["groups"] = record
        if found["before"] is not None and found["eval"] is not None and found["groups"] is not None:
            break
    found["window"].reverse()
    return found


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _plain(value):
    """A logged value as JSON can carry it (a NaN or infinity becomes None)."""
    return _number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _global_batch(records: list[dict]) -> int | None:
    """Images per optimizer step: a window's images over its steps (images/s x s/step), newest first."""
    for record in reversed(records):
        rate, step_time = _number(record.get("train/images_per_s")), _number(record.get("train/step_time_s"))
        if rate and step_time:
            return round(rate * step_time)
    return None


def _window_rates(records: list[dict], before: dict | None) -> dict | None:
    """Skip and NaN rates and the mean step time over the window's records. The counters are the
    run's totals from step 0, so with no record before the window the baseline is step 0, none of each."""
    if not records:
        return None
    base = before or {"step": 0, "train/skipped_updates": 0, "train/nan_losses": 0}
    last = records[-1]
    steps = last["step"] - base["step"]
    rates = {"from_step": base["step"], "to_step": last["step"], "skip_rate": None, "nan_rate": None}
    for key, name in (("train/skipped_updates", "skip_rate"), ("train/nan_losses", "nan_rate")):
        new, old = _number(last.get(key)), _number(base.get(key, 0))
        if steps > 0 and new is not None and old is not None:
            rates[name] = (new - old) / steps
    timed, previous = [], base["step"]
    for record in records:  # each record's step time, weighted by the steps of its window
        step_time = _number(record.get("train/step_time_s"))
        if step_time is not None and record["step"] > previous:
            timed.append((step_time, record["step"] - previous))
        previous = record["step"]
    total = sum(n for _, n in timed)
    rates["step_time_s"] = sum(t * n for t, n in timed) / total if total else None
    return rates


# -- checkpoints ------------------------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _checkpoint(run_dir: Path, checkpoint) -> dict:
    try:
        tag = checkpoint.latest_tag(run_dir)
    except checkpoint.CheckpointError as err:
        return {"tag": None, "error": str(err)}
    if tag is None:
        return {"tag": None}
    latest = checkpoint.checkpoints_dir(run_dir) / checkpoint.LATEST
    try:
        written = latest.stat().st_mtime
    except OSError:  # pruned or rewritten between the two reads
        return {"tag": tag, "step": checkpoint.step_of(tag)}
    return {"tag": tag, "step": checkpoint.step_of(tag), "time": _iso(written), "age_s": time.time() - written}


def _mirror(url: str, checkpoint) -> dict:
    try:
        store = open_store(url)
        if isinstance(store, S3Store):
            store.retry = MIRROR_RETRY
        if checkpoint.LATEST not in store.list():
            return {"url": url, "tag": None}
        tag = store.read_bytes(checkpoint.LATEST).decode(errors="replace").strip()
    except (StorageError, ValueError, OSError) as err:
        return {"url": url, "tag": None, "error": str(err)}
    return {"url": url, "tag": tag, "step": checkpoint.step_of(tag)}


# -- Slurm ------------------------------------------------------------------------------------------


def _slurm(*cmd: str) -> tuple[str | None, str | None]:
    """(stdout, None) of a Slurm command, or (None, why it gave nothing): not installed, failed, hung."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return None, f"{cmd[0]} not installed"
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"{cmd[0]} gave no answer in {SLURM_TIMEOUT_S:.0f} s"
    except OSError as err:
        return None, f"{cmd[0]} could not run: {err}"
    if out.returncode != 0:
        why = (out.stderr.strip() or out.stdout.strip() or f"exit status {out.returncode}").splitlines()[-1]
        return None, f"{cmd[0]} failed: {why}"
    return out.stdout, None


def _scontrol_fields(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def job_status(job: str) -> dict:
    """What Slurm says of a job: state, times, reason or nodes, restarts, exit code; `notes` for what
    it could not say."""
    info = {"job": job, "state": None, "elapsed": None, "time_limit": None, "where": None, "restarts": None,
            "exit_code": None, "notes": []}
    queued, why = _slurm("squeue", "-h", "-j", job, "-o", "%i|%T|%M|%l|%R")
    line = next((row for row in (queued or "").splitlines() if row.split("|")[0] == job), None)
    if line is not None:
        _, info["state"], info["elapsed"], info["time_limit"], info["where"] = (line.split("|", 4) + [None] * 4)[:5]
    elif why and "Invalid job id" not in why:
        info["notes"].append(why)
    shown, why = _slurm("scontrol", "show", "job", "-o", job)
    if shown is not None:
        fields = _scontrol_fields(shown)
        info["restarts"] = int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else None
        info["exit_code"] = fields.get("ExitCode")
        if line is None:
            info["state"], info["elapsed"] = fields.get("JobState"), fields.get("RunTime")
            info["time_limit"] = fields.get("TimeLimit")
    elif why and "Invalid job id" in why:
        info["notes"].append("scontrol: no longer known to slurmctld")
    elif why:
        info["notes"].append(why)
    if line is None:  # no longer queued: accounting knows how it ended
        accounted, why = _slurm("sacct", "-n", "-P", "-j", job, "--format=JobID,State,Elapsed,ExitCode")
        if accounted is None:
            info["notes"].append(f"sacct unavailable ({why.removeprefix('sacct failed: ')})")
        else:
            row = next((r.split("|") for r in accounted.splitlines() if r.split("|")[0] == job), None)
            if row is not None and len(row) >= 4:
                info["state"], info["elapsed"], info["exit_code"] = row[1], row[2], row[3]
            elif info["state"] is None:
                info["notes"].append("sacct: no record of the job")
    return info


def _jobs(run_dir: Path) -> tuple[list[dict], int]:
    """The newest JOBS_SHOWN jobs of RUN/jobs.jsonl with what Slurm says of each, newest first; and how
    many the file lists."""
    path = run_dir / JOBS_NAME
    if not path.is_file():
        return [], 0
    entries = [r for r in (_job_entry(line) for line in path.read_text(errors="replace").splitlines()) if r]
    shown = []
    for entry in reversed(entries[-JOBS_SHOWN:]):
        shown.append({**job_status(entry["job"]), "submitted": entry.get("submitted")})
    return shown, len(entries)


def _job_entry(line: str) -> dict | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or not str(entry.get("job", "")).isdigit():
        return None
    return {**entry, "job": str(entry["job"])}


# -- the report -------------------------------------------------------------------------------------


def run_status(run_dir: str | os.PathLike, window: int = WINDOW_STEPS) -> dict:
    """Everything `vdvae status` shows of a run folder, as plain data (what `--json` prints).

    A folder without config.json is no run folder (FileNotFoundError naming it), unless `vdvae submit
    train` recorded a job in it that has not yet started training: then the report says so, with the job."""
    checkpoint, metrics = _run_readers()
    run_dir = Path(os.path.abspath(run_dir))  # (absolute, as it was given: not through its symlinks)
    if (run_dir / "config.json").is_file() or not (run_dir / JOBS_NAME).is_file():
        config = checkpoint.load_run_config(run_dir)  # (FileNotFoundError naming a folder that is no run)
    else:
        config = None  # submitted, not started
    log_path = run_dir / metrics.LOG_NAME
    log = read_log(log_path, window)
    train = log["window"][-1] if log["window"] else None
    ckpt = _checkpoint(run_dir, checkpoint)
    step = max(train["step"] if train else 0, ckpt.get("step") or 0)
    batch = _global_batch(log["window"])
    per_rank = config.batch_per_gpu * config.grad_accum if config else None
    rates = _window_rates(log["window"], log["before"])
    max_steps = config.max_steps if config else None
    status = {
        "run_dir": str(run_dir),
        "started": config is not None,
        "preset": config.preset if config else None,
        "data": config.data if config else None,
        "max_steps": max_steps,
        "step": step,
        "batch": {"per_gpu": config.batch_per_gpu if config else None,
                  "grad_accum": config.grad_accum if config else None, "global": batch,
                  "ranks": batch // per_rank if batch and per_rank and batch % per_rank == 0 else None},
        "images_seen": step * batch if batch else None,
        "train": None if train is None else {"step": train["step"], "bpd": _number(train.get("train/bpd")),
                                             "elbo": _number(train.get("train/elbo"))},
        "eval": None if log["eval"] is None else {
            "step": log["eval"]["step"], "bpd": _number(log["eval"].get("eval/bpd")),
            "elbo": _number(log["eval"].get("eval/elbo")), "images": _plain(log["eval"].get("eval/images"))},
        "window": rates,
        "images_per_s": _number(train.get("train/images_per_s")) if train else None,
        "done": bool(max_steps) and step >= max_steps,
        "eta_s": None,
        "log": {"path": str(log_path), "exists": log_path.is_file()},
        "checkpoint": ckpt,
        "mirror": _mirror(config.checkpoint_mirror, checkpoint) if config and config.checkpoint_mirror else None,
        "active_groups": None if log["groups"] is None else {"step": log["groups"]["step"],
                                                              "value": _plain(log["groups"][ACTIVE_GROUPS])},
    }
    if log_path.is_file():
        updated = log_path.stat().st_mtime
        status["log"].update(updated=_iso(updated), age_s=time.time() - updated)
    if status["done"]:
        status["eta_s"] = 0.0
    elif max_steps and rates and rates["step_time_s"] is not None:
        status["eta_s"] = (max_steps - step) * rates["step_time_s"]
    status["jobs"], status["jobs_recorded"] = _jobs(run_dir)
    return status


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


def _local(iso: str) -> str:
    """An ISO time as people read it: 2026-12-01 22:22:51."""
    return iso[:19].replace("T", " ")


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


def _value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def format_status(status: dict) -> str:
    """The report as lines of text, one screen."""
    if status["started"]:
        rows = [("run", f"{status['run_dir']}  ({status['preset']}, data {status['data']})")]
    else:
        rows = [("run", f"{status['run_dir']}  (submitted; no config.json yet: training has not started)")]
    step, total = status["step"], status["max_steps"]
    progress = f"{step:,}" + (f" of {total:,} ({100 * step / total:.1f} %)" if total else
                              " (no max_steps)" if status["started"] else "")
    batch = status["batch"]
    if status["images_seen"] is not None:
        ranks = f"{batch['ranks']} rank{'s' if batch['ranks'] != 1 else ''}" if batch["ranks"] else "? ranks"
        progress += (f", {status['images_seen']:,} images seen ({batch['global']:,} a step: {batch['per_gpu']} "
                     f"per GPU x {ranks} x grad_accum {batch['grad_accum']})")
    rows.append(("step", progress))
    train, evaluation = status["train"], status["eval"]
    rows.append(("train", "-" if train is None else f"{train['bpd']:.4f} bits/dim at step {train['step']:,}"
                 if train["bpd"] is not None else f"no finite bits/dim at step {train['step']:,}"))
    if evaluation is None:
        rows.append(("eval", "-"))
    else:
        bpd = "not finite" if evaluation["bpd"] is None else f"{evaluation['bpd']:.4f} bits/dim"
        images = f" on {_value(evaluation['images'])} images" if evaluation["images"] is not None else ""
        rows.append(("eval", f"{bpd} at step {evaluation['step']:,}{images} (EMA weights)"))
    rates = status["window"]
    rows.append(("window", "-" if rates is None else
                 f"steps {rates['from_step']:,}-{rates['to_step']:,}: {_percent(rates['skip_rate'])} updates "
                 f"skipped, {_percent(rates['nan_rate'])} NaN losses"))
    speed = "-" if status["images_per_s"] is None else f"{status['images_per_s']:,.1f} images/s"
    if rates and rates["step_time_s"] is not None:
        speed += f", {rates['step_time_s']:.3g} s/step"
    if status["done"]:
        speed += "; done"
    elif status["eta_s"] is not None:
        speed += f"; ETA {_duration(status['eta_s'])} to step {total:,}"
    elif status["started"] and not total:
        speed += "; no ETA (max_steps=0: until stopped)"
    rows.append(("speed", speed))
    log = status["log"]
    rows.append(("log", f"updated {_duration(log['age_s'])} ago" if log["exists"] else f"none yet ({log['path']})"))
    ckpt = status["checkpoint"]
    if ckpt.get("error"):
        rows.append(("checkpoint", f"unreadable: {ckpt['error']}"))
    elif ckpt["tag"] is None:
        rows.append(("checkpoint", "none yet"))
    else:
        when = f", written {_local(ckpt['time'])} ({_duration(ckpt['age_s'])} ago)" if "time" in ckpt else ""
        rows.append(("checkpoint", f"{ckpt['tag']}{when}"))
    mirror = status["mirror"]
    if mirror is not None:
        latest = (f"error: {mirror['error']}" if mirror.get("error") else
                  mirror["tag"] if mirror["tag"] else "no checkpoint yet")
        rows.append(("mirror", f"{mirror['url']}: {latest}"))
    groups = status["active_groups"]
    rows.append(("latents", "-" if groups is None else
                 f"{_value(groups['value'])} active groups at step {groups['step']:,}"))
    if not status["jobs"]:
        rows.append(("slurm", "-"))
    for job in status["jobs"]:
        state = job["state"] or "state unknown"
        parts = [state]
        if job["elapsed"]:
            parts.append(f"ran {job['elapsed']}" + (f" of {job['time_limit']}" if job["time_limit"] else ""))
        if job["where"]:
            parts.append(job["where"])
        parts.append(f"restarts {job['restarts'] if job['restarts'] is not None else '?'}")
        if job["exit_code"] and state not in ("PENDING", "RUNNING"):
            parts.append(f"exit {job['exit_code']}")
        if job.get("submitted"):
            parts.append(f"submitted {_local(str(job['submitted']))}")
        rows.append((f"job {job['job']}", ", ".join(parts)))
        rows += [("", f"  {note}") for note in job["notes"]]
    if status["jobs_recorded"] > len(status["jobs"]):
        rows.append(("", f"  (and {status['jobs_recorded'] - len(status['jobs'])} older job(s) in {JOBS_NAME})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {text}" for name, text in rows)
