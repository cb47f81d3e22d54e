"""Memory is bounded by settings, never by what a file claims.

- a file's size on disk and its header are checked before a byte of its pixels is read (sparse
  files of 4 GB and 1 TB named ``.png`` are one line each, and the batch goes on);
- ``gapcam localize`` admits images against ``--memory-budget`` by what their headers say, so
  a huge-but-legal image waits for the ones before it (and one larger than the budget runs
  alone), in threaded and sequential runs, with the same results as an unbounded run;
- boxes come from maps of at most ``MAP_PIXELS`` pixels: exactly today's boxes up to that size,
  within one map pixel above it;
- ``input_size``, ``scales`` and ``gapcam synth --size`` have upper bounds;
- class names that hold line breaks or escape sequences do not break ``--top-k 5``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EXAMPLES, TinyGapNet, randomize_
from PIL import Image

import gapcam
from gapcam import batch, cli, images, overlay, pipeline
from gapcam.boxes import boxes_from_map
from gapcam.cli.localize import DEFAULT_BUDGET, memory_size, print_result
from gapcam.errors import GapcamError, ImageError, OutputError
from gapcam.localizer import MAX_INPUT_SIDE, Localizer
from gapcam.outputs import OutputGuard
from gapcam.result import MAP_PIXELS, map_size, scale_boxes
from gapcam.train.synthetic import generate
from gapcam.types import Box, Preprocess

CAT = EXAMPLES / "cat.png"
#: the issue's file: 116,625 bytes of PNG that declare 10950 x 10950 8-bit gray pixels
CLAIMED_SIDE = 10950


def claiming_png(path: Path, side: int = CLAIMED_SIDE) -> Path:
    """A valid all-black 8-bit gray PNG of ``side`` x ``side``, compressed row block by row
    block (120 MP in 117 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer = zlib.compressobj(9)
    row = b"\x00" + bytes(side)
    idat = b"".join(packer.compress(row * 500) for _ in range(side // 500))
    idat += packer.compress(row * (side % 500)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


# -- what a file claims is checked before it costs memory ---------------------------------------


def test_sparse_giants_are_refused_from_their_size(tmp_path: Path) -> None:
    for name, size, shown in (("four.png", 4 << 30, "4.3 GB"), ("tera.png", 1 << 40, "1.1 TB")):
        path = sparse(tmp_path / name, size)
        for read in (images.load_image, images.read_header):
            with pytest.raises(ImageError) as info:
                read(path)
            assert str(info.value) == (
                f"{path}: {shown} on disk is more than an image of at most 120,000,000 pixels "
                "can take (1.0 GB); it is not an image within the limit (raise max_pixels= if "
                "it is one)"
            )


def test_the_size_limit_follows_max_pixels(tmp_path: Path) -> None:
    limit = images.max_file_bytes(1000)
    assert limit == 1000 * images.FILE_BYTES_PER_PIXEL + images.FILE_SLACK_BYTES
    with pytest.raises(ImageError, match="on disk is more than"):
        images.load_image(sparse(tmp_path / "over.png", limit + 1), max_pixels=1000)
    with pytest.raises(ImageError, match="not an image file"):  # within the limit: looked at
        images.load_image(sparse(tmp_path / "at.png", limit), max_pixels=1000)
    with pytest.raises(ImageError, match=r"^<bytes>: 67.1 MB of data is more than an image"):
        images.load_image(b"\x00" * (images.max_file_bytes(10) + 1), max_pixels=10)


def test_the_header_is_read_before_the_pixels(tmp_path: Path) -> None:
    path = claiming_png(tmp_path / "claim.png")
    assert path.stat().st_size == 116_625
    info = images.read_header(path)
    assert info == images.ImageInfo(CLAIMED_SIDE, CLAIMED_SIDE, "L")
    assert info.decode_bytes() == CLAIMED_SIDE**2 * (1 + 4 + 4)
    with pytest.raises(ImageError, match=r"10950x10950 pixels is over the limit of 100,000,000"):
        images.read_header(path, max_pixels=100_000_000)
    assert images.ImageInfo(10, 10, "RGBA").decode_bytes() == 100 * (4 + 4 + 12)
    assert images.ImageInfo(10, 10, "I;16").decode_bytes() == 100 * (2 + 4 + 2)


def test_pipes_and_devices_are_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    os.mkfifo(fifo)
    (tmp_path / "null.png").symlink_to("/dev/null")
    for path in (fifo, tmp_path / "null.png"):
        with pytest.raises(ImageError, match="not a regular file"):
            images.load_image(path)


def test_sparse_giants_through_the_cli_are_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    sparse(folder / "four.png", 4 << 30)
    sparse(folder / "tera.png", 1 << 40)
    shutil.copy(CAT, folder / "cat.png")
    argv = ["localize", str(folder), "--out", str(tmp_path / "out"), "--no-overlay", "-q"]
    assert cli.main([*argv, "--backend", "eager"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "gapcam: 1 of 3 inputs done, 2 failed"
    assert [line.split(": ", 2)[1] for line in err[:-1]] == [
        str(folder / "four.png"),
        str(folder / "tera.png"),
    ]
    assert "raise --max-pixels if it is one" in err[0]
    assert all(len(line) < 300 for line in err)


# -- the memory budget ------------------------------------------------------------------------


def test_memory_budget_sizes() -> None:
    assert memory_size(DEFAULT_BUDGET) == pipeline.DEFAULT_MEMORY_BUDGET
    assert memory_size("512M") == 512 << 20
    assert memory_size("1.5g") == 3 << 29
    assert memory_size("4GB") == memory_size("4GiB") == 4 << 30
    assert memory_size("800") == 800 << 20  # plain numbers are megabytes
    for bad in ("", "12X", "0", "-1G", "0.5K", "1e9", "G"):
        with pytest.raises(Exception, match="not a size of at least 1M"):
            memory_size(bad)
    with pytest.raises(GapcamError, match="memory_budget=0"):
        pipeline.MemoryBudget(0)


def test_a_bad_memory_budget_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["localize", "x.png", "--memory-budget", "lots\x1b[31m"])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()[-1:]
    assert "--memory-budget: lots\\x1b[31m is not a size of at least 1M" in line


def test_the_budget_admits_or_waits_and_an_image_over_it_runs_alone() -> None:
    budget = pipeline.MemoryBudget(100)
    assert budget.fits(500)  # nothing in flight: even an image over the budget runs
    budget.take(500)
    assert not budget.fits(1)  # ... alone
    budget.release(500)
    budget.take(60)
    assert budget.fits(40)
    assert not budget.fits(41)
    budget.take(40)
    budget.release(60)
    assert (budget.used, budget.peak) == (40, 500)


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(7)
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i in range(10):
        array = rng.integers(0, 256, (120 + 8 * i, 160, 3), dtype=np.uint8)
        paths.append(folder / f"p{i:02d}.png")
        Image.fromarray(array).save(paths[-1])
    (folder / "p99-broken.png").write_bytes(b"\x89PNG broken")
    return [*paths[:4], folder / "p99-broken.png", *paths[4:]]


def _run(
    localizer: Localizer,
    paths: list[Path],
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    **settings: Any,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int]:
    """``batch.localize_files`` over ``paths``: (documents, errors, most images decoded and not
    yet reported at once)."""
    lock = threading.Lock()
    alive = {"now": 0, "most": 0}
    real = images.load_image

    def load(*args: Any, **kwargs: Any) -> images.LoadedImage:
        loaded = real(*args, **kwargs)
        with lock:
            alive["now"] += 1
            alive["most"] = max(alive["most"], alive["now"])
        return loaded

    def gone() -> None:
        with lock:
            alive["now"] -= 1

    documents: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []

    def on_result(result: Any, document: dict[str, Any]) -> None:
        gone()
        documents.append({**document, "overlay": Path(document["overlay"]).name})

    monkeypatch.setattr(images, "load_image", load)
    jobs = [((path, Path(path.name)), Path(path.stem)) for path in paths]
    outputs = batch.Outputs(out)
    batch.localize_files(
        localizer,
        jobs,
        outputs,
        OutputGuard(),
        on_result=on_result,
        on_error=lambda name, message: errors.append((name, message)),
        **settings,
    )
    monkeypatch.setattr(images, "load_image", real)
    return documents, errors, alive["most"]


@pytest.mark.parametrize("workers", [0, 3])
def test_the_pipeline_holds_what_the_budget_allows(
    tiny: gapcam.GapModel,
    photos: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    localizer = Localizer(tiny)
    costs = [
        batch.image_cost(images.read_header(p), 1, batch.Outputs(tmp_path))
        for p in photos
        if "broken" not in p.name
    ]
    settings = {"workers": workers, "batch_size": 4}
    free, free_errors, most_free = _run(localizer, photos, tmp_path / "a", monkeypatch, **settings)
    two = 2 * max(costs)
    held, held_errors, most_held = _run(
        localizer, photos, tmp_path / "b", monkeypatch, memory_budget=two, **settings
    )
    alone, _, most_alone = _run(
        localizer, photos, tmp_path / "c", monkeypatch, memory_budget=1, **settings
    )
    assert most_free > 2  # without a budget that binds, many are in flight
    assert most_held == 2
    assert most_alone == 1  # each image over the budget: one at a time
    assert (
        [d["input"] for d in held]
        == [d["input"] for d in free]
        == [str(p) for p in photos if "broken" not in p.name]
    )
    assert held_errors == free_errors == [(str(photos[4]), free_errors[0][1])]
    for a, b, c in zip(free, held, alone, strict=True):  # batches cut short: same answers
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in c["predictions"]]
        assert a["maps"][0]["boxes"] == b["maps"][0]["boxes"] == c["maps"][0]["boxes"]
        for p, q in zip(a["predictions"], c["predictions"], strict=True):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)


def test_a_huge_image_is_charged_for_what_it_will_hold(tmp_path: Path) -> None:
    info = images.ImageInfo(CLAIMED_SIDE, CLAIMED_SIDE, "L")
    bare = batch.image_cost(info, 1, batch.Outputs(tmp_path, overlay=False))
    lines = batch.LINE_BYTES * 2 * CLAIMED_SIDE
    assert bare == info.decode_bytes() + np.prod(map_size(CLAIMED_SIDE, CLAIMED_SIDE)) * 4 + lines
    # a sliver of as many pixels pays for its rows: 50,000,000 of them cost 1.35 GB to resize
    sliver = images.ImageInfo(1, CLAIMED_SIDE**2, "L")
    thin = batch.image_cost(sliver, 1, batch.Outputs(tmp_path, overlay=False))
    assert thin - bare > 20 * CLAIMED_SIDE**2
    drawn = batch.image_cost(info, 2, batch.Outputs(tmp_path))
    # drawn at the size of its maps (overlay.MAX_PIXELS), about 16 bytes a pixel per panel
    assert drawn - batch.image_cost(info, 2, batch.Outputs(tmp_path, overlay=False)) == (
        2 * int(np.prod(map_size(CLAIMED_SIDE, CLAIMED_SIDE))) * 16
    )
    assert np.prod(map_size(CLAIMED_SIDE, CLAIMED_SIDE)) <= overlay.MAX_PIXELS
    raw = batch.image_cost(info, 1, batch.Outputs(tmp_path, overlay=False, save_cam=True))
    assert raw - bare == CLAIMED_SIDE**2 * 12


def _peak_rss_kb(*argv: str) -> tuple[int, int, str]:
    """(peak RSS of ``python -m gapcam ARGV`` in KB, its exit code, its stderr), measured by a
    parent of its own (``getrusage(RUSAGE_CHILDREN)`` of this process holds earlier runs)."""
    measure = (
        "import resource, subprocess, sys; "
        "done = subprocess.run([sys.executable, '-m', 'gapcam', *sys.argv[1:]], "
        "capture_output=True, text=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, done.returncode); "
        "sys.stderr.write(done.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", measure, *argv], capture_output=True, text=True, timeout=600
    )
    peak, code = done.stdout.split()
    return int(peak), int(code), done.stderr


@pytest.mark.slow
def test_files_claiming_120_megapixels_stay_within_the_budget(tmp_path: Path) -> None:
    """The issue's case, three files: 3.5 GB RSS for one of them before, 10.4 GB for twelve."""
    folder = tmp_path / "claims"
    folder.mkdir()
    claiming_png(folder / "claim-0.png")
    for i in (1, 2):
        shutil.copy(folder / "claim-0.png", folder / f"claim-{i}.png")
    peak, code, err = _peak_rss_kb(
        *(
            "localize",
            str(folder),
            "--out",
            str(tmp_path / "out"),
            "--json",
            str(tmp_path / "r.json"),
        ),
        *("--memory-budget", "2G", "--backend", "eager", "-q"),
    )
    assert code == 0, err
    assert err.splitlines()[-1] == "gapcam: 3 of 3 inputs done, 0 failed"
    assert "Traceback" not in err
    assert peak < 3_000_000, f"peak RSS {peak / 1e6:.2f} GB"
    document = json.loads((tmp_path / "r.json").read_text())
    assert [r["width"] for r in document["results"]] == [CLAIMED_SIDE] * 3
    with Image.open(document["results"][0]["overlay"]) as figure:
        # drawn at the size of its maps, and a caption band above
        assert figure.width == map_size(CLAIMED_SIDE, CLAIMED_SIDE)[1]


# -- maps no larger than needed -------------------------------------------------------------------


def test_map_size_rule() -> None:
    assert map_size(640, 480) == (480, 640)
    assert map_size(2048, 1024) == (1024, 2048)  # exactly MAP_PIXELS: the image's own size
    rows, columns = map_size(CLAIMED_SIDE, CLAIMED_SIDE)
    assert rows == columns == 1448
    assert rows * columns <= MAP_PIXELS
    assert map_size(4000, 3000) == (1254, 1672)
    assert map_size(120_000_000, 1) == (1, MAP_PIXELS)  # a sliver keeps its one row
    assert map_size(1, 120_000_000) == (MAP_PIXELS, 1)


def test_boxes_scale_outwards_to_whole_pixels() -> None:
    boxes = (Box(1, 2, 3, 4, 4), Box(0, 0, 10, 10, 100))
    assert scale_boxes(boxes, (10, 10), (10, 10)) is boxes
    scaled = scale_boxes(boxes, (10, 10), (25, 33))
    assert scaled == (Box(3, 5, 10, 10, 33), Box(0, 0, 33, 25, 825))


def _red_square(width: int, height: int) -> Image.Image:
    array = np.full((height, width, 3), 40, dtype=np.uint8)
    array[height // 5 : height // 2, width // 3 : width * 3 // 4] = (230, 10, 10)
    return Image.fromarray(array)


@pytest.mark.parametrize("size", [(640, 480), (2048, 1024), (333, 6000)])
def test_boxes_up_to_map_pixels_are_todays(rednet: gapcam.GapModel, size: tuple[int, int]) -> None:
    result = Localizer(rednet, min_area=0.0)(_red_square(*size), classes=["red", "not red"])
    assert result.kept_maps is not None
    assert result.kept_maps is result.box_maps
    for j, class_map in enumerate(result.maps):
        assert class_map.boxes == boxes_from_map(result.normalized[j], 0.2, 0.0)


def test_the_examples_boxes_are_todays(localizer: Localizer) -> None:
    for path in (EXAMPLES / "cat.png", EXAMPLES / "coffee.jpg"):
        result = localizer(path, top_k=3)
        for j, class_map in enumerate(result.maps):
            assert class_map.boxes == boxes_from_map(result.normalized[j], 0.2, 0.01)


@pytest.mark.parametrize("size", [(2049, 1024), (3000, 2000), (6000, 700)])
def test_boxes_over_map_pixels_are_within_one_map_pixel(
    rednet: gapcam.GapModel, size: tuple[int, int]
) -> None:
    width, height = size
    result = Localizer(rednet, min_area=0.0)(_red_square(width, height), classes=["red"])
    assert result.kept_maps is None
    rows, columns = map_size(width, height)
    assert result.box_maps[0].shape == (rows, columns)
    (box,) = result.maps[0].boxes
    (full,) = boxes_from_map(result.normalized[0], 0.2, 0.0)
    step_x, step_y = -(-width // columns), -(-height // rows)
    assert full.x0 - step_x <= box.x0 <= full.x0
    assert full.x1 <= box.x1 <= full.x1 + step_x
    assert full.y0 - step_y <= box.y0 <= full.y0
    assert full.y1 <= box.y1 <= full.y1 + step_y
    assert box.area == pytest.approx(full.area, rel=0.02)


@pytest.mark.parametrize("size", [(2000, 1500), (5000, 500)])  # drawn at its size / shrunk
def test_overlays_over_map_pixels_match_the_full_size_ones(
    rednet: gapcam.GapModel, size: tuple[int, int]
) -> None:
    result = Localizer(rednet)(_red_square(*size), classes=["red"])
    figure = np.asarray(result.overlay(), dtype=np.int16)
    caption = f"red  {result.maps[0].prediction.probability:.1%}"
    full = overlay.render(result.image, result.normalized[0], result.maps[0].boxes, caption)
    assert figure.shape == np.asarray(full).shape
    assert np.abs(figure - np.asarray(full, dtype=np.int16)).mean() < 1.0


# -- upper bounds on sizes the user sets --------------------------------------------------------


def test_input_size_and_scales_have_an_upper_bound(tiny: gapcam.GapModel) -> None:
    assert Localizer(tiny, input_size=MAX_INPUT_SIDE).preprocess.size == (2048, 2048)
    for size in (MAX_INPUT_SIDE + 32, 40000, (224, 4096)):
        with pytest.raises(GapcamError, match=f"at most {MAX_INPUT_SIDE} pixels a side"):
            Localizer(tiny, input_size=size)
    with pytest.raises(
        GapcamError, match=r"scales= up to 4.0: the largest view would be 4096x4096"
    ):
        Localizer(tiny, input_size=1024, scales=(1.0, 4.0))
    huge = gapcam.from_module(  # a model that declares a huge input of its own
        randomize_(TinyGapNet(), 0),
        features="body",
        classifier="fc",
        preprocess=Preprocess(size=(2080, 64)),
    )
    with pytest.raises(GapcamError, match="the model's input is 2080x64 pixels, over 2048"):
        Localizer(huge)
    assert Localizer(huge, input_size=256).preprocess.size == (256, 256)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["localize", "x.png", "--input-size", "40000"],
            "gapcam: error: --input-size 40000: at most 2048 pixels a side",
        ),
        (
            ["localize", "x.png", "--input-size", "1024", "--scales", "1", "3"],
            "gapcam: error: --scales up to 3.0: the largest view would be 3072x3072 pixels",
        ),
        (
            ["synth", "OUT", "--size", "40000"],
            "gapcam: error: --size 40000: at most 2048 pixels a side; give a smaller --size",
        ),
    ],
)
def test_size_bounds_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    assert (
        cli.main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "localize" else [])]) == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(line), err
    assert list(tmp_path.iterdir()) == []


