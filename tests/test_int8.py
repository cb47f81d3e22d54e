"""precision="int8": the ONNX feature extractor statically quantized with calibration images
(``gapcam.quantize``), refused with a reason wherever it cannot run or would not pay."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gapcam
from gapcam import backends, quantize
from gapcam.cli import main
from gapcam.errors import GapcamError, ModelError
from gapcam.models import GapModel, build_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

needs_int8 = pytest.mark.skipif(
    quantize.int8_support() is not None or not backends.onnx_available(),
    reason=f"this machine cannot run int8: {quantize.int8_support() or 'no onnxruntime'}",
)


def photos(folder: Path, count: int) -> list[Path]:
    """``count`` seeded crops of the two example photos (some mirrored), as a user's own
    photos would calibrate: static quantization needs representative images."""
    generator = np.random.default_rng(0)
    sources = [Image.open(EXAMPLES / name).convert("RGB") for name in ("cat.png", "coffee.jpg")]
    paths = []
    for i in range(count):
        image = sources[i % 2]
        width, height = image.size
        scale = generator.uniform(0.6, 1.0)
        w, h = int(width * scale), int(height * scale)
        x, y = int(generator.integers(0, width - w + 1)), int(generator.integers(0, height - h + 1))
        crop = image.crop((x, y, x + w, y + h)).resize((160, 120))
        if i % 3 == 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        paths.append(folder / f"p{i:02d}.jpg")
        crop.save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module")
def lite0() -> GapModel:
    return build_model("efficientnet_lite0")


@needs_int8
def test_int8_features_follow_float32_and_the_head_stays_float(
    lite0: GapModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path / "cache"))
    calibration = [EXAMPLES / "cat.png", EXAMPLES / "coffee.jpg", *photos(tmp_path, 14)]
    int8 = gapcam.Localizer(lite0, backend="onnx", precision="int8", calibration=calibration)
    plain = gapcam.Localizer(lite0, backend="onnx")
    assert int8.backend_used == ("onnx", "")
    assert int8.settings().extras["precision"] == "int8"
    for source in (EXAMPLES / "cat.png", EXAMPLES / "coffee.jpg"):
        a, b = plain(source), int8(source)
        assert a.predictions[0].index == b.predictions[0].index
        assert np.abs(a.cam() - b.cam()).max() < 0.35
        # the logits are W . GAP(features) + b in float32 from the live classifier
        ours = int8._runner.features(torch.zeros(1, 3, 224, 224))
        assert ours.dtype == torch.float32
    files = sorted((tmp_path / "cache" / "onnx").glob("*-int8-*.onnx"))
    assert len(files) == 1
    # cached: a second localizer with the same calibration quantizes nothing
    monkeypatch.setattr(quantize, "quantize", lambda *a: pytest.fail("quantized again"))
    again = gapcam.Localizer(lite0, backend="auto", precision="int8", calibration=calibration)
    assert again(EXAMPLES / "cat.png").predictions[0].index == plain(EXAMPLES / "cat.png").top.index


@needs_int8
def test_the_cache_key_holds_the_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path / "cache"))
    model = build_model("resnet18", "random")
    shots = photos(tmp_path, 4)
    for calibration in (shots[:2], shots[2:], shots[:2]):
        gapcam.Localizer(
            model, backend="onnx", precision="int8", calibration=calibration, input_size=64
        )
    assert len(list((tmp_path / "cache" / "onnx").glob("*-int8-*.onnx"))) == 2


def test_tensorflow_padding_is_exported_as_constants(lite0: GapModel) -> None:
    """timm's Conv2dSame computes its padding from the input shape at run time; the export
    gets the constants of its input size instead (ONNX Runtime's quantizer mangles the shape
    arithmetic), the same values as the module."""
    copy = backends.static_padding(lite0, (224, 224))
    assert copy is not lite0.module
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with gapcam.models.inference_state(lite0.module), gapcam.models.inference_state(copy):
        assert torch.equal(lite0.feature_fn(copy, x), lite0.features(x))
    onnx = pytest.importorskip("onnx")
    graph = onnx.load_from_string(backends.export_features(lite0, (224, 224))).graph
    assert not [n for n in graph.node if n.op_type in ("Shape", "Ceil")]
    resnet = build_model("resnet18", "random")
    assert backends.static_padding(resnet, (224, 224)) is resnet.module  # nothing to do


@pytest.mark.parametrize("size", [(224, 224), (256, 192)])
def test_uneven_tensorflow_padding_is_part_of_the_convolutions(
    lite0: GapModel, size: tuple[int, int]
) -> None:
    """A stride-2 "same" convolution of an even side pads one more pixel at the end. The
    export puts that padding in the ONNX Conv's own ``pads`` (uneven), with no Pad node: ONNX
    Runtime would copy the activation for a Pad, outside its blocked layout, and in float32
    inside an int8 graph (docs/speed.md). The graph computes what the module computes."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    data = backends.export_features(lite0, size)
    graph = onnx.load_from_string(data).graph
    assert not [n for n in graph.node if n.op_type == "Pad"]
    pads = [
        list(a.ints)
        for n in graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "pads"
    ]
    uneven = [p for p in pads if p[:2] != p[2:]]
    assert len(uneven) == 5  # Lite0's stride-2 convolutions
    assert all(p[2] == p[0] + 1 and p[3] == p[1] + 1 for p in uneven)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    with gapcam.models.inference_state(lite0.module):
        expected = lite0.features(x)
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_an_uneven_convolution_exports_with_and_without_bias(bias: bool) -> None:
    """``backends._UnevenConv`` on a TF-"same" convolution of its own (timm's Conv2dSame),
    with a bias and without one: one ONNX Conv with uneven pads, the layer's values."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    layer = Conv2dSame(3, 4, 5, stride=2, bias=bias).eval()
    padded = backends._constant_padding(layer, (16, 12))

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer  # its weights are the graph's initializers, as in an export

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return padded(x)

    x = torch.randn(2, 3, 16, 12)
    buffer = io.BytesIO()
    with torch.no_grad():
        expected = layer(x)
        assert torch.equal(padded(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation
            torch.onnx.export(Wrapper(), (x,), buffer, dynamo=False, opset_version=backends.OPSET)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert [n.op_type for n in graph.node if n.op_type != "Constant"] == ["Conv"]
    (conv,) = [n for n in graph.node if n.op_type == "Conv"]
    assert len(conv.input) == (3 if bias else 2)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-5)


def test_int8_is_refused_where_it_cannot_run_or_pay(
    lite0: GapModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = [EXAMPLES / "cat.png"]
    with pytest.raises(GapcamError, match="int8' runs on the ONNX backend"):
        gapcam.Localizer(lite0, backend="eager", precision="int8", calibration=cat)
    with pytest.raises(GapcamError, match="calibration= is for precision='int8' only"):
        gapcam.Localizer(lite0, calibration=cat)
    with pytest.raises(GapcamError, match="takes a list of images"):
        gapcam.Localizer(lite0, backend="onnx", precision="int8", calibration="cat.png")
    with pytest.raises(GapcamError, match="calibration=: 0 images"):
        gapcam.Localizer(lite0, backend="onnx", precision="int8", calibration=[])
    with pytest.raises(ModelError, match=r"needs calibration images \(calibration="):
        gapcam.Localizer(lite0, backend="onnx", precision="int8")
    reason = "this x86_64 CPU has no 8-bit integer dot-product instructions (x86 VNNI or AMX)"
    monkeypatch.setattr(quantize, "int8_support", lambda: reason)
    with pytest.raises(ModelError, match=r"precision='int8': this x86_64 CPU has no 8-bit"):
        gapcam.Localizer(lite0, backend="auto", precision="int8", calibration=cat)


def test_cpu_flags_decide_int8_support(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(quantize.platform, "system", lambda: "Linux")
    real_path = quantize.Path
    monkeypatch.setattr(quantize, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert "no 8-bit integer dot-product" in (quantize.int8_support() or "")
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert quantize.int8_support() is None
    info.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert quantize.int8_support() is None


@needs_int8
def test_localize_calibrates_on_its_own_first_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    photos(folder, 12)
    out = tmp_path / "out.json"
    code = main(
        ["localize", str(folder), "--precision", "int8", "--json", str(out), "--no-overlay", "-q"]
    )
    assert code == 0
    document = json.loads(out.read_text())
    assert document["settings"]["precision"] == "int8"
    assert len(document["results"]) == 12


def test_int8_on_ray_needs_named_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "localize",
            str(EXAMPLES),
            "--engine",
            "ray",
            "--precision",
            "int8",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "--calibration IMAGES" in capsys.readouterr().err


def localize_cat_int8(tmp_path: Path, calibration: str) -> int:
    """``gapcam localize cat.png --precision int8 --calibration CALIBRATION``, its exit code."""
    args = [str(EXAMPLES / "cat.png"), "--precision", "int8", "--calibration", calibration]
    return main(["localize", *args, "--out", str(tmp_path / "o")])


def test_a_calibration_path_that_matches_nothing_stops_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = localize_cat_int8(tmp_path, str(tmp_path / "nothing-*.jpg"))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("gapcam: error: --calibration: ")
    assert err.count("\n") == 1


def test_a_bad_calibration_image_is_named_on_one_escaped_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cal"
    folder.mkdir()
    (folder / "bad\nname\x1b[31m.jpg").write_bytes(b"not a jpeg")
    code = localize_cat_int8(tmp_path, str(folder))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gapcam: error: --calibration image ")
    assert err.count("\n") == 1
    assert "\x1b" not in err
    assert "bad\\nname\\x1b[31m.jpg: not an image file" in err
    assert not (tmp_path / "o").exists()


@needs_int8
def test_an_unreadable_file_among_the_first_inputs_fails_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8 calibrates on the run's first images that can be read: a corrupt file first (and
    a missing one named on the command line) is reported, and the others are localized."""
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "in"
    folder.mkdir()
    photos(folder, 4)
    (folder / "a-corrupt.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out.json"
    argv = ["localize", str(folder), str(tmp_path / "gone.png"), "--precision", "int8"]
    code = main([*argv, "--json", str(out), "--no-overlay", "-q"])
    assert code == 1
    document = json.loads(out.read_text())
    assert len(document["results"]) == 4
    assert sorted(Path(e["input"]).name for e in document["errors"]) == [
        "a-corrupt.jpg",
        "gone.png",
    ]
    assert "--calibration" not in capsys.readouterr().err


def test_a_run_with_no_readable_image_says_how_to_calibrate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    code = main(["localize", str(tmp_path / "a.jpg"), "--precision", "int8", "-q"])
    assert code == 2
    assert "none of them can be read as an image; give --calibration IMAGES" in (
        capsys.readouterr().err
    )


def test_calibration_takes_the_first_readable_images_and_stops_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gapcam import images
    from gapcam.cli import options

    good = [str(p) for p in photos(tmp_path, 5)]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    bad, missing = str(tmp_path / "bad.png"), str(tmp_path / "missing.jpg")
    opened: list[str] = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p, **k: opened.append(p) or real(p, **k))
    chosen = options.first_readable([bad, good[0], missing, *good[1:]], 3, 10**8)
    assert chosen == good[:3]
    assert opened == [bad, good[0], missing, good[1], good[2]]  # nothing after the third
    assert options.first_readable([bad, missing], 3, 10**8) == []
    # a photo over max_pixels is passed over like any file that cannot be read
    assert options.first_readable(good[:2], 3, 160 * 120 - 1) == []


@needs_int8
def test_the_localizer_keeps_no_calibration_image(
    lite0: GapModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calibration images are decoded one at a time when the inputs of a size are made,
    and let go: a Localizer does not hold 32 full-size photos for its life."""
    import gc
    import weakref

    from gapcam import images

    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path / "cache"))
    decoded: list[weakref.ref[Image.Image]] = []
    most_alive = 0
    real = images.load_image

    def load(source: object, **options: object) -> images.LoadedImage:
        nonlocal most_alive
        item = real(source, **options)  # type: ignore[arg-type]
        gc.collect()
        most_alive = max(most_alive, sum(ref() is not None for ref in decoded) + 1)
        decoded.append(weakref.ref(item.image))
        return item

    monkeypatch.setattr(images, "load_image", load)
    localizer = gapcam.Localizer(
        lite0, backend="onnx", precision="int8", calibration=photos(tmp_path, 6)
    )
    gc.collect()
    assert len(decoded) == 6  # the one size, made while the Localizer was built
    assert most_alive == 1  # one at a time
    assert all(ref() is None for ref in decoded)  # and none kept
    assert localizer.backend_used[0] == "onnx"
