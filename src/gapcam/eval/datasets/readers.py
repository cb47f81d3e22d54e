"""The wsolevaluation metadata reader and the CSV reader."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from gapcam.console import safe_text
from gapcam.errors import DatasetError
from gapcam.eval.datasets.core import (
    Entry,
    Problems,
    locate,
    mask_problem,
    outside,
    parse_box,
    parse_int,
    read_lines,
    read_text,
)

CSV_HEADER = ["path", "label", "x0", "y0", "x1", "y1"]
WSOL_REQUIRED = ("image_ids.txt", "class_labels.txt", "localization.txt")


def read_wsol(
    folder: Path, root: Path, problems: Problems
) -> tuple[list[Entry], tuple[tuple[int, str, str], ...]]:
    """wsolevaluation metadata in ``folder``; image and mask paths are relative to ``root``
    and may not leave it (``core.locate``).

    Returns the entries in ``image_ids.txt`` order and the class table of ``class_names.txt``
    (index, WordNet id, file:line), empty when that file is absent.
    """
    missing = [name for name in WSOL_REQUIRED if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"{safe_text(folder)}: missing {', '.join(missing)} (wsolevaluation metadata)"
        )
    entries: dict[str, Entry] = {}
    for where, cells in read_lines(folder / "image_ids.txt"):
        image = ",".join(cells)
        if image in entries:
            problems.add(where, f"{image}: listed twice (first at {entries[image].where})", image)
            continue
        path = locate(root, image)
        if path is None:
            problems.add(where, outside(image, image, root), image)
        entries[image] = Entry(image, path, where)
    for where, cells in read_lines(folder / "class_labels.txt"):
        entry = _entry(entries, cells, 2, "path,label", where, problems)
        if entry is None:
            continue
        if entry.label is not None:
            problems.add(
                where, f"{entry.image}: second label (first at {entry.label_where})", entry.image
            )
            continue
        entry.label, entry.label_where = cells[1], where
    if (folder / "image_sizes.txt").is_file():
        _read_sizes(folder / "image_sizes.txt", entries, problems)
    for where, cells in read_lines(folder / "localization.txt"):
        if len(cells) == 3:
            _add_mask(entries, cells, root, where, problems)
            continue
        entry = _entry(entries, cells, 5, "path,x0,y0,x1,y1", where, problems)
        box = parse_box(cells[1:], where, problems, cells[0]) if entry is not None else None
        if entry is not None and box is not None:
            entry.boxes.append((box, where))
    table = _class_table(folder / "class_names.txt", problems)
    return list(entries.values()), table


def _entry(
    entries: dict[str, Entry],
    cells: list[str],
    count: int,
    expected: str,
    where: str,
    problems: Problems,
) -> Entry | None:
    """The entry a metadata line is about, after checking its number of fields."""
    image = cells[0]
    if len(cells) != count:
        problems.add(
            where, f"{len(cells)} fields; expected {expected}", image if image in entries else None
        )
        return None
    entry = entries.get(image)
    if entry is None:
        problems.add(where, f"{image}: not listed in image_ids.txt")
    return entry


def _read_sizes(path: Path, entries: dict[str, Entry], problems: Problems) -> None:
    for where, cells in read_lines(path):
        entry = _entry(entries, cells, 3, "path,width,height", where, problems)
        if entry is None:
            continue
        width = parse_int(cells[1], "width", where, problems, entry.image)
        height = parse_int(cells[2], "height", where, problems, entry.image)
        if width is not None and height is not None:
            entry.size, entry.size_where = (width, height), where


def _add_mask(
    entries: dict[str, Entry], cells: list[str], root: Path, where: str, problems: Problems
) -> None:
    """``path,mask,ignore`` (wsolevaluation's OpenImages layout; ignore on the first line)."""
    entry = _entry(entries, cells, 3, "path,mask,ignore", where, problems)
    if entry is None:
        return
    mask = locate(root, cells[1])
    if mask is None:
        problems.add(where, outside(entry.image, cells[1], root), entry.image)
    else:
        entry.masks.append((mask, where))
    if cells[2]:
        if entry.ignore is not None:
            problems.add(where, f"{entry.image}: a second ignore mask", entry.image)
        entry.ignore = locate(root, cells[2])
        if entry.ignore is None:
            problems.add(where, outside(entry.image, cells[2], root), entry.image)
        elif (problem := mask_problem(entry.ignore)) is not None:
            problems.add(where, f"{entry.image}: ignore {problem}", entry.image)


def _class_table(path: Path, problems: Problems) -> tuple[tuple[int, str, str], ...]:
    if not path.is_file():
        return ()
    table = []
    for where, cells in read_lines(path):
        if len(cells) < 2 or not cells[0].isdigit():
            problems.add(where, f"expected index,wordnet_id,name; got {','.join(cells)!r}")
            continue
        table.append((int(cells[0]), cells[1], where))
    return tuple(table)


def read_csv(path: Path, root: Path, problems: Problems) -> list[Entry]:
    """``path,label,x0,y0,x1,y1`` rows (blank and ``#`` lines skipped, optional header); image
    paths are relative to ``root`` and may not leave it (``core.locate``)."""
    entries: dict[tuple[str, str], Entry] = {}
    text = read_text(path)
    try:
        rows = list(enumerate(csv.reader(io.StringIO(text, newline="")), 1))
    except csv.Error as exc:
        raise DatasetError(f"{safe_text(path)}: cannot read it as a CSV file ({exc})") from exc
    for number, row in rows:
        where, cells = f"{path}:{number}", [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if number == 1 and [c.lower() for c in cells] == CSV_HEADER:
            continue
        if len(cells) != 6:
            problems.add(where, f"{len(cells)} fields; expected {','.join(CSV_HEADER)}", cells[0])
            continue
        image, label = cells[0], cells[1]
        box = parse_box(cells[2:], where, problems, image)
        entry = entries.get((image, label))
        if entry is None:
            located = locate(root, image)
            if located is None:
                problems.add(where, outside(image, image, root), image)
            entry = entries[image, label] = Entry(image, located, where, "", label, where)
        if box is not None:
            entry.boxes.append((box, where))
    return name_by_label(list(entries.values()))


def name_by_label(entries: list[Entry]) -> list[Entry]:
    """An image annotated with several labels becomes one sample per label: ``image#label``."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.image] = counts.get(entry.image, 0) + 1
    for entry in entries:
        if counts[entry.image] > 1:
            entry.name = f"{entry.image}#{entry.label}"
    return entries