def test_synth_size_bounds(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="size=2049: at most 2048"):
        generate(tmp_path / "a", size=2049)
    with pytest.raises(OutputError, match="a size of at least 32 pixels"):
        generate(tmp_path / "a", size=31)


# -- class names that would break a line ----------------------------------------------------------

ODD_NAMES = [
    "two\nlines",
    "\x1b]0;TITLE\x07\x1b[31mred",
    "tab\there",
    "x" * 5000,
    "right\u202etfel",
]


def test_odd_class_names_do_not_break_top_k(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = randomize_(TinyGapNet(classes=5), 3)
    model = gapcam.from_module(
        net,
        features="body",
        classifier="fc",
        class_names=ODD_NAMES,
        preprocess=Preprocess(size=(32, 32)),
    )
    shutil.copy(CAT, tmp_path / "cat.png")
    results: list[Any] = []
    batch.localize_files(
        Localizer(model),
        [((tmp_path / "cat.png", Path("cat.png")), Path("cat"))],
        batch.Outputs(tmp_path / "out"),
        OutputGuard(),
        on_result=lambda result, document: results.append((result, document)),
        on_error=lambda name, message: pytest.fail(message),
        top_k=5,
    )
    ((result, document),) = results
    with Image.open(document["overlay"]) as figure:
        assert figure.width > 5 * overlay.MIN_SIDE
    stream = io.StringIO()
    print_result(result, document, stream)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + 5 + 5 + 1  # name, predictions, boxes (or none), overlay
    for line in lines:
        assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in line)
        assert len(line) < 300
    assert any("two\\nlines" in line for line in lines)
