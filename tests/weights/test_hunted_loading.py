"""Pins bugs a hunt of loading weights from every format a user holds found:

- a sharded diffusers folder (diffusion_pytorch_model.safetensors.index.json + shards, as diffusers'
  save_pretrained(max_shard_size=...) writes and from_pretrained reads) is refused as "a pipeline folder? pass
  subfolder='vae'"; and a shard its index names but the folder lacks is not named;
- from_pretrained(config=<dict>) fails with a bare "unhashable type: 'dict'", though AutoencoderKL(config) takes
  that very dict;
- `klvae info` counts LDM training tensors (loss.*, which loading drops) in the weights' stored dtype, so an fp16
  VAE beside an fp32 discriminator reads as "fp32";
- a .pt holding the VAE's state dict under "model" (torch.save({"model": sd, ...})) is refused as "holds no
  tensors";
- a file that holds a diffusion model and no VAE (a UNet or FLUX transformer, gigabytes) has every tensor read
  into memory before it is refused by its key names;
- a hub pipeline id without subfolder (e.g. stabilityai/stable-diffusion-xl-base-1.0) fails saying only that
  config.json is not there, while the same pipeline as a local folder loads its vae/ (or hints subfolder='vae').
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import klvae
from helpers import fake_hub_cache, one_error_line, perturbed_vae
from klvae.cli.main import main
from klvae.errors import WeightsError
from klvae.weights import diffusers_to_ldm


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def _hand_sharded(vae: klvae.AutoencoderKL, d: Path, shards: int = 3) -> list[str]:
    """`vae` saved as diffusers saves sharded weights: config.json, N shard files and the index naming them."""
    vae.save_pretrained(d)
    (d / "diffusion_pytorch_model.safetensors").unlink()
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    keys = list(sd)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map: dict[str, str] = {}
    for i, name in enumerate(names):
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, str(d / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return names


def test_a_sharded_diffusers_folder_loads_as_diffusers_loads_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers writes and reads this folder; klvae said "has no diffusion_pytorch_model.safetensors ... (a
    pipeline folder? pass subfolder='vae')"."""
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae = perturbed_vae("tiny")
    vae.save_pretrained(tmp_path / "plain")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "plain", low_cpu_mem_usage=False)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors").exists()
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "sharded", low_cpu_mem_usage=False)
    _same_weights(back, vae)  # the oracle reads the folder

    ours = klvae.AutoencoderKL.from_pretrained(tmp_path / "sharded")
    _same_weights(ours, vae)
    assert ours.config == klvae.AutoencoderKL.from_pretrained(tmp_path / "plain").config


