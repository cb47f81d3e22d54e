"""Hostile run folders: ``gapcam.json`` and the safetensors files of a checkpoint are checked
before anything they claim is allocated, and every refusal is one printable line.

Each malformed run folder is a copy of a valid one (the embedded backbone with a seeded head)
with one thing changed, tried through ``gapcam.load_checkpoint`` and through the real
``gapcam localize --checkpoint RUN`` (``gapcam.cli.main`` in-process). Tampered
``train_state.safetensors`` files go through ``gapcam train --resume``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EXAMPLES, SHAPES, write_shapes_run
from safetensors.torch import load_file, save_file

import gapcam
from gapcam.cli import main
from gapcam.models import checkpoint, registry
from gapcam.models.checkpoint import MAX_CLASSES, MAX_METADATA_BYTES, checkpoint_files
from gapcam.train.synthetic import generate

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def one_line(err: str) -> str:
    """The one error line a refusal prints: short, printable, no traceback."""
    assert "Traceback" not in err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1, err
    assert len(lines[0]) < 300, lines[0]
    assert not CONTROL.search(lines[0]), lines[0]
    return lines[0]


def localize_checkpoint(run: Path, out: Path) -> int:
    """``gapcam localize examples/cat.png --checkpoint RUN --out OUT``: its exit code."""
    return main(
        ["localize", str(EXAMPLES / "cat.png"), "--checkpoint", str(run), "--out", str(out)]
    )


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_run(tmp_path_factory.mktemp("valid"))


def document(run: Path) -> dict[str, Any]:
    return json.loads((run / "gapcam.json").read_text())


def changed(valid: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of ``valid`` whose gapcam.json went through ``change``."""
    run = Path(shutil.copytree(valid, tmp_path / "run"))
    meta = document(run)
    change(meta)
    (run / "gapcam.json").write_text(json.dumps(meta))
    return run


def setter(*path: str | int, value: object) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        target: Any = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal from gapcam.json alone comes before any backbone or head is built."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("built something before the checkpoint was checked")

    monkeypatch.setattr(registry, "build_model", refuse)
    monkeypatch.setattr(checkpoint, "replace_classifier", refuse)


# (case, change of gapcam.json, fragment of the one-line reason)
MALFORMED = [
    ("names-number", setter("class_names", value=7), "class_names is a int, not a list"),
    ("names-empty", setter("class_names", value=[]), "class_names is empty"),
    ("names-object", setter("class_names", value={"a": 1}), "class_names is a dict"),
    ("name-number", setter("class_names", 1, value=3), "class name 1 3 is a int"),
    ("name-blank", setter("class_names", 1, value="  "), "class name 1 '  ' is empty"),
    ("name-newline", setter("class_names", 0, value="cat\ndog"), "0 'cat\\ndog' has control"),
    (
        "name-escape",
        setter("class_names", 2, value="\x1b]0;TITLE\x07\x1b[31mred"),
        "class name 2 '\\x1b]0;TITLE\\x07\\x1b[31mred' has control characters",
    ),
    ("name-bidi", setter("class_names", 0, value="abc\u202edef"), "has control characters"),
    ("name-huge", setter("class_names", 1, value="x" * 100_000), "100000 characters long"),
    ("backbone-number", setter("backbone", value=42), "backbone is 42, not a model name"),
    ("backbone-list", setter("backbone", value=["a"]), "backbone is ['a'], not a model name"),
    ("backbone-escape", setter("backbone", value="\x1b[2Jnet"), "backbone '\\x1b[2Jnet' is not"),
    ("backbone-huge", setter("backbone", value="n" * 50_000), "is not a model name"),
    ("weights-number", setter("backbone_weights", value=3), "backbone_weights is 3"),
    ("sha-number", setter("tensors_sha256", value=5), "tensors_sha256 is 5"),
    (
        "size-zero",
        setter("preprocess", "size", value=[0, 0]),
        "preprocess.size is [0, 0]; expected",
    ),
    ("size-strings", setter("preprocess", "size", value=["224", "224"]), "each 8 to 4096"),
    ("size-huge", setter("preprocess", "size", value=[40000, 40000]), "each 8 to 4096"),
    ("size-bool", setter("preprocess", "size", value=[True, True]), "preprocess.size"),
    ("interpolation", setter("preprocess", "interpolation", value="spline"), "one of nearest"),
    ("resize", setter("preprocess", "resize", value="crop"), "expected one of stretch"),
    ("mean-short", setter("preprocess", "mean", value=[0.5, 0.5]), "3 finite numbers"),
    ("mean-nan", setter("preprocess", "mean", value=[float("nan")] * 3), "3 finite numbers"),
    ("std-zero", setter("preprocess", "std", value=[0, 1, 1]), "each above 0"),
    ("preprocess-string", setter("preprocess", value="imagenet"), "preprocess is 'imagenet'"),
    ("format", setter("format", value="gapcam.checkpoint/9"), "is not a gapcam.checkpoint/1"),
]


