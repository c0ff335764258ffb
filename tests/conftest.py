import os
import pickle
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig  # noqa: E402
from services import SeaweedFS  # noqa: E402

NUM_PER_BATCH, NUM_TEST = 1100, 100  # CIFAR-like fixture: 5500 training images, 5000 of them valid

# Every resolution change the real presets use (pool by 2 and by 4, mixins
# from 1 to 4 and 4 to 8 px, 1x1 convs at 1 px), at a size a CPU runs in ms.
TINY = ModelConfig(
    image_size=8,
    width=16,
    enc_blocks="8x2,8d2,4x1,4d4,1x1",
    dec_blocks="1x1,4m1,4x1,8m4,8x1",
    zdim=4,
    num_mixtures=2,
    input_shift=-120.0,
    input_scale=1 / 64.0,
)


def gradient_photos(folder: Path, count: int = 72) -> Path:
    """`count` small learnable images (8 px colour gradients plus noise) as PNG files in `folder`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        base = np.linspace(0, 1, 8)[None, :, None] * rng.uniform(60, 200, 3) + rng.uniform(0, 50, 3)
        pixels = np.broadcast_to(base, (8, 8, 3)) + rng.normal(0, 4, (8, 8, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=gen)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for this test session (auth off).

    Sets the standard AWS variables so that boto3 (and our code) reaches it.
    """
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield {"endpoint": server.endpoint, "client": server.client(), "server": server}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request):
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_server["client"].create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def cifar_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for name, n in [*((f"data_batch_{i}", NUM_PER_BATCH) for i in range(1, 6)), ("test_batch", NUM_TEST)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        images[name] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    return root.parent, images


# The suite runs on 2 pytest-xdist workers, a file to a worker (`make test`: -n 2 --dist loadfile
# --no-loadscope-reorder). Files are handed out in collection order as workers free up, so the
# slowest go first and the two workers finish together (longest first). Measured on 2 cores, serial
# seconds: test_train 276, test_resize 195, test_slurm 168, test_gpu_ready 165 (inductor's cold
# build), test_prep_parallel 97, test_stream 88, test_gpu_check 60; the rest under 65 s each.
SLOWEST_FILES = ("test_train.py", "test_resize.py", "test_slurm.py", "test_gpu_ready.py", "test_prep_parallel.py",
                 "test_stream.py", "test_gpu_check.py", "test_status.py", "test_hostile_files.py", "test_demo.py",
                 "test_init.py", "test_update_rule.py", "test_zero3.py", "test_prep.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within
