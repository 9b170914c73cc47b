"""Loading weights: diffusers folders, single files (diffusers, legacy or LDM layout), hub ids and preset names."""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from klvae.errors import WeightsError, first_line
from klvae.inference.precision import usable_device
from klvae.model.config import PRESET_HUB_FILES, PRESET_HUB_IDS, PRESETS, AutoencoderKLConfig
from klvae.weights.convert import StateDict, to_diffusers
from klvae.weights.diffusers_config import batch_norm_eps, read_config_json, read_json_object
from klvae.weights.hub import (
    CONFIG_NAME,
    by_format,
    fetch_diffusers_files,
    fetch_hub_file,
    looks_like_repo_id,
    parse_hub_file,
    variant_names,
)
from klvae.weights.identify import check_is_vae, check_may_be_vae
from klvae.weights.infer import check_fits, family_from_name, guess_family, infer_config, with_edm_stats
from klvae.weights.latent_bn import BFL_EPS, pop_latent_bn, with_latent_stats

# Re-exported: other modules (save, training, the CLI) have long imported them from here.
from klvae.weights.read import (  # noqa: F401
    CONFIG_METADATA,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    WEIGHTS_SUFFIXES,
    RawWeights,
    header_keys,
    is_shard_index,
    read_state_dict,
    read_weights,
    shard_files,
    sniff_format,
    torch_file_problem,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

# In order of preference inside a diffusers folder; the fp16 variants only when no full-precision file is there.
FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json",  # sharded
    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin",
)
_SHOWN = 5  # keys named per kind of mismatch in an error line


@dataclass(frozen=True)
class WeightsSource:
    """The local files a model loads from (the hub's are in its cache), and the preset name it was, if any."""

    weights: Path
    config_json: Path | None = None
    preset: str | None = None

    @property
    def files(self) -> list[Path]:
        """Every file that loading reads."""
        shards = shard_files(self.weights) if is_shard_index(self.weights) else []
        return [self.weights, *shards] + ([self.config_json] if self.config_json is not None else [])


def _folder(d: Path, variant: str | None = None, use_safetensors: bool | None = None) -> WeightsSource:
    # A `variant` ("fp16") reads diffusion_pytorch_model.<variant>.safetensors (else .bin), as diffusers does.
    names = by_format(variant_names(variant) if variant is not None else FOLDER_WEIGHTS, use_safetensors)
    for name in names:
        if (d / name).is_file():
            if ".fp16." in name and variant is None:
                log.info("%s: only the fp16 variant is there, using %s", d, name)
            config = d / CONFIG_NAME
            if config.exists() and not config.is_file():  # else ignored, and the factors guessed from shapes
                raise WeightsError(f"{config} is not a file")
            return WeightsSource(d / name, config if config.is_file() else None)
    if (d / "vae" / CONFIG_NAME).is_file():
        log.info("%s is a pipeline folder: using its vae/ subfolder", d)
        return _folder(d / "vae", variant, use_safetensors)
    if variant is not None:
        there = sorted(p.name for p in d.glob("diffusion_pytorch_model.*.*") if p.name.count(".") == 2)
        raise WeightsError(f"{d} has no {' or '.join(names)} (variant {variant!r}; "
                           f"{'the variants there: ' + ', '.join(there) if there else 'it holds no variant'})")
    if use_safetensors is not None:
        raise WeightsError(f"{d} has no {' or '.join(names[:2])} (use_safetensors={use_safetensors})")
    raise WeightsError(f"{d} has no {' or '.join(FOLDER_WEIGHTS[:2])} (a pipeline folder? pass subfolder='vae')")


def _check_format(name: str, use_safetensors: bool | None, path: Path | None = None) -> None:
    """Refuse one weights file that `use_safetensors` rules out (True: a pickle; False: safetensors), read by its
    content where it is here (a .ckpt may hold safetensors), else by its name."""
    if use_safetensors is None:
        return
    kind = sniff_format(path) if path is not None and path.is_file() else None
    lower = name.lower()
    safe = kind == "safetensors" if kind else lower.endswith((*SAFETENSORS_SUFFIXES, ".safetensors.index.json"))
    if safe != bool(use_safetensors):
        kind = "a safetensors file" if safe else "not a safetensors file"
        raise WeightsError(f"use_safetensors={use_safetensors} given, but {name} is {kind}")


