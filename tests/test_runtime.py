"""The lean allocator: tunables merged into the environment, applied by re-executing."""

import subprocess
import sys

from pipeline.runtime import LEAN_TUNABLES, lean_allocator_env


def test_tunables_are_merged_not_clobbered():
    env = lean_allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["X"] == "1"
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.arena_max=2", *LEAN_TUNABLES]
    again = lean_allocator_env(env)
    assert again["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]
    own = lean_allocator_env({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"})
    assert own["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=4096:glibc.malloc.hugetlb=1"


def test_reexec_applies_the_tunables_once(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\n"
                      "from pipeline.runtime import reexec_with_lean_allocator\n"
                      "print('run', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], flush=True)\n"
                      "reexec_with_lean_allocator()\n")
    env = {k: v for k, v in lean_allocator_env().items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = ":".join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, str(script), "arg"], capture_output=True, text=True,
                         env=env, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout  # once without, once (re-executed) with
    assert lines[0] == "run  ['arg']"
    assert lines[1] == f"run {':'.join(LEAN_TUNABLES)} ['arg']"
