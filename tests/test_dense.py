"""Dense maps from the same weights (``gapcam.models.dense``): where the plain features lie in
the dense grid, where the dense cells are drawn, and the CAM identities on dilated networks."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_results
from PIL import Image
from timm.layers import Conv2dSame
from torch import nn

import gapcam
from gapcam import cam
from gapcam.cli import main
from gapcam.errors import GapcamError, ModelError, UnsupportedModelError
from gapcam.models import GapModel, build_model, inference_state
from gapcam.models.base import Subgrid
from gapcam.models.dense import dilate
from gapcam.schema import localize_schema
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
    ("kernel", "tf_same", "output_stride", "size", "phase"),
    [
        # symmetric padding centres a stride-2 output i on input cell 2i: phase 0 at every level
        (3, False, 16, (96, 160), 0),
        (5, False, 16, (96, 160), 0),
        (3, False, 8, (96, 160), 0),
        (3, False, 16, (48, 80), 0),
        # TF "same" pads (k-1)/2 - 1/2 cells before an even input: output i on cell 2i + 1, so
        # the plain cell i is the dense cell 2i + 1, and 4i + 2 + 1 two stages down
        (3, True, 16, (96, 160), 1),
        (5, True, 16, (96, 160), 1),
        (3, True, 8, (96, 160), 3),
        # ... and symmetrically before an odd one (48 and 80 give 3 x 5 cells at stride 16)
        (3, True, 16, (48, 80), 0),
        (5, True, 16, (48, 80), 0),
    ],
)
def test_the_plain_features_are_the_derived_sub_grid(
    kernel: int, tf_same: bool, output_stride: int, size: tuple[int, int], phase: int
) -> None:
    plain = strided_model(kernel, tf_same)
    dense = dilate(plain, output_stride, [size])
    step = 32 // output_stride
    assert dense.output_stride == output_stride
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with inference_state(plain.module), inference_state(dense.module):
        f_plain, f_dense = plain.features(x), dense.features(x)
        logits = dense.logits(f_dense)
        own = plain.module(x)
    grid = (f_dense.shape[-2], f_dense.shape[-1])
    assert dense.subgrid(grid) == Subgrid(step, (phase, phase))
    assert f_plain.shape[-2:] == (-(-size[0] // 32), -(-size[1] // 32))
    torch.testing.assert_close(f_dense[..., phase::step, phase::step], f_plain)
    torch.testing.assert_close(logits, own, rtol=1e-4, atol=1e-4)


def test_a_size_it_was_not_checked_at_is_refused() -> None:
    dense = dilate(strided_model(), 16)  # checked at the probe size only
    with pytest.raises(ModelError, match=r"not been checked at a size that gives a \(3, 5\) grid"):
        dense.logits(torch.zeros(1, 8, 3, 5))


@pytest.mark.parametrize(
    ("step", "phase", "plain_cells"),
    [(2, 0, (7, 5)), (2, 1, (7, 5)), (4, 0, (7, 5)), (4, 3, (7, 5)), (2, 0, (8, 9))],
)
@pytest.mark.parametrize("region", [(0.0, 0.0, 1.0, 1.0), (0.1, 0.0, 0.9, 1.0)])
def test_a_dense_grid_holding_the_plain_map_is_drawn_as_the_plain_map(
    step: int, phase: int, plain_cells: tuple[int, int], region: tuple[float, float, float, float]
) -> None:
    """The placement: a dense grid whose sub-grid cells are the plain cells and whose other
    cells lie on the plain map's bilinear surface is drawn exactly as the plain map, so denser
    maps never displace anything. Odd dense grids (8 x 9 plain cells in 15 x 17: TF padding
    before an odd input) too."""
    rows, columns = plain_cells
    plain = torch.randn(1, 2, rows, columns, generator=torch.Generator().manual_seed(2))
    plain = plain.double()
    odd = plain_cells == (8, 9)
    grid = (2 * rows - 1, 2 * columns - 1) if odd else (rows * step, columns * step)
    at_rows, at_columns = (np.arange(grid[0]) - phase) / step, (np.arange(grid[1]) - phase) / step
    dense = torch.from_numpy(_bilinear(plain.numpy(), at_rows, at_columns))
    placement = Subgrid(step, (phase, phase)).placement(grid)
    size = (91, 65)
    expected = cam.upsample(plain, size, region)
    drawn = cam.upsample(dense, size, cam.placed(region, placement))
    torch.testing.assert_close(drawn, expected, rtol=0, atol=1e-9)
    # drawn evenly over the input instead, the map would move
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


@pytest.mark.parametrize(("phase", "cells"), [(0, 14), (1, 14), (0, 13)])
def test_merged_views_keep_the_placement(phase: int, cells: int) -> None:
    """A mirrored view's grid, mirrored back, has its plain cells counted from the other edge
    (``Subgrid.mirrored``); merging resamples it onto the other view's grid, whose placement
    the merged grid keeps, and a coarser view (a smaller scale) is placed by its own."""
    plain = torch.randn(1, 1, 7, 7, generator=torch.Generator().manual_seed(3)).double()
    subgrid = Subgrid(2, (phase, phase))
    grid = (cells, cells)
    at = (np.arange(cells) - phase) / 2
    dense = torch.from_numpy(_bilinear(plain.numpy(), at, at))
    flipped = subgrid.mirrored(grid)
    mirrored_at = (np.arange(cells) - flipped.phase[1]) / 2  # the mirrored input's grid, back
    mirrored = torch.from_numpy(_bilinear(plain.numpy(), at, mirrored_at)).flip(-1)
    coarse = plain  # a plain view at the same size: its own (centred) placement
    placements = [subgrid.placement(grid), flipped.placement(grid), cam.CENTRED]
    merged, placement = cam.merge_views([dense, mirrored, coarse], [False, True, False], placements)
    assert placement == subgrid.placement(grid)
    size = (70, 70)
    expected = cam.upsample(plain, size)
    drawn = cam.upsample(merged, size, cam.placed((0.0, 0.0, 1.0, 1.0), placement))
    torch.testing.assert_close(drawn, expected, rtol=0, atol=1e-9)


def test_centred_views_merge_as_before() -> None:
    generator = torch.Generator().manual_seed(4)
    views = [
        torch.randn(1, 2, 7, 7, generator=generator),
        torch.randn(1, 2, 11, 11, generator=generator),
    ]
    merged, placement = cam.merge_views(views, [False, True])
    coarse = F.interpolate(views[0], size=(11, 11), mode="bilinear", align_corners=False)
    expected = (coarse + views[1].flip(-1)) / 2
    torch.testing.assert_close(merged, expected)
    assert placement == cam.CENTRED


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
    dense = dilate(network, output_stride, [(224, 224)])
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
    row, column = dense.subgrid((7 * step, 7 * step)).phase
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
    row, column = dilate(network, 16, [(224, 224)]).subgrid((14, 14)).phase
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
    for a in eager:
        assert a.maps[0].low_res.shape == (22, 22)  # the finest view: 352 px at stride 16
        assert a.settings.extras["output_stride"] == 16
    assert_same_results(eager, fast(sources))
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
    jsonschema.validate(record, localize_schema())  # the schema knows output_stride
    assert record["settings"]["output_stride"] == 16
    first = record["results"][0]
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


@pytest.mark.parametrize(("name", "grid"), [("efficientnet_lite1", 15), ("efficientnet_lite2", 17)])
def test_lite1_and_lite2_run_dilated_at_their_own_sizes(name: str, grid: int) -> None:
    """240 and 260 px give an odd grid before the last stride-2 layer: TF padding is symmetric
    there, so the plain cells are the even dense cells (15 = 2 x 8 - 1, 17 = 2 x 9 - 1)."""
    model = build_model(name)
    image = Image.open(EXAMPLES / "coffee.jpg").convert("RGB")
    plain = gapcam.Localizer(model)(image)
    localizer = gapcam.Localizer(model, output_stride=16)
    dense = localizer(image)
    assert localizer.preprocess.size == model.preprocess.size
    assert localizer.gap_model.subgrid((grid, grid)) == Subgrid(2, (0, 0))
    assert dense.maps[0].low_res.shape == (grid, grid)
    assert [p.index for p in dense.predictions] == [p.index for p in plain.predictions]
    np.testing.assert_allclose(dense.maps[0].low_res[::2, ::2], plain.maps[0].low_res, atol=1e-3)


def test_serve_answers_with_a_dilated_localizer(embedded_model: GapModel) -> None:
    from fastapi.testclient import TestClient

    from gapcam.web.app import create_app

    localizer = gapcam.Localizer.from_options({"output_stride": 16, "backend": "eager"})
    client = TestClient(create_app(localizer))
    upload = {"file": ("cat.png", (EXAMPLES / "cat.png").read_bytes(), "image/png")}
    answer = client.post("/api/localize", files=upload)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = localizer(EXAMPLES / "cat.png")
    assert body["maps"][0]["feature_size"] == [14, 14]
    assert body["maps"][0]["boxes"][0]["xyxy"] == expected.maps[0].boxes[0].as_list()
