"""`--device cuda` runs the device-aware tests (inference, speed levers) on a GPU; the default is the CPU."""

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for the device-aware tests, e.g. cuda (default: cpu)")


def pytest_configure(config: pytest.Config) -> None:
    dev = torch.device(config.getoption("--device"))
    if dev.type == "cpu":
        # The fused-norm kernels then run in Triton's interpreter. Triton reads this when it is first imported
        # (torch.compile's tests import it too), so it is set here, before any test runs.
        os.environ.setdefault("TRITON_INTERPRET", "1")
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


@pytest.fixture(autouse=True)
def _klvae_logger_as_before() -> Iterator[None]:
    """The CLI sets the klvae logger's level (-q: WARNING) and adds a handler; both are reset to the session's
    start before and after each test, so that a test's caplog sees klvae's INFO lines whatever ran before it
    (a module-scoped fixture that runs the CLI does so before this fixture's setup)."""
    _reset_klvae_logger()
    yield
    _reset_klvae_logger()


@pytest.fixture(autouse=True)
def _rerun_warnings_unsaid() -> None:
    """The fp32 rerun's warning comes once per process; each test starts as a fresh process would."""
    from klvae.inference import precision

    precision._rerun_warned.clear()


_KLVAE_LOGGER = logging.getLogger("klvae")
_KLVAE_LOGGER_START = (_KLVAE_LOGGER.level, list(_KLVAE_LOGGER.handlers))


def _reset_klvae_logger() -> None:
    level, handlers = _KLVAE_LOGGER_START
    _KLVAE_LOGGER.setLevel(level)
    for h in [h for h in _KLVAE_LOGGER.handlers if h not in handlers]:
        _KLVAE_LOGGER.removeHandler(h)


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache under tmp_path, with HF_HUB_OFFLINE set: the hub answers from it alone."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No offline setting, no proxy, no hub cache setting, and a hub host name that 'resolves' (no real lookup)."""
    from huggingface_hub import constants

    from klvae.weights import hub

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
              "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.socket, "getaddrinfo", lambda *a, **k: [])
    hub._no_network.cache_clear()
    yield
    hub._no_network.cache_clear()
