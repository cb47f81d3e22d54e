"""Hostile inputs at the places gapcam prints or writes: whatever a user or a file supplies is
shown on one bounded, printable line, and no partial file survives a full disk or a SIGTERM.

Every failure line is checked the same way (``assert_one_safe_line``): one line, under 300
characters, no raw control character. The signal and disk-full tests run ``python -m gapcam``
in a subprocess, as a scheduler or a full disk meets it; the rest call ``gapcam.cli.main``.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EXAMPLES, SHAPES, write_shapes_run
from PIL import Image, ImageDraw

from gapcam import cli, outputs, overlay
from gapcam.cli import TerminateAsInterrupt, Terminated, info, localize
from gapcam.cli.options import error_text
from gapcam.errors import GapcamError, OutputError
from gapcam.eval.report import format_table
from gapcam.summary import Row, Summary, format_summary
from gapcam.train.output import NAME_BYTES, overlay_name

CLI = (sys.executable, "-m", "gapcam")
#: any raw control character: C0, DEL, C1, and the Unicode ones that reorder or break lines
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
ESCAPES = "\x1b]0;TITLE\x07\x1b[31m"
HOSTILE = [
    pytest.param(f"photo{ESCAPES}.png", id="escape-sequences"),
    pytest.param("first\nsecond\r\nthird.png", id="newlines"),
    pytest.param("evil\u202egnp.exe\u2028next", id="unicode-controls"),
    pytest.param("x" * 50_000_000, id="50MB"),
    pytest.param("\x1b" * 100_000, id="all-escapes"),
]


def assert_one_safe_line(text: str) -> None:
    line = text.removesuffix("\n")
    assert "\n" not in line, line[:500]
    assert len(line) < 300, (len(line), line[:500])
    assert not RAW_CONTROL.search(line), ascii(line[:500])


def tmp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


# -- the CLI's error line -------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_every_gapcam_error_is_one_safe_line(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    message = f"{value}: cannot write; pass overwrite=True or choose another out="

    def fail(args: object) -> int:
        raise OutputError(message)

    monkeypatch.setattr(localize, "run", fail)
    started = time.perf_counter()
    assert cli.main(["localize", "in.png"]) == cli.EXIT_USAGE
    assert time.perf_counter() - started < 2.0  # a huge message is not read through
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_safe_line(captured.err)
    line = captured.err.rstrip("\n")
    assert line.startswith("gapcam: error: ")
    assert line.endswith("; pass --overwrite or choose another --out")  # what to do is kept


def test_ordinary_errors_are_printed_as_before(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "run/out.png: already exists; pass overwrite=True or choose another name, élan 猫"

    def fail(args: object) -> int:
        raise OutputError(message)

    monkeypatch.setattr(localize, "run", fail)
    assert cli.main(["localize", "in.png"]) == cli.EXIT_USAGE
    shown = "run/out.png: already exists; pass --overwrite or choose another name, élan 猫"
    assert capsys.readouterr().err == f"gapcam: error: {shown}\n"


def test_error_text_keeps_both_ends_and_counts_what_it_leaves_out() -> None:
    message = "/data/" + "d" * 1000 + "/x.xml: object 3 is bad; pass skip_invalid=True"
    shown = error_text(message, {"skip_invalid"}, 200)
    assert len(shown) <= 200
    assert shown.startswith("/data/ddd")
    assert shown.endswith("ddd/x.xml: object 3 is bad; pass --skip-invalid")
    kept = len(shown) - len(re.search(r" \.\.\. \(\d+ characters left out\) \.\.\. ", shown)[0])
    left_out = int(re.search(r"\((\d+) characters left out\)", shown)[1])
    assert kept + left_out == len(message) - len("skip_invalid=True") + len("--skip-invalid")
    # escapes count: a message of control characters is cut to the room too, never split
    shown = error_text("\x1b" * 500, set(), 120)
    assert len(shown) <= 120
    assert not RAW_CONTROL.search(shown)
    assert shown.startswith("\\x1b\\x1b")
    assert shown.endswith("\\x1b")
    assert error_text("short\nmessage", set(), 120) == "short\\nmessage"


@pytest.mark.parametrize("value", [*HOSTILE[:3], pytest.param("y" * 100_000, id="100k")])
def test_argument_errors_quote_what_was_typed_safely(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["localize", "in.png", "--backend", value])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("gapcam localize: error: argument --backend: invalid choice")
    assert_one_safe_line(last)
    with pytest.raises(SystemExit):
        cli.main(["models", value])  # unrecognized arguments: quoted as typed
    assert_one_safe_line(capsys.readouterr().err.splitlines()[-1])


# -- gapcam classes / summary and evaluate's table ------------------------------------------------


class _Names:
    def __init__(self, names: list[str]) -> None:
        self.class_names = names
        self.aliases: list[str] = []


def test_classes_prints_each_name_on_its_own_safe_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import gapcam.models

    names = ["tabby", f"red{ESCAPES}", "two\nlines", "z" * 10_000]
    monkeypatch.setattr(gapcam.models, "build_model", lambda *a: _Names(names))
    assert cli.main(["classes", "anything"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[0] == "    0  tabby"
    assert lines[1] == "    1  red\\x1b]0;TITLE\\x07\\x1b[31m"
    assert lines[2] == "    2  two\\nlines"
    for line in lines:
        assert_one_safe_line(line)


def test_summary_table_escapes_the_names_it_shows() -> None:
    summary = Summary(
        model=f"timm:{ESCAPES}",
        rows=(Row("stem", "Conv2d", 10), Row("evil\nlayer", f"Kind{ESCAPES}", 30)),
        total=40,
        head=30,
        head_layers="fc\nhead",
        cam=False,
        reason="a\nb" * 300,
    )
    text = format_summary(summary)
    assert not RAW_CONTROL.search(text.replace("\n", ""))  # the table's own lines aside
    lines = text.split("\n")
    assert lines[0] == "timm:\\x1b]0;TITLE\\x07\\x1b[31m"
    assert lines[3].startswith("evil\\nlayer  Kind\\x1b]0;TITLE\\x07\\x1b[31m  ")
    assert len(lines) == 7
    assert len(lines[2]) == len(lines[3])  # still aligned on the escaped names


def _report(source: str, model: str, skipped: list[str]) -> dict[str, Any]:
    """The parts of an evaluation report that ``format_table`` shows."""
    percents = ("top1_cls", "top5_cls", "gt_known_loc", "top1_loc", "top5_loc")
    return {
        "dataset": {"source": source, "layout": "csv", "images": 2, "boxes": 2, "skipped": skipped},
        "settings": {
            "input_size": [224, 224],
            "hflip": False,
            "scales": [1.0],
            "model": model,
            "threshold": 0.2,
        },
        "metrics": dict.fromkeys(percents, 50.0) | {"pxap": None},
        "timing": {"seconds": 1.0, "per_image": 0.5, "scoring_seconds": 0.01},
    }


@pytest.mark.parametrize("value", HOSTILE)
def test_evaluate_table_shows_file_supplied_text_on_safe_lines(value: str) -> None:
    skipped = [f"boxes.csv:{n}: unknown label {value!s}" for n in (2, 3)] + ["boxes.csv:4: ok"]
    text = format_table(_report(f"data/{value[:5000]}", f"run:{value[:300]}", skipped))
    lines = text.split("\n")
    assert len(lines) == 5 + 1 + 3  # the table, LEFT OUT, one line per problem
    assert not RAW_CONTROL.search(text.replace("\n", ""))  # the table's own lines aside
    for line in lines[-3:]:
        assert_one_safe_line(line)
    assert lines[-1] == "    boxes.csv:4: ok"


def test_evaluate_table_of_ordinary_reports_is_unchanged() -> None:
    path = "/data/" + "long-folder-name/" * 14 + "boxes.csv"  # a 250-character path stays whole
    text = format_table(_report(path, "resnet50", [f"{path}:3: unknown label 'tabbby'"]))
    assert text.splitlines()[0].startswith(f"{path} (csv): 2 images, 2 boxes; resnet50 at 224x224")
    assert text.splitlines()[-1] == f"    {path}:3: unknown label 'tabbby'"


# -- overlay captions -----------------------------------------------------------------------------


def _caption_as_before(image: Image.Image, text: str) -> Image.Image:
    """``overlay.add_caption`` as it was before captions were bounded (the reference for
    ordinary captions, which must draw pixel for pixel as before)."""
    size = max(12, round(image.width / 28))
    font = overlay._font(size)
    band = round(size * 1.6)
    out = Image.new("RGB", (image.width, image.height + band), (20, 20, 20))
    out.paste(image, (0, band))
    draw = ImageDraw.Draw(out)
    while len(text) > 4 and draw.textlength(text, font=font) > image.width - size:
        text = text[:-2].rstrip() + "…" if not text.endswith("…") else text[:-2] + "…"
    draw.text((size // 2, (band - size) // 2), text, fill=(255, 255, 255), font=font)
    return out


@pytest.mark.parametrize("name", ["cat.png", "coffee.jpg"])
@pytest.mark.parametrize("width", [41, 224, 451, 4096])
def test_ordinary_captions_draw_as_before(name: str, width: int) -> None:
    with Image.open(EXAMPLES / name) as opened:
        photo = opened.convert("RGB").resize((width, 120))
    captions = [
        "tabby cat  87.3%",
        "tiger cat, Felis catus  41.0%, Egyptian cat  12.3%, lynx, catamount  3.1%",
        "chat noir, élégant 猫  3.0%",
        "x" * 199,
        "y" * 500,  # cut to the width, as before
        "abc…",
    ]
    for caption in captions:
        got, want = overlay.add_caption(photo, caption), _caption_as_before(photo, caption)
        assert got.tobytes() == want.tobytes(), caption[:40]


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("tabby\ncat  87.0%", "tabby\\ncat  87.0%"),
        ("two\r\nlines\u2028three", "two\\r\\nlines\\u2028three"),
        (f"red{ESCAPES}  1.0%", "red\\x1b]0;TITLE\\x07\\x1b[31m  1.0%"),
        ("nul\x00byte", "nul\\x00byte"),
    ],
)
def test_captions_with_control_characters_draw_one_escaped_line(raw: str, shown: str) -> None:
    photo = Image.new("RGB", (451, 300), (40, 90, 160))
    assert overlay.add_caption(photo, raw).tobytes() == overlay.add_caption(photo, shown).tobytes()
    figure = overlay.render(photo, np.zeros((300, 451), np.float32), caption=raw)
    assert figure.size == overlay.add_caption(photo, shown).size  # one band, one line


@pytest.mark.parametrize("length", [10_000, 50_000_000])
def test_huge_captions_draw_bounded_and_fast(length: int) -> None:
    photo = Image.new("RGB", (451, 300))
    name = "n" * length
    started = time.perf_counter()
    drawn = overlay.add_caption(photo, name + "  12.0%")
    assert time.perf_counter() - started < 2.0
    cut = "n" * overlay.CAPTION_LIMIT + "…"
    assert drawn.tobytes() == overlay.add_caption(photo, cut).tobytes()
    assert drawn.size == (451, 300 + round(max(12, round(451 / 28)) * 1.6))


# -- training overlays' file names ----------------------------------------------------------------


def test_overlay_names_of_ordinary_classes_are_unchanged() -> None:
    assert overlay_name("tabby cat", "img_0001") == "tabby cat-img_0001.cam.png"
    assert overlay_name("chat noir, élégant 猫", "x") == "chat noir, élégant 猫-x.cam.png"
    long = "c" * 120
    assert overlay_name(long, "s" * 120) == f"{long}-{'s' * 120}.cam.png"  # 249 bytes: fits


@pytest.mark.parametrize(
    "name",
    ["../../../../tmp/evil", "a/b\\c", "two\nlines\x00nul", "猫" * 300, "z" * 10_000, "\udcff"],
)
def test_overlay_names_never_leave_the_folder_nor_overflow(name: str, tmp_path: Path) -> None:
    for stem in ("img", "é" * 120):
        shown = overlay_name(name, stem)
        assert not {"/", "\x00", "\n"} & set(shown)
        assert len(os.fsencode(shown)) <= NAME_BYTES
        assert shown.endswith(".cam.png")
        outputs.atomic_write(tmp_path / shown, b"png")  # a name the filesystem takes
    assert len(list(tmp_path.iterdir())) == 2


# -- outputs that would replace the inputs, or each other -----------------------------------------


def _boxes_csv(folder: Path) -> Path:
    """A CSV dataset of the two examples, beside them in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("cat.png", "coffee.jpg"):
        (folder / name).write_bytes((EXAMPLES / name).read_bytes())
    data = folder / "boxes.csv"
    data.write_text(
        "path,label,x0,y0,x1,y1\ncat.png,285,36,0,410,300\ncoffee.jpg,967,77,0,483,354\n"
    )
    return data


