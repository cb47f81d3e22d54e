"""The GapModel contract for every adapter family, checked as identities (timm-style).

For every family: ``logits(features(x)) == module(x)``, the CAM equals ``sum_k w[c, k] f_k``
(computed here independently in float64 numpy), ``mean_hw(CAM_c) + b_c == logit_c`` (or
``mean_hw(CAM_c) == logit_c`` for SqueezeNet's conv-relu head) and ``all_class_maps`` agrees
with ``class_maps``. Then the refusals, and the rules on hooks and model state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyGapNet, forward_hooks, randomize_, tiny_gap_model, training_flags
from torch import nn

import gapcam
from gapcam import cam
from gapcam.errors import ClassSelectionError, ModelError, UnsupportedModelError
from gapcam.models import GapModel, build_model, inference_state, specs
from gapcam.models.registry import ModelSpec, register
from gapcam.types import Preprocess

# family id -> (model name for build_model, or None for a custom module; input side)
FAMILIES: dict[str, tuple[str | None, int]] = {
    "efficientnet_lite0": ("efficientnet_lite0", 96),
    "efficientnet_lite1": ("efficientnet_lite1", 96),
    "efficientnet_lite2": ("efficientnet_lite2", 96),
    "resnet18": ("resnet18", 96),
    "resnext50_32x4d": ("resnext50_32x4d", 64),
    "densenet121": ("densenet121", 64),
    "mobilenet_v2": ("mobilenet_v2", 96),
    "efficientnet_b0": ("efficientnet_b0", 96),
    "regnet_y_400mf": ("regnet_y_400mf", 96),
    "mnasnet0_5": ("mnasnet0_5", 96),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", 96),
    "squeezenet1_1": ("squeezenet1_1", 96),
    "timm:resnet18": ("timm:resnet18", 96),
    "custom-hooked": (None, 32),
    "custom-callable": (None, 32),
}


# the embedded models, with their real ImageNet weights (shared: not modified)
EMBEDDED_FIXTURES = {
    "efficientnet_lite0": "embedded_model",
    "efficientnet_lite1": "lite1",
    "efficientnet_lite2": "lite2",
}


@pytest.fixture(scope="module")
def lite1() -> GapModel:
    return build_model("efficientnet_lite1")


@pytest.fixture(scope="module")
def lite2() -> GapModel:
    return build_model("efficientnet_lite2")


def _family_model(family: str, request: pytest.FixtureRequest) -> GapModel:
    name, _ = FAMILIES[family]
    if family in EMBEDDED_FIXTURES:
        return request.getfixturevalue(EMBEDDED_FIXTURES[family])
    if name is None:
        return tiny_gap_model(callable_features=family == "custom-callable")
    model = build_model(name, "random")
    _randomize_classifier(model)
    return model


def _randomize_classifier(model: GapModel) -> None:
    """Seeded classifier weights and a clearly non-zero bias, so the bias term is exercised."""
    generator = torch.Generator().manual_seed(7)
    weight, bias = model.classifier.weight, model.classifier.bias
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) / weight[0].numel() ** 0.5)
        bias.copy_(torch.randn(bias.shape, generator=generator))


def _close(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-5) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cam_identities(family: str, request: pytest.FixtureRequest) -> None:
    model = _family_model(family, request)
    side = FAMILIES[family][1]
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    k = model.num_classes
    classes = torch.tensor([[0, k - 1, 3], [k // 2, 1, 0]])
    flags = training_flags(model.module)

    with inference_state(model.module):
        features = model.features(x)
        logits = model.logits(features)
        own = model.module(x)
        maps = cam.class_maps(features, model.weight, classes, model.bias, model.head)
        every = cam.all_class_maps(features, model.weight, model.bias, model.head)
        all_indices = torch.arange(k).expand(2, k)
        by_class = cam.class_maps(features, model.weight, all_indices, model.bias, model.head)

    assert features.dim() == 4
    assert features.shape[:2] == (2, model.num_features)
    assert logits.shape == own.shape == (2, k)
    _close(logits.numpy(), own.numpy())

    f64 = features.double().numpy()
    w64 = model.weight.detach().double().numpy()
    b64 = model.bias.detach().double().numpy()
    for n in range(2):
        for j, c in enumerate(classes[n].tolist()):
            expected = np.tensordot(w64[c], f64[n], axes=1)  # sum_k w[c, k] f_k
            if model.head == "conv-relu":
                expected = np.maximum(expected + b64[c], 0.0)
                pooled = expected.mean()
            else:
                pooled = expected.mean() + b64[c]
            _close(maps[n, j].double().numpy(), expected)
            _close(np.float64(logits[n, c]), pooled)
            _close(np.float64(own[n, c]), pooled)

    assert every.shape == (2, k, *features.shape[2:])
    _close(every.numpy(), by_class.numpy())
    assert forward_hooks(model.module) == {}
    assert training_flags(model.module) == flags


def test_squeezenet_is_a_conv_relu_head() -> None:
    model = build_model("squeezenet1_1", "random")
    assert model.head == "conv-relu"
    assert isinstance(model.classifier, nn.Conv2d)
    assert model.weight.shape == (1000, 512)


def test_embedded_model_is_the_default(embedded_model: GapModel) -> None:
    assert gapcam.models.DEFAULT_MODEL == "efficientnet_lite0"
    assert embedded_model.source == "embedded"
    assert embedded_model.num_classes == len(embedded_model.class_names) == 1000
    assert embedded_model.class_names[281] == "tabby"
    assert embedded_model.preprocess.size == (224, 224)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("vgg16", "dense layers"),
        ("alexnet", "dense layers"),
        ("mobilenet_v3_large", "Hardswish"),
        ("convnext_tiny", "LayerNorm"),
        ("torchvision:vgg16", "dense layers"),
    ],
)
def test_torchvision_refusals_say_why(name: str, reason: str) -> None:
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        build_model(name, "random")
    assert name.removeprefix("torchvision:") in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["timm:mobilenetv3_large_100", "timm:convnext_atto"])
def test_timm_refusals(name: str) -> None:
    with pytest.raises(UnsupportedModelError, match="not") as info:
        build_model(name, "random")
    assert name in str(info.value)


def test_unknown_model_lists_suggestions() -> None:
    with pytest.raises(ModelError, match="resnet18") as info:
        build_model("resnet19", "random")
    assert not isinstance(info.value, UnsupportedModelError)
    assert "resnet19" in str(info.value)
    assert "gapcam models" in str(info.value)


def test_unknown_timm_model() -> None:
    with pytest.raises(ModelError, match="timm:no_such_net_xyz"):
        build_model("timm:no_such_net_xyz", "random")


# -- timm's pretrained weights: the Hugging Face hub's own settings decide what is offline -----


@pytest.fixture
def no_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty Hugging Face cache, no offline or proxy settings, and a fresh hub client (it
    reads the proxy settings when it is made)."""
    from huggingface_hub import close_session, constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    close_session()
    yield tmp_path
    close_session()


