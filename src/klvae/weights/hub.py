"""Fetching a diffusers-layout VAE, or one weights file, from the Hugging Face hub (or its local cache), with
one-line errors."""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from klvae.errors import WeightsError, first_line

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_VARIANT = re.compile(r"^[A-Za-z0-9][\w-]*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# One file in a repo: org/name/path/file.ext, or the address of its page or download (diffusers' from_single_file
# takes these): https://huggingface.co/org/name/blob|resolve/<revision>/path/file.ext.
_HUB_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/(?P<file>(?:[\w.-]+/)*[\w.-]+\.(?P<ext>\w+))$")
_HUB_URL = re.compile(r"^https://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/"
                      r"(?:blob|resolve)/(?P<rev>[\w.-]+)/(?P<file>(?:[\w.-]+/)*[\w.-]+\.(?P<ext>\w+))$")
_TRUE = {"1", "on", "yes", "true"}


def variant_names(variant: str) -> tuple[str, str]:
    """The weights files of a diffusers variant ("fp16": diffusion_pytorch_model.fp16.safetensors, then .bin)."""
    if not isinstance(variant, str) or not _VARIANT.fullmatch(variant):
        raise WeightsError(f"variant {variant!r} is not a variant name such as 'fp16'")
    safe, pickled = (n.replace(".", f".{variant}.", 1) for n in WEIGHTS_NAMES)
    return safe, pickled


def by_format(names: tuple[str, ...], use_safetensors: bool | None) -> tuple[str, ...]:
    """The weights file names that diffusers' `use_safetensors` allows: True safetensors only, False the pickled
    (.bin) ones only, None both (safetensors first)."""
    if use_safetensors is None:
        return names
    return tuple(n for n in names if (".safetensors" in n) == bool(use_safetensors))


def looks_like_repo_id(s: str) -> bool:
    """Whether `s` has the form org/name of a hub repository."""
    return bool(_REPO_ID.match(s)) and ".." not in s


def parse_hub_file(s: str, suffixes: tuple[str, ...]) -> tuple[str, str, str | None] | None:
    """(repo id, file path, revision from a URL) when `s` names one file with one of `suffixes` in a hub repo."""
    m = _HUB_URL.match(s.split("?", 1)[0]) or _HUB_FILE.match(s)
    if m is None or ".." in s or f".{m['ext'].lower()}" not in suffixes:
        return None
    return m["repo"], m["file"], m.groupdict().get("rev")


def fetch_hub_file(repo_id: str, filename: str, revision: str | None = None, local_only: bool = False) -> Path:
    """The local path of one file of a hub repo, downloaded or cached (only from the cache with `local_only`)."""
    from huggingface_hub.utils import EntryNotFoundError

    try:
        path = _download(repo_id, filename, None, revision, local_only)
    except (OSError, ValueError, EntryNotFoundError) as e:
        raise WeightsError(_describe(e, repo_id, filename, revision, local_only)) from None
    log.info("hub %s%s: %s", repo_id, f"@{revision}" if revision else "", path)
    return path


def _offline() -> bool:
    # Read at call time: huggingface_hub freezes HF_HUB_OFFLINE when it is imported.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def _no_network() -> bool:
    """Whether the hub's host name fails to resolve: then only the local cache is tried, at once, instead of
    huggingface_hub's retries (about 25 s). Behind a proxy the proxy resolves names, so no check is made."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        log.info("%s does not resolve: using the local hub cache only", host)
        return True
    return False


def _cache_dir() -> str | None:
    # Also read at call time, for the same reason; None lets huggingface_hub use its own default.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _download(repo_id: str, filename: str, subfolder: str | None, revision: str | None,
              local_only: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(
        repo_id, filename, subfolder=subfolder or None, revision=revision, cache_dir=_cache_dir(),
        local_files_only=local_only or _offline() or _no_network(),
        library_name="klvae",
    )
    return Path(path)


def _describe(e: Exception, repo_id: str, filename: str, revision: str | None = None, local_only: bool = False) -> str:
    """One line for a person from a huggingface_hub exception."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}/{filename}" + (f" at revision {revision}" if revision else "")
    if isinstance(e, LocalEntryNotFoundError):
        if _offline():
            return f"HF_HUB_OFFLINE is set and {where} is not in the local cache"
        if local_only:
            return f"local_files_only is set and {where} is not in the local cache"
        if _no_network():
            return f"no network (the hub's host name does not resolve) and {where} is not in the local cache"
        return f"cannot reach the hub and {where} is not in the local cache"
    if isinstance(e, EntryNotFoundError):
        return f"hub repository {repo_id} has no {filename}" + (f" at revision {revision}" if revision else "")
    if isinstance(e, GatedRepoError):
        return f"{repo_id} is gated: accept its licence on huggingface.co and log in (hf auth login)"
    if isinstance(e, RepositoryNotFoundError):
        return f"hub repository {repo_id} not found (or private: log in with hf auth login)"
    if isinstance(e, RevisionNotFoundError):
        return f"hub repository {repo_id} has no revision {revision or 'main'}"
    return f"cannot fetch {where} from the hub: {first_line(e)}"


def fetch_diffusers_files(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                          variant: str | None = None, use_safetensors: bool | None = None,
                          local_only: bool = False) -> tuple[Path, Path]:
    """Local paths of config.json and the weights (safetensors, else .bin, as `use_safetensors` allows; of
    `variant`, such as "fp16", where given) of a hub repo, downloaded or cached (only cached with `local_only`);
    `revision` is a branch, tag or commit (default: main)."""
    names = by_format(variant_names(variant) if variant is not None else WEIGHTS_NAMES, use_safetensors)
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    def shown(name: str) -> str:
        return f"{subfolder}/{name}" if subfolder else name

    try:
        config = _download(repo_id, CONFIG_NAME, subfolder, revision, local_only)
    except (OSError, ValueError, EntryNotFoundError) as e:
        if subfolder or not isinstance(e, EntryNotFoundError):  # LocalEntryNotFoundError is one too
            raise WeightsError(_describe(e, repo_id, shown(CONFIG_NAME), revision, local_only)) from None
        try:  # a pipeline repo (its model_index.json at the top), as a local pipeline folder is taken
            config, subfolder = _download(repo_id, CONFIG_NAME, "vae", revision, local_only), "vae"
        except (OSError, ValueError, EntryNotFoundError):
            # Offline, a repo never fetched lacks both: then the hint would only mislead.
            hint = "" if isinstance(e, LocalEntryNotFoundError) else " (a pipeline repo? pass subfolder='vae')"
            raise WeightsError(_describe(e, repo_id, CONFIG_NAME, revision, local_only) + hint) from None
        log.info("%s is a pipeline repo: using its vae/ subfolder", repo_id)
    first: Exception | None = None
    for name in names:
        try:
            weights = _download(repo_id, name, subfolder, revision, local_only)
        except (OSError, ValueError, EntryNotFoundError) as e:
            # Fall back to .bin only when the file is absent (remotely or in the cache), not on other failures.
            if not isinstance(e, EntryNotFoundError):
                raise WeightsError(_describe(e, repo_id, shown(name), revision, local_only)) from None
            first = first or e
            continue
        log.info("hub %s%s%s: %s", repo_id, f"@{revision}" if revision else "", f" ({subfolder})" if subfolder else "",
                 weights)
        return config, weights
    assert first is not None
    nor = " (nor .bin)" if len(names) > 1 else f" (use_safetensors={use_safetensors})"
    raise WeightsError(_describe(first, repo_id, shown(names[0]) + nor, revision, local_only))
