"""`gapcam localize --engine ray` on a local Ray instance (2 CPUs) started by this module:
Parquet rows equal the single-process path (also with --checkpoint), failures are rows, sources
are listed right."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EXAMPLES, write_shapes_run

import gapcam
from gapcam import cli
from gapcam.cli.options import localizer_options
from gapcam.ray_engine import list_sources

ray = pytest.importorskip("ray")  # gapcam[ray] is part of the test extra
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.slow  # a local Ray instance: seconds to start, seconds per run


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "cat.png").write_bytes((EXAMPLES / "cat.png").read_bytes())
    (folder / "sub" / "coffee.jpg").write_bytes((EXAMPLES / "coffee.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        "# one per line\nimages/cat.png\n\nimages/broken.jpg\nimages/sub/coffee.jpg\n"
    )
    return manifest


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    return write_shapes_run(tmp_path)


def test_sources_are_manifests_folders_globs_and_uris(source: Path) -> None:
    folder = source.parent / "images"
    listed, problems = list_sources([str(source)])
    assert listed == [
        str(folder / "cat.png"),
        str(folder / "broken.jpg"),
        str(folder / "sub/coffee.jpg"),
    ]
    assert problems == []
    listed, _ = list_sources([str(folder), "s3://bucket/a.jpg"])
    assert listed == ["s3://bucket/a.jpg", *map(str, sorted(folder.rglob("*.*")))]
    listed, problems = list_sources([str(folder / "*.png"), str(folder / "*.gif")])
    assert listed == [str(folder / "cat.png")]
    assert problems == [f"{folder / '*.gif'}: pattern matched no files"]


@pytest.mark.usefixtures("local_ray")
def test_ray_rows_equal_the_single_process_path(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["localize", "--engine", "ray", str(source), "--out", str(out), "--backend", "eager"]
    code = cli.main([*args, "--batch-size", "2", "--top-k", "2", "-q"])
    assert code == 1  # broken.jpg
    rows = pq.read_table(out / "parquet").to_pylist()
    assert [Path(r["path"]).name for r in rows] == ["cat.png", "broken.jpg", "coffee.jpg"]
    broken = rows[1]
    assert "not an image file" in broken["error"]
    said = [line for line in capsys.readouterr().err.splitlines() if "broken.jpg" in line]
    assert said == [f"error: {broken['error']}"]  # named, as the local engine names it
    assert broken["classes"] is None
    assert broken["boxes"] is None

    images = [Path(rows[0]["path"]), Path(rows[2]["path"])]
    expected = gapcam.Localizer()(images, top_k=2)
    for row, result in zip([rows[0], rows[2]], expected, strict=True):
        assert row["error"] is None
        assert (row["width"], row["height"]) == result.size
        assert row["classes"] == [p.index for p in result.predictions]
        assert row["names"] == [p.name for p in result.predictions]
        np.testing.assert_allclose(
            row["scores"], [p.probability for p in result.predictions], atol=1e-5
        )
        assert row["map_classes"] == [m.prediction.index for m in result.maps]
        assert row["boxes"] == [[b.as_list() for b in m.boxes] for m in result.maps]
        cam = np.frombuffer(row["cam"], dtype=np.float16).reshape(row["cam_shape"])
        low = np.stack([m.low_res for m in result.maps])
        np.testing.assert_allclose(cam, low, rtol=2e-3, atol=2e-3 * np.abs(low).max())
        assert tuple(row["cam_region"]) == result.region
        assert Path(row["overlay"]).is_file()
        assert Path(row["overlay"]).parent == out / "overlays"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left


@pytest.mark.usefixtures("local_ray")
def test_ray_rows_with_a_checkpoint_equal_the_local_engines(
    run_folder: Path, tmp_path: Path
) -> None:
    inputs = [str(EXAMPLES / "cat.png"), str(EXAMPLES / "coffee.jpg")]
    common = ["--checkpoint", str(run_folder), "--top-k", "2", "--backend", "eager", "-q"]
    report = tmp_path / "local.json"
    local = ["localize", *inputs, *common, "--no-overlay", "--json", str(report)]
    assert cli.main([*local, "--out", str(tmp_path / "local")]) == 0
    out = tmp_path / "out"
    ray_args = ["localize", "--engine", "ray", *inputs, *common, "--batch-size", "2"]
    assert cli.main([*ray_args, "--out", str(out)]) == 0

    rows = pq.read_table(out / "parquet").to_pylist()
    results = json.loads(report.read_text())["results"]
    assert [r["path"] for r in rows] == [r["input"] for r in results] == inputs
    for row, result in zip(rows, results, strict=True):
        assert row["error"] is None
        assert row["names"] == [p["name"] for p in result["predictions"]]
        assert sorted(row["names"]) == ["circle", "square", "triangle"]
        assert row["classes"] == [p["index"] for p in result["predictions"]]
        np.testing.assert_allclose(
            row["scores"], [p["probability"] for p in result["predictions"]], atol=1e-3
        )
        assert row["map_classes"] == [m["index"] for m in result["maps"]]
        assert row["boxes"] == [[b["xyxy"] for b in m["boxes"]] for m in result["maps"]]
        assert Path(row["overlay"]).is_file()


@pytest.mark.parametrize("extra", [["--model", "resnet18"], ["--weights", "w.safetensors"]])
def test_checkpoint_with_model_or_weights_is_refused_as_by_the_local_engine(
    extra: list[str], run_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(EXAMPLES / "cat.png"), "--checkpoint", str(run_folder), *extra, "-q"]
    assert cli.main(["localize", *args, "--out", str(tmp_path / "local")]) == 2
    local = capsys.readouterr().err
    code = cli.main(["localize", "--engine", "ray", *args, "--out", str(tmp_path / "ray")])
    assert code == 2
    assert capsys.readouterr().err == local
    assert "--checkpoint and --model/--weights" in local
    assert not (tmp_path / "ray").exists()


def test_a_folder_without_gapcam_json_is_refused_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["localize", "--engine", "ray", str(EXAMPLES / "cat.png"), "--checkpoint", str(tmp_path)]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"gapcam: error: --checkpoint {tmp_path}: no gapcam.json in it; "
        "give a folder made by `gapcam train`"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("local_ray")
def test_an_existing_out_is_refused_before_any_work(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code = cli.main(["localize", "--engine", "ray", str(source), "--out", str(out), "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"gapcam: error: {out}: already exists; pass --overwrite or choose another --out"
    ]


def test_without_ray_the_error_says_what_to_install(
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    code = cli.main(["localize", "--engine", "ray", str(source), "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "gapcam: error: the Ray engine needs Ray Data: pip install 'gapcam[ray]'"
    )


def test_actors_get_the_view_options_and_precision(tmp_path: Path) -> None:
    argv = ["localize", "x", "--engine", "ray", "--out", str(tmp_path / "out")]
    argv += ["--preset", "best", "--hflip", "--precision", "bfloat16", "--output-stride", "8"]
    argv += ["--model", "efficientnet_lite2"]
    options = localizer_options(cli.build_parser().parse_args(argv))
    assert options["output_stride"] == 8
    assert options["scales"] == (1.0, 1.5)
    assert options["hflip"] is True
    assert options["precision"] == "bfloat16"


@pytest.mark.parametrize(
    ("failures", "error", "calls", "connects"),
    [
        (1, ConnectionAbortedError("Initialization failure from server:\nTraceback ..."), 2, True),
        (9, ConnectionAbortedError("Initialization failure from server:\nTraceback ..."), 3, False),
        (9, ConnectionError("failed to connect to all addresses"), 1, False),
    ],
)
def test_a_head_that_fails_to_start_the_client_server_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, failures: int, error: Exception, calls: int, connects: bool
) -> None:
    """'Initialization failure from server' (the head could not start this client's own server
    in time) is tried again, twice at most; any other failure is one line at once."""
    from gapcam import ray_engine
    from gapcam.errors import GapcamError

    tried: list[str] = []

    def init(address: str, **_: object) -> None:
        tried.append(address)
        if len(tried) <= failures:
            raise error

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray_engine.time, "sleep", lambda _: None)
    address = "ray://127.0.0.1:1"
    if connects:
        ray_engine._connect(address)
    else:
        with pytest.raises(GapcamError, match="cannot connect to the Ray cluster") as caught:
            ray_engine._connect(address)
        assert "\n" not in str(caught.value).replace("\\n", "")
    assert tried == [address] * calls


def test_a_staging_folder_that_comes_back_is_removed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a stop, a write already on its way can make the staging folder again: it is
    removed until it stays away."""
    import threading

    from gapcam import ray_engine

    monkeypatch.setattr(ray_engine, "SETTLE_SECONDS", 0.6)
    staging = tmp_path / ".out.abc"
    (staging / "parquet").mkdir(parents=True)

    def late_writer() -> None:
        time.sleep(0.3)
        (staging / "parquet").mkdir(parents=True, exist_ok=True)
        (staging / "parquet" / "late.parquet").write_bytes(b"x")

    writer = threading.Thread(target=late_writer)
    writer.start()
    ray_engine.remove_settled(staging)
    writer.join()
    assert not staging.exists()


@pytest.mark.usefixtures("local_ray")
def test_a_run_whose_folder_a_stop_removed_never_becomes_out(
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C where a ray:// command was typed removes the run's staging folder; a driver that
    goes on regardless (its overlays then fail as gone) has its Parquet write make the folder
    again. That folder, without the mark its run made first, is removed, never renamed to OUT."""
    import shutil

    from gapcam import ray_engine

    real = ray_engine.localize_dataset

    def stopped_meanwhile(paths: list[str], options: dict[str, Any], **kwargs: Any) -> Any:
        rows = real(paths, options, **kwargs).materialize()  # the run's work, done
        shutil.rmtree(Path(options["overlays"]).parent)  # as the stopped client removes it
        return rows

    monkeypatch.setattr(ray_engine, "localize_dataset", stopped_meanwhile)
    monkeypatch.setattr(ray_engine, "SETTLE_SECONDS", 0.5)
    out = tmp_path / "out"
    args = ["localize", "--engine", "ray", str(source), "--out", str(out), "--backend", "eager"]
    code = cli.main([*args, "-q"])
    assert code != 0
    assert "the run was stopped; nothing was written" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