@pytest.mark.parametrize("setting", ["HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=true"])
def test_timm_weights_offline_by_the_hubs_setting_fail_at_once(
    no_hub_cache: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    from gapcam.models import timm_models

    name, value = setting.split("=")
    monkeypatch.setenv(name, value)

    def no_request(hub_id: str) -> str:
        raise AssertionError(f"asked the hub for {hub_id} although {setting}")

    monkeypatch.setattr(timm_models, "_first_request", no_request)
    with pytest.raises(ModelError) as offline:
        build_model("timm:resnet18")
    assert str(offline.value) == (
        f"timm:resnet18: its pretrained weights are not cached and {setting} keeps the Hugging "
        "Face hub offline; download them once without it, or pass weights=FILE, or use "
        "efficientnet_lite0"
    )


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, None),
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"),
        ({"HF_HUB_OFFLINE": "ON", "TRANSFORMERS_OFFLINE": "0"}, "HF_HUB_OFFLINE=ON"),
        ({"TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE=yes"),
        ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, None),  # the first one set counts
        ({"HTTPS_PROXY": "http://proxy.example:3128"}, None),
    ],
)
def test_offline_setting_reads_the_environment_as_huggingface_hub_does(
    no_hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    expected: str | None,
) -> None:
    from gapcam.models import timm_models

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert timm_models.offline_setting() == expected


def test_timm_weights_are_fetched_through_the_proxy_of_the_environment(
    no_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No direct connection decides that the hub is offline: the request goes to the proxy
    (which here refuses it), and its answer is the one-line error."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    server = socket.create_server(("127.0.0.1", 0))
    requests: list[str] = []

    def proxy() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed at the end of the test
                return
            with connection:
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                requests.append(received.decode("latin-1").split("\r\n")[0])
                connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=proxy, daemon=True).start()
    address = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, address)
    try:
        with pytest.raises(ModelError) as unreachable:
            build_model("timm:resnet18")
    finally:
        server.close()
    host = urlsplit(constants.ENDPOINT).hostname
    assert requests
    assert all(r.startswith(f"CONNECT {host}:443 ") for r in requests), requests
    message = str(unreachable.value)
    assert message.startswith(
        "timm:resnet18: its pretrained weights are not cached and the Hugging Face hub cannot "
        "be reached ("
    )
    assert message.endswith("); connect once, or pass weights=FILE, or use efficientnet_lite0")
    assert "\n" not in message