@pytest.mark.parametrize(("case", "change", "fragment"), MALFORMED, ids=[m[0] for m in MALFORMED])
@pytest.mark.usefixtures("nothing_built")
def test_malformed_gapcam_json_is_refused_before_anything_is_built(
    valid_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    change: Callable[[dict[str, Any]], None],
    fragment: str,
) -> None:
    run = changed(valid_run, tmp_path, change)
    with pytest.raises(gapcam.ModelError) as caught:
        gapcam.load_checkpoint(run)
    message = str(caught.value)
    assert message.startswith(f"checkpoint={str(run)!r}: gapcam.json")
    assert fragment in message, message
    assert "\n" not in message
    assert not CONTROL.search(message)
    code = localize_checkpoint(run, tmp_path / "out")
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"gapcam: error: --checkpoint {run}: gapcam.json")
    assert not (tmp_path / "out").exists()


def test_the_valid_run_loads(valid_run: Path) -> None:
    """The control: the folder every malformed case starts from loads."""
    model = gapcam.load_checkpoint(valid_run)
    assert model.class_names == tuple(SHAPES)
    assert model.name == "efficientnet_lite0+shapes-run"


@pytest.mark.usefixtures("nothing_built")
def test_three_million_class_names_fail_fast(valid_run: Path, tmp_path: Path) -> None:
    """A 15 MB gapcam.json naming 3 million classes: refused by the count, before the 15 GB
    head such a list asks for."""
    run = changed(valid_run, tmp_path, setter("class_names", value=["c"] * 3_000_000))
    started = time.perf_counter()
    with pytest.raises(gapcam.ModelError, match=r"3,000,000 class names, over the limit"):
        gapcam.load_checkpoint(run)
    assert time.perf_counter() - started < 1.0


@pytest.mark.usefixtures("nothing_built")
def test_class_names_that_the_tensors_do_not_have_are_refused_from_the_header(
    valid_run: Path, tmp_path: Path
) -> None:
    """Within the limit, the names are counted against head.weight's rows in the safetensors
    header, before the backbone or the head is built."""
    names = [f"class {i}" for i in range(MAX_CLASSES)]
    run = changed(valid_run, tmp_path, setter("class_names", value=names))
    with pytest.raises(gapcam.ModelError) as caught:
        gapcam.load_checkpoint(run)
    assert "head.weight is (3, 1280), but gapcam.json names 100,000 classes" in str(caught.value)


@pytest.mark.parametrize("depth", [200_000, 5_000])
@pytest.mark.usefixtures("nothing_built")
def test_deeply_nested_json_is_refused(
    valid_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], depth: int
) -> None:
    run = Path(shutil.copytree(valid_run, tmp_path / "run"))
    text = json.dumps(document(run))
    nested = text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    (run / "gapcam.json").write_text(nested)
    with pytest.raises(gapcam.ModelError, match=r"gapcam\.json is nested too deeply"):
        gapcam.load_checkpoint(run)
    (run / "gapcam.json").write_text("[" * depth + "]" * depth)
    code = localize_checkpoint(run, tmp_path)
    assert code == 2
    assert "nested too deeply" in one_line(capsys.readouterr().err)


