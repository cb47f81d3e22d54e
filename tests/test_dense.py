"""Dense maps from the same weights (``gapcam.models.dense``): where the plain features lie in
the dense grid, where the dense cells are drawn, and the CAM identities on dilated networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import Conv2dSame
from torch import nn

import gapcam
from gapcam import cam
from gapcam.cli import main
from gapcam.errors import GapcamError, UnsupportedModelError
from gapcam.models import GapModel, build_model, inference_state
from gapcam.models.base import Subgrid
from gapcam.models.dense import dilate
from gapcam.types import Preprocess

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Strided(nn.Module):
    """Five stride-2 stages of ``kernel`` x ``kernel`` convolutions (a 3x3 stride-1 one after
    each), TensorFlow "same" padding (timm's Conv2dSame) or symmetric (torchvision's)."""

    def __init__(self, kernel: int, tf_same: bool, gate: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for _ in range(5):
            down = (
                Conv2dSame(channels, 8, kernel, stride=2)
                if tf_same
                else nn.Conv2d(channels, 8, kernel, stride=2, padding=kernel // 2)
            )
            layers += [down, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
            channels = 8
        self.body = nn.Sequential(*layers)
        self.gate = gate
        self.fc = nn.Linear(8, 4)
        generator = torch.Generator().manual_seed(0)
        for parameter in self.parameters():
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        if self.gate:  # squeeze-excitation: every cell scaled by a gate of the whole map
            f = f * torch.sigmoid(f.mean(dim=(2, 3), keepdim=True))
        return self.fc(f.mean(dim=(2, 3)))


def strided_model(kernel: int = 3, tf_same: bool = False, gate: bool = False) -> GapModel:
    net = Strided(kernel, tf_same, gate)
    if gate:
        return gapcam.from_module(
            net,
            features=lambda x: (lambda f: f * torch.sigmoid(f.mean((2, 3), keepdim=True)))(
                net.body(x)
            ),
            classifier="fc",
            preprocess=Preprocess(size=(64, 64)),
        )
    return gapcam.from_module(
        net, features="body", classifier="fc", preprocess=Preprocess(size=(64, 64))
    )


# -- where the plain cells are: derived, then checked ----------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "tf_same", "output_stride", "phase"),
    [
        # symmetric padding centres a stride-2 output i on input cell 2i: phase 0 at every level
        (3, False, 16, 0),
        (5, False, 16, 0),
        (3, False, 8, 0),
        # TF "same" pads (k-1)/2 - 1/2 cells before an even input: output i on cell 2i + 1, so
        # the plain cell i is the dense cell 2i + 1, and 4i + 2 + 1 two stages down
        (3, True, 16, 1),
        (5, True, 16, 1),
        (3, True, 8, 3),
    ],
)
def test_the_plain_features_are_the_derived_sub_grid(
    kernel: int, tf_same: bool, output_stride: int, phase: int
) -> None:
    plain = strided_model(kernel, tf_same)
    dense = dilate(plain, output_stride)
    step = 32 // output_stride
    assert dense.subgrid == Subgrid(step, (phase, phase))
    assert dense.output_stride == output_stride
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with inference_state(plain.module), inference_state(dense.module):
        f_plain, f_dense = plain.features(x), dense.features(x)
        logits = dense.logits(f_dense)
        own = plain.module(x)
    assert f_dense.shape[-2:] == (3 * step, 5 * step)
    torch.testing.assert_close(f_dense[..., phase::step, phase::step], f_plain)
    torch.testing.assert_close(logits, own, rtol=1e-5, atol=1e-4)
    assert dense.subgrid.shift == (step / 2 - phase - 0.5,) * 2


@pytest.mark.parametrize(("step", "phase"), [(2, 0), (2, 1), (4, 0), (4, 3)])
@pytest.mark.parametrize("region", [(0.0, 0.0, 1.0, 1.0), (0.1, 0.0, 0.9, 1.0)])
def test_a_dense_grid_holding_the_plain_map_is_drawn_as_the_plain_map(
    step: int, phase: int, region: tuple[float, float, float, float]
) -> None:
    """The placement: a dense grid whose sub-grid cells are the plain cells and whose other
    cells lie on the plain map's bilinear surface is drawn exactly as the plain map, so denser
    maps never displace anything."""
    plain = torch.randn(1, 2, 7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shift = (step / 2 - phase - 0.5,) * 2
    rows, columns = (np.arange(7 * step) - phase) / step, (np.arange(5 * step) - phase) / step
    dense = torch.from_numpy(_bilinear(plain.numpy(), rows, columns))
    size = (91, 65)
    expected = cam.upsample(plain, size, region)
    drawn = cam.upsample(dense, size, cam.placed(region, shift, (7 * step, 5 * step)))
    torch.testing.assert_close(drawn, expected, rtol=0, atol=1e-9)
    # the centred placement would move it by (step / 2 - phase - 1/2) cells
    assert not torch.allclose(cam.upsample(dense, size, region), expected, atol=1e-3)


def _bilinear(grid: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The bilinear surface through ``grid``'s cells (clamped outside), sampled at fractional
    cell positions."""

    def along(values: np.ndarray, at: np.ndarray, axis: int) -> np.ndarray:
        n = values.shape[axis]
        at = np.clip(at, 0, n - 1)
        low = np.floor(at).astype(int)
        high = np.minimum(low + 1, n - 1)
        weight = (at - low).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
        return np.take(values, low, axis) * (1 - weight) + np.take(values, high, axis) * weight

    return along(along(grid, rows, 2), columns, 3)