class DenseHeadNet(nn.Module):
    """features -> GAP -> Linear -> ReLU -> Linear: not a CAM architecture."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.hidden(self.pool(self.body(x)).flatten(1))))


@pytest.mark.parametrize("callable_features", [False, True])
def test_from_module_refuses_a_dense_head(callable_features: bool) -> None:
    net = randomize_(DenseHeadNet())
    features = net.body if callable_features else "body"
    with pytest.raises(UnsupportedModelError, match=r"not W \. GAP"):
        gapcam.from_module(
            net, features=features, classifier="fc", preprocess=Preprocess(size=(16, 16))
        )
    assert forward_hooks(net) == {}


def test_from_module_refuses_features_of_the_wrong_width() -> None:
    net = randomize_(DenseHeadNet())
    net.hidden = nn.Linear(8, 6)
    net.fc = nn.Linear(6, 4)
    with pytest.raises(UnsupportedModelError, match="features have shape"):
        gapcam.from_module(net, features="body", classifier="fc", preprocess=Preprocess((16, 16)))


def test_from_module_refuses_a_classifier_that_is_not_linear() -> None:
    with pytest.raises(UnsupportedModelError, match=r"nn\.Linear"):
        gapcam.from_module(TinyGapNet(), features="body", classifier="pool")
    net = TinyGapNet()
    net.fc = nn.Conv2d(8, 5, 3)  # type: ignore[assignment]
    with pytest.raises(UnsupportedModelError, match="not 1x1"):
        gapcam.from_module(net, features="body", classifier="fc")


def test_from_module_names_missing_submodules() -> None:
    with pytest.raises(ModelError, match=r"features='bodyy'.*body, pool, fc"):
        gapcam.from_module(TinyGapNet(), features="bodyy", classifier="fc")
    with pytest.raises(ModelError, match="classifier='head'"):
        gapcam.from_module(TinyGapNet(), features="body", classifier="head")


def test_from_module_class_names_must_match_outputs() -> None:
    with pytest.raises(ModelError, match="3 class names"):
        gapcam.from_module(TinyGapNet(), features="body", classifier="fc", class_names="abc")


def test_registry_names_are_unique_and_duplicates_raise() -> None:
    names = [spec.name for spec in specs()]
    assert len(names) == len(set(names))
    assert {"efficientnet_lite0", "resnet18", "squeezenet1_1"} <= set(names)
    assert names[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert not any(n.startswith(("vgg", "alexnet", "convnext", "mobilenet_v3")) for n in names)
    existing = specs()[0]
    with pytest.raises(ValueError, match="already registered"):
        register(ModelSpec(existing.name, "test", existing.build, existing.offline))


# -- classes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "index"),
    [(281, 281), ("281", 281), (" 281 ", 281), ("tabby", 281), ("Tabby Cat", 281)],
)
def test_class_index_by_index_name_and_synonym(
    embedded_model: GapModel, query: int | str, index: int
) -> None:
    assert embedded_model.class_index(query) == index


def test_class_index_accepts_numpy_integers(embedded_model: GapModel) -> None:
    assert embedded_model.class_index(np.int64(285)) == 285


@pytest.mark.parametrize(
    ("query", "message"),
    [(1000, "out of range"), (-1, "out of range"), ("tabbby", "did you mean: tabby"), (2.5, "2.5")],
)
def test_class_index_errors(embedded_model: GapModel, query: object, message: str) -> None:
    with pytest.raises(ClassSelectionError, match=message):
        embedded_model.class_index(query)  # type: ignore[arg-type]


# -- hooks, state, live weights --------------------------------------------------------------------


def _mixed_flags(module: nn.Module) -> dict[str, bool]:
    module.train()
    module.body[1].eval()  # BatchNorm in eval, the rest training
    module.fc.eval()
    return training_flags(module)


@pytest.mark.parametrize("callable_features", [False, True])
def test_hooks_removed_and_flags_restored_after_a_run(callable_features: bool) -> None:
    model = tiny_gap_model(callable_features=callable_features)
    flags = _mixed_flags(model.module)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    first = gapcam.Localizer(model)(image)
    second = gapcam.Localizer(model)(image)
    assert forward_hooks(model.module) == {}
    assert training_flags(model.module) == flags
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BN statistics updated
    np.testing.assert_array_equal(first.maps[0].low_res, second.maps[0].low_res)  # eval: no dropout


# (callable features?, where the forward raises)
RAISES = {
    "hooked-after-features": (False, "explode"),
    "hooked-inside-features": (False, "tripwire"),
    "callable-inside-features": (True, "tripwire"),
}


def _arm(net: TinyGapNet, where: str) -> None:
    if where == "explode":
        net.explode = True
    else:
        net.body[5].armed = True


@pytest.mark.parametrize("case", list(RAISES))
def test_hooks_removed_and_flags_restored_when_forward_raises(case: str) -> None:
    callable_features, where = RAISES[case]
    model = tiny_gap_model(callable_features=callable_features)
    flags = _mixed_flags(model.module)
    _arm(model.module, where)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="exploded on purpose"):
        gapcam.Localizer(model)(image)
    assert forward_hooks(model.module) == {}
    assert training_flags(model.module) == flags
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("case", list(RAISES))
def test_from_module_validation_cleans_up_when_forward_raises(case: str) -> None:
    callable_features, where = RAISES[case]
    net = randomize_(TinyGapNet())
    flags = _mixed_flags(net)
    _arm(net, where)
    with pytest.raises(RuntimeError, match="exploded on purpose"):
        gapcam.from_module(
            net,
            features=net.body if callable_features else "body",
            classifier="fc",
            preprocess=Preprocess(size=(16, 16)),
        )
    assert forward_hooks(net) == {}
    assert training_flags(net) == flags


def test_inference_state_restores_flags_on_error() -> None:
    net = TinyGapNet()
    flags = _mixed_flags(net)
    seen = []

    def body() -> None:
        with inference_state(net):
            seen.append((any(m.training for m in net.modules()), torch.is_grad_enabled()))
            raise KeyError("inside")

    with pytest.raises(KeyError):
        body()
    assert seen == [(False, False)]  # inside: eval mode, no autograd
    assert training_flags(net) == flags
    assert torch.is_grad_enabled()


def test_classifier_weights_are_read_live() -> None:
    model = tiny_gap_model()
    localizer = gapcam.Localizer(model)
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    before = localizer(image, classes=[2])
    with torch.no_grad():
        model.module.fc.weight[2].mul_(-3.0)
        model.module.fc.bias[2].add_(5.0)
    after = localizer(image, classes=[2])
    np.testing.assert_allclose(after.maps[0].low_res, -3.0 * before.maps[0].low_res, atol=1e-5)
    bias = float(model.module.fc.bias[2].detach())
    assert after.maps[0].prediction.logit == pytest.approx(
        float(after.maps[0].low_res.mean()) + bias, abs=1e-5
    )


def test_weights_files_without_version_metadata_load_into_mnasnet(tmp_path: Path) -> None:
    """A plain dict (safetensors) has no state-dict version; torchvision's MNASNet refuses to
    load without one, so gapcam lends it the module's own."""
    from safetensors.torch import save_file

    source = gapcam.build_model("mnasnet0_5", "random")
    path = tmp_path / "mnasnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.module.state_dict().items()}, str(path))
    loaded = gapcam.build_model("mnasnet0_5", str(path))
    for name, tensor in source.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], tensor)


def test_a_fine_tuned_mnasnet_run_loads(tmp_path: Path) -> None:
    import dataclasses

    from gapcam.models.checkpoint import checkpoint_files, replace_classifier, trained_tensors
    from gapcam.train.finetune import stage_names

    model = replace_classifier(gapcam.build_model("mnasnet0_5", "random"), ["a", "b"])
    metadata = {
        "backbone": "mnasnet0_5",
        "backbone_weights": "random",
        "class_names": ["a", "b"],
        "preprocess": dataclasses.asdict(model.preprocess),
    }
    run = tmp_path / "run"
    run.mkdir()
    tensors = trained_tensors(model, stage_names(model))
    for name, data in checkpoint_files(tensors, metadata).items():
        (run / name).write_bytes(data)
    loaded = gapcam.load_checkpoint(run)
    for name in stage_names(model):
        assert torch.equal(loaded.module.state_dict()[name], model.module.state_dict()[name])
