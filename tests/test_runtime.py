"""The fast allocator: tcmalloc preloaded by re-executing the process once."""

import os
import subprocess
import sys

import pytest

from pipeline.runtime import MARKER, allocator_env, find_tcmalloc


def test_preload_is_merged_not_clobbered():
    library = find_tcmalloc()
    if library is None:
        pytest.fail("no tcmalloc library: scripts/setup.sh installs libtcmalloc-minimal4")
    env, name = allocator_env({"LD_PRELOAD": "/x/libother.so", "X": "1"})
    assert name == "tcmalloc" and env["X"] == "1" and env[MARKER] == "tcmalloc"
    assert env["LD_PRELOAD"] == f"{library}:/x/libother.so"
    again, _ = allocator_env(env)
    assert again["LD_PRELOAD"] == env["LD_PRELOAD"]


def test_reexec_preloads_tcmalloc_once(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "from pipeline.runtime import reexec_with_fast_allocator\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('run', os.environ.get('VDVAE_ALLOCATOR', '-'), 'libtcmalloc' in maps, sys.argv[1:], flush=True)\n"
        "reexec_with_fast_allocator()\n")
    env = {k: v for k, v in allocator_env()[0].items() if k not in (MARKER, "LD_PRELOAD")}
    env["PYTHONPATH"] = ":".join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, str(script), "arg"], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.splitlines() == ["run - False ['arg']", "run tcmalloc True ['arg']"]


def test_cpu_start_builds_no_op_and_leaves_nothing_in_dev_shm(tmp_path):
    """DeepSpeed's CPU shared-memory op is kept out: no JIT build, no /dev/shm buffer left behind."""
    port = "29931"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    subprocess.run([sys.executable, "-c", "from pipeline.distributed import init_distributed; init_distributed()"],
                   env=env, check=True, capture_output=True, timeout=120)
    assert not (tmp_path / "extensions").exists()
    assert not [name for name in os.listdir("/dev/shm") if f"_{port}_" in name]
