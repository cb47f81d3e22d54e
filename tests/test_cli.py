"""The ``gapcam`` command line, run as a user runs it: ``python -m gapcam.cli`` in a subprocess.

Every run is offline (TORCH_HOME in a temporary folder, HTTP(S) proxies pointed at a closed
port) and uses the embedded default model unless a test says otherwise. Each test checks the
exit code (0 ok, 1 some inputs failed, 2 bad arguments or model), the messages (one line that
names the file and the reason, never a traceback) and the final summary line.

Loading torch costs a few seconds per process, so the expensive runs are module fixtures shared
by several tests: one mixed batch of good and bad inputs, one run whose --out is its input folder.
The tests that use them are marked ``slow``; ``--help`` and the argument errors (no torch) are not.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gapcam import images, overlay
from gapcam.overlay import display_scale
from gapcam.types import Preprocess

CLI = (sys.executable, "-m", "gapcam")
SUMMARY = re.compile(r"^gapcam: (\d+) of (\d+) inputs done, (\d+) failed$")
GIF_NOTE = "multi-frame file (3 frames): using the first frame"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GRID_GAP = inspect.signature(overlay.grid).parameters["gap"].default


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def summary(self) -> tuple[int, int, int]:
        """(done, total, failed) from the summary, which must be the last line on stderr."""
        match = SUMMARY.match(self.err_lines[-1])
        assert match, f"last stderr line is not the summary: {self.err_lines[-1]!r}"
        done, total, failed = (int(g) for g in match.groups())
        return done, total, failed

    def lines_naming(self, name: str) -> list[str]:
        return [line for line in self.err_lines if name in line]


def assert_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.err, run.err[-2000:]
    assert "Traceback" not in run.out


def assert_usage_error(run: Run, *fragments: str) -> None:
    """Exit 2, nothing on stdout, and exactly one line on stderr holding every fragment."""
    assert run.code == 2, run.err
    assert_no_traceback(run)
    assert run.out == ""
    assert len(run.err_lines) == 1, run.err
    for fragment in fragments:
        assert fragment in run.err_lines[0]


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    closed = "http://127.0.0.1:9"  # discard port: a download attempt fails at once
    env.update(
        TORCH_HOME=str(tmp_path_factory.mktemp("torch-home")),
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
        http_proxy=closed,
        https_proxy=closed,
        COLUMNS="100",
        GAPCAM_CACHE_DIR=str(tmp_path_factory.mktemp("gapcam-cache")),
    )
    return env


@pytest.fixture(scope="module")
def cli(offline_env: dict[str, str]):
    def run(*args: str | Path, cwd: Path | None = None) -> Run:
        done = subprocess.run(
            [*CLI, *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=offline_env,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        return Run(done.returncode, done.stdout, done.stderr)

    return run


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_good_inputs(folder: Path) -> dict[str, str]:
    """Unusual but valid images -> what they exercise."""
    rgb = noise()
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    deep = np.random.default_rng(1).integers(0, 65536, (48, 64)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    with Image.open(folder / "deep16.png") as check:
        assert check.mode == "I;16"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(folder / "rotated.jpg", exif=exif)
    rgb.save(folder / "anim.gif", save_all=True, append_images=[rgb.rotate(90), rgb.rotate(180)])
    return {
        "gray.png": "grayscale",
        "rgba.png": "alpha",
        "palette.png": "palette",
        "cmyk.jpg": "CMYK",
        "deep16.png": "16-bit",
        "rotated.jpg": "EXIF rotation",
        "anim.gif": "multi-frame",
    }


def make_bad_inputs(folder: Path) -> dict[str, str]:
    """Inputs that must fail -> a fragment of the reason their one-line message gives."""
    rgb = noise()
    jpeg, png = encoded(rgb, "JPEG"), encoded(rgb, "PNG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "trunc.png").write_bytes(png[: len(png) // 2])
    (folder / "corrupt.jpg").write_bytes(np.random.default_rng(2).bytes(3000))
    (folder / "text.png").write_text("this is not a picture\n")
    Image.new("1", (3000, 2000)).save(folder / "big.png")  # over --max-pixels 5,000,000
    Image.new("1", (20000, 20000)).save(folder / "huge.png")  # 400 Mpx in ~50 kB
    assert (folder / "huge.png").stat().st_size < 200_000
    rgb.save(folder / "kept.png")  # fine, but its output exists before the run
    return {
        "missing.jpg": "no such file",
        "zero.jpg": "empty (0 bytes)",
        "trunc.jpg": "truncated",
        "trunc.png": "truncated",
        "corrupt.jpg": "not an image file",
        "text.png": "not an image file",
        "big.png": "over the limit of 5,000,000 pixels",
        "huge.png": "20000x20000 pixels is over the limit of 5,000,000 pixels",
        "kept.png": "already exists; pass --overwrite",
    }


@dataclass(frozen=True)
class Batch:
    run: Run
    root: Path
    out: Path
    good: dict[str, str]
    bad: dict[str, str]
    document: dict
    kept_after_run: bytes


@pytest.fixture(scope="module")
def batch(cli, background: Background, tmp_path_factory: pytest.TempPathFactory) -> Batch:
    """One call with good and bad files interleaved (so every batch of 2 mixes them), two
    folders holding files with the same stem, an empty folder and a glob matching nothing.
    (``background`` is requested only to start its runs first.)"""
    root = tmp_path_factory.mktemp("batch")
    inputs = root / "in"
    for sub in ("a", "b", "empty"):
        (inputs / sub).mkdir(parents=True)
    good, bad = make_good_inputs(inputs), make_bad_inputs(inputs)
    noise(seed=5).save(inputs / "a" / "same.png")
    noise(seed=6).save(inputs / "b" / "same.png")
    (inputs / "empty" / "notes.txt").write_text("no images here\n")
    out = root / "out"
    out.mkdir()
    (out / "kept.cam.png").write_bytes(b"an earlier output")
    files = [name for pair in zip(good, bad, strict=False) for name in pair]
    files += [*list(good)[len(bad) :], *list(bad)[len(good) :]]
    run = cli(
        "localize",
        *(f"in/{name}" for name in files),
        "in/a",
        "in/b",
        "in/empty",
        "in/*.nomatch",
        "--out",
        "out",
        "--json",
        "out/run.json",
        "--batch-size",
        "2",
        "--top-k",
        "3",
        "--save-cam",
        "--max-pixels",
        "5000000",
        cwd=root,
    )
    document = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    kept = (out / "kept.cam.png").read_bytes()
    return Batch(run, root, out, good, bad, document, kept)


def result_for(batch: Batch, name: str) -> dict:
    matches = [r for r in batch.document["results"] if r["input"] == f"in/{name}"]
    assert len(matches) == 1, name
    return matches[0]


@pytest.mark.slow
def test_mixed_batch_exit_code_and_summary(batch: Batch) -> None:
    assert batch.run.code == 1, batch.run.err
    assert_no_traceback(batch.run)
    good = len(batch.good) + 2  # + a/same.png, b/same.png
    failed = len(batch.bad) + 2  # + the empty folder, the glob
    assert batch.run.summary() == (good, good + failed, failed)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "missing.jpg",
        "zero.jpg",
        "trunc.jpg",
        "trunc.png",
        "corrupt.jpg",
        "text.png",
        "big.png",
        "huge.png",
        "kept.png",
    ],
)
def test_bad_input_one_line_and_json_error(batch: Batch, name: str) -> None:
    reason = batch.bad[name]
    named = "out/kept.cam.png" if name == "kept.png" else f"in/{name}"  # the file at fault
    lines = batch.run.lines_naming(named)
    assert len(lines) == 1, batch.run.err
    assert lines[0].startswith(f"error: {named}: ")
    assert reason in lines[0]
    errors = [e for e in batch.document["errors"] if e["input"] == f"in/{name}"]
    assert len(errors) == 1
    assert errors[0]["error"] == lines[0].removeprefix("error: ")
    assert not (batch.out / f"{name.rsplit('.', 1)[0]}.cam.npy").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argument", "reason"),
    [("in/empty", "folder holds no image files"), ("in/*.nomatch", "pattern matched no files")],
)
def test_empty_folder_and_unmatched_glob(batch: Batch, argument: str, reason: str) -> None:
    lines = batch.run.lines_naming(argument)
    assert lines == [f"error: {argument}: {reason}" + lines[0].split(reason, 1)[1]]
    error = {"input": argument, "error": lines[0].removeprefix("error: ")}
    assert error in batch.document["errors"]


@pytest.mark.slow
def test_existing_output_is_kept_without_overwrite(batch: Batch) -> None:
    assert batch.kept_after_run == b"an earlier output"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep16.png", "anim.gif"]
)
def test_unusual_modes_work(batch: Batch, name: str) -> None:
    result = result_for(batch, name)
    assert (result["width"], result["height"]) == (64, 48)
    assert len(result["maps"]) == 3
    for entry in result["maps"]:
        for box in entry["boxes"]:
            x0, y0, x1, y1 = box["xyxy"]
            assert 0 <= x0 < x1 <= 64
            assert 0 <= y0 < y1 <= 48
    stem, suffix = name.rsplit(".", 1)
    # --format auto: a JPEG photo's overlay is a JPEG, any other input's a PNG
    assert result["overlay"] == f"out/{stem}.cam.{'jpg' if suffix == 'jpg' else 'png'}"
    with Image.open(batch.root / result["overlay"]) as figure:
        assert figure.mode == "RGB"
        # --top-k 3: a grid of three panels, each as wide as the image shown at display size
        panel = round(64 * display_scale((64, 48)))  # small images are enlarged for display
        assert figure.width == 3 * panel + 2 * GRID_GAP
        assert figure.height > 224
    cam = np.load(batch.root / result["cam_npy"])
    assert cam.shape == (3, 48, 64)
    assert cam.dtype == np.float32
    assert np.isfinite(cam).all()
    assert f"in/{name}  (64x48)" in batch.run.out


@pytest.mark.slow
def test_exif_rotated_jpeg_in_rotated_coordinates(batch: Batch) -> None:
    result = result_for(batch, "rotated.jpg")
    assert (result["width"], result["height"]) == (48, 64)  # stored 64x48, displayed 48x64
    for entry in result["maps"]:
        for box in entry["boxes"]:
            x0, y0, x1, y1 = box["xyxy"]
            assert 0 <= x0 < x1 <= 48
            assert 0 <= y0 < y1 <= 64
    assert np.load(batch.root / result["cam_npy"]).shape == (3, 64, 48)
    with Image.open(batch.root / result["overlay"]) as figure:
        assert figure.width == 3 * round(48 * display_scale((48, 64))) + 2 * GRID_GAP


@pytest.mark.slow
def test_multi_frame_gif_noted_once(batch: Batch) -> None:
    assert result_for(batch, "anim.gif")["notes"] == [GIF_NOTE]
    assert batch.run.out.count(GIF_NOTE) == 1
    assert GIF_NOTE not in batch.run.err


@pytest.mark.slow
def test_same_stem_in_two_folders_gets_two_outputs(batch: Batch) -> None:
    first, second = result_for(batch, "a/same.png"), result_for(batch, "b/same.png")
    assert {first["overlay"], second["overlay"]} == {"out/same.cam.png", "out/same-2.cam.png"}
    assert first["cam_npy"] != second["cam_npy"]
    a, b = (np.load(batch.root / r["cam_npy"]) for r in (first, second))
    assert not np.array_equal(a, b)  # different pictures, so really two different outputs


@pytest.mark.slow
def test_json_document_of_the_batch(batch: Batch) -> None:
    document = batch.document
    assert document["schema"] == "gapcam.localize/1"
    assert document["settings"]["model"] == "efficientnet_lite0"
    assert document["settings"]["top_k"] == 3
    assert len(document["results"]) == len(batch.good) + 2
    assert len(document["errors"]) == len(batch.bad) + 2
    for result in document["results"]:
        assert (batch.root / result["overlay"]).is_file()
        probabilities = [p["probability"] for p in result["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)
    assert not any(name.endswith(".tmp") for name in os.listdir(batch.out))


@pytest.fixture(scope="module")
def rerun(cli, batch: Batch) -> Run:
    """kept.png again, into the same --out, with --overwrite and two classes picked by name and
    by index."""
    return cli(
        "localize", "in/kept.png", "--out", "out", "--overwrite", "--json", "-", "-q",
        "--class", "tabby cat", "--class", "285", cwd=batch.root,
    )  # fmt: skip


@pytest.mark.slow
def test_existing_output_replaced_with_overwrite(rerun: Run, batch: Batch) -> None:
    assert rerun.code == 0, rerun.err
    assert rerun.err_lines == ["gapcam: 1 of 1 inputs done, 0 failed"]
    with Image.open(batch.out / "kept.cam.png") as figure:
        assert figure.width == 2 * round(64 * display_scale((64, 48))) + GRID_GAP


@pytest.mark.slow
def test_class_by_name_and_index(rerun: Run) -> None:
    (result,) = json.loads(rerun.out)["results"]
    assert [(m["index"], m["name"]) for m in result["maps"]] == [
        (281, "tabby"),
        (285, "Egyptian cat"),
    ]
    assert result["overlay"] == "out/kept.cam.png"


@dataclass(frozen=True)
class SameFolder:
    run: Run
    folder: Path
    protected: bytes


@pytest.fixture(scope="module")
def same_folder(cli, tmp_path_factory: pytest.TempPathFactory) -> SameFolder:
    """--out is the folder of the input files, x.png and an input named like its output (the
    folder itself as input is refused with --out: test_hostile_output.py)."""
    folder = tmp_path_factory.mktemp("same") / "d"
    folder.mkdir()
    noise(seed=3).save(folder / "x.png")
    noise(seed=4).save(folder / "x.cam.png")
    protected = (folder / "x.cam.png").read_bytes()
    run = cli("localize", "d/x.cam.png", "d/x.png", "--out", "d", "--json", "-", cwd=folder.parent)
    return SameFolder(run, folder, protected)


@pytest.mark.slow
def test_output_never_overwrites_an_input(same_folder: SameFolder) -> None:
    run = same_folder.run
    assert run.code == 1
    assert_no_traceback(run)
    assert (same_folder.folder / "x.cam.png").read_bytes() == same_folder.protected
    lines = run.lines_naming("d/x.cam.png: ")
    assert lines == ["error: d/x.cam.png: is one of the inputs; refusing to overwrite it"]
    assert run.summary() == (1, 2, 1)
    # the input named like an output is itself processed, into x.cam.cam.png (one panel)
    with Image.open(same_folder.folder / "x.cam.cam.png") as figure:
        assert figure.width == round(64 * display_scale((64, 48)))  # one panel


@pytest.mark.slow
def test_json_to_stdout_is_the_only_stdout(same_folder: SameFolder) -> None:
    run = same_folder.run
    document = json.loads(run.out)  # the whole of stdout is one JSON document
    assert [r["input"] for r in document["results"]] == ["d/x.cam.png"]
    assert document["errors"][0]["input"] == "d/x.png"
    assert "is one of the inputs" in document["errors"][0]["error"]
    # the human-readable report went to stderr
    assert "d/x.cam.png  (64x48)" in run.err
    assert "overlay: d/x.cam.cam.png" in run.err


class Payload:
    """Unpickling this runs code (through ``__reduce__``): it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        code = f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('unpickled')"
        return (exec, (code,))


