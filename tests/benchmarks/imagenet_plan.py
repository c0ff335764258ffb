"""Time and peak memory of planning a full-size ImageNet32 prep from the pickled batch files.

    python tests/benchmarks/imagenet_plan.py [--dir FOLDER]

Writes (once) 10 `train_data_batch_K` files with 1,281,167 random 32 px
images in all (3.9 GB) and a 50,000-image `val_data` in the release's
layout, then times `data_prep.imagenet.plan` (which reads every batch file
to count and check it, and reads the 5000 valid images ahead) and the first
20,000 training items, and reports the process's peak RSS.
"""

import argparse
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_prep.imagenet import plan  # noqa: E402

NUM_TRAIN, PER_FILE, NUM_TEST = 1_281_167, 128_117, 50_000


def write_release(root: Path) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(10):
        n = PER_FILE if k < 9 else NUM_TRAIN - 9 * PER_FILE
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(root / f"train_data_batch_{k + 1}", "wb") as f:
            pickle.dump({"data": data, "labels": (np.arange(n) % 1000 + 1).tolist(), "mean": data[:1000].mean(0)},
                        f, protocol=4)
    data = rng.integers(0, 256, (NUM_TEST, 3072), dtype=np.uint8)
    with open(root / "val_data", "wb") as f:
        pickle.dump({"data": data, "labels": (np.arange(NUM_TEST) % 1000 + 1).tolist()}, f, protocol=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "vdvae-imagenet32-bench")
    args = parser.parse_args()
    if not (args.dir / "val_data").exists():
        write_release(args.dir)  # before any timing: its memory is not the planner's
        print("wrote the release; run again for the planner's own peak memory")
        return
    start = time.perf_counter()
    plans = plan(args.dir, 32)
    planning = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(20_000):
        plans["train"].get(i)
    print({"samples": {s: p.num_samples for s, p in plans.items()}, "plan_s": round(planning, 1),
           "first_20000_train_items_s": round(time.perf_counter() - start, 2),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})


if __name__ == "__main__":
    main()