def _hub(repo_id: str, subfolder: str | None, revision: str | None, preset: str | None = None,
         variant: str | None = None, use_safetensors: bool | None = None, local_only: bool = False) -> WeightsSource:
    config, weights = fetch_diffusers_files(repo_id, subfolder, revision, variant, use_safetensors, local_only)
    return WeightsSource(weights, config, preset)


# Models that ship inside the package (src/klvae/assets/<name>/), so the commands run offline.
EMBEDDED_MODELS = ("demo",)


class BuiltinName(str):
    """The name of a built-in model that means it even where a local file or folder has that name: the CLI's
    default --model (a project's own demo/ folder must not stand in for the model the log line names)."""

    __slots__ = ()


def embedded_model_dir(name: str) -> Path:
    """The folder of an embedded model (config.json + safetensors inside the installed package)."""
    from importlib.resources import files

    folder = Path(str(files("klvae") / "assets" / name))
    if not (folder / "config.json").is_file():
        raise WeightsError(f"the embedded {name!r} model is missing from this installation ({folder})")
    return folder


def _check_subfolder(subfolder: str) -> None:
    # A subfolder is a place inside the model: '../other' or '/etc' would read a model from elsewhere.
    sub = Path(subfolder)
    if sub.is_absolute() or ".." in sub.parts:
        raise WeightsError(f"subfolder {subfolder!r} must be a path inside the model folder or repo (no '..')")


# A branch, tag or commit as git allows them, without what a shell or a path would misread.
_REVISION = re.compile(r"^[\w][\w.\-/]*$")


def _split_revision(name: str, revision: str | None) -> tuple[str, str | None]:
    """'org/name@rev' (or 'sdxl@rev') -> the name and the revision; one given both ways must agree."""
    base, at, rev = name.rpartition("@")
    if not at or not base:
        return name, revision
    if revision is not None and revision != rev:
        raise WeightsError(f"{name} names revision {rev!r}, but revision {revision!r} is given too")
    return base, rev


def _local(path: Path, subfolder: str | None, revision: str | None, variant: str | None = None,
           use_safetensors: bool | None = None) -> WeightsSource:
    if revision:
        kind = "folder" if path.is_dir() else "file"
        raise WeightsError(f"revision {revision!r} given, but {path} is a local {kind}, not a hub repo")
    if subfolder:
        if not path.is_dir():
            raise WeightsError(f"subfolder {subfolder!r} given, but {path} is a file, not a folder")
        path = path / subfolder
        if not path.is_dir():
            raise WeightsError(f"no such folder: {path}")
    if path.is_dir():
        return _folder(path, variant, use_safetensors)
    if variant is not None:
        raise WeightsError(f"variant {variant!r} given, but {path} is one weights file, not a diffusers folder")
    _check_format(str(path), use_safetensors, path)
    # A diffusers folder's weights named alone: its config.json beside them is the model's, not a guess from shapes.
    beside = path.parent / CONFIG_NAME
    return WeightsSource(path, beside if path.name in FOLDER_WEIGHTS and beside.is_file() else None)


