"""Pins of the fixed pretrained networks (klvae.nets) that a mutation audit found unguarded: frozen nets that stay in
eval mode under a training parent, strict loading's one-line message (its order, cut and quoting), user-named files
(~, a folder, a pickled object, no state dict), where the torch hub cache is, hash prefixes in file names, a full
hash pin, the download's hidden temporary file and its log line, which cached name wins, the offline
message; LPIPS's non-negative random heads, named files that win over `pretrained`, input checks, one VGG pass
for a metric and two for a loss, its fp32 unit normalisation, finding an installed lpips; and the Inception's
8-bit quantisation (clamped, rounded, any float dtype)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn

from klvae.errors import KlvaeError, WeightsError
from klvae.nets import inception as inception_mod
from klvae.nets import lpips as lpips_mod
from klvae.nets import pretrained as pretrained_mod
from klvae.nets.inception import InceptionV3Features
from klvae.nets.lpips import LPIPS, TAP_CHANNELS, VGG16Features, _unit_normalise
from klvae.nets.pretrained import check_sha256, hash_prefix, hub_checkpoint, load_strict, read_weights

_real_installed_lpips_lin = lpips_mod.installed_lpips_lin


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, object]]:
    """A hub cache of our own, no installed lpips package, and a torch.hub file download that serves file:// URLs
    only (the network is refused); the calls it gets are returned, for the tests that look at them."""
    calls: list[dict[str, object]] = []

    def serve(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append({"url": url, "dst": Path(dst), "args": args, "kwargs": kwargs})
        if not url.startswith("file:"):
            raise urllib.error.URLError("network disabled in tests")
        shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path), dst)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", serve)
    monkeypatch.setattr(lpips_mod, "installed_lpips_lin", lambda: None)
    return calls


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lin_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(TAP_CHANNELS)}


def vgg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in VGG16Features().state_dict().items()}


def images(shape: tuple[int, ...] = (2, 3, 32, 32), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    return x, (x + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)


# ---- FrozenNet -------------------------------------------------------------------------------------------------


def test_a_frozen_net_has_no_trainable_weights_and_stays_in_eval_mode_under_a_training_parent() -> None:
    lp = LPIPS(pretrained=False)
    assert not any(p.requires_grad for p in lp.parameters())
    assert not any(m.training for m in lp.modules())
    parent = nn.ModuleDict({"perceptual": lp, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent.training and parent["head"].training
    assert not any(m.training for m in lp.modules())  # the heads' dropout stays off
    lp.train(True)
    assert not any(m.training for m in lp.modules())
    x, y = images()
    with torch.no_grad():
        assert torch.equal(lp(x, y), lp(x, y))  # no dropout: the same numbers every time


# ---- strict loading --------------------------------------------------------------------------------------------


def toy() -> nn.Module:
    """Twelve keys: 0.weight, 0.bias .. 5.weight, 5.bias, each [2, 2] or [2]."""
    return nn.Sequential(*(nn.Linear(2, 2) for _ in range(6)))


def strict_error(sd: dict[object, object]) -> str:
    with pytest.raises(WeightsError) as err:
        load_strict(toy(), sd, "Toy weights")  # type: ignore[arg-type]
    return str(err.value)


def test_strict_loading_names_the_first_four_keys_of_each_kind_in_sorted_order() -> None:
    # An empty file: 12 keys missing, the first four shown (sorted, not in hash order), then " ...".
    assert strict_error({}) == "Toy weights do not fit: missing: 0.bias, 0.weight, 1.bias, 1.weight ..."
    full = toy().state_dict()
    # Exactly four missing: all four, no " ...".
    four = {k: v for k, v in full.items() if not k.startswith(("4.", "5."))}
    assert strict_error(four) == "Toy weights do not fit: missing: 4.bias, 4.weight, 5.bias, 5.weight"
    five = {k: v for k, v in full.items() if k not in ("0.bias", "1.bias", "2.bias", "3.bias", "4.bias")}
    assert strict_error(five) == "Toy weights do not fit: missing: 0.bias, 1.bias, 2.bias, 3.bias ..."


def test_strict_loading_joins_the_kinds_and_shows_a_value_that_is_no_tensor_as_shapeless() -> None:
    sd: dict[object, object] = dict(toy().state_dict())
    del sd["5.bias"]
    sd["0.weight"] = torch.zeros(3)
    sd["0.bias"] = 7  # a number where a tensor belongs
    sd["extra"] = torch.zeros(1)
    assert strict_error(sd) == ("Toy weights do not fit: missing: 5.bias; unexpected: extra; "
                                "wrong shape: 0.bias () != (2,), 0.weight (3,) != (2, 2)")


def test_strict_loading_shows_printable_keys_up_to_80_characters_bare_and_others_quoted() -> None:
    full = dict(toy().state_dict())
    bare = "k" * 80
    assert strict_error({**full, bare: torch.zeros(1)}) == f"Toy weights do not fit: unexpected: {bare}"
    long = "k" * 81
    assert strict_error({**full, long: torch.zeros(1)}) == "Toy weights do not fit: unexpected: '" + "k" * 56 + "..."
    assert strict_error({**full, "a\tb": torch.zeros(1)}) == "Toy weights do not fit: unexpected: 'a\\tb'"
    assert strict_error({**full, 3: torch.zeros(1)}) == "Toy weights do not fit: unexpected: 3"


# ---- user-named files ------------------------------------------------------------------------------------------


def test_a_named_file_may_start_with_a_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    torch.save(lin_state(), home / "heads.pth")
    monkeypatch.setenv("HOME", str(home))
    assert sorted(read_weights("~/heads.pth", "LPIPS linear")) == sorted(lin_state())
    m = LPIPS(pretrained=False, lin_path="~/heads.pth")
    assert torch.equal(m.lin.lin1.model[1].weight, lin_state()["lin1.model.1.weight"])


def test_a_named_folder_is_no_weights_file(tmp_path: Path) -> None:
    (tmp_path / "weights.pth").mkdir()
    with pytest.raises(WeightsError) as err:
        read_weights(tmp_path / "weights.pth", "VGG16")
    assert str(err.value) == f"VGG16 file not found: {tmp_path / 'weights.pth'}"


class _RunsCode:
    """A pickled object whose loading would run code (touch a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return Path.touch, (self.marker,)


def test_a_named_file_is_read_without_unpickling_objects(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "heads.pth"
    torch.save({**lin_state(), "extra": _RunsCode(marker)}, path)
    with pytest.raises(WeightsError) as err:
        read_weights(path, "LPIPS linear")
    assert str(err.value).startswith(f"LPIPS linear file {path} is not a PyTorch weights file (UnpicklingError: "), \
        str(err.value)
    # One plain line: torch's weights_only refusal runs to a dozen lines with terminal bold codes.
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value), str(err.value)
    assert not marker.exists()


def test_a_named_file_that_holds_no_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError) as err:
        LPIPS(pretrained=False, vgg_path=path)
    assert str(err.value) == f"VGG16 file {path} holds a Tensor, not a state dict"


