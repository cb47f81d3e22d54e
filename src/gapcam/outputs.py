"""Atomic writers. Outputs go to a temporary name in the target folder and are then linked or
renamed into place, so a reader never sees half a file and a crash leaves no corrupt output.
Inputs are never overwritten; existing outputs only with ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from gapcam.errors import OutputError

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Outputs get the permissions a plain ``open(..., "w")`` would give (mkstemp makes them 0600).
FILE_MODE = 0o666 & ~_current_umask()


class OutputGuard:
    """Remembers the inputs of a run so that no output can replace one of them."""

    def __init__(self, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
        self.protected = {_identity(p) for p in inputs if p.exists()}
        self.overwrite = overwrite
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

    def protect(self, path: Path) -> None:
        """Add ``path`` to the inputs (a video whose frames arrive one by one)."""
        if path.exists():
            self.protected.add(_identity(path))

    def claim(self, target: Path) -> None:
        """``check`` ``target`` and keep its name for one output of this run: another output
        of the run with the same name is refused (it would replace the first, even with
        ``overwrite``)."""
        key = str(target.parent.resolve() / target.name)
        with self._lock:
            if key in self._claimed:
                raise OutputError(
                    f"{target}: another output of this run has this name; choose another name"
                )
            self.check(target)
            self._claimed.add(key)

    def check(self, target: Path) -> None:
        if target.is_dir():
            raise OutputError(f"{target}: is a folder; give a file name")
        if target.exists() and _identity(target) in self.protected:
            raise OutputError(f"{target}: is one of the inputs; refusing to overwrite it")
        if target.exists() and not self.overwrite:
            raise OutputError(
                f"{target}: already exists; pass overwrite=True or choose another name"
            )
        check_folder(target.parent)

    def write_bytes(self, target: Path, data: bytes, *, claimed: bool = False) -> Path:
        """``data`` written atomically at ``target``, whose name is claimed here unless the
        caller ``claimed`` it already (before the run's work)."""
        if claimed:
            self.check(target)
        else:
            self.claim(target)
        return atomic_write(target, data, overwrite=self.overwrite)

    @contextlib.contextmanager
    def file(self, target: Path) -> Iterator[Path]:
        """A temporary path next to ``target`` for a writer that needs a file name of its own
        (PyAV's muxer writing a video): on leaving the block without an error the finished file
        is moved to ``target`` (as ``atomic_write`` does, with the same checks); on an error or
        an interruption it is removed, so no partial output is ever left."""
        self.claim(target)
        temp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(
                prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent
            )
            temp = Path(name)
            os.fchmod(handle, FILE_MODE)
            os.close(handle)
            yield temp
            with open(temp, "rb+") as stream:
                os.fsync(stream.fileno())
            self.check(target)
            _place(temp, target, self.overwrite)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
        finally:
            if temp is not None:
                temp.unlink(missing_ok=True)


def check_folder(folder: Path) -> None:
    """Raise ``OutputError`` unless ``folder`` is, or can be created as, a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{existing}: is a file, not a folder; choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{existing}: folder is not writable; choose another output folder")


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _fill(stream: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` to an open file (tests replace this to simulate a full disk)."""
    stream.write(data)


#: the longest file name most file systems take, in bytes
NAME_BYTES = 255


def _temp_prefix(target: Path) -> str:
    """``.NAME.``, the start of ``target``'s temporary name: cut where the whole temporary name
    (8 random characters and ``.tmp`` follow) would not fit in ``NAME_BYTES``."""
    name = target.name
    while name and len(os.fsencode(f".{name}.")) > NAME_BYTES - 12:
        name = name[:-1]
    return f".{name}."


def _write_temp(target: Path, data: bytes, sync: bool = True, parents: bool = True) -> Path:
    """``data`` in a new temporary file next to ``target``, flushed to disk when ``sync``;
    removed on error. ``parents``: make the folder first when it is missing."""
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent
    )
    temp = Path(temp_name)
    try:
        os.fchmod(handle, FILE_MODE)
        with os.fdopen(handle, "wb") as stream:
            _fill(stream, data)
            stream.flush()
            if sync:
                os.fsync(stream.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def atomic_write_all(files: Mapping[Path, bytes]) -> None:
    """Replace several files together: every one is first written in full to a temporary file
    (where a full disk or any other write error stops everything, leaving the old files as they
    were), and only then are all renamed into place."""
    temps: list[tuple[Path, Path]] = []
    try:
        for target, data in files.items():
            try:
                temps.append((_write_temp(target, data), target))
            except OSError as exc:
                raise OutputError(
                    f"{target}: cannot write ({exc.strerror or exc}); no file was replaced"
                ) from exc
        for temp, target in temps:
            try:
                os.replace(temp, target)
            except OSError as exc:
                raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
    finally:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)


