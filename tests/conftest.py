import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig  # noqa: E402

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