def test_named_files_name_their_kind_when_absent(tmp_path: Path) -> None:
    absent = tmp_path / "absent.pth"
    with pytest.raises(WeightsError) as err:
        LPIPS(pretrained=False, vgg_path=absent)
    assert str(err.value) == f"VGG16 file not found: {absent}"
    with pytest.raises(WeightsError) as err:
        InceptionV3Features(weights=absent)
    assert str(err.value) == f"Inception file not found: {absent}"


# ---- the torch hub cache and the hashes ------------------------------------------------------------------------


def test_the_hub_cache_is_torch_homes_or_where_set_dir_moved_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    assert hub_checkpoint("x.pth") == tmp_path / "torch_home" / "hub" / "checkpoints" / "x.pth"
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # set_dir's setting is undone after the test
    torch.hub.set_dir(str(tmp_path / "elsewhere"))
    assert hub_checkpoint("x.pth") == tmp_path / "elsewhere" / "checkpoints" / "x.pth"


@pytest.mark.parametrize(("name", "prefix"), [
    ("vgg16-397923af.pth", "397923af"),
    ("weights-inception-2015-12-05-6726825d.pth", "6726825d"),
    ("net-b1.v2-deadbeef.pth", "deadbeef"),  # the digits after the last "-", not the first hex run
    ("model-0a1b.tar.gz", "0a1b"),
])
def test_the_hash_prefix_is_the_hex_after_the_last_dash(name: str, prefix: str) -> None:
    assert hash_prefix(name) == prefix


