"""Hostile paths never abort a batch: a symbolic link loop, a folder without permission, a
folder nested deeper than PATH_MAX, a subfolder that cannot be listed, names holding control
characters. Each is one line naming the path (escaped, under 300 characters), counted as a
failure (exit 1), and the rest of the batch goes on.

The tests run as root here, and root ignores permission bits: permission failures are made by
making ``os.stat``/``os.scandir``/``os.open`` raise ``PermissionError`` for one path; the
tests with real permissions are skipped under root.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES

from gapcam import cli, images
from gapcam.errors import ImageError
from gapcam.images import expand_inputs, load_image

CAT = EXAMPLES / "cat.png"
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: a folder name of 200 characters: 21 of them nested pass PATH_MAX (4096)
LONG = "d" * 200


def _localize(tmp_path: Path, capsys: pytest.CaptureFixture[str], *inputs: str | Path) -> tuple:
    """``gapcam localize`` in this process: (exit code, stdout lines, stderr lines, JSON)."""
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    argv = ["localize", *map(str, inputs), "--out", str(tmp_path / "out"), "--overwrite"]
    code = cli.main([*argv, "--json", str(report), "--no-overlay", "--backend", "eager"])
    captured = capsys.readouterr()
    document = json.loads(report.read_text()) if report.exists() else None
    return code, captured.out.splitlines(), captured.err.splitlines(), document


def _assert_one_line_each(lines: list[str]) -> None:
    for line in lines:
        assert len(line) < 300, line
        assert "Traceback" not in line
        assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in line), repr(line)


def _deep_folder(base: Path, levels: int = 22) -> Path:
    """``base/LONG/LONG/...`` deeper than PATH_MAX, with a copy of the cat at the bottom (made
    through folder descriptors: no path that long can be opened by name)."""
    base.mkdir()
    descriptor = os.open(base, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir(LONG, dir_fd=descriptor)
            inner = os.open(LONG, os.O_RDONLY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
        target = os.open("cat.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=descriptor)
        os.write(target, CAT.read_bytes())
        os.close(target)
    finally:
        os.close(descriptor)
    return base.joinpath(*[LONG] * levels)


def _refusing(real: Callable[..., Any], blocked: Path) -> Callable[..., Any]:
    """``real`` (os.stat, os.scandir, os.open), raising PermissionError for ``blocked``."""

    def call(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, (str, os.PathLike)) and Path(path) == blocked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    return call


# -- symbolic link loops ------------------------------------------------------------------------


def test_symlink_loops_are_one_problem_each(tmp_path: Path) -> None:
    (tmp_path / "self.png").symlink_to("self.png")
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    (tmp_path / "dir-loop").symlink_to("dir-loop")
    arguments = ["self.png", "a.png", "dir-loop/inside.png", "dir-loop"]
    found, problems = expand_inputs([str(tmp_path / name) for name in arguments])
    assert found == []
    assert [p.path for p in problems] == [str(tmp_path / name) for name in arguments]
    loop = "cannot read this path (a symbolic link that points to itself, or a loop of links)"
    assert problems == [f"{problem.path}: {loop}" for problem in problems]


def test_a_loop_inside_a_folder_is_reported_and_its_neighbours_found(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(CAT, folder / "sub" / "cat.png")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "up").symlink_to("..")  # a link to a folder is not followed: no endless walk
    (folder / "notes.txt").symlink_to("notes.txt")  # not an image name: not looked at
    found, problems = expand_inputs([str(folder)])
    assert [relative.as_posix() for _, relative in found] == ["sub/cat.png"]
    assert [p.path for p in problems] == [str(folder / "loop.jpg")]


def test_loops_through_the_cli_fail_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop.name)
    code, out, err, document = _localize(tmp_path, capsys, loop, CAT, tmp_path / "a\nb.png")
    assert code == 1
    assert [line for line in err if str(loop) in line] == [
        f"error: {loop}: cannot read this path (a symbolic link that points to itself, or a "
        "loop of links)"
    ]
    assert err[-1] == "gapcam: 1 of 3 inputs done, 2 failed"
    assert f"error: {tmp_path}/a\\nb.png: no such file; check the path" in err
    _assert_one_line_each(err)
    assert [e["input"] for e in document["errors"]] == [str(loop), str(tmp_path / "a\nb.png")]
    assert [r["input"] for r in document["results"]] == [str(CAT)]
    assert out[0].startswith(f"{CAT}  (")


# -- folders deeper than PATH_MAX ---------------------------------------------------------------


def test_a_folder_deeper_than_path_max_is_one_problem(tmp_path: Path) -> None:
    bottom = _deep_folder(tmp_path / "deep")
    shutil.copy(CAT, tmp_path / "deep" / "top.png")
    found, problems = expand_inputs([str(tmp_path / "deep")])
    assert [relative.as_posix() for _, relative in found][-1] == "top.png"
    assert len(problems) == 1  # the first folder whose path is too long; nothing below it
    assert len(problems[0].path) > 4096
    assert bottom.as_posix().startswith(problems[0].path)
    assert problems[0].endswith(
        ": cannot list this folder (the path is longer than the system allows); its images "
        "are left out"
    )
    too_long = tmp_path / ("x" * 300 + ".png")  # one name over NAME_MAX
    _, problems = expand_inputs([str(too_long), str(bottom / "cat.png")])
    assert [p.path for p in problems] == [str(too_long), str(bottom / "cat.png")]
    assert all("the path is longer than the system allows" in p for p in problems)
    with pytest.raises(ImageError, match="longer than the system allows"):
        load_image(bottom / "cat.png")


def test_deep_folders_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bottom = _deep_folder(tmp_path / "deep", levels=21)
    middle = tmp_path / "deep" / LONG / LONG  # reaches the same folder again: reported once
    code, _, err, document = _localize(tmp_path, capsys, tmp_path / "deep", middle, CAT)
    assert code == 1
    assert err[-1] == "gapcam: 1 of 2 inputs done, 1 failed"
    _assert_one_line_each(err)
    (line,) = [line for line in err if line.startswith("error:")]
    assert line.startswith(f"error: {tmp_path}/deep/{LONG[:50]}")
    assert line.endswith("; its images are left out")
    assert bottom.as_posix().startswith(document["errors"][0]["input"])
    shutil.rmtree(tmp_path / "deep")


# -- permissions --------------------------------------------------------------------------------


def test_a_file_in_a_folder_without_search_permission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked" / "cat.png"
    locked.parent.mkdir()
    shutil.copy(CAT, locked)
    monkeypatch.setattr(os, "stat", _refusing(os.stat, locked))
    monkeypatch.setattr(os, "open", _refusing(os.open, locked))
    found, problems = expand_inputs([str(locked)])
    assert found == []
    assert problems == [
        f"{locked}: cannot read this path (Permission denied); check its permissions"
    ]
    with pytest.raises(ImageError, match=r"cannot read the file \(Permission denied\)"):
        load_image(locked)
    code, _, err, document = _localize(tmp_path, capsys, locked, CAT)
    assert code == 1
    assert err[-1] == "gapcam: 1 of 2 inputs done, 1 failed"
    assert document["errors"] == [{"input": str(locked), "error": str(problems[0])}]


def test_an_unreadable_subfolder_is_a_failure_not_a_silence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    for relative in ("a.png", "secret/b.png", "secret/deeper/c.png", "open/d.png"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CAT, folder / relative)
    monkeypatch.setattr(os, "scandir", _refusing(os.scandir, folder / "secret"))
    found, problems = expand_inputs([str(folder)])
    assert [relative.as_posix() for _, relative in found] == ["a.png", "open/d.png"]
    assert problems == [
        f"{folder / 'secret'}: cannot list this folder (Permission denied); its images are left out"
    ]
    code, _, err, document = _localize(tmp_path, capsys, folder)
    assert code == 1
    assert err[-1] == "gapcam: 2 of 3 inputs done, 1 failed"
    assert document["errors"][0]["input"] == str(folder / "secret")


def test_a_folder_that_cannot_be_listed_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "closed"
    folder.mkdir()
    monkeypatch.setattr(os, "scandir", _refusing(os.scandir, folder))
    found, problems = expand_inputs([str(folder)])
    assert found == []
    assert [p.path for p in problems] == [str(folder)]  # not also "holds no image files"


def _locked_tree(tmp_path: Path) -> Path:
    """photos/a.png, photos/secret/b.png with photos/secret unreadable (mode 000), and
    locked/c.png with locked readable but not searchable (600); returns photos/."""
    folder = tmp_path / "photos"
    (folder / "secret").mkdir(parents=True)
    shutil.copy(CAT, folder / "a.png")
    shutil.copy(CAT, folder / "secret" / "b.png")
    (tmp_path / "locked").mkdir()
    shutil.copy(CAT, tmp_path / "locked" / "c.png")
    (folder / "secret").chmod(0o000)
    (tmp_path / "locked").chmod(0o600)  # readable, not searchable
    return folder


@pytest.mark.skipif(ROOT, reason="root reads and searches every folder whatever its mode")
def test_real_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _locked_tree(tmp_path)
    try:
        code, _, err, document = _localize(tmp_path, capsys, folder, tmp_path / "locked" / "c.png")
    finally:
        (folder / "secret").chmod(0o755)
        (tmp_path / "locked").chmod(0o755)
    assert code == 1
    assert err[-1] == "gapcam: 1 of 3 inputs done, 2 failed"
    assert sorted(e["input"] for e in document["errors"]) == sorted(
        [str(folder / "secret"), str(tmp_path / "locked" / "c.png")]
    )
    _assert_one_line_each(err)


@pytest.mark.slow
@pytest.mark.skipif(
    not ROOT or shutil.which("setpriv") is None, reason="needs root and setpriv to drop them"
)
def test_real_permissions_as_root_without_its_override(tmp_path: Path) -> None:
    """The same as a user: root that has given up reading and searching past permission bits
    (``setpriv`` drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), in a subprocess."""
    folder = _locked_tree(tmp_path)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    argv = [*drop, sys.executable, "-m", "gapcam", "localize", str(folder)]
    argv += [str(tmp_path / "locked" / "c.png"), "--out", str(tmp_path / "out")]
    try:
        done = subprocess.run(
            [*argv, "--no-overlay", "--backend", "eager", "-q"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        (folder / "secret").chmod(0o755)
        (tmp_path / "locked").chmod(0o755)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"error: {folder / 'secret'}: cannot list this folder (Permission denied); its images "
        "are left out",
        f"error: {tmp_path / 'locked' / 'c.png'}: cannot read this path (Permission denied); "
        "check its permissions",
        "gapcam: 1 of 3 inputs done, 2 failed",
    ]


# -- names that are not plain ---------------------------------------------------------------------


def test_a_nul_in_a_name_is_refused_in_words(tmp_path: Path) -> None:
    _, problems = expand_inputs([f"{tmp_path}/a\x00b.png"])
    assert problems[0].endswith(": not a file name (it holds a NUL character)")
    with pytest.raises(ImageError, match="holds a NUL character"):
        load_image(f"{tmp_path}/a\x00b.png")


def test_names_with_control_characters_are_printed_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    title = tmp_path / "\x1b]0;TITLE\x07\x1b[31mred.png"
    broken = tmp_path / "line\nbreak.png"
    shutil.copy(CAT, title)
    broken.write_bytes(b"not a png")
    code, out, err, document = _localize(tmp_path, capsys, title, broken)
    assert code == 1
    printed = out + err
    _assert_one_line_each(printed)
    assert out[0].startswith(f"{tmp_path}/\\x1b]0;TITLE\\x07\\x1b[31mred.png  (")
    assert f"error: {tmp_path}/line\\nbreak.png: not an image file" in "\n".join(err)
    assert [r["input"] for r in document["results"]] == [str(title)]  # JSON keeps the name
    assert [e["input"] for e in document["errors"]] == [str(broken)]


def test_a_glob_match_that_cannot_be_examined_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a.png", "b.png"):
        shutil.copy(CAT, tmp_path / name)
    (tmp_path / "c.png").symlink_to("c.png")
    monkeypatch.setattr(os, "stat", _refusing(os.stat, tmp_path / "b.png"))
    found, problems = expand_inputs([str(tmp_path / "*.png")])
    assert [path.name for path, _ in found] == ["a.png"]
    assert [p.path for p in problems] == [str(tmp_path / "b.png"), str(tmp_path / "c.png")]


def test_problems_keep_the_exclusion_of_the_output_folder(tmp_path: Path) -> None:
    shutil.copy(CAT, tmp_path / "a.png")
    (tmp_path / "gapcam-out").mkdir()
    (tmp_path / "gapcam-out" / "loop.png").symlink_to("loop.png")  # skipped with the folder
    found, problems = images.expand_inputs([str(tmp_path)], exclude=[tmp_path / "gapcam-out"])
    assert [str(relative) for _, relative in found] == ["a.png"]
    assert problems == []
