"""`--device cuda` runs the device-aware tests (inference, speed levers) on a GPU; the default is the CPU."""

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for the device-aware tests, e.g. cuda (default: cpu)")


def pytest_configure(config: pytest.Config) -> None:
    dev = torch.device(config.getoption("--device"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda was given, but torch sees no CUDA device")
        # fp32 references must be fp32: cuDNN convolutions otherwise default to TF32.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device named by --device."""
    return torch.device(request.config.getoption("--device"))
