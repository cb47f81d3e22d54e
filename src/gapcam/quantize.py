"""int8 feature extractors for the ONNX backend: static quantization with calibration.

``precision="int8"`` runs the network's convolutions with 8-bit integer kernels (ONNX
Runtime's QDQ format: weights int8 per output channel, activations uint8 per tensor, their
ranges measured on calibration images), which CPUs with dot-product instructions for 8-bit
integers (x86 VNNI, Arm dotprod) run several times faster than float32. Only the feature
extractor is quantized: the logits and the CAMs are still computed in float32 from the live
classifier weights, on float32 features (the graph ends in a dequantization).

Calibration: static quantization needs representative inputs to fix each activation's range.
They are images the caller names (``Localizer(calibration=...)``; ``gapcam localize`` takes the
first ``CALIBRATION_IMAGES`` of its own inputs unless ``--calibration`` names others), resized
as the view they calibrate. The quantized model is cached next to the float32 export, keyed by
the float model's key, the calibration tensors' digest and the quantization settings.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gapcam.errors import ModelError

#: how many images calibrate by default (``gapcam localize`` and ``evaluate`` take the first
#: ones of their inputs), and the most ``calibration=`` may hold
CALIBRATION_IMAGES = 32
MAX_CALIBRATION_IMAGES = 512

#: the settings of ``quantize_static``, part of the cache key
SETTINGS = "QDQ, weights QInt8 per channel, activations QUInt8 per tensor, MinMax, v1"

#: the CPU flags (Linux ``/proc/cpuinfo``) of 8-bit integer dot products
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")

#: pooled features of the quantized model against the float32 one on the calibration images:
#: the lowest cosine similarity accepted (a broken quantization falls far below)
MIN_COSINE = 0.95


def int8_support() -> str | None:
    """None when this CPU has 8-bit integer dot-product instructions; else the reason why
    int8 would not be faster here (one line)."""
    machine = platform.machine().lower()
    system = platform.system()
    if system == "Linux":
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "cannot read /proc/cpuinfo to tell whether this CPU has int8 instructions"
        flags = {word for line in text.splitlines() if ":" in line for word in line.split()}
        if flags & set(INT8_FLAGS):
            return None
        return (
            f"this {machine} CPU has no 8-bit integer dot-product instructions "
            "(x86 VNNI or AMX, Arm dotprod), so int8 would be slower than float32"
        )
    if system == "Darwin" and machine == "arm64":
        try:
            found = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
        except OSError:
            found = ""
        return None if found == "1" else "this Mac's CPU reports no int8 dot-product support"
    return f"cannot tell on {system} whether this CPU has int8 dot-product instructions"


def calibration_digest(batches: list[np.ndarray]) -> str:
    digest = hashlib.sha256(SETTINGS.encode())
    for batch in batches:
        digest.update(f"{batch.shape}:{batch.dtype}\n".encode())
        digest.update(np.ascontiguousarray(batch).tobytes())
    return digest.hexdigest()


def quantize(float_model: Path, batches: list[np.ndarray], name: str) -> bytes:
    """The int8 (QDQ) version of the ONNX feature extractor at ``float_model``, its activation
    ranges measured on ``batches`` (N x 3 x H x W float32 inputs); checked against the float32
    model on the same inputs. ``ModelError`` (one line) when it cannot be made."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.pending = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.pending, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory(prefix="gapcam-int8-") as folder:
        prepared, output = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        try:
            quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(output),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:  # the quantizer raises many kinds; one line for the user
            raise ModelError(
                f"{name}: cannot quantize it to int8 ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); use precision='float32'"
            ) from exc
        data = output.read_bytes()
    _check(name, float_model, data, batches)
    return data


def _check(name: str, float_model: Path, data: bytes, batches: list[np.ndarray]) -> None:
    """Pooled int8 features must point where the float32 ones do: the median cosine over the
    first calibration images at least ``MIN_COSINE`` (a broken graph falls far below)."""
    import onnxruntime as ort

    sessions = [
        ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        for source in (str(float_model), data)
    ]
    probe = batches[0][:8]
    expected, got = (
        torch.from_numpy(s.run(None, {"input": probe})[0]).mean(dim=(2, 3)) for s in sessions
    )
    cosine = float(torch.nn.functional.cosine_similarity(expected, got, dim=1).median())
    if not cosine >= MIN_COSINE:
        raise ModelError(
            f"{name}: its int8 features differ from float32 (median cosine {cosine:.3f} on "
            "the calibration images); use precision='float32', or calibrate with more "
            "representative images"
        )


def calibration_batches(
    make: Callable[[tuple[int, int]], torch.Tensor], size: tuple[int, int], batch: int = 8
) -> list[np.ndarray]:
    """The calibration inputs at ``size`` from ``make`` (N x 3 x H x W), in batches."""
    x = make(size).to("cpu", torch.float32).contiguous().numpy()
    return [x[i : i + batch] for i in range(0, len(x), batch)]