def locate(path_or_id: str | Path, subfolder: str | None = None, revision: str | None = None,
           variant: str | None = None, use_safetensors: bool | None = None,
           local_files_only: bool = False) -> WeightsSource:
    """Where the weights (and config.json) named by path_or_id are, fetching from the hub when needed; a hub id or
    preset may name a revision (branch, tag or commit) as `org/name@rev` or with `revision`; a diffusers folder or
    hub repo its `variant` ("fp16": diffusion_pytorch_model.fp16.safetensors). `use_safetensors` and
    `local_files_only` mean what they mean to diffusers' from_pretrained."""
    if subfolder:
        _check_subfolder(subfolder)
    if variant is not None:
        variant_names(variant)  # a bad name refused before anything is read
    if not str(path_or_id).strip():  # Path("") is ".", the current folder: never what an empty option meant
        raise WeightsError("the model's name is empty: name a folder, a weights file, a hub id or a preset")
    path = Path(path_or_id).expanduser()
    if path.exists() and not isinstance(path_or_id, BuiltinName):
        return _local(path, subfolder, revision, variant, use_safetensors)
    name, revision = _split_revision(str(path_or_id), revision)
    _check_named(name, subfolder, revision, variant)
    if name in EMBEDDED_MODELS:
        return _folder(embedded_model_dir(name), use_safetensors=use_safetensors)
    if name in PRESETS:
        return _preset(name, revision, use_safetensors, local_files_only)
    if looks_like_repo_id(name) and not name.lower().endswith(WEIGHTS_SUFFIXES):
        return _hub(name, subfolder, revision, None, variant, use_safetensors, local_files_only)
    if variant is not None:
        raise WeightsError(f"variant {variant!r} given, but {path_or_id} names no diffusers folder or hub repo")
    if hub_file := parse_hub_file(name, WEIGHTS_SUFFIXES):
        _check_format(hub_file[1], use_safetensors)
        return _hub_file(str(path_or_id), *hub_file, subfolder, revision, local_files_only)
    raise WeightsError(f"no such file or folder, preset or hub id: {path_or_id}{_preset_hint(name)}")


def _check_named(name: str, subfolder: str | None, revision: str | None, variant: str | None) -> None:
    """Refuse a bad revision, and a subfolder, revision or variant given with a name that stands for one model."""
    # '..' would lead huggingface_hub's cache lookup (refs/<revision>) out of the cache.
    if revision is not None and (not _REVISION.match(revision) or ".." in revision):
        raise WeightsError(f"revision {revision!r} is not a branch, tag or commit name")
    if (subfolder or revision) and (name in EMBEDDED_MODELS or (subfolder and name in PRESETS)):
        # Such a name stands for one known model; a subfolder would be ignored, or pick another part of its repo.
        given = f"subfolder {subfolder!r}" if subfolder else f"revision {revision!r}"
        raise WeightsError(f"{given} given, but {name!r} is {_known(name)}, not a folder or hub repo")
    if variant is not None and (name in EMBEDDED_MODELS or name in PRESETS):
        raise WeightsError(f"variant {variant!r} given, but {name!r} is {_known(name)}: name its hub repo instead")


def _known(name: str) -> str:
    return "klvae's built-in model" if name in EMBEDDED_MODELS else "a preset"


def _preset_hint(name: str) -> str:
    """For a name that could only have meant a preset (no folder, no suffix): the presets, and a near one."""
    if "/" in name or "\\" in name or Path(name).suffix:
        return ""
    known = [*EMBEDDED_MODELS, *PRESETS]
    near = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    return f" ({f'did you mean {near[0]!r}? ' if near else ''}the built-in names: {', '.join(known)})"


def _preset(name: str, revision: str | None, use_safetensors: bool | None = None,
            local_only: bool = False) -> WeightsSource:
    """A preset's released weights: a diffusers folder in a hub repo, or one file (BFL's small decoder)."""
    if name in PRESET_HUB_FILES:
        _check_format(PRESET_HUB_FILES[name][1], use_safetensors)
        return WeightsSource(fetch_hub_file(*PRESET_HUB_FILES[name], revision, local_only), preset=name)
    if name not in PRESET_HUB_IDS:
        raise WeightsError(f"preset {name!r} has no released weights: it is an architecture to build with random "
                           f"weights (AutoencoderKL({name!r}) in Python, or `klvae info --model {name}` to describe "
                           "it)")
    repo_id, preset_sub = PRESET_HUB_IDS[name]
    return _hub(repo_id, preset_sub, revision, name, None, use_safetensors, local_only)


def _hub_file(given: str, repo_id: str, filename: str, url_revision: str | None, subfolder: str | None,
              revision: str | None, local_only: bool = False) -> WeightsSource:
    """One weights file of a hub repo (org/name/file.safetensors, or its huggingface.co address)."""
    if subfolder:
        raise WeightsError(f"subfolder {subfolder!r} given, but {given} names one file")
    if url_revision is not None and revision is not None and revision != url_revision:
        raise WeightsError(f"{given} names revision {url_revision!r}, but revision {revision!r} is given too")
    try:
        return WeightsSource(fetch_hub_file(repo_id, filename, revision or url_revision, local_only))
    except WeightsError as e:
        # It may as well have been a local path with a typo: say both.
        raise WeightsError(f"no such local file {given}, nor as a hub file: {e}") from None


