"""Inference backends: who runs ``GapModel.features`` (the only heavy step of a CAM).

- ``eager``: the PyTorch module itself (the reference; any device; weights read live).
- ``onnx``: the feature extractor exported once to ONNX (``torch.onnx.export``, opset 17,
  dynamic batch) and run by ONNX Runtime on the CPU (faster than eager there: measured in
  docs/speed.md). Needs ``onnxruntime`` (``pip install gapcam[fast]``).
- ``auto``: ``onnx`` when onnxruntime is installed, the model is on the CPU in float32 and it
  exports; otherwise ``eager``, with a note saying why.

Only the feature maps come from the backend: logits and CAMs are still computed from them with
the classifier read live, so ``logits(features(x)) == module(x)`` keeps its meaning. The ONNX
backend snapshots the *backbone* when it is first used; the tests hold it to eager within
``FEATURE_TOLERANCE`` (relative to the feature scale).

Exported models are cached (atomic writes; deleting the folder is always safe)::

    CACHE/onnx/<model>-<key>.onnx    key = sha256(model name, every tensor of the module
                                     (``models.base.weights_digest``), input size, gapcam,
                                     torch, onnxruntime and opset versions)

``CACHE`` is ``$GAPCAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/gapcam``, else ``~/.cache/gapcam``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gapcam._version import __version__
from gapcam.cache import cache_dir
from gapcam.errors import ModelError
from gapcam.models.base import GapModel, inference_state, weights_digest
from gapcam.outputs import atomic_write
from gapcam.types import BACKENDS, PRECISIONS

OPSET = 17

#: the first line of the weights digest in the cache key (``models.base.weights_digest``)
DIGEST_KIND = "gapcam.onnx/3"  # 2: constant TF padding (static_padding); 3: no Pad nodes

#: ORT's intra-op threads busy-wait between runs when "1"
SPINNING = "0"

#: |onnx - eager| <= FEATURE_TOLERANCE * max(1, max |eager|), checked on every fresh export.
FEATURE_TOLERANCE = 1e-3


class Backend(Protocol):
    """Who runs ``GapModel.features``: ``name`` (``eager`` or ``onnx``), ``note`` (why ``auto``
    chose it, or "") and the features of an N x 3 x H x W input."""

    name: str
    note: str

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


def onnx_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


class EagerBackend:
    """The PyTorch module: the reference every other backend is tested against.

    Built-in models (torchvision, timm, the embedded default and checkpoints of them) get their
    input in the channels-last memory format on CPU and CUDA, which carries through their
    convolutions: the same values up to float rounding (~1e-6 relative), and faster on a CPU
    (measured in docs/speed.md). The module itself is not touched (its tensors stay contiguous, so a
    caller's ``state_dict`` saves as before). Modules wrapped with ``from_module`` get the
    default layout, since user code may ``view`` feature maps in ways that need it.
    """

    name = "eager"

    def __init__(self, model: GapModel, note: str = "", precision: str = "float32") -> None:
        self.model = model
        self.note = note
        self.precision = check_precision(precision, model.device)
        self.channels_last = model.source != "custom" and model.device.type in ("cpu", "cuda")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "float32":
            return self.model.features(x)
        dtype = getattr(torch, self.precision)
        with torch.autocast(self.model.device.type, dtype=dtype):
            features = self.model.features(x)
        return features.float()  # the CAM and the logits stay float32 with the live weights


class _FeatureModule(nn.Module):
    def __init__(self, model: GapModel, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.inner = model.module if inner is None else inner
        self.feature_fn = model.feature_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_fn(self.inner, x)


class OnnxBackend:
    """ONNX Runtime on the CPU; one exported model (and session) per input size.

    ``threads``: intra-op threads per run (default: torch's thread count). ``features`` may be
    called from several threads at once (ONNX Runtime sessions are thread-safe): see
    ``Localizer(streams=...)``, which gives each of its streams a share of the cores.
    """

    name = "onnx"

    def __init__(
        self,
        model: GapModel,
        root: Path | None = None,
        threads: int = 0,
        calibration: Callable[[tuple[int, int]], torch.Tensor] | None = None,
    ) -> None:
        if not onnx_available():
            raise ModelError(
                "backend 'onnx' needs onnxruntime and onnx: pip install 'gapcam[fast]', "
                "or use backend='eager'"
            )
        if model.device.type != "cpu" or model.weight.dtype != torch.float32:
            raise ModelError(
                f"backend 'onnx' runs float32 models on the CPU; {model.name} is "
                f"{model.weight.dtype} on {model.device}: use backend='eager'"
            )
        self.model = model
        self.root = root or cache_dir()
        self.threads = threads or torch.get_num_threads()
        self.note = ""
        #: int8 when given: the calibration inputs at a size (``gapcam.quantize``)
        self.calibration = calibration
        self._digest = weights_digest(model, DIGEST_KIND)
        self._sessions: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        session = self._sessions.get(size)
        if session is None:
            with self._lock:  # one export per size, however many threads ask at once
                session = self._sessions.get(size)
                if session is None:
                    session = self._sessions[size] = self._session(size)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = session.run(None, {"input": array})
        return torch.from_numpy(out)

    def path(self, size: tuple[int, int]) -> Path:
        import onnxruntime

        key = hashlib.sha256(
            "\n".join(
                [
                    self._digest,
                    f"{size[0]}x{size[1]}",
                    f"gapcam {__version__}",
                    f"torch {torch.__version__}",
                    f"onnxruntime {onnxruntime.__version__}",
                    f"opset {OPSET}",
                ]
            ).encode()
        ).hexdigest()
        return self.root / "onnx" / f"{self.model.name.replace(':', '-')}-{key[:24]}.onnx"

    def _session(self, size: tuple[int, int]) -> Any:
        import onnxruntime as ort

        path = self.path(size)
        if not path.is_file():
            atomic_write(path, export_features(self.model, size), overwrite=True)
        if self.calibration is not None:
            path = self._int8(path, size)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # no busy-waiting between runs: decoding and encoding threads need the cores too
        options.add_session_config_entry("session.intra_op.allow_spinning", SPINNING)
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a corrupt cache entry: drop it, the next run re-exports
            path.unlink(missing_ok=True)
            raise ModelError(f"{path}: ONNX Runtime cannot load it ({exc}); removed") from exc

    def _int8(self, float_path: Path, size: tuple[int, int]) -> Path:
        """The int8 model of ``float_path`` for the calibration at ``size`` (cached)."""
        from gapcam.quantize import calibration_batches, calibration_digest, quantize

        assert self.calibration is not None
        batches = calibration_batches(self.calibration, size)
        key = calibration_digest(batches)[:16]
        path = float_path.with_name(f"{float_path.stem}-int8-{key}.onnx")
        if not path.is_file():
            atomic_write(path, quantize(float_path, batches, self.model.name), overwrite=True)
        return path


def export_features(model: GapModel, size: tuple[int, int]) -> bytes:
    """The feature extractor as ONNX bytes (input ``input`` N x 3 x H x W, output ``features``),
    checked against eager on a seeded input; ``ModelError`` when it cannot be exported."""
    wrapper = _FeatureModule(model, static_padding(model, size))
    probe = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with inference_state(wrapper, tracing=True):
        expected = wrapper(probe)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation, tracer notes
                torch.onnx.export(
                    wrapper,
                    (probe,),
                    buffer,  # type: ignore[arg-type]  # the legacy exporter takes file objects
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=["input"],
                    output_names=["features"],
                    dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
                )
        except Exception as exc:  # the exporter raises many kinds; one line for the user
            raise ModelError(f"{model.name}: cannot export to ONNX ({type(exc).__name__})") from exc
    data = buffer.getvalue()
    _check_export(model.name, data, probe, expected)
    return data


def static_padding(model: GapModel, size: tuple[int, int]) -> nn.Module:
    """``model.module``, or, when it has convolutions that compute TensorFlow "same" padding
    from their input at run time (timm's ``tf_`` models: EfficientNet-Lite), a copy sharing its
    weights in which each pads by the constant amounts of an input of ``size``. An ONNX graph
    of the dynamic padding keeps the shape arithmetic as nodes, which ONNX Runtime's int8
    quantizer mangles (EfficientNet-Lite0 came out with a 6 x 6 grid instead of 7 x 7); the
    constant padding is the same computation for the fixed input size of each export."""
    from gapcam.models.dense import DYNAMIC_PADDING, shared_copy

    dynamic = [
        name
        for name, layer in model.module.named_modules()
        if type(layer).__name__ in DYNAMIC_PADDING
    ]
    if not dynamic:
        return model.module
    inputs: dict[str, tuple[int, int]] = {}
    copy = shared_copy(model.module)
    layers = dict(copy.named_modules())
    handles = [
        layers[name].register_forward_pre_hook(
            lambda _, args, name=name: inputs.__setitem__(name, tuple(args[0].shape[-2:]))
        )
        for name in dynamic
    ]
    try:
        with inference_state(copy):
            model.feature_fn(copy, torch.zeros(1, 3, *size))
    finally:
        for handle in handles:
            handle.remove()
    for name in dynamic:
        layer = layers[name]
        if name in inputs:
            layer.forward = _constant_padding(layer, inputs[name])  # type: ignore[method-assign]
    return copy


def _constant_padding(layer: Any, size: tuple[int, int]) -> Any:
    """``layer``'s forward with its TF "same" padding for inputs of ``size`` as constants.
    Uneven padding (a stride-2 convolution of an even side pads one more at the end) exports
    as one ONNX ``Conv`` with uneven ``pads`` (``_UnevenConv``), not a ``Pad`` node before it:
    ONNX Runtime runs a ``Pad`` as a copy of the whole activation, outside its blocked layout
    (with a layout change on each side) and, in an int8 graph, in float32 between a
    dequantization and a quantization; the five of EfficientNet-Lite0 took 30% of its float32
    forward pass and half of its int8 one (measured in docs/speed.md)."""
    from timm.layers.padding import get_same_padding  # the layer's own rule (timm's pad_same)

    pads = []
    for side, k, s, d in zip(size, layer.kernel_size, layer.stride, layer.dilation, strict=True):
        total = get_same_padding(side, k, s, d)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads

    def forward(x: torch.Tensor) -> torch.Tensor:
        if top == bottom and left == right:  # one convolution with its own padding
            return torch.nn.functional.conv2d(
                x, layer.weight, layer.bias, layer.stride, (top, left), layer.dilation, layer.groups
            )
        conv = (tuple(layer.stride), tuple(layer.dilation), layer.groups)
        return _UnevenConv.apply(x, layer.weight, layer.bias, conv, (top, left, bottom, right))

    return forward


class _UnevenConv(torch.autograd.Function):
    """A convolution with uneven zero padding ``(top, left, bottom, right)``: ``F.pad`` then
    ``F.conv2d`` when run, one ``Conv`` node with those ``pads`` when exported to ONNX (whose
    ``Conv`` takes uneven padding; PyTorch's ``conv2d`` does not)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: tuple[tuple[int, int], tuple[int, int], int],
        pads: tuple[int, int, int, int],
    ) -> torch.Tensor:
        (stride, dilation, groups), (top, left, bottom, right) = conv, pads
        x = torch.nn.functional.pad(x, (left, right, top, bottom))
        return torch.nn.functional.conv2d(x, weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(
        g: Any,
        x: Any,
        weight: Any,
        bias: Any,
        conv: tuple[tuple[int, int], tuple[int, int], int],
        pads: tuple[int, int, int, int],
    ) -> Any:
        (stride, dilation, groups), kernel = conv, weight.type().sizes()[2:]
        inputs = [x, weight] if bias is None or bias.node().mustBeNone() else [x, weight, bias]
        return g.op(
            "Conv",
            *inputs,
            kernel_shape_i=list(kernel),
            strides_i=list(stride),
            dilations_i=list(dilation),
            group_i=groups,
            pads_i=list(pads),
        )


def _check_export(name: str, data: bytes, probe: torch.Tensor, expected: torch.Tensor) -> None:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"input": probe.numpy()})
        error = float((torch.from_numpy(got) - expected).abs().max())
    except Exception:  # e.g. a graph traced to a constant has no input left; bad shapes
        error = float("inf")
    scale = max(1.0, float(expected.abs().max()))
    if not error <= FEATURE_TOLERANCE * scale:
        raise ModelError(
            f"{name}: the ONNX export differs from eager (max error {error:.2g}); "
            "use backend='eager'"
        )


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``ModelError`` (one line) otherwise."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(
            f"device={str(device)!r}: not a device; use cpu, cuda, cuda:N or mps"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device={str(device)!r}: no CUDA GPU is available here; use cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ModelError(
            f"device={str(device)!r}: only {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device={str(device)!r}: MPS (Apple GPU) is not available here; use cpu")
    return resolved


def check_choices(backend: str, precision: str) -> None:
    """``backend`` and ``precision`` are among the choices (``BACKENDS``, ``PRECISIONS``);
    whether this machine can run them is for ``make_backend`` to say."""
    if backend not in BACKENDS:
        raise ModelError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ModelError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and backend == "eager":
        raise ModelError(
            "precision='int8' runs on the ONNX backend: use backend='onnx' or backend='auto'"
        )


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` when the eager backend can run it on ``device``; ``ModelError`` otherwise."""
    check_choices("eager", precision)
    if precision == "int8":
        raise ModelError(
            "precision='int8' runs on the ONNX backend: use backend='onnx' or backend='auto'"
        )
    if precision == "float16" and device.type == "cpu":
        raise ModelError(
            "precision='float16' needs a GPU (device='cuda' or device='mps'); on a CPU use bfloat16"
        )
    if precision == "bfloat16" and device.type == "mps":
        raise ModelError("precision='bfloat16' is not supported on mps; use float16")
    return precision


def make_backend(
    model: GapModel,
    choice: str = "auto",
    size: tuple[int, int] | None = None,
    root: Path | None = None,
    threads: int = 0,
    precision: str = "float32",
    calibration: Callable[[tuple[int, int]], torch.Tensor] | None = None,
) -> Backend:
    """The backend for ``choice`` (see ``BACKENDS``); ``auto`` falls back to eager with a note.

    ``auto`` tries the ONNX export for ``size`` (default: the model's input size) at once, so that an
    unexportable model falls back here rather than in the middle of a run. ``threads``: ONNX
    Runtime's intra-op threads (0: torch's thread count). ``precision`` other than float32 runs
    on the eager backend (autocast): ``auto`` picks it, ``onnx`` refuses; ``int8`` runs on the
    ONNX backend, quantized with ``calibration`` (the calibration inputs at a size), on CPUs
    with 8-bit dot-product instructions (``gapcam.quantize``).
    """
    check_choices(choice, precision)
    if precision == "int8":
        return _int8_backend(model, choice, size, root, threads, calibration)
    check_precision(precision, model.device)
    if choice == "eager" or (choice == "auto" and precision != "float32"):
        note = f"{precision} runs on the eager backend" if choice == "auto" else ""
        return EagerBackend(model, note, precision)
    if precision != "float32":
        raise ModelError(
            f"backend='onnx' runs float32; for precision={precision!r} use backend='eager' "
            "(or backend='auto')"
        )
    if choice == "onnx":
        return OnnxBackend(model, root, threads)
    if not onnx_available():
        return EagerBackend(model, "onnxruntime is not installed (pip install 'gapcam[fast]')")
    if model.device.type != "cpu" or model.weight.dtype != torch.float32:
        return EagerBackend(model, f"the model is {model.weight.dtype} on {model.device}")
    try:
        backend = OnnxBackend(model, root, threads)
        backend.features(torch.zeros(1, 3, *(size or model.preprocess.size)))
    except ModelError as exc:
        return EagerBackend(model, str(exc))
    return backend


def _int8_backend(
    model: GapModel,
    choice: str,
    size: tuple[int, int] | None,
    root: Path | None,
    threads: int,
    calibration: Callable[[tuple[int, int]], torch.Tensor] | None,
) -> Backend:
    from gapcam.quantize import int8_support

    if choice == "eager":
        raise ModelError(
            "precision='int8' runs on the ONNX backend: use backend='onnx' or backend='auto'"
        )
    if model.device.type != "cpu":
        raise ModelError(f"precision='int8' runs on the CPU; {model.name} is on {model.device}")
    if calibration is None:
        raise ModelError(
            "precision='int8' needs calibration images (calibration=[...]: a few dozen "
            "representative images, e.g. 32 of your own)"
        )
    reason = int8_support()
    if reason:
        raise ModelError(f"precision='int8': {reason}; use precision='float32'")
    if not onnx_available():
        raise ModelError("precision='int8' needs onnxruntime and onnx: pip install 'gapcam[fast]'")
    backend = OnnxBackend(model, root, threads, calibration)
    backend.features(torch.zeros(1, 3, *(size or model.preprocess.size)))  # quantize now
    return backend
