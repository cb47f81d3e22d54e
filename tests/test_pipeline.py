"""The streaming pipeline: order kept, failures as values, bounded queues, and a threaded
`gapcam localize` whose outputs equal the sequential loop's byte for byte (same batch size:
batch composition moves eager floats by ~1e-7)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES

from gapcam import cli, outputs, pipeline
from gapcam.errors import GapcamError, ImageError
from gapcam.localizer import Localizer
from gapcam.models import GapModel


def _square(n: int) -> int:
    if n == 3:
        raise ImageError("three: unreadable")
    time.sleep(0.001 * (n % 4))  # finish out of order
    return n * n


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_ordered_map_keeps_order_and_returns_errors(workers: int) -> None:
    with ExitStack() as stack:
        pool = pipeline.executor(workers, stack, "test")
        pairs = list(pipeline.ordered_map(_square, range(10), pool, window=3))
    assert [item for item, _ in pairs] == list(range(10))
    assert isinstance(pairs[3][1], ImageError)
    assert [value for item, value in pairs if item != 3] == [n * n for n in range(10) if n != 3]


def test_other_exceptions_propagate() -> None:
    def boom(n: int) -> int:
        raise ValueError("a bug, not an input problem")

    with ExitStack() as stack, pytest.raises(ValueError, match="a bug"):
        list(pipeline.ordered_map(boom, range(3), pipeline.executor(2, stack, "t"), 2))


def test_at_most_window_items_are_in_flight() -> None:
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def work(n: int) -> int:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.002)
        with lock:
            state["now"] -= 1
        return n

    consumed = 0
    with ExitStack() as stack:
        pool = pipeline.executor(8, stack, "t")
        for _ in pipeline.ordered_map(work, range(40), pool, window=4):
            consumed += 1
    assert consumed == 40
    assert state["most"] <= 4


def test_allocator_tuning_respects_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert pipeline.tune_allocator() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("GAPCAM_MALLOC", "system")
    assert pipeline.tune_allocator() is False


def test_torch_threads_are_set_for_the_block_and_restored() -> None:
    before = torch.get_num_threads()
    inside = []
    try:
        with pipeline.torch_threads(1):
            inside.append(torch.get_num_threads())
            raise RuntimeError("the block failed")
    except RuntimeError:
        pass
    assert inside == [1]
    assert torch.get_num_threads() == before


def test_defaults_fit_the_machine() -> None:
    assert 2 <= pipeline.default_workers() <= 16
    assert pipeline.default_batch_size() in (8, 16)


def _localize(tmp_path: Path, name: str, *options: str) -> tuple[dict, dict[str, bytes]]:
    folder = tmp_path / "in"
    if not folder.exists():
        folder.mkdir()
        for i in range(3):
            (folder / f"cat{i}.png").write_bytes((EXAMPLES / "cat.png").read_bytes())
        (folder / "coffee.jpg").write_bytes((EXAMPLES / "coffee.jpg").read_bytes())
        (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / name
    code = cli.main(
        [
            *("localize", str(folder), "--out", str(out)),
            *("--json", str(tmp_path / f"{name}.json"), "--backend", "eager", "-q", *options),
        ]
    )
    assert code == 1  # the broken file
    document = json.loads((tmp_path / f"{name}.json").read_text())
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())} if out.exists() else {}
    for result in document["results"]:
        if "overlay" in result:
            result["overlay"] = Path(result["overlay"]).name
    return document, files


def test_threaded_localize_equals_the_sequential_loop(tmp_path: Path) -> None:
    plain, plain_files = _localize(tmp_path, "plain", "--workers", "0", "--batch-size", "2")
    fast, fast_files = _localize(tmp_path, "fast", "--workers", "3", "--batch-size", "2")
    assert fast == plain
    assert fast_files == plain_files
    assert len(plain["results"]) == 4
    assert [e["input"] for e in plain["errors"]] == [str(tmp_path / "in" / "broken.jpg")]
    assert plain["settings"]["backend"] == "eager"


def test_auto_backend_is_reported_and_agrees_with_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path / "cache"))
    eager, _ = _localize(tmp_path, "eager", "--no-overlay")
    fast, _ = _localize(tmp_path, "fast", "--no-overlay", "--backend", "auto")
    assert fast["settings"]["backend"] == "onnx"
    assert "backend_note" not in fast["settings"]
    for a, b in zip(eager["results"], fast["results"], strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert [m["boxes"] for m in a["maps"]] == [m["boxes"] for m in b["maps"]]
    assert list((tmp_path / "cache" / "onnx").glob("efficientnet_lite0-*.onnx"))


def test_two_onnx_streams_equal_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path / "cache"))
    options = ("--no-overlay", "--backend", "onnx", "--batch-size", "1")
    one, _ = _localize(tmp_path, "one", *options, "--workers", "0")
    seen: set[int] = set()  # torch's threads while the streams explain: 1 (torch_threads)
    explain = Localizer.explain
    monkeypatch.setattr(
        Localizer,
        "explain",
        lambda self, *a, **k: seen.add(torch.get_num_threads()) or explain(self, *a, **k),
    )
    before = torch.get_num_threads()
    two, _ = _localize(tmp_path, "two", *options, "--workers", "2", "--streams", "2")
    assert seen == {1}
    assert torch.get_num_threads() == before
    assert [r["input"] for r in two["results"]] == [r["input"] for r in one["results"]]
    for a, b in zip(one["results"], two["results"], strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert [m["boxes"] for m in a["maps"]] == [m["boxes"] for m in b["maps"]]
        for p, q in zip(a["predictions"], b["predictions"], strict=True):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-6)
    assert two["errors"] == one["errors"]


def test_streams_follow_the_backend(
    tiny: GapModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAPCAM_CACHE_DIR", str(tmp_path))
    assert Localizer(tiny, backend="eager", streams=2).concurrency == 1  # eval mode is shared
    assert Localizer(tiny, backend="onnx", streams=2).concurrency == 2
    with pytest.raises(GapcamError, match="streams=0: give a positive integer"):
        Localizer(tiny, streams=0)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--workers", "-1"), "-1 is not 0 or a positive integer"),
        (("--streams", "0"), "--streams"),
        (("--backend", "tpu"), "invalid choice: 'tpu'"),
        (("--engine", "spark"), "invalid choice: 'spark'"),
    ],
)
def test_speed_options_are_checked(
    option: tuple[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["localize", "x.png", *option])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_precision_is_checked_and_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cat = str(EXAMPLES / "cat.png")
    assert cli.main(["localize", cat, "--out", str(tmp_path / "a"), "--precision", "float16"]) == 2
    assert (
        "error: --precision float16 needs a GPU (--device cuda or --device mps); on a CPU use bfloat16"
        in (capsys.readouterr().err)
    )
    report = tmp_path / "b.json"
    argv = ["localize", cat, "--out", str(tmp_path / "b"), "--json", str(report), "--no-overlay"]
    assert cli.main([*argv, "--precision", "bfloat16", "-q"]) == 0
    settings = json.loads(report.read_text())["settings"]
    assert (settings["precision"], settings["backend"]) == ("bfloat16", "eager")
    assert settings["backend_note"] == "bfloat16 runs on the eager backend"


@pytest.mark.parametrize("count", [0, 1, 3])
@pytest.mark.parametrize("failures", [0, 2])
def test_streamed_json_equals_the_whole_document(tmp_path: Path, count: int, failures: int) -> None:
    head = {"schema": "gapcam.localize/1", "settings": {"model": "m", "extras": {}, "k": [1, 2]}}
    results = [
        {"input": f"é{i}.png", "maps": [{"boxes": [[0, 1, 2, 3]]}], "n": []} for i in range(count)
    ]
    errors = [{"input": f"bad{i}", "error": "corrupt"} for i in range(failures)]
    target = tmp_path / "out.json"
    sink = outputs.JsonStream(str(target), head, outputs.OutputGuard())
    assert not target.exists()  # only a temporary file while the run goes on
    for result in results:
        sink.add(result)
    sink.close(errors)
    expected = outputs.encode_json({**head, "results": results, "errors": errors})
    assert target.read_bytes() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_an_aborted_json_stream_leaves_nothing(tmp_path: Path) -> None:
    sink = outputs.JsonStream(str(tmp_path / "out.json"), {"schema": "x"}, outputs.OutputGuard())
    sink.add({"input": "a"})
    sink.abort()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out.json").write_text("{}")
    with pytest.raises(GapcamError, match="already exists"):
        outputs.JsonStream(str(tmp_path / "out.json"), {}, outputs.OutputGuard())


def test_stdout_json_is_printed_only_when_the_run_ends(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sink = outputs.JsonStream("-", {"schema": "x"}, outputs.OutputGuard())
    sink.add({"input": "a"})
    assert capsys.readouterr().out == ""  # nothing half-written while the run goes on
    sink.abort()
    assert capsys.readouterr().out == ""  # an interrupted run prints no half document
    sink = outputs.JsonStream("-", {"schema": "x"}, outputs.OutputGuard())
    sink.add({"input": "é"})
    sink.close([])
    document = {"schema": "x", "results": [{"input": "é"}], "errors": []}
    assert capsys.readouterr().out == outputs.encode_json(document).decode("utf-8")


def test_an_unwritable_json_folder_gets_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(GapcamError, match=r"cannot write|is a file"):
        outputs.JsonStream(str(blocker / "out.json"), {"schema": "x"}, outputs.OutputGuard())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