def _resolve_config(
    config: AutoencoderKLConfig | str | None, source: WeightsSource, sd: StateDict, family: str | None,
    raw: RawWeights,
) -> tuple[AutoencoderKLConfig, str]:
    """The config to build and how to name it in errors: explicit > preset name > config.json > the config klvae
    wrote into a .safetensors header > shapes."""
    if isinstance(config, AutoencoderKLConfig):
        check_fits(sd, config, "(the one passed)")
        return config, "the config passed"
    name = config if config is not None else source.preset
    if name is not None:
        if name not in PRESETS:
            raise WeightsError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        check_fits(sd, PRESETS[name], repr(name))
        return PRESETS[name], f"preset {name!r}"
    if source.config_json is not None:
        cfg = read_config_json(source.config_json)
        check_fits(sd, cfg, str(source.config_json))
        return cfg, str(source.config_json)
    if CONFIG_METADATA in raw.metadata:
        cfg = _config_from_metadata(raw.metadata[CONFIG_METADATA], source.weights)
        check_fits(sd, cfg, f"stored in {source.weights.name}")
        return cfg, f"the config stored in {source.weights.name}"
    named = family_from_name(source.weights.name) if family is None else None
    cfg = infer_config(sd, family, named=(named, source.weights.name) if named else None)
    return with_edm_stats(cfg, raw.extras, source.weights.name), "the config inferred from the weights"


def _batch_norm_eps(source: WeightsSource) -> float:
    """The latent BatchNorm's epsilon: config.json's where the weights came with one, else BFL's."""
    return BFL_EPS if source.config_json is None else batch_norm_eps(read_json_object(source.config_json))


def _config_from_metadata(text: str, path: Path) -> AutoencoderKLConfig:
    try:
        return AutoencoderKLConfig.from_dict(json.loads(text))
    except RecursionError:
        raise WeightsError(f"{path}: the klvae config in its header is nested too deeply to be a config") from None
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{path}: the klvae config in its header is unreadable: {first_line(e)}") from None


def _names(keys: list[str], shown: int = _SHOWN) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _type(v: Any) -> str:
    return str(v.dtype) if isinstance(v, Tensor) else type(v).__name__