@dataclass(frozen=True)
class Background:
    folder: Path
    runs: dict[str, Future[Run]]
    marker: Path
    module: torch.nn.Module

    def __getitem__(self, key: str) -> Run:
        return self.runs[key].result()


@pytest.fixture(scope="module")
def background(cli, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    """Runs that need nothing from other tests, started together on two threads so that their
    torch start-ups overlap with each other and with the module's other runs."""
    import torchvision
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("background")
    noise().save(folder / "img.png")
    marker = folder / "payload-ran"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": Payload(marker)}, folder / "evil.pth")
    torch.load(folder / "evil.pth", weights_only=False)  # control: a plain unpickle runs it
    assert marker.read_text() == "unpickled"
    marker.unlink()
    (folder / "text.pth").write_text("not weights\n")
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    save_file(module.state_dict(), str(folder / "r18.safetensors"))
    localize = ("localize", "img.png", "--out", "out")
    commands = {
        "resnet18": (
            "localize", EXAMPLES / "cat.png", "--model", "resnet18", "--weights",
            "r18.safetensors", "--json", "r18.json", "--out", "r18", "-q",
        ),
        "summary vgg16": ("summary", "vgg16"),
        "summary resnet50": ("summary", "resnet50"),
        "nonsense": (*localize, "--class", "nonsense"),
        "vgg16": (*localize, "--model", "vgg16"),
        "resnet50": (*localize, "--model", "resnet50", "--json", "-"),
        "evil.pth": (*localize, "--model", "resnet18", "--weights", folder / "evil.pth"),
        "text.pth": (*localize, "--model", "resnet18", "--weights", folder / "text.pth"),
        "models": ("models",),
        "classes": ("classes", "--grep", "cat"),
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {key: pool.submit(cli, *args, cwd=folder) for key, args in commands.items()}
        yield Background(folder, runs, marker, module)


@pytest.mark.slow
def test_unknown_class_stops_before_any_work(background: Background) -> None:
    run = background["nonsense"]
    assert_usage_error(run, "class 'nonsense'", "not a class of efficientnet_lite0")
    assert run.err_lines[0].startswith("gapcam: error: ")


@pytest.mark.slow
def test_vgg16_refused_with_the_reason(background: Background) -> None:
    assert_usage_error(background["vgg16"], "vgg16", "flattens", "dense layers")


@pytest.mark.slow
def test_resnet50_without_weights_offline_is_one_line(background: Background) -> None:
    run = background["resnet50"]
    assert_usage_error(run, "resnet50", "cannot download", "--weights FILE")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("evil.pth", "it holds pickled Python objects besides tensors (exec); refused"),
        ("text.pth", "not a torch weights file"),
    ],
)
def test_bad_weights_refused(background: Background, name: str, reason: str) -> None:
    path = background.folder / name
    assert_usage_error(background[name], f"--weights {path}: {reason}", "save a plain state dict")
    assert not background.marker.exists(), "the weights file was unpickled"


