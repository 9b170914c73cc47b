"""Models from the Hugging Face hub cache with no network: hub ids, presets, revisions, one file of a repo, the
cache answering at once when the network is down, and ids the cache does not hold."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import assert_same_weights, fake_hub_cache, perturbed_vae
from klvae import AutoencoderKL, WeightsError
from klvae.model.config import PRESET_HUB_IDS, PRESETS
from klvae.weights import export_ldm, hub


def test_hub_id_from_the_offline_cache(offline_cache: Path) -> None:
    model = perturbed_vae()
    fake_hub_cache(offline_cache, "org/pipeline", model, "vae")
    fake_hub_cache(offline_cache, "org/old-vae", model, None, bin_only=True)
    assert_same_weights(AutoencoderKL.from_pretrained("org/pipeline", subfolder="vae"), model)
    assert_same_weights(AutoencoderKL.from_pretrained("org/old-vae"), model)  # .bin fallback


def test_preset_name_goes_to_its_hub_repo(offline_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = perturbed_vae()
    fake_hub_cache(offline_cache, "org/tiny-vae", model, "vae")
    monkeypatch.setitem(PRESET_HUB_IDS, "tiny", ("org/tiny-vae", "vae"))
    back = AutoencoderKL.from_pretrained("tiny")
    assert back.config == PRESETS["tiny"]
    assert_same_weights(back, model)


def test_hub_revision_pins_a_commit_or_branch(offline_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.cli.main import main

    model = perturbed_vae()
    snap = fake_hub_cache(offline_cache, "org/pinned", model, "vae").parent
    commit = snap.name
    other = perturbed_vae(seed=1)
    # A second snapshot, which the branch "v2" points to; main stays on the first.
    other.save_pretrained(snap.parent / ("f" * 40) / "vae")
    (snap.parent.parent / "refs" / "v2").write_text("f" * 40)
    assert_same_weights(AutoencoderKL.from_pretrained("org/pinned", subfolder="vae"), model)
    assert_same_weights(AutoencoderKL.from_pretrained("org/pinned", subfolder="vae", revision="v2"), other)
    assert_same_weights(AutoencoderKL.from_pretrained(f"org/pinned@{commit}", subfolder="vae"), model)
    assert_same_weights(AutoencoderKL.from_pretrained("org/pinned@v2", subfolder="vae", revision="v2"), other)
    with pytest.raises(WeightsError, match=r"^HF_HUB_OFFLINE is set and org/pinned/vae/config.json at revision v3 "):
        AutoencoderKL.from_pretrained("org/pinned@v3", subfolder="vae")
    with pytest.raises(WeightsError, match="org/pinned@v2 names revision 'v2', but revision 'main' is given too"):
        AutoencoderKL.from_pretrained("org/pinned@v2", revision="main")
    for bad in ("../../x", "v2/../../..", "-rf", "a b"):
        with pytest.raises(WeightsError, match="is not a branch, tag or commit name"):
            AutoencoderKL.from_pretrained(f"org/pinned@{bad}", subfolder="vae")
    with pytest.raises(WeightsError, match="revision 'v2' given, but 'demo' is klvae's built-in model"):
        AutoencoderKL.from_pretrained("demo@v2")
    with pytest.raises(WeightsError, match=r"revision 'v2' given, but .* is a local folder, not a hub repo"):
        AutoencoderKL.from_pretrained(snap, revision="v2")
    # The CLI takes the same form wherever --model goes.
    assert main(["-q", "info", "--model", "org/pinned@v2", "--subfolder", "vae"]) == 0
    assert main(["info", "--model", "org/pinned@nope", "--subfolder", "vae"]) == 2
    assert "at revision nope is not in the local cache" in capsys.readouterr().err


def test_one_file_of_a_hub_repo(offline_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """org/name/file.safetensors, or its huggingface.co address (as diffusers' from_single_file takes): the files
    ComfyUI users know, such as stabilityai/sdxl-vae/sdxl_vae.safetensors or FLUX's ae.safetensors."""
    from klvae.cli.main import main

    model = perturbed_vae()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_cache / "models--org--single"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    export_ldm(model, repo / "snapshots" / commit / "vae" / "ae.safetensors")
    for name in ("org/single/vae/ae.safetensors", f"org/single/vae/ae.safetensors@{commit}",
                 "https://huggingface.co/org/single/blob/main/vae/ae.safetensors",
                 f"https://huggingface.co/org/single/resolve/{commit}/vae/ae.safetensors?download=true"):
        assert_same_weights(AutoencoderKL.from_pretrained(name), model)
    assert main(["-q", "info", "--model", "org/single/vae/ae.safetensors"]) == 0
    with pytest.raises(WeightsError, match=r"^no such local file org/single/vae/other\.safetensors, nor as a hub "
                                           r"file: HF_HUB_OFFLINE is set and org/single/vae/other\.safetensors is"):
        AutoencoderKL.from_pretrained("org/single/vae/other.safetensors")
    with pytest.raises(WeightsError, match=r"subfolder 'vae' given, but org/single/ae\.safetensors names one file"):
        AutoencoderKL.from_pretrained("org/single/ae.safetensors", subfolder="vae")
    with pytest.raises(WeightsError, match="names revision 'main', but revision 'v2' is given too"):
        AutoencoderKL.from_pretrained("https://huggingface.co/org/single/blob/main/vae/ae.safetensors",
                                      revision="v2")
    for not_a_weights_file in ("org/single/vae/config.json", "org/single/../x.safetensors"):
        with pytest.raises(WeightsError, match="no such file or folder, preset or hub id"):
            AutoencoderKL.from_pretrained(not_a_weights_file)


@pytest.fixture
def no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No HF_HUB_OFFLINE, no proxy, and a host name that does not resolve."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    hub._no_network.cache_clear()
    yield cache
    hub._no_network.cache_clear()


def test_without_network_the_cache_answers_at_once(no_network: Path) -> None:
    model = perturbed_vae()
    fake_hub_cache(no_network, "org/cached", model, "vae")
    start = time.perf_counter()
    assert_same_weights(AutoencoderKL.from_pretrained("org/cached", subfolder="vae"), model)
    with pytest.raises(WeightsError, match=r"^no network .* org/absent/config\.json is not in the local cache$"):
        AutoencoderKL.from_pretrained("org/absent")
    assert time.perf_counter() - start < 5  # huggingface_hub's own retries take about 25 s


def test_hub_id_not_in_the_cache(offline_cache: Path) -> None:
    with pytest.raises(WeightsError, match=r"HF_HUB_OFFLINE is set and org/absent/vae/config.json is not in the local"):
        AutoencoderKL.from_pretrained("org/absent", subfolder="vae")
    fake_hub_cache(offline_cache, "org/config-only", perturbed_vae(), None)
    next((offline_cache / "models--org--config-only").rglob("*.safetensors")).unlink()
    with pytest.raises(WeightsError, match=r"config-only/diffusion_pytorch_model\.safetensors \(nor \.bin\) is not in"):
        AutoencoderKL.from_pretrained("org/config-only")
