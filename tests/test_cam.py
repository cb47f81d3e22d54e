"""gapcam.cam: pure tensor functions, checked against independent loops and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gapcam import cam


@pytest.fixture
def head(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random features (N=2, C=6, 4 x 5), weight (K=7 x C) and bias (K)."""
    return {
        "features": torch.randn(2, 6, 4, 5, generator=generator),
        "weight": torch.randn(7, 6, generator=generator),
        "bias": torch.randn(7, generator=generator),
    }


def _loop_cam(features: np.ndarray, weight: np.ndarray, n: int, c: int) -> np.ndarray:
    """sum_k w[c, k] * f[n, k] with an explicit loop over channels."""
    out = np.zeros(features.shape[2:], dtype=np.float64)
    for k in range(features.shape[1]):
        out += weight[c, k] * features[n, k].astype(np.float64)
    return out


def test_class_maps_is_the_weighted_sum(head: dict[str, torch.Tensor]) -> None:
    f, w = head["features"], head["weight"]
    classes = torch.tensor([[6, 0, 6], [3, 2, 1]])
    maps = cam.class_maps(f, w, classes)
    assert maps.shape == (2, 3, 4, 5)
    for n in range(2):
        for j, c in enumerate(classes[n].tolist()):
            expected = _loop_cam(f.numpy(), w.numpy(), n, c)
            np.testing.assert_allclose(maps[n, j].numpy(), expected, atol=1e-5)


def test_conv_relu_maps(head: dict[str, torch.Tensor]) -> None:
    f, w, b = head["features"], head["weight"], head["bias"]
    classes = torch.tensor([[0, 5], [4, 4]])
    maps = cam.class_maps(f, w, classes, b, head="conv-relu")
    for n in range(2):
        for j, c in enumerate(classes[n].tolist()):
            expected = np.maximum(_loop_cam(f.numpy(), w.numpy(), n, c) + float(b[c]), 0.0)
            np.testing.assert_allclose(maps[n, j].numpy(), expected, atol=1e-5)
    assert (maps == 0).any()  # the ReLU did cut something: the test is not vacuous
    logits = cam.logits_from_features(f, w, b, head="conv-relu")
    for n in range(2):
        for j, c in enumerate(classes[n].tolist()):
            assert float(logits[n, c]) == pytest.approx(float(maps[n, j].mean()), abs=1e-6)


def test_linear_logits_and_mean_identity(head: dict[str, torch.Tensor]) -> None:
    f, w, b = head["features"], head["weight"], head["bias"]
    logits = cam.logits_from_features(f, w, b)
    pooled = f.double().numpy().mean(axis=(2, 3))
    expected = pooled @ w.double().numpy().T + b.double().numpy()
    np.testing.assert_allclose(logits.numpy(), expected, atol=1e-5)
    every = cam.all_class_maps(f, w, b)
    np.testing.assert_allclose((every.mean(dim=(2, 3)) + b).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv-relu"])
def test_all_class_maps_equals_class_maps(head: dict[str, torch.Tensor], kind: str) -> None:
    f, w, b = head["features"], head["weight"], head["bias"]
    every = cam.all_class_maps(f, w, b, kind)
    chosen = cam.class_maps(f, w, torch.arange(7).expand(2, 7), b, kind)
    assert every.shape == (2, 7, 4, 5)
    torch.testing.assert_close(every, chosen, atol=1e-5, rtol=1e-5)
    logits = cam.logits_from_features(f, w, b, kind)
    offset = b if kind == "linear" else torch.zeros_like(b)
    torch.testing.assert_close(every.mean(dim=(2, 3)) + offset, logits, atol=1e-5, rtol=1e-5)


def test_class_maps_argument_errors(head: dict[str, torch.Tensor]) -> None:
    f, w = head["features"], head["weight"]
    with pytest.raises(ValueError, match=r"classes has shape \(3,\)"):
        cam.class_maps(f, w, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="N = 2"):
        cam.class_maps(f, w, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="needs its bias"):
        cam.class_maps(f, w, torch.tensor([[0], [1]]), head="conv-relu")


# -- upsample --------------------------------------------------------------------------------------


def test_upsample_stretch_equals_interpolate(generator: torch.Generator) -> None:
    maps = torch.randn(2, 3, 7, 7, generator=generator)
    out = cam.upsample(maps, (45, 61))
    expected = F.interpolate(maps, size=(45, 61), mode="bilinear", align_corners=False)
    assert out.shape == (2, 3, 45, 61)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _ramp(h: int, w: int, along: str) -> torch.Tensor:
    """A 1 x 1 x h x w map whose value is the column (along="x") or row (along="y") index."""
    if along == "x":
        return torch.arange(w, dtype=torch.float64).expand(h, w)[None, None].clone()
    return torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)[None, None].clone()


def _expected_ramp(out_len: int, in_len: int, start: float, stop: float) -> np.ndarray:
    """Bilinear (align_corners=False, border-clamped) sample of a 0..in_len-1 ramp at the
    pixel centres of ``out_len`` pixels spanning [start, stop] of the input (fractions)."""
    where = start + (np.arange(out_len) + 0.5) / out_len * (stop - start)
    return np.clip(where * in_len - 0.5, 0, in_len - 1)


@pytest.mark.parametrize("along", ["x", "y"])
def test_upsample_stretch_of_a_ramp(along: str) -> None:
    out = cam.upsample(_ramp(6, 8, along), (30, 50))[0, 0].numpy()
    if along == "x":
        expected = np.broadcast_to(_expected_ramp(50, 8, 0.0, 1.0), (30, 50))
    else:
        expected = np.broadcast_to(_expected_ramp(30, 6, 0.0, 1.0)[:, None], (30, 50))
    np.testing.assert_allclose(out, expected, atol=1e-9)