@pytest.mark.slow
def test_refused_runs_write_nothing(background: Background) -> None:
    for key in ("nonsense", "vgg16", "resnet50", "evil.pth", "text.pth"):
        background[key]
    assert not (background.folder / "out").exists()


@pytest.mark.slow
def test_safetensors_weights_end_to_end_match_the_module(background: Background) -> None:
    import torchvision

    run = background["resnet18"]
    assert run.code == 0, run.err
    assert run.err_lines == ["gapcam: 1 of 1 inputs done, 0 failed"]
    (result,) = json.loads((background.folder / "r18.json").read_text())["results"]
    assert (background.folder / "r18" / "cat.cam.png").is_file()

    transforms = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    preprocess = Preprocess(size=(224, 224), mean=tuple(transforms.mean), std=tuple(transforms.std))
    picture = images.load_image(EXAMPLES / "cat.png").image
    x = images.to_tensor([images.resize_for_model(picture, preprocess)], preprocess)
    with torch.inference_mode():
        logits = background.module(x)[0]
    top = logits.topk(5)
    assert [p["index"] for p in result["predictions"]] == top.indices.tolist()
    reported = torch.tensor([p["logit"] for p in result["predictions"]])
    torch.testing.assert_close(
        reported, top.values, rtol=1e-4, atol=1e-4 * float(logits.abs().max())
    )