def test_a_shard_the_index_names_but_the_folder_lacks_is_named(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupted download of a sharded folder: the error should name the missing shard, not suggest a
    pipeline folder."""
    names = _hand_sharded(perturbed_vae("tiny"), tmp_path / "vae")
    (tmp_path / "vae" / names[1]).unlink()
    with pytest.raises(WeightsError) as e:
        klvae.AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert names[1] in str(e.value) and "\n" not in str(e.value).strip()
    assert main(["-q", "info", "--model", str(tmp_path / "vae")]) == 2
    assert names[1] in one_error_line(capsys.readouterr().err)


def test_a_config_dict_is_taken_as_the_constructor_takes_it_or_named(tmp_path: Path) -> None:
    """AutoencoderKL(cfg.to_dict()) builds; from_pretrained(folder, config=cfg.to_dict()) raised
    TypeError: unhashable type: 'dict' (from `name not in PRESETS`)."""
    vae = perturbed_vae("tiny")
    folder = vae.save_pretrained(tmp_path / "vae")
    klvae.AutoencoderKL(vae.config.to_dict())  # the constructor's own form of a config
    try:
        back = klvae.AutoencoderKL.from_pretrained(folder, config=vae.config.to_dict())
    except (TypeError, ValueError) as e:  # WeightsError is a ValueError too
        assert "config" in str(e), f"an error that does not name the config argument: {e}"
    else:
        assert back.config == vae.config
        _same_weights(back, vae)


def test_info_stored_dtype_counts_only_the_tensors_loading_keeps(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An LDM autoencoder checkpoint keeps its discriminator (loss.*) beside the VAE; loading drops it, but
    `klvae info` counted it, calling an fp16 VAE "fp32 (fp16 for 33 % of the values)"."""
    vae = perturbed_vae("tiny")
    sd = {k: v.half().contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    n = sum(v.numel() for v in sd.values())
    sd["loss.discriminator.main.0.weight"] = torch.randn(2 * n)  # fp32, twice the VAE's values
    sd["loss.logvar"] = torch.zeros(())
    path = tmp_path / "kl-f8-half.safetensors"
    save_file(sd, str(path))
    loaded = klvae.AutoencoderKL.from_pretrained(path, config="tiny")  # the loss.* tensors are no part of it
    _same_weights(loaded, vae.half())
    capsys.readouterr()
    assert main(["-q", "info", "--model", str(path), "--config", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stored_dtype"] == "fp16"


def test_weights_nested_under_a_model_key_are_not_called_no_tensors(tmp_path: Path) -> None:
    """torch.save({"model": model.state_dict(), "epoch": 3}) is a common trainer's checkpoint; klvae said the
    file "holds no tensors" (it looks into "state_dict" only). Loading it, or naming where the tensors are,
    would both be right; denying they exist is not."""
    vae = perturbed_vae("tiny")
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": vae.state_dict(), "epoch": 3}, path)
    try:
        back = klvae.AutoencoderKL.from_pretrained(path, config="tiny")
    except WeightsError as e:
        text = str(e).replace(str(path), "<file>")
        assert "no tensors" not in text, text
        assert "'model'" in text or '"model"' in text, text
    else:
        _same_weights(back, vae)


def test_a_diffusion_model_file_is_refused_before_its_tensors_are_read(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal is by key names (in the header), yet every tensor of the file was read first: for a UNet or a
    FLUX transformer passed by mistake that is its whole size in RAM (gigabytes) before the one-line error."""
    import safetensors

    path = tmp_path / "flux1-dev.safetensors"
    save_file({f"double_blocks.{i}.img_attn.qkv.weight": torch.zeros(96, 32) for i in range(8)}, str(path))
    real = safetensors.safe_open
    read: list[str] = []

    class Spy:
        """safe_open, counting the tensors read."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            self._f = real(*args, **kwargs)

        def __enter__(self) -> Spy:
            self._f.__enter__()
            return self

        def __exit__(self, *exc: object) -> object:
            return self._f.__exit__(*exc)

        def get_tensor(self, key: str) -> torch.Tensor:
            read.append(key)
            return self._f.get_tensor(key)

        def __getattr__(self, name: str) -> object:
            return getattr(self._f, name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    with pytest.raises(WeightsError, match="holds a diffusion model"):
        klvae.AutoencoderKL.from_pretrained(path)
    assert read == [], f"{len(read)} tensors of a file that holds no VAE were read into memory"


def test_a_hub_pipeline_id_without_subfolder_finds_its_vae_or_says_subfolder(
    offline_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same pipeline as a local folder loads its vae/ (or the error hints subfolder='vae'); as a hub id it said
    only "HF_HUB_OFFLINE is set and org/pipe/config.json is not in the local cache" (online: "has no
    config.json"), though the pipeline and its VAE are in the cache."""
    vae = perturbed_vae("tiny")
    snap = fake_hub_cache(offline_cache, "org/pipe", vae, "vae").parent
    (snap / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    _same_weights(klvae.AutoencoderKL.from_pretrained(snap), vae)  # the local folder: its vae/
    try:
        back = klvae.AutoencoderKL.from_pretrained("org/pipe")
    except WeightsError as e:
        assert "subfolder" in str(e), str(e)
    else:
        _same_weights(back, vae)
    code = main(["-q", "info", "--model", "org/pipe"])
    if code != 0:
        assert "subfolder" in one_error_line(capsys.readouterr().err)
