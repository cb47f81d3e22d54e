"""The one translation of command-line flags into library keywords, and back for errors."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gapcam import cli
from gapcam.cli.options import flag_message, localizer_options
from gapcam.errors import GapcamError, ModelError
from gapcam.localizer import Localizer
from gapcam.models import GapModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("precision='float16' needs a GPU", "--precision float16 needs a GPU"),
        ("input_size=300: must be a multiple of 32", "--input-size 300: must be a multiple of 32"),
        (
            "checkpoint= and model=/weights=: give one",
            "--checkpoint and --model/--weights: give one",
        ),
        ('device="cuda:1": only 1 CUDA device(s)', "--device cuda:1: only 1 CUDA device(s)"),
        ("threshold=0.5 and top_k=3", "--threshold 0.5 and top_k=3"),  # not a flag: left alone
        ("exists; pass overwrite=True", "exists; pass --overwrite"),
        ("name=a.jpg, classes_per_image=...", "name=a.jpg, classes_per_image=..."),
    ],
)
def test_library_keywords_become_the_flags_typed(message: str, expected: str) -> None:
    flags = {"precision", "input_size", "checkpoint", "model", "weights", "device", "threshold"}
    flags.add("overwrite")
    assert flag_message(message, flags) == expected


def test_the_library_names_keywords_not_flags() -> None:
    with pytest.raises(ModelError) as caught:
        Localizer(precision="float16")
    assert "--" not in str(caught.value)
    assert str(caught.value).startswith("precision='float16' needs a GPU")


def test_every_front_end_reads_the_same_localizer_flags() -> None:
    """localize, evaluate and serve: the flags each has reach the Localizer, the rest do not."""
    local = localizer_options(
        parse("localize", "x", "--threshold", "0.3", "--preset", "fine", "--workers", "0")
    )
    assert local["threshold"] == 0.3
    assert local["input_size"] == 288
    assert local["streams"] == 1  # --workers 0: the sequential loop, one stream
    evaluated = localizer_options(parse("evaluate", "d", "--hflip", "--precision", "bfloat16"))
    assert evaluated["hflip"] is True
    assert evaluated["precision"] == "bfloat16"
    assert "normalize" not in evaluated  # evaluate has no --normalize: the library default
    assert "streams" not in evaluated
    served = localizer_options(parse("serve", "--backend", "onnx", "--scales", "1", "1.5"))
    assert served["backend"] == "onnx"
    assert served["scales"] == (1.0, 1.5)
    assert set(localizer_options(parse("serve"))) <= {
        "model",
        "weights",
        "checkpoint",
        "device",
        "backend",
        "precision",
        "max_pixels",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--input-size", "300"],
            "--input-size 300: must be a multiple of 32 (the feature grid's stride), e.g. 288",
        ),
        (["--ray-address", "auto"], "--ray-address: only with --engine ray"),
        (["--backend", "eager", "--streams", "2"], "--streams 2: only the onnx backend runs"),
        (["--precision", "float16"], "--precision float16 needs a GPU"),
        (["--top-k", "2", "--class", "285"], "--top-k: not with --class"),
        (["--no-overlay", "--cmap", "viridis"], "--cmap: not with --no-overlay"),
        (["--no-overlay", "--alpha", "0.3", "--format", "jpg"], "--alpha, --format: not with"),
        (["--workers", "0", "--streams", "2"], "--streams 2: --workers 0 runs one stream"),
        (["--streams", "2", "--precision", "bfloat16"], "--streams 2: only the onnx backend"),
        (["--engine", "ray", "--json", "r.json"], "--json: not with --engine ray"),
        (["--engine", "ray", "--save-cam"], "--save-cam: not with --engine ray"),
        (["--engine", "ray", "--input-size", "300"], "--input-size 300: must be a multiple"),
        (["--top-k", "1001"], "--top-k 1001: efficientnet_lite0 has 1000 classes; give at most"),
    ],
)
def test_what_a_user_types_is_used_or_refused_in_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["localize", str(EXAMPLES / "cat.png"), "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"gapcam: error: {message}")
    assert not any(tmp_path.iterdir())


def test_a_localizer_is_immutable_and_replace_makes_a_variant(tiny: GapModel) -> None:
    import dataclasses

    tiny_localizer = Localizer(tiny)

    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_localizer.threshold = 0.7  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_localizer.backend = "onnx"  # type: ignore[misc]
    variant = dataclasses.replace(tiny_localizer, threshold=0.7)
    assert variant.threshold == 0.7
    assert variant.gap_model is tiny_localizer.gap_model  # the model is not built again
    assert tiny_localizer.threshold == 0.2
    with pytest.raises(GapcamError, match=r"threshold=7\.0: must be between 0 and 1"):
        dataclasses.replace(tiny_localizer, threshold=7.0)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # file names are never taken for keywords: values are repr()s
        ("out=old.png: not an image", "out=old.png: not an image"),
        ("/tmp/fm/out=old.png: not an image", "/tmp/fm/out=old.png: not an image"),
        ("out=3.png: not an image", "out=3.png: not an image"),
        ("out='run': is a file", "--out run: is a file"),
        ("or pass out=DIR, or", "or pass --out DIR, or"),  # a placeholder
        # the parser's spelling, and tuples as typed
        ("classes=['x']: not a class", "--class x: not a class"),
        ("scales=(0.05,): give factors", "--scales 0.05: give factors"),
        ("scales=(1.0, 1.5) and cache=False", "--scales 1.0 1.5 and --no-cache"),
    ],
)
def test_only_library_keywords_are_rewritten(message: str, expected: str) -> None:
    flags = {"out": "--out", "classes": "--class", "scales": "--scales", "cache": "--no-cache"}
    assert flag_message(message, flags) == expected


def test_a_file_named_like_a_keyword_keeps_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "out=old.png"
    bad.write_bytes(b"not an image")
    assert cli.main(["localize", str(bad), "--out", str(tmp_path / "o"), "--json", "-"]) == 1
    captured = capsys.readouterr()
    assert "out=old.png" in captured.err
    assert "--out old.png" not in captured.err + captured.out


def test_a_variant_cannot_change_what_the_model_was_built_from(tiny: GapModel) -> None:
    import dataclasses

    loc = Localizer(tiny)
    assert loc.weights is None
    with pytest.raises(GapcamError, match=r"weights='random': the model is already built"):
        dataclasses.replace(loc, weights="random")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input_size": 300}, "input_size=300: must be a multiple of 32"),
        ({"threshold": 1.5}, "threshold=1.5: must be between 0 and 1"),
        ({"scales": (0.01,)}, "scales=(0.01,): give one or more factors"),
        ({"backend": "tpu"}, "backend='tpu': use one of"),
        ({"precision": "int4"}, "precision='int4': use one of"),
    ],
)
def test_settings_are_checked_without_building_the_model(
    options: dict[str, object], message: str
) -> None:
    Localizer.check_options({"model": "resnet50", "weights": "nowhere.pth"})  # nothing built
    with pytest.raises(GapcamError, match=re.escape(message)):
        Localizer.check_options({"model": "resnet50", **options})


def test_presets_are_the_models_own() -> None:
    """The embedded models' presets come from their own measurements (MODEL_PRESETS); other
    models and checkpoints get the generic ones."""
    lite0 = localizer_options(parse("localize", "x", "--preset", "best"))
    assert (lite0["input_size"], lite0["output_stride"], lite0["hflip"]) == (288, 16, True)
    lite2 = localizer_options(
        parse("localize", "x", "--model", "efficientnet_lite2", "--preset", "best")
    )
    assert lite2["scales"] == (1.0, 1.5)
    assert "output_stride" not in lite2
    lite1 = localizer_options(
        parse("evaluate", "d", "--model", "efficientnet_lite1", "--preset", "fine")
    )
    assert not {"input_size", "scales", "output_stride", "hflip"} & {
        k for k, v in lite1.items() if v not in (None, False)
    }  # Lite1's curve has no step between its single pass and best
    resnet = localizer_options(parse("serve", "--model", "resnet50", "--preset", "fine"))
    assert resnet["input_size"] == 288
    assert "output_stride" not in resnet
    run = localizer_options(parse("serve", "--checkpoint", "run", "--preset", "fine"))
    assert "output_stride" not in run
    explicit = localizer_options(
        parse("localize", "x", "--preset", "fine", "--output-stride", "32")
    )
    assert explicit["output_stride"] == 32  # a flag overrides the preset