def test_help(cli) -> None:
    run = cli("--help")
    assert run.code == 0
    assert run.err == ""
    for command in ("localize", "models", "summary", "classes"):
        assert command in run.out
    run = cli("localize", "--help")
    assert run.code == 0
    assert "examples:" in run.out
    assert "gapcam localize examples/cat.png" in run.out
    assert "--max-pixels" in run.out
    assert "--overwrite" in run.out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("localize",), "the following arguments are required: PATH"),
        (("localize", "x.png", "--top-k", "0"), "0 is not a positive integer"),
        (("localize", "x.png", "--threshold", "1.5"), "1.5 is not between 0 and 1"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2(cli, args: tuple[str, ...], fragment: str) -> None:
    run = cli(*args)
    assert run.code == 2
    assert_no_traceback(run)
    assert run.out == ""
    assert fragment in run.err_lines[-1]


@pytest.mark.slow
def test_models_lists_the_embedded_model_offline(background: Background) -> None:
    run = background["models"]
    assert run.code == 0, run.err
    rows = {line.split()[0]: line.split() for line in run.out.splitlines() if line.strip()}
    assert rows["efficientnet_lite0"][1:3] == ["embedded", "yes"]
    assert rows["resnet50"][1:3] == ["torchvision", "no"]  # nothing cached in this TORCH_HOME


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "share", "cam"), [("vgg16", 89.4, "no"), ("resnet50", 8.0, "yes")]
)
def test_summary_head_share(background: Background, model: str, share: float, cam: str) -> None:
    run = background[f"summary {model}"]
    assert run.code == 0, run.err
    match = re.search(r"^classifier head \(.*\): [\d,]+ parameters, ([\d.]+)% of", run.out, re.M)
    assert match, run.out
    assert float(match.group(1)) == pytest.approx(share, abs=0.05)
    assert f"class activation maps: {cam}" in run.out


@pytest.mark.slow
def test_classes_grep(background: Background) -> None:
    run = background["classes"]
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert "  285  Egyptian cat" in lines
    assert "  282  tiger cat" in lines
    assert all("cat" in line.lower() for line in lines)
    assert len(lines) < 20
