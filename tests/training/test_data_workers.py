"""Data-loading worker processes are cut to what the machine can use: `klvae cache --num-workers 99999` (a typo)
spawned that many processes, each with a copy of the dataset, until the OOM killer ended the job and others on the
machine; now each loader (the cache's, training's map-style and streamed ones, build_dataloader's) runs at most
WORKERS_PER_CPU per CPU, with one warning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import DataLoader

from helpers import noise_folder, saved_tiny_model, tiny_train_config
from klvae import distributed
from klvae.cli.main import main
from klvae.distributed import DistInfo, cpu_count, usable_workers
from klvae.latents import cache as cache_module
from klvae.training import data_setup
from klvae.training.data import build_dataloader


@pytest.fixture
def one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine of one CPU that takes one worker per CPU: the cap is 1, so a capped loader stays cheap."""
    monkeypatch.setattr(distributed, "cpu_count", lambda: 1)
    monkeypatch.setattr(distributed, "WORKERS_PER_CPU", 1)


def _spy(monkeypatch: pytest.MonkeyPatch, module: object) -> list[int]:
    """The num_workers of every DataLoader `module` builds."""
    seen: list[int] = []

    def recording(*args: Any, **kwargs: Any) -> DataLoader:
        seen.append(kwargs["num_workers"])
        return DataLoader(*args, **kwargs)

    monkeypatch.setattr(module, "DataLoader", recording)
    return seen


def test_usable_workers_cuts_at_four_per_cpu_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(distributed, "cpu_count", lambda: 2)
    assert [usable_workers(n) for n in (0, 1, 8)] == [0, 1, 8]
    assert not caplog.records
    assert usable_workers(99999) == 8
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage() == ("99999 data-loading workers asked for, more than this machine's 2 CPUs can use: "
                                   "running 8")


def test_cpu_count_is_the_processes_affinity() -> None:
    assert cpu_count() == len(os.sched_getaffinity(0))


def test_cache_with_absurd_workers_finishes_on_the_capped_count(one_cpu: None, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    seen = _spy(monkeypatch, cache_module)
    data = noise_folder(tmp_path / "data", 2, hw=(16, 16))
    args = ["cache", "--data", str(data), "-o", str(tmp_path / "out"), "-m", str(saved_tiny_model(tmp_path / "m")),
            "--resolution", "16", "--num-workers", "99999"]
    assert main(args) == 0
    assert seen == [1]
    assert "99999 data-loading workers asked for" in caplog.text


def test_training_loaders_run_the_capped_count(one_cpu: None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch, data_setup)
    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    batch = next(data_setup.build_train_loader(tiny_train_config(tmp_path, "data.num_workers=99999"), DistInfo()))
    assert batch["pixels"].shape == (2, 3, 16, 16)
    assert seen == [1]
    assert build_dataloader(list(range(4)), batch_size=2, num_workers=99999).num_workers == 1

