"""Pins what a mutation audit of weights.hub found the other tests let through: which names are hub repo ids and
hub files (www. and hf.co addresses), how offline mode and the cache folder are read from the environment, what
hf_hub_download is asked, the one-line message for each huggingface_hub error, and the .bin fallback. Each test names
the mutant(s) it kills. No network: huggingface_hub's download is replaced by fakes that return local files or raise
its real exception types."""

from __future__ import annotations

import importlib
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from helpers import one_line
from klvae.errors import WeightsError
from klvae.weights import hub

# The HTTP library huggingface_hub builds its errors on (httpx2 in huggingface_hub 2.x), not named here, so a
# release that changes it changes these fakes with it.
_http = importlib.import_module(huggingface_hub.errors.Response.__module__.split(".")[0])
Request, Response = _http.Request, _http.Response


def _http_error(cls: type[Exception], message: str = "404 Client Error") -> Exception:
    return cls(message, response=Response(404, request=Request("GET", "https://huggingface.co/org/x")))


# ---- weights.hub: names ----------------------------------------------------------------------------------------

def test_repo_ids_start_with_a_letter_or_digit_and_hold_no_dot_dot() -> None:
    """H02 (no '..' check), H03 (any first character)."""
    assert hub.looks_like_repo_id("org/name") and hub.looks_like_repo_id("0rg/na.me-v1_2")
    for bad in ("org/a..b", "o..rg/name", "-org/name", ".org/name", "_org/name"):
        assert not hub.looks_like_repo_id(bad), bad


@pytest.mark.parametrize("host", ["huggingface.co", "www.huggingface.co", "hf.co", "www.hf.co"])
def test_hub_file_addresses_on_every_host_name(host: str) -> None:
    """H08 (www. dropped), H09 (hf.co dropped)."""
    url = f"https://{host}/org/repo/blob/v1.0/vae/ae.safetensors"
    assert hub.parse_hub_file(url, (".safetensors",)) == ("org/repo", "vae/ae.safetensors", "v1.0")
    assert hub.parse_hub_file(f"https://{host}/org/repo/resolve/main/ae.ckpt?download=true",
                              (".ckpt",)) == ("org/repo", "ae.ckpt", "main")
    assert hub.parse_hub_file(f"https://{host}.evil/org/repo/blob/main/ae.safetensors", (".safetensors",)) is None


# ---- weights.hub: the environment -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["1", " TRUE ", "Yes", "on\n"])
def test_offline_is_read_from_either_variable_in_any_case(online: None, monkeypatch: pytest.MonkeyPatch,
                                                          value: str) -> None:
    """H12 (no strip/lower), H13 (TRANSFORMERS_OFFLINE ignored)."""
    assert not hub._offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub._offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", value)
    assert hub._offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not hub._offline()


