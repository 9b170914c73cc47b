"""The metric networks against the packages they reimplement: LPIPS against `lpips`, the FID Inception and the
Fréchet distance against `torch-fidelity`; same weights, same inputs, outputs compared bit for bit.

klvae writes these networks out so that they run without torchvision (see `klvae.nets`); these tests are
where the reimplementation meets the reference that published figures come from.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from klvae.evaluation.fid import feature_statistics, frechet_distance
from klvae.nets.inception import InceptionV3Features
from klvae.nets.lpips import LPIPS

PEERS = "lpips==0.1.4 torch-fidelity==0.4.0"  # the versions compared; .ci/run installs these


# torchvision's VGG16 `features` (configuration "D"): 3x3 convs with ReLU, 2x2 max pools, indexed as torchvision
# indexes them. Written out here rather than taken from klvae, so that the comparison does not check klvae
# against itself.
_VGG16_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16(**_: object) -> SimpleNamespace:
    layers: list[torch.nn.Module] = []
    c_in = 3
    for v in _VGG16_D:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [torch.nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
            c_in = int(v)
    return SimpleNamespace(features=torch.nn.Sequential(*layers))


class _Absent(ModuleType):
    """A torchvision module whose every other attribute is a stand-in class (the peers subclass some of them)
    that fails when called."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        where = f"{self.__name__}.{name}"

        def absent(*_: object, **__: object) -> None:
            raise AssertionError(f"the peer tests do not use torchvision's {where}")

        return type(name, (), {"__init__": absent})


@contextlib.contextmanager
def _stand_in_torchvision() -> Iterator[None]:
    # lpips and torch-fidelity import torchvision, whose PyPI wheel is a CUDA build: with the CPU torch that
    # klvae's tests install its C++ ops do not load and its import fails (and an installed broken torchvision
    # breaks diffusers' import too). What these tests run of theirs needs only VGG16's layer list, so a
    # stand-in serves while they import. It and the peers' modules are dropped from sys.modules again, so
    # other tests see neither the stand-in nor the peers (test_losses looks for an `lpips` it may import).
    before = set(sys.modules)
    names = ["torchvision", "torchvision.models", "torchvision.datasets", "torchvision.transforms",
             "torchvision.transforms.functional"]
    for n in names:
        sys.modules[n] = _Absent(n)
    sys.modules["torchvision.models"].vgg16 = _vgg16
    for n in names[1:]:
        parent, _, child = n.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[n])
    try:
        yield
    finally:
        for n in set(sys.modules) - before:
            # Only theirs: a C extension imported meanwhile (numpy.fft, say) cannot be imported a second time.
            if n.split(".")[0] in ("torchvision", "lpips", "torch_fidelity"):
                del sys.modules[n]


def _import_peer(name: str) -> ModuleType:
    """Import a module of lpips or torch-fidelity (installed as the README's set-up says), hermetically."""
    with _stand_in_torchvision():
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise AssertionError(f"{e}: install the peers with `pip install --no-deps {PEERS}` (README)") from e


@pytest.fixture(scope="module")
def lpips_ref() -> torch.nn.Module:
    """lpips' own LPIPS-VGG: its default random VGG16 init, and the v0.1 heads the package ships."""
    lpips = _import_peer("lpips")
    return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()


def _vgg_state_dict(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    # lpips splits torchvision's `features` into slice1..slice5, each child keeping its index in `features`.
    sd: dict[str, torch.Tensor] = {}
    for s in range(1, 6):
        for name, module in getattr(ref.net, f"slice{s}").named_children():
            if isinstance(module, torch.nn.Conv2d):
                sd[f"features.{name}.weight"] = module.weight.detach().clone()
                sd[f"features.{name}.bias"] = module.bias.detach().clone()
    return sd


@pytest.mark.parametrize("shape", [(3, 3, 64, 64), (2, 3, 45, 71)])
def test_lpips_equals_the_lpips_package(lpips_ref: torch.nn.Module, shape: tuple[int, ...]) -> None:
    ours = LPIPS(pretrained=False)
    ours.load_vgg(_vgg_state_dict(lpips_ref))
    ours.load_lin({f"lin{i}.model.1.weight": getattr(lpips_ref, f"lin{i}").model[1].weight for i in range(5)})
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        got, want = ours(x, y), lpips_ref(x, y)
    assert got.shape == want.shape == (shape[0], 1, 1, 1)
    assert float(want.min()) > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)



def test_lpips_as_a_loss_equals_the_lpips_package_with_its_gradient(lpips_ref: torch.nn.Module) -> None:
    # The training path (gradients to the reconstructions only) runs its own VGG passes: value and gradient.
    ours = LPIPS(pretrained=False)
    ours.load_vgg(_vgg_state_dict(lpips_ref))
    ours.load_lin({f"lin{i}.model.1.weight": getattr(lpips_ref, f"lin{i}").model[1].weight for i in range(5)})
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 48, 40, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    got_y, want_y = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    got, want = ours(x, got_y), lpips_ref(x, want_y)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_y.grad, want_y.grad)


def _calibrated_inception(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights whose BatchNorm statistics come from data, so that every layer passes the input on (with
    arbitrary running statistics the features barely depend on it), plus the 1008-way fc of the checkpoint."""
    net = InceptionV3Features(pretrained=False)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        torch.nn.init.normal_(m.bias, std=0.1)
        m.reset_running_stats()
        m.momentum = None  # the plain average over the calibration batch
        m.training = True
    with torch.no_grad():
        net(torch.rand(6, 3, 299, 299, generator=g) * 2 - 1)
    sd = net.state_dict()
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1008)
    return sd


@pytest.fixture(scope="module")
def inception_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module]:
    """klvae's Inception and torch-fidelity's, both loading one checkpoint file in the converted TF layout."""
    peer = _import_peer("torch_fidelity.feature_extractor_inceptionv3")
    path: Path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    torch.save(_calibrated_inception(torch.Generator().manual_seed(1)), path)
    theirs = peer.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    return InceptionV3Features(weights=path), theirs.eval()


@pytest.mark.parametrize("size", [(299, 299), (256, 256), (120, 200)])
def test_inception_features_equal_torch_fidelitys(
    inception_pair: tuple[torch.nn.Module, torch.nn.Module], size: tuple[int, int]
) -> None:
    ours, theirs = inception_pair
    pixels = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours(pixels.float() / 127.5 - 1)  # klvae takes [-1, 1] and quantises back to these 8-bit values
        want = theirs(pixels)[0]
    assert got.shape == want.shape == (3, 2048)
    assert float(want.std(0).mean()) > 1e-3  # the features follow the image
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_frechet_distance_equals_torch_fidelitys() -> None:
    fid = _import_peer("torch_fidelity.metric_fid")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 64, generator=g, dtype=torch.float64)
    b = torch.randn(300, 64, generator=g, dtype=torch.float64) * 1.3 + 0.2
    want = fid.fid_statistics_to_metric(fid.fid_features_to_statistics(a), fid.fid_features_to_statistics(b), False)
    got = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert got == pytest.approx(want["frechet_inception_distance"], rel=1e-9)
    assert got > 1.0