def check_state_dict(model: nn.Module, sd: dict[str, Any], what: str = "the model", shown: int = _SHOWN) -> None:
    """WeightsError naming missing keys, unexpected keys and type and shape mismatches of `sd` against `model`."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    # A weight must be a tensor of the model's kind: an int32 tensor in place of a float one cannot be loaded.
    kinds = [
        f"{k} {_type(sd[k])} vs {expected[k].dtype}"
        for k in expected
        if k in sd and (not isinstance(sd[k], Tensor) or sd[k].is_floating_point() != expected[k].is_floating_point())
    ]
    shapes = [
        f"{k} {list(sd[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in sd and isinstance(sd[k], Tensor) and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{len(missing)} missing keys: {_names(missing, shown)}" if missing else "",
        f"{len(unexpected)} unexpected keys: {_names(unexpected, shown)}" if unexpected else "",
        f"{len(kinds)} values of the wrong type (weights vs model): {_names(kinds, shown)}" if kinds else "",
        f"{len(shapes)} shape mismatches (weights vs model): {_names(shapes, shown)}" if shapes else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise WeightsError(f"the weights do not fit {what}: " + "; ".join(problems))


def load_state_dict_strict(model: M, sd: StateDict, what: str = "the model", assign: bool = False) -> M:
    """Load `sd` into `model` after check_state_dict; assign=True adopts the tensors (for meta-built models)."""
    check_state_dict(model, sd, what)
    model.load_state_dict(sd, strict=True, assign=assign)
    return model


def _check_dtype(dtype: torch.dtype | None) -> None:
    # Else an int8 model fails strict loading with every weight named as "of the wrong type".
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return
    what = dtype if isinstance(dtype, torch.dtype) else repr(dtype)
    raise WeightsError(f"dtype {what} is not a floating-point torch.dtype: use torch.float32, torch.float16 or "
                       "torch.bfloat16")


def _check_finite(raw: StateDict, cast: StateDict, name: str, dtype: torch.dtype) -> None:
    # A NaN or inf weight makes every output NaN (black images, NaN latents) with no hint why; so does a finite
    # weight beyond the range of the dtype asked for (float16 ends at 65504).
    bad = [k for k, v in cast.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return
    stored = [k for k in bad if not bool(torch.isfinite(raw[k]).all())]
    if stored:
        raise WeightsError(f"{name} holds NaN or infinite values in {len(stored)} weights ({_names(stored)}): "
                           "the file is damaged or comes from a training run that diverged")
    # float16 has a narrower range than float32 and bfloat16; past float32's own, no dtype klvae runs in holds them.
    way_out = ": use float32 or bfloat16" if dtype == torch.float16 else ": the file is damaged"
    raise WeightsError(f"{name} has weights beyond the range of {str(dtype).removeprefix('torch.')}, whose largest "
                       f"value is {torch.finfo(dtype).max:g} ({_names(bad)}){way_out}")


def load_pretrained(
    cls: type[M],
    path_or_id: str | Path,
    subfolder: str | None = None,
    config: AutoencoderKLConfig | str | dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    local_files_only: bool = False,
) -> M:
    """A `cls` (AutoencoderKL) with the weights that path_or_id names, in eval mode on device/dtype."""
    # Refused before anything is read or fetched.
    _check_dtype(dtype)
    config = _as_config(config)
    device = usable_device(device) if device is not None else None
    source = locate(path_or_id, subfolder, revision, variant, use_safetensors, local_files_only)
    return load_source(cls, source, config=config, dtype=dtype, device=device)


def _as_config(config: object) -> AutoencoderKLConfig | str | None:
    # As AutoencoderKL(config) takes it: a dict is AutoencoderKLConfig.to_dict()'s form.
    if isinstance(config, dict):
        return AutoencoderKLConfig.from_dict(config)
    if config is not None and not isinstance(config, AutoencoderKLConfig | str):
        raise TypeError(f"config must be an AutoencoderKLConfig, a preset name or a dict of its fields, got a "
                        f"{type(config).__name__}")
    return config


def load_source(
    cls: type[M],
    source: WeightsSource,
    config: AutoencoderKLConfig | str | dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> M:
    """`load_pretrained` from files already located (see `locate`)."""
    _check_dtype(dtype)
    config = _as_config(config)
    if (keys := header_keys(source.weights)) is not None:
        check_may_be_vae(source.weights, keys)
    raw = read_weights(source.weights)
    check_is_vae(source.weights, raw.tensors, raw.keys)
    sd, latent_bn = pop_latent_bn(to_diffusers(raw.tensors))
    family = "flux2" if latent_bn is not None else guess_family(raw.keys)
    cfg, what = _resolve_config(config, source, sd, family, raw)
    if latent_bn is not None:
        cfg = with_latent_stats(cfg, latent_bn, _batch_norm_eps(source), what)
    elif cfg.latent_patch_size > 1 and cfg.latents_mean is None:
        log.warning("%s has no latent statistics (FLUX.2's bn.running_mean/var): its diffusion latents will be "
                    "patchified but not normalised", source.weights.name)
    # Built without memory or random init: every tensor is replaced by a checkpoint tensor below.
    with torch.device("meta"):
        model = cls(cfg)
    target = dtype or torch.float32
    cast = {k: v.to(dtype=target) if v.is_floating_point() else v for k, v in sd.items()}
    _check_finite(sd, cast, source.weights.name, target)
    sd = cast
    load_state_dict_strict(model, sd, f"{what} ({source.weights.name})", assign=True)
    if device is not None:
        model.to(device=device)
    log.info("loaded %s (%s)", source.weights, what)
    return model.eval()
