"""`gapcam localize --engine ray` on a local Ray instance (2 CPUs) started by this module:
Parquet rows equal the single-process path, failures are rows, sources are listed right."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES

import gapcam
from gapcam import cli
from gapcam.ray_engine import list_sources

ray = pytest.importorskip("ray")  # gapcam[ray] is part of the test extra
pq = pytest.importorskip("pyarrow.parquet")


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


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_ray_rows_equal_the_single_process_path(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["localize", "--engine", "ray", str(source), "--out", str(out), "--backend", "eager"]
    code = cli.main([*args, "--batch-size", "2", "--top-k", "2", "-q"])
    assert code == 1  # broken.jpg
    rows = pq.read_table(out / "parquet").to_pylist()
    assert [Path(r["path"]).name for r in rows] == ["cat.png", "broken.jpg", "coffee.jpg"]
    broken = rows[1]
    assert "not an image file" in broken["error"]
    assert broken["classes"] is None
    assert broken["boxes"] is None

    images = [Path(rows[0]["path"]), Path(rows[2]["path"])]
    expected = gapcam.Localizer()(images, cam_top_k=2)
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
        assert Path(row["overlay"]).is_file()
        assert Path(row["overlay"]).parent == out / "overlays"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left


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
        "gapcam: error: --engine ray needs Ray Data: pip install 'gapcam[ray]'"
    )