@pytest.mark.parametrize("name", ["vgg16.pth", "vgg16-.pth", "vgg16-XYZ.pth", "lpips-v0.1-vgg.pth"])
def test_a_name_without_a_hash_prefix_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} carries no SHA-256 prefix$"):
        hash_prefix(name)


def test_a_full_hash_pin_refuses_a_file_that_differs_after_the_first_digits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.pth"
    path.write_bytes(b"x")
    pin = inception_mod.INCEPTION_SHA256
    monkeypatch.setattr(pretrained_mod, "file_sha256", lambda p: pin[:40] + "0" * 24)
    with pytest.raises(WeightsError) as err:
        check_sha256(path, pin, "the file", "fix it")
    assert str(err.value) == ("the file is damaged or not the pinned file: its SHA-256 begins 6726825d0af5f729, "
                              "expected 6726825d0af5f729; fix it")
    monkeypatch.setattr(pretrained_mod, "file_sha256", lambda p: pin)
    check_sha256(path, pin, "the file", "fix it")
    check_sha256(path, pin[:8], "the file", "fix it")  # a name's prefix: the start is enough


def test_an_unreadable_file_is_one_line_even_when_the_os_says_more(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(path: Path) -> str:
        raise OSError("I/O error\nsector 12 unreadable")

    monkeypatch.setattr(pretrained_mod, "file_sha256", unreadable)
    with pytest.raises(WeightsError) as err:
        check_sha256(tmp_path / "f.pth", "00", "the file", "fix it")
    assert str(err.value) == "the file cannot be read: OSError: I/O error"


# ---- downloads and the cache -----------------------------------------------------------------------------------


def serve(tmp_path: Path, sd: dict[str, torch.Tensor]) -> tuple[str, str]:
    """A file:// URL serving `sd`, and its SHA-256."""
    src = tmp_path / "served" / "file.pth"
    src.parent.mkdir(exist_ok=True)
    torch.save(sd, src)
    return src.as_uri(), sha(src)


def test_a_download_goes_to_a_hidden_unique_file_beside_its_target_quietly(
    tmp_path: Path, offline: list[dict[str, object]], caplog: pytest.LogCaptureFixture
) -> None:
    url, digest = serve(tmp_path, lin_state())
    target = hub_checkpoint("lin.pth")
    with caplog.at_level(logging.INFO, logger="klvae"):
        sd = pretrained_mod.fetch(url, ("lin.pth",), "LPIPS v0.1 linear", "name a file", sha256=digest)
    assert sorted(sd) == sorted(lin_state())
    assert f"downloading the LPIPS v0.1 linear weights from {url}" in caplog.messages
    pretrained_mod.download(url, "lin.pth", digest)  # again, over the first
    temps = [call["dst"] for call in offline]
    assert len(temps) == 2 and temps[0] != temps[1]  # two downloads at once cannot share one
    for tmp in temps:
        assert isinstance(tmp, Path) and tmp.parent == target.parent  # renamed in place, on the cache's disk
        assert tmp.name.startswith(".lin.pth.") and tmp.name.endswith(".tmp")  # hidden from a listing
    assert all(call["kwargs"] == {"progress": False} for call in offline)
    assert sorted(p.name for p in target.parent.iterdir()) == ["lin.pth"]


def test_the_first_cached_name_wins_and_a_download_lands_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = hub_checkpoint(inception_mod.INCEPTION_FILE), hub_checkpoint(inception_mod.PYTORCH_FID_FILE)
    ours.parent.mkdir(parents=True)
    torch.save({"which": torch.tensor(1)}, ours)
    torch.save({"which": torch.tensor(2)}, theirs)
    monkeypatch.setattr(inception_mod, "INCEPTION_SHA256", sha(ours))  # only torch-fidelity's name is the pinned file
    assert int(inception_mod.resolve_inception_weights()["which"]) == 1
    # Under pytorch-fid's name alone it is found too; a folder under the first name is passed over.
    ours.rename(theirs)
    ours.mkdir()
    assert int(inception_mod.resolve_inception_weights()["which"]) == 1
    # Nothing cached: downloaded, under torch-fidelity's name.
    ours.rmdir()
    theirs.unlink()
    url, digest = serve(tmp_path, {"which": torch.tensor(3)})
    monkeypatch.setattr(inception_mod, "INCEPTION_URL", url)
    monkeypatch.setattr(inception_mod, "INCEPTION_SHA256", digest)
    assert int(inception_mod.resolve_inception_weights()["which"]) == 3
    assert sorted(p.name for p in ours.parent.iterdir()) == [inception_mod.INCEPTION_FILE]


def test_offline_the_message_says_why_what_to_pass_and_where_to_save_the_file() -> None:
    with pytest.raises(KlvaeError) as err:
        inception_mod.resolve_inception_weights(hint="pass --inception-weights <file>")
    assert str(err.value) == (
        "FID Inception weights unavailable (URLError: <urlopen error network disabled in tests>); "
        f"pass --inception-weights <file> or save {inception_mod.INCEPTION_URL} as "
        f"{hub_checkpoint(inception_mod.INCEPTION_FILE)}")


def test_a_wrong_download_says_so_without_an_exception_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, digest = serve(tmp_path, lin_state())
    monkeypatch.setattr(lpips_mod, "LIN_URL", url)
    with pytest.raises(KlvaeError) as err:
        lpips_mod.resolve_lin_weights(hint="pass --lpips-lin <file>")
    assert type(err.value) is KlvaeError
    assert str(err.value) == (
        f"LPIPS v0.1 linear weights unavailable (the download from {url} is damaged or not the pinned file: "
        f"its SHA-256 begins {digest[:16]}, expected {lpips_mod.LIN_SHA256[:16]}; nothing was kept); "
        f"pass --lpips-lin <file> or save {url} as {hub_checkpoint(lpips_mod.LIN_FILE)}")


# ---- LPIPS -----------------------------------------------------------------------------------------------------


def test_random_heads_are_non_negative_so_the_value_is_a_distance() -> None:
    torch.manual_seed(0)
    lp = LPIPS(pretrained=False)
    assert all(float(head.model[1].weight.min()) >= 0 for head in lp.lin.heads())
    x, y = images((4, 3, 32, 32), seed=1)
    with torch.no_grad():
        assert float(lp(x, y).min()) > 0


def test_named_files_win_over_pretrained(tmp_path: Path) -> None:
    # Offline with nothing cached, pretrained=True would fail: the named files are all it reads.
    torch.save(vgg_state(), tmp_path / "vgg.pth")
    torch.save(lin_state(), tmp_path / "lin.pth")
    m = LPIPS(pretrained=True, vgg_path=tmp_path / "vgg.pth", lin_path=tmp_path / "lin.pth")
    assert torch.equal(m.net.features[0].weight, vgg_state()["features.0.weight"])
    assert torch.equal(m.lin.lin0.model[1].weight, lin_state()["lin0.model.1.weight"])


def test_lpips_keeps_its_input_scaling_out_of_its_state_dict() -> None:
    keys = set(LPIPS(pretrained=False).state_dict())
    assert keys == {f"net.{k}" for k in VGG16Features().state_dict()} | {f"lin.{k}" for k in lin_state()}


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 4, 32, 32), (3, 32, 32)])
def test_lpips_wants_rgb_batches(shape: tuple[int, ...]) -> None:
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"^LPIPS needs two \[B, 3, H, W\] batches of one shape"):
        LPIPS(pretrained=False)(x, x)