@pytest.mark.parametrize("along", ["x", "y"])
def test_upsample_region_samples_only_the_region(along: str) -> None:
    """Letterbox: the image occupies rows 0.25..0.75 of the input; the output covers only them."""
    region = (0.0, 0.25, 1.0, 0.75)
    out = cam.upsample(_ramp(8, 8, along), (20, 40), region)[0, 0].numpy()
    if along == "x":
        expected = np.broadcast_to(_expected_ramp(40, 8, 0.0, 1.0), (20, 40))
    else:
        expected = np.broadcast_to(_expected_ramp(20, 8, 0.25, 0.75)[:, None], (20, 40))
    np.testing.assert_allclose(out, expected, atol=1e-9)
    if along == "y":  # samples fall between map rows 1.6 and 5.4: the image's rows 2..5 +/- half
        assert out.min() >= 1.5
        assert out.max() <= 5.5


def test_upsample_region_on_a_block() -> None:
    """A map that is 1 exactly on the image's part of the input and 0 on the padding."""
    maps = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    maps[0, 0, 2:6, :] = 1.0
    out = cam.upsample(maps, (16, 64), (0.0, 0.25, 1.0, 0.75))[0, 0].numpy()
    # the inner rows only see map rows 2..5 (all ones); the edge rows blend with the padding
    np.testing.assert_allclose(out[2:14], 1.0)
    for row in (0, 1, 14, 15):
        assert 0.5 < out[row].max() < 1.0


def test_upsample_grid_branch_equals_interpolate_on_the_full_region(
    generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = F.grid_sample

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    maps = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64)
    forced = cam.upsample(maps, (23, 37), [0.0, 0.0, 1.0, 1.0])  # a list: skips the fast path
    assert calls, "the grid_sample branch was not taken; update how this test forces it"
    expected = F.interpolate(maps, size=(23, 37), mode="bilinear", align_corners=False)
    torch.testing.assert_close(forced, expected, atol=1e-9, rtol=0)


# -- normalize ------------------------------------------------------------------------------------


def test_normalize_minmax_is_per_map_affine(generator: torch.Generator) -> None:
    maps = torch.randn(2, 3, 4, 5, generator=generator) * 7 + 3
    out = cam.normalize(maps, "minmax")
    m = maps.numpy()
    low = m.min(axis=(2, 3), keepdims=True)
    high = m.max(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(out.numpy(), (m - low) / (high - low), atol=1e-6)
    assert torch.all(out.amin(dim=(2, 3)) == 0)
    assert torch.all(out.amax(dim=(2, 3)) == 1)


@pytest.mark.parametrize("mode", ["minmax", "max"])
def test_normalize_a_batch_equals_each_map_alone(generator: torch.Generator, mode: str) -> None:
    """The pipeline normalises the maps of a whole batch at once: the same bits as one by one,
    flat maps among them included."""
    maps = torch.randn(4, 2, 30, 40, generator=generator)
    maps[1, 0] = 2.5  # flat
    maps[2, 1] = -1.0  # flat and negative
    maps[3, 0] = maps[3, 0] * 1e-7 + 4.0  # rounding noise: flat for minmax
    together = cam.normalize(maps, mode)
    for n in range(4):
        for k in range(2):
            assert torch.equal(
                together[n, k], cam.normalize(maps[n : n + 1, k : k + 1], mode)[0, 0]
            )


def test_normalize_max_drops_negative_evidence() -> None:
    maps = torch.tensor([[[[-2.0, 0.0], [1.0, 4.0]]]])
    out = cam.normalize(maps, "max")
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.0], [0.25, 1.0]]]]))


def test_normalize_flat_maps() -> None:
    """minmax: every flat map becomes 0. max: a flat map keeps its sign (1 where positive)."""
    maps = torch.stack([torch.full((3, 3), 5.0), torch.full((3, 3), -1.0), torch.zeros(3, 3)])[None]
    minmax = cam.normalize(maps, "minmax")
    assert torch.equal(minmax, torch.zeros_like(maps))
    by_max = cam.normalize(maps, "max")
    assert torch.equal(by_max[0, 0], torch.ones(3, 3))
    assert torch.equal(by_max[0, 1:], torch.zeros(2, 3, 3))


def test_normalize_max_all_negative_is_zero() -> None:
    maps = torch.tensor([[[[-3.0, -1.0], [-2.0, -0.5]]]])
    assert torch.equal(cam.normalize(maps, "max"), torch.zeros_like(maps))


def test_normalize_none_and_errors(generator: torch.Generator) -> None:
    maps = torch.randn(1, 1, 3, 3, generator=generator)
    assert torch.equal(cam.normalize(maps, "none"), maps)
    with pytest.raises(ValueError, match=r"normalize='softmax'.*minmax"):
        cam.normalize(maps, "softmax")


def test_normalize_minmax_treats_rounding_noise_as_flat() -> None:
    noisy = torch.full((1, 1, 8, 8), -1.0)
    noisy[0, 0, 3, 4] = -0.99999994  # what bilinear upsampling of a constant -1 map can give
    assert torch.equal(cam.normalize(noisy, "minmax"), torch.zeros_like(noisy))
    small = torch.full((1, 1, 8, 8), 100.0)
    small[0, 0, 3, 4] = 100.01  # a small but real difference is still a signal
    assert float(cam.normalize(small, "minmax")[0, 0, 3, 4]) == 1.0