@pytest.mark.parametrize(
    ("json_to", "plot_to", "said"),
    [
        ("d/boxes.csv", None, "d/boxes.csv: is one of the inputs; refusing to overwrite it"),
        ("r.json", "d/cat.png", "d/cat.png: is one of the inputs; refusing to overwrite it"),
        (
            "same.out",
            "same.out",
            "same.out: another output of this run has this name; choose another name",
        ),
        ("d", None, "d: is a folder; give a file name"),
    ],
)
def test_evaluate_writes_over_neither_its_dataset_nor_its_other_output(
    json_to: str, plot_to: str | None, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    data = _boxes_csv(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in data.parent.iterdir()}
    argv = ["evaluate", "d/boxes.csv", "-q", "--overwrite", "--json", json_to]
    assert cli.main([*argv, *(["--plot", plot_to] if plot_to else [])]) == 2
    assert capsys.readouterr().err == f"gapcam: error: {said}\n"
    assert {p.name: p.read_bytes() for p in data.parent.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_localize_json_named_as_an_overlay_fails_that_overlay_not_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = ["localize", str(EXAMPLES / "cat.png"), "--out", str(out), "-q", "--overwrite"]
    assert cli.main([*argv, "--json", str(out / "cat.cam.png")]) == 1
    said = capsys.readouterr().err
    assert f"{out / 'cat.cam.png'}: another output of this run has this name" in said
    document = json.loads((out / "cat.cam.png").read_text())
    assert document["errors"][0]["input"] == str(EXAMPLES / "cat.png")
    assert cli.main([*argv, "--json", str(out)]) == 2  # a folder, refused before any work
    assert capsys.readouterr().err == f"gapcam: error: {out}: is a folder; give a file name\n"


def test_localize_out_as_an_input_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    _boxes_csv(photos)
    (photos / "sub").mkdir()
    (photos / "sub" / "mine.png").write_bytes((EXAMPLES / "cat.png").read_bytes())
    before = sorted(p.name for p in photos.rglob("*"))
    assert cli.main(["localize", str(photos), "--out", str(photos), "-q"]) == 2  # refused
    err = capsys.readouterr().err
    assert err.startswith(f"gapcam: error: --out {photos}: is the input folder {photos}; ")
    assert sorted(p.name for p in photos.rglob("*")) == before
    # a folder inside it is the output folder: its files are not inputs, and it says so
    out = photos / "sub"
    assert cli.main(["localize", str(photos), "--out", str(out), "--no-overlay"]) == 0
    err = capsys.readouterr().err
    assert f"gapcam: note: {out} is the output folder (--out): its files are not read" in err
    assert "gapcam: 2 of 2 inputs done, 0 failed" in err


# -- JSON streams on a full disk -------------------------------------------------------------------


class FullDisk(io.RawIOBase):
    """A file on a disk that fills after ``room`` bytes: writes and the flush on close fail."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.written = b""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if len(self.written) + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += bytes(data)
        return len(data)


def _stream_on_full_disk(target: Path, room: int, head: dict[str, Any]) -> outputs.JsonStream:
    sink = outputs.JsonStream(str(target), head, outputs.OutputGuard())
    sink.stream.close()
    sink.stream = io.BufferedWriter(FullDisk(room), buffer_size=64)
    return sink


@pytest.mark.parametrize("room", [0, 100, 1000])
def test_a_json_stream_on_a_full_disk_fails_once_and_leaves_nothing(
    tmp_path: Path, room: int
) -> None:
    target = tmp_path / "run.json"
    sink = _stream_on_full_disk(target, room, {"schema": "x"})

    def write_all() -> None:
        for index in range(100):
            sink.add({"input": f"image-{index}.png", "boxes": [[1, 2, 3, 4]]})
        sink.close([])

    with pytest.raises(OutputError) as failed:
        write_all()
    assert str(failed.value) == f"{target}: cannot write (No space left on device)"
    sink.abort()  # what the CLI does on the way out: must not raise again
    sink.abort()
    assert sorted(tmp_path.iterdir()) == []


def test_a_json_stream_whose_close_fails_raises_one_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "run.json"
    sink = _stream_on_full_disk(target, 10, {"schema": "x"})
    sink.add({"input": "a.png"})  # fits in the buffer: the disk is met at close
    with pytest.raises(OutputError, match="cannot write \\(No space left on device\\)"):
        sink.close([])
    assert sorted(tmp_path.iterdir()) == []

    def full(stream: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_fill", full)  # the very first bytes fail
    with pytest.raises(OutputError, match="No space left on device"):
        outputs.JsonStream(str(target), {"schema": "x"}, outputs.OutputGuard())
    assert sorted(tmp_path.iterdir()) == []


def test_file_names_that_are_not_utf8_are_written_as_json_escapes(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name, as Python reads it
    document = {"input": name, "name": "chat noir"}
    assert json.loads(outputs.encode_json(document)) == document
    sink = outputs.JsonStream(str(tmp_path / "run.json"), {"schema": "x"}, outputs.OutputGuard())
    sink.add(document)
    sink.close([{"input": name, "error": "cannot read"}])
    written = (tmp_path / "run.json").read_bytes()
    assert written.decode("utf-8").count("caf\\udce9.png") == 2
    assert json.loads(written)["results"] == [document]
    whole = {
        "schema": "x",
        "results": [document],
        "errors": [{"input": name, "error": "cannot read"}],
    }
    assert written == outputs.encode_json(whole)


# -- SIGTERM is an interruption ----------------------------------------------------------------------


def _signal_and_wait() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)


def test_sigterm_raises_terminated_once_and_the_old_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with TerminateAsInterrupt() as signals:
        with pytest.raises(Terminated):  # raised where the handler runs
            _signal_and_wait()
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while cleaning up: only noted
        time.sleep(0.05)
        assert signals.received
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt)  # every `except KeyboardInterrupt` sees it


def test_sigterm_during_a_command_is_exit_143_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def slow(args: object) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(info, "run_models", slow)
    assert cli.main(["models"]) == cli.EXIT_TERMINATED == 143
    assert capsys.readouterr().err == "gapcam: terminated\n"

    def caught(args: object) -> int:  # a command that saves its work on an interruption
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            print("saved the run so far")
        return cli.EXIT_INTERRUPTED

    monkeypatch.setattr(info, "run_models", caught)
    assert cli.main(["models"]) == 143
    assert capsys.readouterr() == ("saved the run so far\n", "gapcam: terminated\n")


# -- the real command line: signals and a full disk -------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    closed = "http://127.0.0.1:9"  # offline: a download attempt fails at once
    return {
        **os.environ,
        "TORCH_HOME": str(tmp_path_factory.mktemp("torch-home")),
        "GAPCAM_CACHE_DIR": str(tmp_path_factory.mktemp("gapcam-cache")),
        "HTTP_PROXY": closed,
        "HTTPS_PROXY": closed,
        "PYTHONUNBUFFERED": "1",
    }


def _noise_folder(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


def _terminate_when(process: subprocess.Popen[str], ready: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_during_localize_leaves_no_temporary_file(
    tmp_path: Path, env: dict[str, str]
) -> None:
    images = _noise_folder(tmp_path / "in", 300)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*CLI, "localize", str(images), "--out", str(out), "--json", str(out / "run.json"), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _terminate_when(process, lambda: len(list(out.glob("*.cam.png"))) >= 3)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err == "gapcam: terminated\n"
    assert tmp_files(tmp_path) == []
    assert not (out / "run.json").exists()  # no half document
    assert 3 <= len(list(out.glob("*.cam.png"))) < 300  # stopped, and what was written is whole
    for written in out.glob("*.cam.png"):
        with Image.open(written) as figure:
            figure.load()


def _slowed_cli(marker: str) -> list[str]:
    """``python -m gapcam`` whose file writes of data starting with ``marker`` announce
    themselves on stderr and then wait, so that a signal lands in the middle of one."""
    code = (
        "import sys, time\n"
        "from gapcam import outputs\n"
        "real = outputs._fill\n"
        "def slow(stream, data):\n"
        f"    if data.startswith({marker!r}.encode()):\n"
        f"        print('WRITING', file=sys.stderr, flush=True)\n"
        "        time.sleep(60)\n"
        "    real(stream, data)\n"
        "outputs._fill = slow\n"
        "from gapcam.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_sigterm_while_evaluate_writes_its_json_leaves_no_part_of_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    run = write_shapes_run(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    rows = ["path,label,x0,y0,x1,y1"]
    for index, label in enumerate(SHAPES * 2):
        Image.new("RGB", (40, 30), (index * 40, 90, 160)).save(data / f"{index}.png")
        rows.append(f"{index}.png,{label},2,2,20,20")
    (data / "boxes.csv").write_text("\n".join(rows) + "\n")
    report = tmp_path / "report.json"
    process = subprocess.Popen(
        [*_slowed_cli("{"), "evaluate", str(data / "boxes.csv"), "--checkpoint", str(run),
         "--json", str(report), "--plot", str(tmp_path / "curve.png"), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert process.stderr is not None
    line = process.stderr.readline()
    assert line == "WRITING\n", line + process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err == "gapcam: terminated\n"
    assert tmp_files(tmp_path) == []
    assert not report.exists()  # the JSON it was writing, after the plot
    with Image.open(tmp_path / "curve.png") as plot:
        plot.load()  # the plot written before is whole


@pytest.mark.slow
def test_sigterm_during_train_saves_the_run_and_leaves_no_temporary_file(
    tmp_path: Path, env: dict[str, str]
) -> None:
    made = subprocess.run(
        [*CLI, "synth", str(tmp_path / "shapes"), "--classes", "2", "--per-class", "8",
         "--size", "48"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    run = tmp_path / "run"
    process = subprocess.Popen(
        [*CLI, "train", str(tmp_path / "shapes"), "--out", str(run), "--finetune", "last-stage",
         "--epochs", "30", "--patience", "30", "--overlays", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("finetune epoch"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.splitlines()[-1] == "gapcam: terminated"
    assert "Traceback" not in err + out
    assert "continue it with: gapcam train" in out
    assert json.loads((run / "gapcam.json").read_text())["class_names"] == ["circle", "square"]
    assert tmp_files(tmp_path) == []
    assert tmp_files(Path(env["GAPCAM_CACHE_DIR"])) == []


@pytest.mark.slow
def test_a_full_disk_while_json_is_written_is_one_line_and_leaves_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    images = _noise_folder(tmp_path / "in", 40)
    out = tmp_path / "out"

    def small_files() -> None:  # writes past 5 kB fail, as on a full disk (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5_000, 5_000))

    done = subprocess.run(
        [*CLI, "localize", str(images), "--out", str(out), "--json", str(out / "run.json"),
         "--no-overlay", "--backend", "eager", "-q"],
        capture_output=True, text=True, env=env, preexec_fn=small_files, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"gapcam: error: {out / 'run.json'}: cannot write (File too large)\n"
    assert tmp_files(tmp_path) == []
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_evaluate_prints_hostile_paths_and_labels_on_safe_lines(
    tmp_path: Path, env: dict[str, str]
) -> None:
    run = write_shapes_run(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    hostile = f"shot{ESCAPES}.png"
    for name in ("good.png", hostile, "a.png", "b.png"):
        Image.new("RGB", (40, 30), (200, 90, 160)).save(data / name)
    with (data / "boxes.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "x0", "y0", "x1", "y1"])
        writer.writerow(["good.png", "circle", 2, 2, 20, 20])
        writer.writerow([hostile, "square", 500, 0, 510, 10])  # a box outside the image
        writer.writerow(["a.png", "two\nlines" + ESCAPES, 2, 2, 20, 20])  # unknown labels
        writer.writerow(["b.png", "L" * 100_000, 2, 2, 20, 20])
        writer.writerow(["../good.png", "circle", 2, 2, 20, 20])  # outside the CSV's folder
    done = subprocess.run(
        [*CLI, "evaluate", str(data / "boxes.csv"), "--checkpoint", str(run), "--skip-invalid",
         "--json", str(tmp_path / f"r{ESCAPES}.json"), "-q"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not RAW_CONTROL.search(done.stdout.replace("\n", "")), ascii(done.stdout)
    lines = done.stdout.splitlines()
    start = lines.index(next(x for x in lines if "LEFT OUT" in x)) + 1
    left_out = lines[start:-1]  # the problems, then the json line
    assert len(left_out) == 4
    for line in left_out:
        assert_one_safe_line(line)
    outside = [line for line in left_out if "../good.png" in line]
    assert outside[0].endswith("or pass --images a folder holding them)")  # the flag, as typed
    assert lines[-1] == f"json: {tmp_path}/r\\x1b]0;TITLE\\x07\\x1b[31m.json"
    assert (tmp_path / f"r{ESCAPES}.json").exists()
    assert done.stderr == ""

    with (data / "bad.csv").open("w", newline="") as stream:  # nothing left: one line each
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "x0", "y0", "x1", "y1"])
        writer.writerow(["a.png", "two\nlines" + ESCAPES, 2, 2, 20, 20])
        writer.writerow(["../good.png", "circle", 2, 2, 20, 20])
    done = subprocess.run(
        [*CLI, "evaluate", str(data / "bad.csv"), "--checkpoint", str(run), "--skip-invalid"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == f"gapcam: error: {data / 'bad.csv'}: no image left to evaluate"
    assert len(lines) == 3
    problems = sorted(lines[1:])
    assert problems[0].startswith(f"  {data / 'bad.csv'}:2: a.png: ")
    assert problems[1].startswith(f"  {data / 'bad.csv'}:3: ../good.png: ")
    assert problems[1].endswith("or pass --images a folder holding them)")
    for line in lines:
        assert_one_safe_line(line)


# -- the Ray engine's lists of images ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"a.png\n\xff\xfe b.png\n", "not UTF-8 text"), (None, "Is a directory")],
)
def test_a_manifest_that_cannot_be_read_is_one_line(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    from gapcam import ray_engine

    manifest = tmp_path / f"list{ESCAPES}.txt"
    if content is None:  # what cannot be read as a file
        manifest.mkdir()
    else:
        manifest.write_bytes(content)
    with pytest.raises(GapcamError) as refused:
        ray_engine._read_manifest(manifest)
    message = str(refused.value)
    assert_one_safe_line(message)
    assert message.startswith(f"{tmp_path}/list\\x1b]0;TITLE\\x07\\x1b[31m.txt")
    assert f"cannot read the list of images ({reason})" in message


def test_a_listed_path_holding_a_nul_is_an_error_row_not_a_crash() -> None:
    from gapcam import ray_engine

    with pytest.raises(GapcamError) as refused:
        ray_engine._read("images/a\x00b\n.png", 1_000_000)
    assert str(refused.value) == "images/a\\x00b\\n.png: not a file name (it holds a NUL character)"