def vgg_batches(lp: LPIPS) -> list[int]:
    seen: list[int] = []
    lp.net.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


def test_a_metric_runs_the_vgg_once_and_a_loss_once_per_side() -> None:
    lp = LPIPS(pretrained=False)
    seen = vgg_batches(lp)
    x, y = images((2, 3, 32, 32))
    with torch.no_grad():
        metric = lp(x, y)
    assert seen == [4]
    y_grad = y.clone().requires_grad_(True)
    loss = lp(x, y_grad)
    assert seen == [4, 2, 2]  # gradients to one side: that side's pass apart
    torch.testing.assert_close(loss.detach(), metric, rtol=0, atol=1e-6)
    seen.clear()
    with torch.no_grad():
        lp(x, y_grad)  # no gradients wanted: a metric after all
        lp(x.clone().requires_grad_(True), y_grad)
    lp(x.clone().requires_grad_(True), y_grad)  # both sides: one pass
    lp(x, y)
    assert seen == [4, 4, 4, 4]


def test_unit_normalisation_is_fp32_and_keeps_an_all_zero_column_at_zero() -> None:
    f = torch.zeros(1, 8, 2, 2, dtype=torch.float16)
    f[..., 0, 0] = 3.0
    out = _unit_normalise(f)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert float(out[..., 1:, :].abs().max()) == 0.0 and float(out[..., 0, 1].abs().max()) == 0.0
    torch.testing.assert_close(out[0, :, 0, 0].norm(), torch.tensor(1.0))