@pytest.mark.usefixtures("nothing_built")
def test_a_huge_gapcam_json_is_not_read(valid_run: Path, tmp_path: Path) -> None:
    """A sparse 64 GB file: refused after reading at most the limit, at once."""
    run = Path(shutil.copytree(valid_run, tmp_path / "run"))
    with (run / "gapcam.json").open("r+b") as stream:
        stream.truncate(1 << 36)
    started = time.perf_counter()
    with pytest.raises(
        gapcam.ModelError, match=f"gapcam.json is over {MAX_METADATA_BYTES:,} bytes"
    ):
        gapcam.load_checkpoint(run)
    assert time.perf_counter() - started < 5.0


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\xff\xfe\x00not utf-8", "gapcam.json is not valid JSON"),
        (b'{"format": "gapcam.checkpoint/1", "backbone": ', "gapcam.json is not valid JSON"),
        (b"", "gapcam.json is not valid JSON"),
    ],
)
@pytest.mark.usefixtures("nothing_built")
def test_gapcam_json_that_is_not_json(
    valid_run: Path, tmp_path: Path, content: bytes, fragment: str
) -> None:
    run = Path(shutil.copytree(valid_run, tmp_path / "run"))
    (run / "gapcam.json").write_bytes(content)
    with pytest.raises(gapcam.ModelError, match=fragment):
        gapcam.load_checkpoint(run)


def _header_only(path: Path, header: dict[str, Any], data: int) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with path.open("r+b") as stream:
        stream.truncate(8 + len(text) + data)