def test_merged_views_keep_the_placement() -> None:
    """A mirrored view's grid, mirrored back, is drawn at the opposite shift; merging resamples
    it onto the others' and the merged grid keeps their shift."""
    generator = torch.Generator().manual_seed(3)
    plain = torch.randn(1, 1, 7, 7, generator=generator, dtype=torch.float64)
    for phase in (0, 1):
        shift = (0.5 - phase, 0.5 - phase)
        at = (np.arange(14) - phase) / 2
        dense = torch.from_numpy(_bilinear(plain.numpy(), at, at))
        mirrored_at = (np.arange(14) - (1 - phase)) / 2  # the mirrored input's grid, flipped back
        mirrored = torch.from_numpy(_bilinear(plain.numpy(), at, mirrored_at)).flip(-1)
        merged = cam.merge_views([dense, mirrored], [False, True], shift)
        size = (70, 70)
        expected = cam.upsample(plain, size)
        drawn = cam.upsample(merged, size, cam.placed((0.0, 0.0, 1.0, 1.0), shift, (14, 14)))
        torch.testing.assert_close(drawn, expected, rtol=0, atol=1e-9)


def test_no_shift_merges_as_before() -> None:
    generator = torch.Generator().manual_seed(4)
    views = [
        torch.randn(1, 2, 7, 7, generator=generator),
        torch.randn(1, 2, 11, 11, generator=generator),
    ]
    assert torch.equal(
        cam.merge_views(views, [False, True]), cam.merge_views(views, [False, True], (0.0, 0.0))
    )


# -- real networks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18() -> GapModel:
    model = build_model("resnet18", "random")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.randn(model.num_classes, generator=generator))
    return model


@pytest.fixture(params=["embedded", "resnet18"])
def network(request: pytest.FixtureRequest) -> GapModel:
    return request.getfixturevalue("embedded_model" if request.param == "embedded" else "resnet18")


@pytest.mark.parametrize("output_stride", [16, 8])
def test_cam_identities_on_dilated_networks(network: GapModel, output_stride: int) -> None:
    dense = dilate(network, output_stride)
    step = 32 // output_stride
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[0, 5], [999, 281]])
    with inference_state(network.module), inference_state(dense.module):
        features = dense.features(x)
        logits = dense.logits(features)
        own = network.module(x)
        maps = cam.class_maps(features, dense.weight, classes)
    assert features.shape[-2:] == (7 * step, 7 * step)
    torch.testing.assert_close(logits, own, rtol=1e-4, atol=1e-4)
    f64, w64 = features.double().numpy(), dense.weight.detach().double().numpy()
    b64 = dense.bias.detach().double().numpy()
    row, column = dense.subgrid.phase
    for n in range(2):
        for j, c in enumerate(classes[n].tolist()):
            expected = np.tensordot(w64[c], f64[n], axes=1)  # sum_k w[c, k] f_k, every cell
            np.testing.assert_allclose(maps[n, j].double().numpy(), expected, rtol=1e-5, atol=1e-4)
            pooled = expected[row::step, column::step].mean() + b64[c]  # the plain cells
            assert float(logits[n, c]) == pytest.approx(pooled, abs=1e-3)
            assert float(own[n, c]) == pytest.approx(pooled, abs=1e-3)