def atomic_write(
    target: Path, data: bytes, *, overwrite: bool = False, sync: bool = True, parents: bool = True
) -> Path:
    """Write ``data`` to ``target`` through a temporary file in the same folder; ``OutputError``
    (nothing left behind) when it cannot. ``sync=False`` skips the fsync, for caches, where an
    entry lost in a crash is only a miss. ``parents=False``: the folder must exist (it is never
    made again, e.g. by a Ray actor after a cancelled run removed it)."""
    temp = None
    try:
        temp = _write_temp(target, data, sync, parents)
        _place(temp, target, overwrite)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if temp is not None and temp.exists():
            temp.unlink()
    return target


#: what ``os.link`` raises where the filesystem has no hard links (FAT, exFAT, many SMB shares)
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


def _place(temp: Path, target: Path, overwrite: bool) -> None:
    """Move a finished temporary file to ``target`` (replacing it only when ``overwrite``).

    Without ``overwrite`` a file that appeared at ``target`` meanwhile is never replaced: the
    temporary file is hard-linked to the name (which fails if it exists), or, where the
    filesystem has no hard links, the name is first claimed by creating it exclusively and
    the finished file then renamed over that claim (a reader may see it empty meanwhile)."""
    if overwrite:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)  # fails if the target appeared meanwhile: never clobbers
    except FileExistsError as exc:
        raise _exists(target) from exc
    except (OSError, AttributeError) as exc:  # AttributeError: a platform without os.link
        if isinstance(exc, OSError) and exc.errno not in NO_HARD_LINKS:
            raise
        _claim(target)
        try:
            os.replace(temp, target)
        except BaseException:
            target.unlink(missing_ok=True)  # our empty claim, not a file of someone else's
            raise
        return
    temp.unlink()


def _claim(target: Path) -> None:
    """Create ``target`` empty, failing if it exists (the fallback of ``_place``)."""
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
    except FileExistsError as exc:
        raise _exists(target) from exc


def _exists(target: Path) -> OutputError:
    return OutputError(f"{target}: already exists; pass overwrite=True")


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 92) -> bytes:
    """PNG (zlib level 1: fast, lossless) or JPEG bytes."""
    kind = IMAGE_FORMATS.get(fmt.lower())
    if kind is None:
        raise OutputError(f"fmt={fmt!r}: use png or jpg")
    buffer = io.BytesIO()
    if kind == "PNG":
        image.save(buffer, "PNG", compress_level=1)
    else:
        image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _utf8(text: str) -> bytes:
    """UTF-8, where a lone surrogate (a file name that is not UTF-8, as Python reads it) is
    written as its JSON escape ``\\udcff`` instead of failing: the document stays valid UTF-8
    and ``json.loads`` gives back the same string."""
    return text.encode("utf-8", "backslashreplace")


