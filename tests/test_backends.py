"""Inference backends: ONNX Runtime equals eager within the stated tolerance; cache and fallbacks.

Stated tolerance (README, gapcam.backends): the same top classes, probabilities within 1e-4,
normalised CAMs within 1e-3 and raw low-res CAMs within 1e-3 x their scale; feature maps within
``FEATURE_TOLERANCE`` x max(1, max |eager|).
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, assert_same_results, tiny_gap_model

import gapcam
from gapcam import backends, outputs
from gapcam.boxes import box_iou
from gapcam.errors import ModelError, OutputError
from gapcam.models import GapModel, inference_state


def _eager_features(model: GapModel, x: torch.Tensor) -> torch.Tensor:
    with inference_state(model.module):
        return model.features(x)


def test_eager_is_the_module_itself(tiny: GapModel) -> None:
    backend = backends.make_backend(tiny, "eager")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert backend.name == "eager"
    assert backend.note == ""
    with inference_state(tiny.module):
        assert torch.equal(backend.features(x), tiny.features(x))


def test_unknown_backend_names_the_choices(tiny: GapModel) -> None:
    with pytest.raises(ModelError, match=r"backend='tpu': use one of auto, eager, onnx"):
        backends.make_backend(tiny, "tpu")


def test_onnx_features_equal_eager_for_any_batch_and_size(tiny: GapModel, tmp_path: Path) -> None:
    backend = backends.make_backend(tiny, "onnx", root=tmp_path)
    for batch, size in ((1, 32), (5, 32), (3, 48)):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        expected = _eager_features(tiny, x)
        got = backend.features(x)
        assert got.shape == expected.shape
        scale = max(1.0, float(expected.abs().max()))
        assert float((got - expected).abs().max()) <= backends.FEATURE_TOLERANCE * scale
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2  # one export per input size


def test_onnx_features_from_several_threads_at_once(tiny: GapModel, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    backend = backends.OnnxBackend(tiny, tmp_path, threads=1)
    inputs = [
        torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)
    ]
    with ThreadPoolExecutor(4) as pool:  # the first calls race to create the session
        together = list(pool.map(backend.features, inputs))
    alone = [backend.features(x) for x in inputs]
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1
    assert backend.threads == 1


def test_the_model_is_left_as_it_was(tmp_path: Path) -> None:
    model = tiny_gap_model()
    model.module.train()
    backends.make_backend(model, "onnx", root=tmp_path).features(torch.zeros(1, 3, 32, 32))
    assert all(m.training for m in model.module.modules())


def test_exports_are_cached_by_weights_and_size(tmp_path: Path) -> None:
    model = tiny_gap_model()
    first = backends.OnnxBackend(model, tmp_path)
    first.features(torch.zeros(1, 3, 32, 32))
    path = first.path((32, 32))
    stamp = path.stat().st_mtime_ns
    again = backends.OnnxBackend(model, tmp_path)
    again.features(torch.zeros(1, 3, 32, 32))
    assert path.stat().st_mtime_ns == stamp  # reused, not exported again
    assert again.path((32, 32)) == path
    assert again.path((48, 48)) != path
    with torch.no_grad():
        next(model.module.parameters()).add_(1.0)
    assert backends.OnnxBackend(model, tmp_path).path((32, 32)) != path
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failing_cache_write_is_one_line_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(stream: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_fill", full)
    backend = backends.OnnxBackend(tiny_gap_model(), tmp_path)
    with pytest.raises(OutputError) as info:
        backend.features(torch.zeros(1, 3, 32, 32))
    assert str(info.value) == f"{backend.path((32, 32))}: cannot write (No space left on device)"
    assert [p.name for p in tmp_path.rglob("*")] == ["onnx"]


def test_the_export_key_hashes_every_tensor_and_the_feature_key_only_the_backbone() -> None:
    """One digest of the weights (``weights_digest``) keys both caches: the ONNX export over
    every tensor of the module, the feature cache without the classifier (a new head keeps
    the pooled features) and with the preprocessing."""
    from gapcam.train.features import model_key

    model = tiny_gap_model()
    export, features = backends.weights_digest(model, backends.DIGEST_KIND), model_key(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert backends.weights_digest(model, backends.DIGEST_KIND) != export
    assert model_key(model) == features
    with torch.no_grad():
        next(model.module.parameters()).add_(1.0)
    changed = model_key(model)
    assert changed != features
    model.preprocess = model.preprocess.replace(size=(48, 48))
    assert model_key(model) != changed


def test_a_corrupt_cache_entry_is_removed_with_a_one_line_error(tmp_path: Path) -> None:
    model = tiny_gap_model()
    backend = backends.OnnxBackend(model, tmp_path)
    path = backend.path((32, 32))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load it") as info:
        backend.features(torch.zeros(1, 3, 32, 32))
    assert "\n" not in str(info.value).split(" (", 1)[0]
    assert not path.exists()
    assert backends.OnnxBackend(model, tmp_path).features(torch.zeros(1, 3, 32, 32)).shape[0] == 1


def test_auto_falls_back_to_eager_without_onnxruntime(
    tiny: GapModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backends, "onnx_available", lambda: False)
    backend = backends.make_backend(tiny, "auto")
    assert backend.name == "eager"
    assert "pip install 'gapcam[fast]'" in backend.note
    with pytest.raises(ModelError, match=r"needs onnxruntime.*backend='eager'"):
        backends.make_backend(tiny, "onnx")


def test_auto_falls_back_when_the_export_is_wrong(tmp_path: Path) -> None:
    """A feature function that leaves torch (numpy) traces to a constant: the check catches it."""
    net = tiny_gap_model().module

    def through_numpy(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(module.body(x).numpy() * 1.0)

    model = GapModel("numpy-net", net, through_numpy, net.fc, [str(i) for i in range(5)])
    backend = backends.make_backend(model, "auto", root=tmp_path)
    assert backend.name == "eager"
    assert "ONNX" in backend.note
    with pytest.raises(ModelError, match="use backend='eager'"):
        backends.make_backend(model, "onnx", root=tmp_path).features(torch.ones(2, 3, 32, 32))


def test_onnx_needs_a_float32_cpu_model(tmp_path: Path) -> None:
    model = tiny_gap_model()
    model.module.double()
    with pytest.raises(ModelError, match="float32 models on the CPU"):
        backends.make_backend(model, "onnx", root=tmp_path)
    assert backends.make_backend(model, "auto", root=tmp_path).name == "eager"


def test_onnx_localizer_matches_eager_on_the_embedded_model(
    embedded_model: GapModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path))
    sources = [EXAMPLES / "cat.png", EXAMPLES / "coffee.jpg"]
    eager = gapcam.Localizer(embedded_model)(sources, top_k=2)
    fast_localizer = gapcam.Localizer(embedded_model, backend="auto")
    assert fast_localizer.backend_used == ("onnx", "")
    assert_same_results(eager, fast_localizer(sources, top_k=2))


def test_devices_that_are_not_here_get_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backends.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match=r"^device='tpu9': not a device; use cpu, cuda"):
        backends.check_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"^device='cuda': no CUDA GPU is available here"):
        backends.check_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"^device='mps': MPS \(Apple GPU\) is not available"):
        gapcam.Localizer(device="mps")


def test_built_in_models_run_channels_last_with_the_same_values() -> None:
    model = gapcam.build_model("resnet18", "random")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = _eager_features(model, x)
    backend = backends.make_backend(model, "eager")
    assert backend.channels_last
    with inference_state(model.module):
        got = backend.features(x)
    assert got.is_contiguous(memory_format=torch.channels_last)  # it carried through
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    assert all(p.is_contiguous() for p in model.module.parameters())  # the module is untouched


def test_custom_modules_keep_their_layout(tiny: GapModel) -> None:
    backend = backends.make_backend(tiny, "eager")
    assert not backend.channels_last
    assert all(p.is_contiguous() for p in tiny.module.parameters())


@pytest.mark.parametrize(
    ("choice", "precision", "message"),
    [
        ("eager", "float16", "precision='float16' needs a GPU"),
        (
            "onnx",
            "bfloat16",
            "backend='onnx' runs float32; for precision='bfloat16' use backend='eager'",
        ),
        ("eager", "int8", "precision='int8' runs on the ONNX backend: use backend='onnx'"),
        ("eager", "int4", "precision='int4': use one of float32, bfloat16, float16, int8"),
    ],
)
def test_precisions_the_backend_cannot_run_are_refused(
    tiny: GapModel, choice: str, precision: str, message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        backends.make_backend(tiny, choice, precision=precision)


def test_auto_runs_bfloat16_on_eager_and_says_so(tiny: GapModel) -> None:
    backend = backends.make_backend(tiny, "auto", precision="bfloat16")
    assert (backend.name, backend.note) == ("eager", "bfloat16 runs on the eager backend")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with inference_state(tiny.module):
        assert backend.features(x).dtype == torch.float32  # CAMs are computed in float32


def test_bfloat16_stays_within_the_stated_tolerance(
    embedded_model: GapModel, localizer: gapcam.Localizer
) -> None:
    """Stated (docs/speed.md, measured on the 300 dev images): the same top class, normalised
    CAMs within 0.1 and box IoU >= 0.9 of float32."""
    fast = gapcam.Localizer(embedded_model, backend="eager", precision="bfloat16")
    assert fast.settings().extras == {"precision": "bfloat16"}
    for path in (EXAMPLES / "cat.png", EXAMPLES / "coffee.jpg"):
        reference = localizer(path)
        result = fast(path, classes=[reference.top.index])
        assert fast(path).top.index == reference.top.index
        assert float(np.abs(result.cam() - reference.cam()).max()) <= 0.1
        box, expected = result.maps[0].boxes[0], reference.maps[0].boxes[0]
        assert box_iou(np.array([box.as_list()]), np.array([expected.as_list()]))[0, 0] >= 0.9