def test_the_dense_copy_shares_the_weights(resnet18: GapModel) -> None:
    dense = dilate(resnet18, 16)
    assert dense.module is not resnet18.module
    assert dense.classifier is resnet18.classifier
    plain_tensors = {id(t) for t in [*resnet18.module.parameters(), *resnet18.module.buffers()]}
    assert {id(t) for t in [*dense.module.parameters(), *dense.module.buffers()]} == plain_tensors
    # the plain module is untouched
    assert resnet18.module.layer4[0].conv1.stride == (2, 2)  # BasicBlock: the first 3x3
    assert dense.module.layer4[0].conv1.stride == (1, 1)
    assert dense.module.layer4[0].conv2.dilation == (2, 2)  # the 3x3 after it
    assert dense.module.layer4[1].conv1.dilation == (2, 2)
    assert resnet18.module.layer4[1].conv1.dilation == (1, 1)
    assert dilate(resnet18, 32) is resnet18


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: build_model("densenet121", "random"), "transition3.pool (AvgPool2d)"),
        (lambda: strided_model(gate=True), "sees the whole map"),
        (lambda: strided_model(kernel=2), "even kernel"),
    ],
)
def test_networks_that_cannot_run_dilated_are_refused_with_the_reason(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedModelError, match="use output_stride=32") as caught:
        dilate(make(), 16)
    assert reason in str(caught.value)


def test_output_stride_must_be_one_of_the_choices(embedded_model: GapModel) -> None:
    with pytest.raises(GapcamError, match=r"output_stride=12: use one of 32, 16, 8"):
        gapcam.Localizer(embedded_model, output_stride=12)
    with pytest.raises(UnsupportedModelError, match="already dilated"):
        dilate(dilate(embedded_model, 16), 8)


# -- through the Localizer -------------------------------------------------------------------------


@pytest.mark.parametrize("hflip", [False, True])
def test_sub_grid_cells_are_drawn_where_the_plain_cells_are(network: GapModel, hflip: bool) -> None:
    """On a 21 x 21 image each plain cell (7 x 7 at 224) covers 3 x 3 pixels and its centre is
    a pixel centre: there the dilated map and the plain map must agree exactly."""
    image = Image.open(EXAMPLES / "cat.png").convert("RGB").resize((21, 21))
    plain = gapcam.Localizer(network, hflip=hflip)(image)
    dense = gapcam.Localizer(network, hflip=hflip, output_stride=16)(image)
    assert [p.index for p in dense.predictions] == [p.index for p in plain.predictions]
    for ours, theirs in zip(dense.predictions, plain.predictions, strict=True):
        assert ours.logit == pytest.approx(theirs.logit, abs=1e-4)
    assert dense.maps[0].low_res.shape == (14, 14)
    row, column = dilate(network, 16).subgrid.phase
    np.testing.assert_allclose(
        dense.maps[0].low_res[row::2, column::2], plain.maps[0].low_res, rtol=1e-4, atol=1e-4
    )
    centres = np.arange(7) * 3 + 1
    ours = dense.raw_cam()[np.ix_(centres, centres)]
    np.testing.assert_allclose(ours, plain.maps[0].low_res, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ours, plain.raw_cam()[np.ix_(centres, centres)], rtol=1e-4, atol=1e-4
    )


def test_dilated_localizer_with_scales_and_the_onnx_backend(
    embedded_model: GapModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path))
    sources = [EXAMPLES / "cat.png", EXAMPLES / "coffee.jpg"]
    eager = gapcam.Localizer(embedded_model, output_stride=16, scales=(1.0, 1.5))(sources)
    fast = gapcam.Localizer(embedded_model, output_stride=16, scales=(1.0, 1.5), backend="onnx")
    assert fast.backend_used == ("onnx", "")
    plain_fast = gapcam.Localizer(embedded_model, backend="onnx")  # its own cache entry
    for a, b in zip(eager, fast(sources), strict=True):
        assert a.maps[0].low_res.shape == (22, 22)  # the finest view: 352 px at stride 16
        assert a.settings.extras["output_stride"] == 16
        np.testing.assert_allclose(
            b.maps[0].low_res, a.maps[0].low_res, atol=1e-3 * float(np.abs(a.maps[0].low_res).max())
        )
        assert [x.as_list() for x in a.maps[0].boxes] == [x.as_list() for x in b.maps[0].boxes]
    assert plain_fast(sources[0]).maps[0].low_res.shape == (7, 7)


def test_the_command_line_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    code = main(
        [
            "localize",
            str(EXAMPLES / "cat.png"),
            "--output-stride",
            "16",
            "--json",
            str(out),
            "--out",
            str(tmp_path / "o"),
            "-q",
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    first = record["results"][0] if "results" in record else record
    assert first["maps"][0]["feature_size"] == [14, 14]
    capsys.readouterr()
    code = main(
        [
            "localize",
            str(EXAMPLES / "cat.png"),
            "--model",
            "densenet121",
            "--weights",
            "random",
            "--output-stride",
            "8",
            "--out",
            str(tmp_path / "d"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "use --output-stride 32" in err
    assert "transition2.pool" in err
