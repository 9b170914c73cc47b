"""The metric networks' weight files: what klvae finds by itself (torch hub cache, download, the installed lpips
package) must be the pinned file, checked by SHA-256; what the user names need not be, but must fit."""

import hashlib
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from klvae.errors import KlvaeError, WeightsError
from klvae.evaluation.evaluate import load_named_weights
from klvae.nets import inception as inception_mod
from klvae.nets import lpips as lpips_mod
from klvae.nets import pretrained as pretrained_mod
from klvae.nets.lpips import LPIPS, TAP_CHANNELS

_real_installed_lpips_lin = lpips_mod.installed_lpips_lin
_real_download = pretrained_mod.download
# The heads the installed lpips package ships (7 KB): the real file, in the real layout.
REAL_LIN = _real_installed_lpips_lin()


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A hub cache of our own under tmp_path, no installed lpips package and no download (unless a test serves
    one from a file:// URL)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(lpips_mod, "installed_lpips_lin", lambda: None)
    monkeypatch.setattr(pretrained_mod, "download", refuse)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lin_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Heads in the lpips v0.1 layout, but not the published ones."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(TAP_CHANNELS)}


def in_cache(name: str) -> Path:
    p = pretrained_mod.hub_checkpoint(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def cache_listing() -> list[str]:
    folder = pretrained_mod.hub_checkpoint("x").parent
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_the_pins_are_the_files_the_code_names() -> None:
    assert REAL_LIN is not None and REAL_LIN.stat().st_size == 7289
    assert sha(REAL_LIN) == lpips_mod.LIN_SHA256
    assert lpips_mod.LIN_URL.endswith("/lpips/weights/v0.1/vgg.pth")  # the same file of the lpips repository
    # ... at a commit, whose file is the wheel's (as git hashes a blob), not at a branch that may move.
    commit = lpips_mod.LIN_URL.split("/raw/")[1].split("/")[0]
    assert len(commit) == 40 and int(commit, 16) >= 0
    data = REAL_LIN.read_bytes()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == "47e943cfacabf7040b4af8cf4084ab91177f1b88"
    for name in (inception_mod.INCEPTION_FILE, inception_mod.PYTORCH_FID_FILE):
        assert inception_mod.INCEPTION_SHA256.startswith(pretrained_mod.hash_prefix(name))
    assert pretrained_mod.hash_prefix(lpips_mod.VGG16_FILE) == "397923af"


@pytest.mark.parametrize("damage", ["cut", "other heads"])
def test_a_cached_lin_heads_file_must_be_the_pinned_one(damage: str, tmp_path: Path) -> None:
    cached = in_cache(lpips_mod.LIN_FILE)
    if damage == "cut":  # a download cut short: torch.load would call it a bad zip
        cached.write_bytes(REAL_LIN.read_bytes()[:4000])
    else:  # loads, fits, and would give other LPIPS numbers without a word
        torch.save(lin_state(), cached)
    found = sha(cached)
    with pytest.raises(WeightsError) as err:
        lpips_mod.resolve_lin_weights()
    msg = str(err.value)
    assert "\n" not in msg and str(cached) in msg, msg
    assert f"SHA-256 begins {found[:16]}, expected a78928a0af1e5f0f;" in msg, msg
    assert "delete it to download it again, or set loss.lpips_lin_path" in msg, msg
    assert sha(cached) == found  # refused, and left for the user to look at
    # The published file under that name loads.
    shutil.copyfile(REAL_LIN, cached)
    sd, real = lpips_mod.resolve_lin_weights(), torch.load(REAL_LIN, map_location="cpu", weights_only=True)
    assert torch.equal(sd["lin3.model.1.weight"], real["lin3.model.1.weight"])


def test_the_installed_lpips_packages_heads_are_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('lpips must not be imported')\n")
    torch.save(lin_state(), pkg / "weights" / "v0.1" / "vgg.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(lpips_mod, "installed_lpips_lin", _real_installed_lpips_lin)
    with pytest.raises(WeightsError) as err:
        lpips_mod.resolve_lin_weights(hint="pass --lpips-lin <file>")
    msg = str(err.value)
    assert "\n" not in msg and str(pkg / "weights" / "v0.1" / "vgg.pth") in msg and "installed lpips" in msg, msg
    assert "expected a78928a0af1e5f0f; reinstall lpips, or pass --lpips-lin <file>" in msg, msg
    shutil.copyfile(REAL_LIN, pkg / "weights" / "v0.1" / "vgg.pth")
    assert sorted(lpips_mod.resolve_lin_weights()) == [f"lin{i}.model.1.weight" for i in range(5)]


def test_a_wrong_lin_heads_download_leaves_nothing_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pretrained_mod, "download", _real_download)
    served = tmp_path / "served.pth"
    served.write_bytes(REAL_LIN.read_bytes()[:5000])  # the connection dropped part-way
    monkeypatch.setattr(lpips_mod, "LIN_URL", served.as_uri())  # urllib serves file:// as it would https://
    with pytest.raises(KlvaeError) as err:
        lpips_mod.resolve_lin_weights()
    msg = str(err.value)
    assert "\n" not in msg and f"SHA-256 begins {sha(served)[:16]}, expected a78928a0af1e5f0f" in msg, msg
    assert "nothing was kept" in msg and str(pretrained_mod.hub_checkpoint(lpips_mod.LIN_FILE)) in msg, msg
    assert cache_listing() == []  # no file under its name, no temporary one beside it
    shutil.copyfile(REAL_LIN, served)  # the whole file this time
    assert sorted(lpips_mod.resolve_lin_weights()) == [f"lin{i}.model.1.weight" for i in range(5)]
    assert cache_listing() == [lpips_mod.LIN_FILE] and sha(in_cache(lpips_mod.LIN_FILE)) == lpips_mod.LIN_SHA256


def test_a_cached_vgg16_file_must_carry_the_hash_its_name_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    cached = in_cache(lpips_mod.VGG16_FILE)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, cached)  # e.g. another VGG16 saved under the name
    with pytest.raises(WeightsError) as err:
        lpips_mod.resolve_vgg_weights()
    msg = str(err.value)
    assert "\n" not in msg and str(cached) in msg and f"begins {sha(cached)[:8]}, expected 397923af;" in msg, msg
    assert "set loss.lpips_vgg_path" in msg, msg
    # Under a name whose label is its own hash prefix the same file is torchvision's promise kept: it loads.
    monkeypatch.setattr(lpips_mod, "VGG16_FILE", f"vgg16-{sha(cached)[:8]}.pth")
    cached.rename(in_cache(lpips_mod.VGG16_FILE))
    assert list(lpips_mod.resolve_vgg_weights()) == ["features.0.weight"]


@pytest.mark.parametrize("name", [inception_mod.INCEPTION_FILE, inception_mod.PYTORCH_FID_FILE])
def test_a_cached_inception_file_must_have_the_full_pinned_hash(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = in_cache(name)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, cached)
    with pytest.raises(WeightsError) as err:
        inception_mod.resolve_inception_weights()
    msg = str(err.value)
    assert "\n" not in msg and str(cached) in msg and "expected 6726825d0af5f729;" in msg, msg
    assert "delete it to download it again, or pass InceptionV3Features(weights=<file>)" in msg, msg
    monkeypatch.setattr(inception_mod, "INCEPTION_SHA256", sha(cached))
    assert list(inception_mod.resolve_inception_weights()) == ["Conv2d_1a_3x3.conv.weight"]


def test_a_cached_file_that_cannot_be_read_is_one_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    cached = in_cache(lpips_mod.LIN_FILE)
    shutil.copyfile(REAL_LIN, cached)

    def unreadable(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pretrained_mod, "file_sha256", unreadable)  # root reads any file, so chmod cannot show it
    with pytest.raises(WeightsError) as err:
        lpips_mod.resolve_lin_weights()
    assert str(err.value).startswith(f"LPIPS v0.1 linear file {cached} cannot be read: PermissionError: ")
    assert "\n" not in str(err.value)


BAD_KEYS = {
    "numbered keys": {0: torch.zeros(1), 1: torch.zeros(1)},
    "a key with a newline": {"lin0.model.1.weight\nlin9": torch.zeros(1, 64, 1, 1)},
    "a megabyte key": {"k" * 1_000_000: torch.zeros(1)},
}


@pytest.mark.parametrize("keys", list(BAD_KEYS))
def test_user_named_files_need_not_be_the_pinned_ones_but_must_fit_in_one_line(keys: str, tmp_path: Path) -> None:
    own = tmp_path / "own.pth"
    torch.save(lin_state(seed=1), own)  # the user's own heads: another hash, the right layout
    m = LPIPS(pretrained=False, lin_path=own)
    assert torch.equal(m.lin.lin4.model[1].weight, lin_state(seed=1)["lin4.model.1.weight"])
    bad = tmp_path / "bad.pth"
    torch.save(BAD_KEYS[keys], bad)
    with pytest.raises(WeightsError) as err:
        LPIPS(pretrained=False, lin_path=bad)
    msg = str(err.value)
    assert msg.startswith(f"LPIPS linear weights in {bad} do not fit: missing: lin0.model.1.weight"), msg
    assert "unexpected: " in msg
    assert "\n" not in msg and len(msg) < 400, msg
    with pytest.raises(KlvaeError) as err:  # klvae eval --lpips-lin: the file and the flag named
        load_named_weights(m.load_lin, bad, "lpips_lin")
    assert str(err.value).startswith(f"lpips_lin={str(bad)!r}: LPIPS linear weights do not fit")
    assert "\n" not in str(err.value) and len(str(err.value)) < 500


@pytest.mark.parametrize(("arg", "what"), [("vgg_path", "VGG16 weights in"), ("lin_path", "LPIPS linear weights in")])
def test_lpips_names_the_file_that_does_not_fit(arg: str, what: str, tmp_path: Path) -> None:
    """Before: "VGG16 weights do not fit: ..." from a training config with several paths, none named."""
    path = tmp_path / "mine.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=rf"^{what} {path} do not fit: missing: .*; unexpected: a$"):
        LPIPS(pretrained=False, **{arg: path})


@pytest.mark.parametrize(("content", "failure", "reason"), [
    (b"", None, "is empty"),
    (b"not a checkpoint", None, "is not a PyTorch weights file (UnpicklingError: "),
    (b"PK", PermissionError(13, "Permission denied"), "cannot be read: PermissionError: "),
])
def test_a_weights_file_that_yields_no_state_dict_says_why_the_same_way_everywhere(
    content: bytes, failure: OSError | None, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty file used to be "cannot be read: EOFError" for LPIPS, and a disk's refusal "is not a PyTorch weights
    # file" for `klvae eval`: one reader (nets.pretrained.torch_state_dict) now words both for every caller.
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    if failure is not None:
        def refuse(*args: object, **kwargs: object) -> None:
            raise failure

        monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(WeightsError) as lpips_err:
        LPIPS(pretrained=False, lin_path=path)
    assert str(lpips_err.value).startswith(f"LPIPS linear file {path} {reason}"), str(lpips_err.value)
    with pytest.raises(KlvaeError) as eval_err:
        load_named_weights(lambda sd: None, path, "lpips_lin")
    assert str(eval_err.value).startswith(f"lpips_lin={str(path)!r} {reason}"), str(eval_err.value)
