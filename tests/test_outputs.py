"""Atomic writers where the filesystem has no hard links (FAT, exFAT, many SMB shares): a write
that must not overwrite claims the name with an exclusive create and renames into it, with the
same refusals, the same bytes and permissions, and no temporary file left behind."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from gapcam import outputs
from gapcam.cli.options import flag_message
from gapcam.errors import OutputError

NO_LINKS = [
    pytest.param(OSError(errno.EPERM, "Operation not permitted"), id="EPERM"),
    pytest.param(OSError(errno.ENOTSUP, "Operation not supported"), id="ENOTSUP"),
    pytest.param(OSError(errno.EXDEV, "Invalid cross-device link"), id="EXDEV"),
]


def _no_links(monkeypatch: pytest.MonkeyPatch, error: OSError) -> list[tuple[str, str]]:
    """``os.link`` raises ``error``; returns the list of links it was asked for."""
    asked: list[tuple[str, str]] = []

    def link(source: object, target: object, *args: object, **kwargs: object) -> None:
        asked.append((str(source), str(target)))
        raise error

    monkeypatch.setattr(os, "link", link)
    return asked


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("error", NO_LINKS)
def test_without_hard_links_a_new_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    asked = _no_links(monkeypatch, error)
    target = tmp_path / "out.png"
    assert outputs.atomic_write(target, b"\x89PNG data") == target
    assert len(asked) == 1  # the link was tried first
    assert target.read_bytes() == b"\x89PNG data"
    assert stat.S_IMODE(target.stat().st_mode) == outputs.FILE_MODE
    assert _names(tmp_path) == ["out.png"]


@pytest.mark.parametrize("error", NO_LINKS)
def test_without_hard_links_an_existing_file_is_refused_then_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    _no_links(monkeypatch, error)
    target = tmp_path / "out.png"
    target.write_bytes(b"earlier")
    with pytest.raises(OutputError) as refused:
        outputs.atomic_write(target, b"new")
    assert str(refused.value) == f"{target}: already exists; pass overwrite=True"
    assert target.read_bytes() == b"earlier"
    assert _names(tmp_path) == ["out.png"]
    outputs.atomic_write(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["out.png"]


def test_without_os_link_at_all_the_fallback_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "link")
    target = tmp_path / "out.json"
    outputs.atomic_write(target, b"{}\n")
    assert target.read_bytes() == b"{}\n"
    with pytest.raises(OutputError, match="already exists"):
        outputs.atomic_write(target, b"[]\n")
    assert target.read_bytes() == b"{}\n"
    assert _names(tmp_path) == ["out.json"]


def test_a_file_created_meanwhile_is_never_replaced_by_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.png"

    def link(source: object, destination: object) -> None:
        target.write_bytes(b"someone else's")  # appears between the check and the move
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(OutputError, match="already exists"):
        outputs.atomic_write(target, b"ours")
    assert target.read_bytes() == b"someone else's"
    assert _names(tmp_path) == ["out.png"]


def test_other_link_errors_are_not_taken_for_missing_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_links(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    target = tmp_path / "out.png"
    with pytest.raises(OutputError) as failed:
        outputs.atomic_write(target, b"data")
    assert str(failed.value) == f"{target}: cannot write (No space left on device)"
    assert _names(tmp_path) == []


@pytest.mark.parametrize("error", NO_LINKS)
def test_without_hard_links_a_json_stream_closes_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    _no_links(monkeypatch, error)
    target = tmp_path / "run.json"
    sink = outputs.JsonStream(str(target), {"schema": "x"}, outputs.OutputGuard())
    sink.add({"input": "a"})
    sink.close([])
    document = {"schema": "x", "results": [{"input": "a"}], "errors": []}
    assert target.read_bytes() == outputs.encode_json(document)
    assert _names(tmp_path) == ["run.json"]
    sink = outputs.JsonStream(str(target), {}, outputs.OutputGuard(overwrite=True))
    sink.close([])
    assert target.read_bytes() == outputs.encode_json({"results": [], "errors": []})
    assert _names(tmp_path) == ["run.json"]


def test_a_guarded_write_names_the_keyword_which_the_cli_shows_as_its_flag(
    tmp_path: Path,
) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"earlier")
    with pytest.raises(OutputError) as refused:
        outputs.OutputGuard().write_bytes(target, b"new")
    message = str(refused.value)
    assert message == f"{target}: already exists; pass overwrite=True or choose another name"
    shown = f"{target}: already exists; pass --overwrite or choose another name"
    assert flag_message(message, {"overwrite"}) == shown
    assert target.read_bytes() == b"earlier"


def test_an_unknown_image_format_names_the_keyword() -> None:
    from PIL import Image

    with pytest.raises(OutputError) as refused:
        outputs.encode_image(Image.new("RGB", (2, 2)), "webp")
    assert str(refused.value) == "fmt='webp': use png or jpg"


def test_a_write_that_may_not_make_its_folder_fails_and_leaves_nothing(tmp_path: Path) -> None:
    """``parents=False`` (a Ray actor writing into a staging folder that a stopped run removed):
    an OutputError, and the folder is not made again."""
    target = tmp_path / "gone" / "overlays" / "a.cam.png"
    with pytest.raises(OutputError, match="cannot write"):
        outputs.atomic_write(target, b"png", parents=False)
    assert list(tmp_path.iterdir()) == []
    assert outputs.atomic_write(target, b"png") == target  # the default makes it
    assert target.read_bytes() == b"png"