def encode_json(document: Any) -> bytes:
    return _utf8(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def write_json(
    document: Any, destination: str, guard: OutputGuard, *, claimed: bool = False
) -> None:
    """Write JSON to a file (atomically) or to standard output for ``-``."""
    if destination == "-":
        sys.stdout.write(encode_json(document).decode("utf-8"))
        sys.stdout.flush()
        return
    guard.write_bytes(Path(destination), encode_json(document), claimed=claimed)


class JsonStream:
    """``{**head, "results": [...], "errors": [...]}`` written while the results come in, so a
    run holds no list of them, into a temporary file: next to ``destination`` and moved into
    place by ``close`` (as ``atomic_write`` does), or, for ``-``, an anonymous one copied to
    standard output by ``close``. ``abort`` drops it: an interrupted run leaves no file and
    prints no half document. The bytes equal ``encode_json`` of the whole document."""

    def __init__(self, destination: str, head: Mapping[str, Any], guard: OutputGuard) -> None:
        self.target = None if destination == "-" else Path(destination)
        self.guard = guard
        self.count = 0
        self.temp: Path | None = None
        self.stream: Any = None
        if self.target is not None:
            guard.claim(self.target)  # no other output of the run may take its name
        try:
            if self.target is None:
                self.stream = tempfile.TemporaryFile()  # noqa: SIM115  # closed by close/abort
            else:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                handle, name = tempfile.mkstemp(
                    prefix=_temp_prefix(self.target), suffix=".tmp", dir=self.target.parent
                )
                self.temp = Path(name)
                self.stream = os.fdopen(handle, "wb")
                os.fchmod(handle, FILE_MODE)
        except OSError as exc:
            self.abort()
            where = self.target.parent if self.target is not None else "a temporary file"
            raise OutputError(f"{where}: cannot write ({exc.strerror or exc})") from exc
        opening = json.dumps(dict(head), indent=2, ensure_ascii=False)
        opening = opening[: opening.rfind("\n}")] + ",\n" if head else "{\n"
        try:
            self._write(opening + '  "results": [')
        except BaseException:
            self.abort()
            raise

    def add(self, result: Mapping[str, Any], items: Iterable[Any] | None = None) -> None:
        """One entry of ``results``. With ``items``, the entry's last key holds an empty list
        that is filled with ``items`` as they are read (a video's frames, spilled to a file
        while it ran): the entry is never whole in memory, the bytes are the same."""
        text = json.dumps(result, indent=2, ensure_ascii=False).replace("\n", "\n    ")
        if items is None:
            self._write(("," if self.count else "") + "\n    " + text)
            self.count += 1
            return
        if not text.endswith("[]\n    }"):
            raise ValueError("items: the entry's last key must hold an empty list")
        self._write(("," if self.count else "") + "\n    " + text[: -len("]\n    }")])
        first = True
        for item in items:
            body = json.dumps(item, indent=2, ensure_ascii=False).replace("\n", "\n        ")
            self._write(("\n" if first else ",\n") + "        " + body)
            first = False
        self._write(("]" if first else "\n      ]") + "\n    }")
        self.count += 1

    def close(self, errors: list[Any]) -> None:
        listed = json.dumps(errors, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        try:
            self._write(("\n  ]" if self.count else "]") + ',\n  "errors": ' + listed + "\n}\n")
            self.stream.flush()
            if self.target is None:
                self.stream.seek(0)
                with io.TextIOWrapper(self.stream, encoding="utf-8") as text:  # closes both
                    shutil.copyfileobj(text, sys.stdout)
                sys.stdout.flush()
                return
            os.fsync(self.stream.fileno())
            self.stream.close()
            assert self.temp is not None
            self.guard.check(self.target)
            _place(self.temp, self.target, self.guard.overwrite)
        except OSError as exc:
            where = self.target or "standard output"
            raise OutputError(f"{where}: cannot write ({exc.strerror or exc})") from exc
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the unfinished document: the temporary file is removed, and nothing is raised
        (it runs while another error, a full disk or an interruption, is on its way out);
        a no-op after ``close``."""
        try:
            if self.stream is not None and not self.stream.closed:
                self.stream.close()
        except OSError:
            pass  # the bytes it could not flush (a full disk) belong to the dropped document
        finally:
            temp, self.temp = self.temp, None
            if temp is not None:
                with contextlib.suppress(OSError):
                    temp.unlink(missing_ok=True)

    def _write(self, text: str) -> None:
        try:
            _fill(self.stream, _utf8(text))
        except OSError as exc:
            where = self.target or "a temporary file"
            raise OutputError(f"{where}: cannot write ({exc.strerror or exc})") from exc
