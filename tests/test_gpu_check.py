"""tests/gpu/check.sh, the GPU check, run here in its CPU mode: every stage of its sequence, shortened
(the GPU run itself happens on a lent GPU machine); and its scheduler's rules on stub stages."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import TINY
from model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _load_driver():
    """tests/gpu/check.py, the driver, as a module of its own name (tests/gpu is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tests" / "gpu" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


check = _load_driver()


def test_the_driver_constants_are_the_projects():
    from pipeline.distributed import REQUEUE_EXIT_CODE

    assert ModelConfig(**check.TINY_MODEL) == TINY
    assert {k: asdict(TINY)[k] for k in check.TINY_MODEL} == check.TINY_MODEL
    assert check.REQUEUE_EXIT_CODE == REQUEUE_EXIT_CODE


def _stub_check(tmp_path, stages, budget=60.0):
    args = check.parse_args(["--cpu", "--out", str(tmp_path / "r.json"), "--budget", str(budget),
                             "--work", str(tmp_path / "work")])
    runner = check.Check(args, check.CPU_PLAN)
    runner.stages = stages
    return runner


def test_a_failing_stage_stops_only_what_needs_it_and_a_slow_one_is_killed(tmp_path):
    def fails(ctx):
        raise check.Failed("broken", {"measured": 1})

    def sleeps(ctx):
        ctx.run(["sleep", "30"], what="sleep")
        return {}

    stages = [check.Stage("a", fails, 10, min_time=0), check.Stage("b", lambda ctx: {"x": 2}, 10, min_time=0),
              check.Stage("c", lambda ctx: {}, 10, needs=("a",), min_time=0),
              check.Stage("d", sleeps, 1, min_time=0), check.Stage("e", lambda ctx: {}, 10, not_run="not here"),
              check.Stage("f", lambda ctx: {}, 10, min_time=100)]
    runner = _stub_check(tmp_path, stages)
    start = time.time()
    assert runner.run() == 1
    assert time.time() - start < 15
    doc = json.loads((tmp_path / "r.json").read_text())
    st = doc["stages"]
    assert [st[n]["status"] for n in "abcdef"] == ["failed", "ok", "skipped", "failed", "not_run", "skipped"]
    assert st["a"]["reason"] == "broken" and st["a"]["figures"] == {"measured": 1}
    assert st["b"]["figures"] == {"x": 2}
    assert "needs a" in st["c"]["reason"] and "timed out" in st["d"]["reason"]
    assert "time budget" in st["f"]["reason"]
    assert "$ sleep 30" in st["d"]["log_tail"] and Path(st["d"]["log"]).is_file()
    assert not doc["ok"] and doc["summary"]["failed"] == ["a", "d"]


def test_a_timing_runs_alone_and_nothing_listed_after_it_starts_before_it(tmp_path):
    spans = {}

    def span(name, seconds):
        def run(ctx):
            start = time.time()
            time.sleep(seconds)
            spans[name] = (start, time.time())
            return {}
        return run

    stages = [check.Stage("slow", span("slow", 0.6), 10, min_time=0),
              check.Stage("timing", span("timing", 0.3), 10, exclusive=True, min_time=0),
              check.Stage("later", span("later", 0.1), 10, min_time=0)]
    assert _stub_check(tmp_path, stages).run() == 0
    assert spans["timing"][0] >= spans["slow"][1] and spans["later"][0] >= spans["timing"][1]


def test_gpu_mode_without_a_gpu_fails_at_the_environment_and_skips_the_rest(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/gpu/check.py"), "--out", str(out)], cwd=ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:]
    doc = json.loads(out.read_text())
    stages = doc["stages"]
    assert doc["mode"] == "gpu" and not doc["ok"]
    assert stages["environment"]["status"] == "failed" and "no CUDA device" in stages["environment"]["reason"]
    assert {"train_zero3_fp16", "cut_resume_zero2_bf16", "train_compile_zero2_bf16", "max_batch_ffhq1024_bf16_ckpt_all",
            "model_step_ffhq1024_b1_bf16_compile", "model_step_cifar10_b16_fp32"} <= set(doc["summary"]["skipped"])
    assert stages["official_cifar10_b16_fp32"]["status"] == "not_run"  # no --official-src
    assert stages["install"]["status"] == "not_run"  # check.py run directly


@pytest.mark.slow
def test_cpu_mode_passes_every_stage_with_its_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    start = time.time()
    proc = subprocess.run(["bash", str(ROOT / "tests/gpu/check.sh"), "--cpu", "--out", str(out)], cwd=ROOT,
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=900)
    seconds = time.time() - start
    doc = json.loads(out.read_text())
    stages = doc["stages"]
    bad = {k: (v.get("reason"), v.get("log_tail", "")[-1500:]) for k, v in stages.items()
           if v["status"] not in ("ok", "not_run")}
    assert proc.returncode == 0 and not bad, (bad, proc.stdout[-3000:], proc.stderr[-2000:])
    assert doc["ok"] and doc["mode"] == "cpu" and doc["seconds"] <= seconds
    not_run = {k for k, v in stages.items() if v["status"] == "not_run"}
    assert not_run == {"train_compile_zero2_bf16", "official_cifar10_b1_fp32", "model_step_compile",
                       "max_batch_ffhq1024_bf16_ckpt_all"}
    assert all(stages[k]["reason"] for k in not_run)
    assert stages["install"]["status"] == "ok" and "nothing to install" in stages["install"]["figures"]["note"]
    assert doc["environment"]["packages"]["deepspeed"] and doc["environment"]["cuda_available"] is False

    for leg in ("zero2_bf16", "zero3_bf16"):
        train = stages[f"train_{leg}"]["figures"]
        assert train["steps"] == 6 and train["all_finite"] and train["eval_images"] == 8
        cut = stages[f"cut_resume_{leg}"]["figures"]
        assert cut["exit_code_after_signal"] == 85 and 1 <= cut["cut_at_step"] < 6
        assert cut["resumed_at_step"] == cut["cut_at_step"] and cut["checkpoint"] == f"global_step{cut['cut_at_step']}"
        same = stages[f"resume_identical_{leg}"]["figures"]
        assert same["identical"] is True and same["steps_compared"] == 6 and same["max_abs_diff_after_cut"] == 0
    refusal = stages["fp16_refused_on_cpu"]["figures"]
    assert refusal["exit_code"] == 2 and "precision=fp16 needs GPUs" in refusal["message"]
    assert refusal["message_names_the_cause_and_the_remedy"]
    evaluation = stages["eval"]["figures"]
    assert evaluation["images"] == 8 and math.isfinite(evaluation["bpd"])
    assert Path(stages["sample"]["figures"]["png"]).is_file() and stages["sample"]["figures"]["size"] == [42, 22]
    assert set(stages["export"]["figures"]["files"]) == {"model.pt", "model-ema.pt", "cifar10-model.th",
                                                         "cifar10-model-ema.th"}
    step = stages["model_step_cifar10_b1_fp32"]["figures"]
    assert step["dtype"] == "fp32" and step["device"] == "cpu" and step["median_step_s"] > 0
    forms = stages["conv1x1_forms"]["figures"]
    assert forms["machine_form"] in ("matmul", "conv") and len(forms["matmul_over_conv"]) == 6
    assert step["conv1x1_form"] == forms["machine_form"]
    assert all(line["device"] == "cpu" and line["dtype"] == "float32" for line in forms["lines"])

    logs = Path(doc["logs"])
    assert logs == tmp_path / "gpu_check_logs"
    ran = [k for k, v in stages.items() if v["status"] == "ok"]
    assert all(Path(stages[k]["log"]).parent == logs for k in ran)
    assert (logs / "runs" / "cut_zero2_bf16.jsonl").is_file()
    print(f"check.sh --cpu: {seconds:.1f} s")
