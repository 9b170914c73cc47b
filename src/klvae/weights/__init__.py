"""Weight formats: diffusers folders and config.json, LDM and legacy checkpoints, the hub, strict loading."""

from klvae.weights.convert import (
    detect_layout,
    diffusers_to_ldm,
    drop_training_keys,
    ldm_to_diffusers,
    legacy_to_diffusers,
    strip_prefix,
    to_diffusers,
)
from klvae.weights.diffusers_config import config_from_diffusers, config_to_diffusers, read_config_json
from klvae.weights.infer import check_fits, guess_family, infer_architecture, infer_config
from klvae.weights.load import check_state_dict, load_pretrained, load_state_dict_strict, read_state_dict
from klvae.weights.save import export_ldm, save_pretrained

__all__ = [
    "check_fits",
    "check_state_dict",
    "config_from_diffusers",
    "config_to_diffusers",
    "detect_layout",
    "diffusers_to_ldm",
    "drop_training_keys",
    "export_ldm",
    "guess_family",
    "infer_architecture",
    "infer_config",
    "ldm_to_diffusers",
    "legacy_to_diffusers",
    "load_pretrained",
    "load_state_dict_strict",
    "read_config_json",
    "read_state_dict",
    "save_pretrained",
    "strip_prefix",
    "to_diffusers",
]
