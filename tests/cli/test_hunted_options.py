"""Hunted: documented options versus what the commands do."""

import json
from pathlib import Path

import pytest

from helpers import saved_tiny_model
from klvae.cli.main import main


def test_info_of_a_model_folder_named_like_a_preset_describes_that_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Now: `klvae info --model tiny` beside a model folder ./tiny says "weights: preset, no weights (random init)"
    # and the preset's factors, while `klvae encode --model tiny` (every other command) loads ./tiny's weights.
    monkeypatch.chdir(tmp_path)
    saved_tiny_model(tmp_path / "tiny", scaling_factor=0.5)
    assert main(["-q", "info", "--model", "tiny", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert Path(d["weights"]) == Path("tiny") / "diffusion_pytorch_model.safetensors", d["weights"]
    assert d["config"]["scaling_factor"] == 0.5