def test_offline_falls_back_to_huggingface_hubs_own_setting(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """H14: huggingface_hub's HF_HUB_OFFLINE (frozen at its import) counts when the environment says nothing."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub._offline()


@pytest.mark.parametrize("proxy", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])
def test_behind_a_proxy_no_name_lookup_is_made(online: None, monkeypatch: pytest.MonkeyPatch, proxy: str) -> None:
    """H15: with a proxy, a host name that does not resolve here is no sign of no network."""
    import socket

    calls = []

    def fail(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(hub.socket, "getaddrinfo", fail)
    monkeypatch.setenv(proxy, "http://proxy:3128")
    assert hub._no_network() is False
    assert calls == []
    hub._no_network.cache_clear()
    monkeypatch.delenv(proxy)
    assert hub._no_network() is True


def test_the_cache_folder_follows_huggingface_hubs_variables(online: None, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """H17 (HF_HOME itself, not HF_HOME/hub), H18 (HF_HUB_CACHE ignored): first HF_HUB_CACHE, then
    HUGGINGFACE_HUB_CACHE, then HF_HOME/hub, else huggingface_hub's default."""
    assert hub._cache_dir() is None
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub._cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old"))
    assert hub._cache_dir() == str(tmp_path / "old")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub._cache_dir() == str(tmp_path / "new")


# ---- weights.hub: what hf_hub_download is asked, and its errors in one line -------------------------------------

class FakeDownload:
    """hf_hub_download's stand-in: records each call's arguments; `answers` maps a file name to a path to return
    or an exception to raise."""

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers, self.calls = answers, []

    def __call__(self, repo_id: str, filename: str, **kwargs: object) -> str:
        self.calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        answer = self.answers[filename]
        if isinstance(answer, Exception):
            raise answer
        return str(answer)


def _fake(monkeypatch: pytest.MonkeyPatch, answers: dict[str, object]) -> FakeDownload:
    fake = FakeDownload(answers)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def test_download_arguments(online: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """H19 (local_files_only ignores a failed name lookup), H20 (revision not passed on): each file is asked for with
    the subfolder, the revision, the cache folder and local_files_only as the environment says."""
    fake = _fake(monkeypatch, {"config.json": tmp_path / "c.json", "diffusion_pytorch_model.safetensors":
                               tmp_path / "w.safetensors", "ae.safetensors": tmp_path / "ae.safetensors"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.fetch_diffusers_files("org/repo", "vae", "v2") == (tmp_path / "c.json", tmp_path / "w.safetensors")
    assert hub.fetch_hub_file("org/repo", "ae.safetensors", "abc") == tmp_path / "ae.safetensors"
    expected = {"repo_id": "org/repo", "subfolder": "vae", "revision": "v2", "cache_dir": str(tmp_path / "cache"),
                "local_files_only": False, "library_name": "klvae"}
    assert fake.calls[0] == {**expected, "filename": "config.json"}
    assert fake.calls[1] == {**expected, "filename": "diffusion_pytorch_model.safetensors"}
    assert fake.calls[2] == {**expected, "filename": "ae.safetensors", "subfolder": None, "revision": "abc"}
    # A host name that does not resolve: the cache alone, at once.
    import socket

    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(hub.socket, "getaddrinfo", fail)
    hub._no_network.cache_clear()
    hub.fetch_hub_file("org/repo", "ae.safetensors")
    assert fake.calls[-1]["local_files_only"] is True and fake.calls[-1]["revision"] is None


@pytest.mark.parametrize(("error", "message"), [
    (_http_error(GatedRepoError), "org/repo is gated: accept its licence on huggingface.co and log in (hf auth login)"),
    (_http_error(RepositoryNotFoundError), "hub repository org/repo not found (or private: log in with hf auth login)"),
    (_http_error(RemoteEntryNotFoundError), "hub repository org/repo has no ae.safetensors at revision v2"),
    (LocalEntryNotFoundError("not cached"), "cannot reach the hub and org/repo/ae.safetensors at revision v2 is not in "
                                            "the local cache"),
    (_http_error(RevisionNotFoundError), "hub repository org/repo has no revision v2"),
    (ValueError("bad\nsecond line"), "cannot fetch org/repo/ae.safetensors at revision v2 from the hub: bad"),
    (OSError(), "cannot fetch org/repo/ae.safetensors at revision v2 from the hub: OSError"),
])
def test_each_hub_error_in_one_line(online: None, monkeypatch: pytest.MonkeyPatch, error: Exception,
                                    message: str) -> None:
    """H21-H25, H27, H34: the line for each of huggingface_hub's errors (a gated repo is also a missing one to it)."""
    _fake(monkeypatch, {"ae.safetensors": error})
    with pytest.raises(WeightsError) as e:
        hub.fetch_hub_file("org/repo", "ae.safetensors", "v2")
    assert one_line(e) == message


def test_a_missing_revision_defaults_to_main_in_its_message() -> None:
    """H26: without a revision, the one that was missing is main."""
    assert hub._describe(_http_error(RevisionNotFoundError), "org/repo", "config.json") == \
        "hub repository org/repo has no revision main"


def test_the_bin_fallback_is_only_for_a_missing_file(online: None, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """H28 (any error falls back to .bin), H30 (.bin tried first), H29/H32 (subfolder left out of the message):
    a .safetensors that is absent gives the .bin; one that fails otherwise is the error."""
    answers = {"config.json": tmp_path / "c.json", "diffusion_pytorch_model.safetensors":
               _http_error(RemoteEntryNotFoundError), "diffusion_pytorch_model.bin": tmp_path / "w.bin"}
    fake = _fake(monkeypatch, answers)
    assert hub.fetch_diffusers_files("org/repo", "vae") == (tmp_path / "c.json", tmp_path / "w.bin")
    assert [c["filename"] for c in fake.calls] == ["config.json", "diffusion_pytorch_model.safetensors",
                                                   "diffusion_pytorch_model.bin"]
    answers["diffusion_pytorch_model.safetensors"] = OSError("disk full")
    with pytest.raises(WeightsError) as e:
        hub.fetch_diffusers_files("org/repo", "vae")
    assert one_line(e) == "cannot fetch org/repo/vae/diffusion_pytorch_model.safetensors from the hub: disk full"
    answers["config.json"] = _http_error(RemoteEntryNotFoundError)
    with pytest.raises(WeightsError) as e:
        hub.fetch_diffusers_files("org/repo", "vae", "v1")
    assert one_line(e) == "hub repository org/repo has no vae/config.json at revision v1"