def test_unit_normalisation_uses_lpips_epsilon_of_1e_10() -> None:
    # Features whose norm is 1e-6 (a dim corner of a ReLU map) are still unit vectors: eps is 1e-10, as in lpips.
    f = torch.full((1, 4, 1, 1), 5e-7, dtype=torch.float64)
    out = _unit_normalise(f)
    assert float(out.norm()) == pytest.approx(1e-6 / (1e-6 + 1e-10), rel=1e-5)


# ---- finding the lpips package's heads -------------------------------------------------------------------------


@pytest.fixture
def real_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lpips_mod, "installed_lpips_lin", _real_installed_lpips_lin)
    monkeypatch.delitem(sys.modules, "lpips", raising=False)


@pytest.mark.usefixtures("real_lookup")
def test_no_lpips_package_means_no_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lpips", None)  # as `import lpips` would find nothing
    assert lpips_mod.installed_lpips_lin() is None
    monkeypatch.setitem(sys.modules, "lpips", types.ModuleType("lpips"))  # a module without a spec
    assert lpips_mod.installed_lpips_lin() is None


@pytest.mark.usefixtures("real_lookup")
def test_an_lpips_module_or_package_without_the_heads_file_means_no_heads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = tmp_path / "single"
    single.mkdir()
    (single / "lpips.py").write_text("raise ImportError('lpips must not be imported')\n")
    monkeypatch.syspath_prepend(str(single))
    assert lpips_mod.installed_lpips_lin() is None
    pkg = tmp_path / "pkg" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('lpips must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    assert lpips_mod.installed_lpips_lin() is None
    (pkg / "weights" / "v0.1" / "vgg.pth").write_bytes(b"heads")
    assert lpips_mod.installed_lpips_lin() == pkg / "weights" / "v0.1" / "vgg.pth"
    assert "lpips" not in sys.modules


# ---- the FID Inception -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the converted TF layout whose features follow the input (He-normal convolutions)."""
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5 if k.endswith("conv.weight") else v)
          for k, v in InceptionV3Features(pretrained=False).state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def inception(inception_file: Path) -> InceptionV3Features:
    return InceptionV3Features(pretrained=False, weights=inception_file)


@pytest.fixture
def small_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception_mod, "INPUT_SIZE", 75)  # the smallest the network takes: fast


def test_named_inception_weights_are_read_even_with_pretrained_false(inception: InceptionV3Features,
                                                                      inception_file: Path) -> None:
    want = torch.load(inception_file, weights_only=True)["Mixed_7c.branch_pool.conv.weight"]
    assert torch.equal(inception.Mixed_7c.branch_pool.conv.weight, want)


def test_inception_weights_that_do_not_fit_say_so(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError) as err:
        InceptionV3Features(weights=path)
    assert str(err.value).startswith("Inception weights do not fit: missing: Conv2d_1a_3x3.bn.bias, "), str(err.value)


@pytest.mark.usefixtures("small_input")
def test_inception_sees_8_bit_pixels_clamped_and_rounded(inception: InceptionV3Features) -> None:
    pixels = torch.randint(0, 256, (2, 3, 40, 48), generator=torch.Generator().manual_seed(1))
    x = pixels.double() / 127.5 - 1
    with torch.no_grad():
        want = inception(x.float())
        assert float(want.std(0).mean()) > 0  # the features follow the image
        # Within half a level of each 8-bit value: the same pixels, the same features.
        jitter = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) - 0.5) * 0.9 / 127.5
        assert torch.equal(inception((x + jitter).clamp(-1, 1).float()), want)
        # Beyond [-1, 1]: black and white.
        beyond = x.clone()
        beyond[pixels == 0] = -3.0
        beyond[pixels == 255] = 2.0
        assert (pixels == 0).any() and (pixels == 255).any()
        assert torch.equal(inception(beyond.float()), want)
        # Any float dtype: the same 8-bit values, fp32 features.
        for dtype in (torch.float16, torch.float64):  # bfloat16 cannot hold 255 levels near 1
            got = inception(x.to(dtype))
            assert got.dtype == torch.float32 and torch.equal(got, want), dtype