@pytest.mark.parametrize(
    "kind", ["garbage", "header-lies", "huge-tensor", "extra-tensor", "wide-head"]
)
def test_tensor_files_are_checked_from_their_header(
    valid_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    run = Path(shutil.copytree(valid_run, tmp_path / "run"))
    target = run / "model.safetensors"
    tensors = load_file(str(target))
    if kind == "garbage":
        target.write_bytes(b"not a safetensors file at all")
        fragment = "model.safetensors is not a readable safetensors file"
    elif kind == "header-lies":  # claims 15 GB in a file of a few bytes
        rows = 3_000_000 * 1280 * 4
        _header_only(
            target,
            {
                "head.weight": {
                    "dtype": "F32",
                    "shape": [3_000_000, 1280],
                    "data_offsets": [0, rows],
                }
            },
            16,
        )
        fragment = "not a readable safetensors file"
    elif kind == "huge-tensor":  # a sparse file that really is 15 GB: refused from the header
        size = 3_000_000 * 1280 * 4
        offsets = [0, size]
        _header_only(
            target,
            {"head.weight": {"dtype": "F32", "shape": [3_000_000, 1280], "data_offsets": offsets}},
            size,
        )
        fragment = "head.weight is (3000000, 1280), but gapcam.json names 3 classes"
    elif kind == "extra-tensor":
        save_file({**tensors, "junk": torch.zeros(4)}, str(target))
        fragment = "model.safetensors holds 'junk', which the backbone efficientnet_lite0 has not"
    else:
        wide = {"head.weight": torch.zeros(3, 7), "head.bias": tensors["head.bias"]}
        save_file(wide, str(target))
        fragment = "head.weight is (3, 7), expected (3, 1280)"
    started = time.perf_counter()
    code = localize_checkpoint(run, tmp_path / "out")
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert fragment in line, line
    assert time.perf_counter() - started < 30  # nothing of the 15 GB was read


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        (["a", "b\nc", "d"], "class name 1 'b\\nc' has control characters"),
        (["a", "", "c"], "class name 1 '' is empty"),
        ("abc", "class_names is a str"),
    ],
)
def test_a_checkpoint_with_bad_class_names_is_never_written(names: Any, fragment: str) -> None:
    tensors = {"head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}
    with pytest.raises(gapcam.ModelError) as caught:
        checkpoint_files(tensors, {"backbone": "resnet18", "class_names": names})
    assert fragment in str(caught.value)


def test_head_rows_must_match_the_names_when_written() -> None:
    tensors = {"head.weight": torch.zeros(2, 4), "head.bias": torch.zeros(2)}
    with pytest.raises(gapcam.ModelError, match=r"head.weight is \(2, 4\), for 3 class names"):
        checkpoint_files(tensors, {"backbone": "resnet18", "class_names": ["a", "b", "c"]})


@pytest.mark.parametrize(
    "name", ["new\nline", "\x1b]0;TITLE\x07\x1b[31mred", "tab\there", "bidi\u202eevil"]
)
def test_train_refuses_class_folders_whose_names_would_break_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    data = tmp_path / "data"
    generate(data, classes=2, per_class=2, val_per_class=1, size=32, seed=0)
    for split in ("train", "val"):
        (data / split / "circle").rename(data / split / name)
    code = main(["train", str(data), "--out", str(tmp_path / "run"), "--no-cache"])
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert "has control characters" in line
    assert "rename it" in line
    assert not (tmp_path / "run").exists()


# -- gapcam train --resume with a tampered state ---------------------------------------------


@pytest.fixture(scope="module")
def resumable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, run, feature cache): a 2-epoch run of 2 classes that ``--resume`` continues."""
    root = tmp_path_factory.mktemp("resumable")
    data, run, cache = root / "data", root / "run", root / "cache"
    generate(data, classes=2, per_class=3, val_per_class=1, size=64, seed=0)
    argv = ["train", str(data), "--out", str(run), "--cache-dir", str(cache)]
    assert main([*argv, "--epochs", "2", "--overlays", "0", "-q"]) == 0
    return data, run, cache


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "train_state.safetensors"))


def _save_state(run: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(run / "train_state.safetensors"))


def tamper_state(kind: str, run: Path) -> str:
    """Damage the copy ``run`` one way; the fragment its refusal names."""
    state = _state(run)
    if kind == "missing-norm":
        del state["norm.mean"]
        fragment = "norm.mean is missing"
    elif kind == "missing-best":
        del state["head.best.head.weight"]
        fragment = "head.best.head.weight is missing"
    elif kind == "wrong-shape":
        state["head.last.head.weight"] = torch.zeros(2, 7)
        fragment = "head.last.head.weight is F32 (2, 7), expected F32 (2, 1280)"
    elif kind == "wrong-dtype":
        state["norm.std"] = state["norm.std"].double()
        fragment = "norm.std is F64 (1280,), expected F32 (1280,)"
    elif kind == "int-optimizer":
        state["head.optim.0.exp_avg"] = state["head.optim.0.exp_avg"].long()
        fragment = "head.optim.0.exp_avg is I64 (2, 1280), expected a float (2, 1280)"
    elif kind == "optimizer-shape":
        state["head.optim.1.exp_avg"] = torch.zeros(5)
        fragment = "head.optim.1.exp_avg is F32 (5,), expected a float (2,)"
    elif kind == "optimizer-index":
        state["head.optim.9.exp_avg"] = torch.zeros(2)
        fragment = "head.optim.9.exp_avg: no parameter 9 is optimised"
    elif kind == "unexpected":
        state["\x1b[31mevil"] = torch.zeros(1)
        fragment = "unexpected tensor '\\x1b[31mevil'"
    elif kind == "not-safetensors":
        (run / "train_state.safetensors").write_bytes(b"PK\x03\x04 a zip, say")
        return "train_state.safetensors is not a readable safetensors file"
    else:
        raise AssertionError(kind)
    _save_state(run, state)
    return fragment


STATE_DAMAGE = [
    "missing-norm",
    "missing-best",
    "wrong-shape",
    "wrong-dtype",
    "int-optimizer",
    "optimizer-shape",
    "optimizer-index",
    "unexpected",
    "not-safetensors",
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", STATE_DAMAGE)
def test_resume_with_a_tampered_state_file_is_one_line(
    resumable: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    data, valid, cache = resumable
    run = Path(shutil.copytree(valid, tmp_path / "run"))
    fragment = tamper_state(kind, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    code = main(["train", str(data), "--out", str(run), "--cache-dir", str(cache), "--resume"])
    out = capsys.readouterr()
    line = one_line(out.err)
    assert code == 2
    assert line.startswith("gapcam: error: --resume: ")
    assert fragment in line, line
    assert "features:" not in out.out  # refused before any feature was computed
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


GAPCAM_JSON_DAMAGE = [
    ("no-settings", setter("training", value=[]), "has no training settings and phases"),
    ("lr-string", setter("training", "settings", "lr", value="fast"), "setting lr is 'fast'"),
    ("seed-huge", setter("training", "settings", "seed", value=2**70), "setting seed is 1180591"),
    ("no-history", setter("training", "phases", "head", "history", value=None), "history is not"),
    (
        "epoch-huge",
        setter("training", "phases", "head", "epoch", value=10**15),
        "history does not hold",
    ),
    (
        "prediction",
        setter("training", "phases", "head", "best_predictions", value=[7]),
        "best_predictions",
    ),
    ("phase-name", setter("training", "phases", value={"warmup": {}}), "lists the training phases"),
    ("no-dataset", setter("dataset", value=7), None),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "change", "fragment"), GAPCAM_JSON_DAMAGE, ids=[c[0] for c in GAPCAM_JSON_DAMAGE]
)
def test_resume_with_a_tampered_training_record_is_one_line(
    resumable: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    change: Callable[[dict[str, Any]], None],
    fragment: str | None,
) -> None:
    """gapcam.json's ``training`` part, which only resuming reads, is checked as well; a damaged
    ``dataset`` record only means the images are taken as changed."""
    data, valid, cache = resumable
    run = changed(valid, tmp_path, change)
    capsys.readouterr()
    argv = ["train", str(data), "--out", str(run), "--cache-dir", str(cache), "--resume"]
    code = main([*argv, "--epochs", "3", "--overlays", "0"])
    out = capsys.readouterr()
    if fragment is None:
        assert code == 0, out.err
        assert "note: the images changed since the run started" in out.out
        return
    line = one_line(out.err)
    assert code == 2
    assert fragment in line, line


def test_a_run_folder_named_with_escapes_is_shown_escaped(
    valid_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(valid_run, tmp_path / "run\x1b[31m\nx"))
    os.remove(run / "model.safetensors")
    code = localize_checkpoint(run, tmp_path / "o")
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert "run\\x1b[31m\\nx" in line
    assert gapcam.load_checkpoint(valid_run).name == "efficientnet_lite0+shapes-run"


@pytest.mark.slow
def test_resume_after_a_validation_image_was_added_rescores_the_best_epoch(
    resumable: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The best epoch's predictions were made on 2 validation images; the data now has 3 and no
    epoch is left to run: the head's best epoch is scored again on the 3 (before, the record
    of 2 predictions for 3 images ended in a ValueError traceback)."""
    data, valid, cache = resumable
    data = Path(shutil.copytree(data, tmp_path / "data"))
    generate(tmp_path / "more", classes=2, per_class=2, val_per_class=2, size=64, seed=5)
    shutil.copy(tmp_path / "more" / "val" / "square" / "square-0001.png", data / "val" / "square")
    run = Path(shutil.copytree(valid, tmp_path / "run"))
    capsys.readouterr()
    argv = ["train", str(data), "--out", str(run), "--cache-dir", str(cache), "--resume"]
    code = main([*argv, "--epochs", "2", "--overlays", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "note: the images changed since the run started" in out.out
    metrics = document(run)["metrics"]
    assert metrics["val_images"] == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == 3
    assert metrics["epochs_run"] == 2


def test_a_checkpoint_that_is_no_folder_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(EXAMPLES / "cat.png")
    for given, said in [("nosuch", "no such folder"), (image, "is a file, not a folder")]:
        argv = ["localize", image, "--checkpoint", given, "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        assert capsys.readouterr().err == (
            f"gapcam: error: --checkpoint {given}: {said}; give a folder made by `gapcam train`\n"
        )
