"""Pascal VOC / ImageNet XML annotation folders, parsed with line numbers (expat, no DTDs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from gapcam.console import safe_text
from gapcam.errors import DatasetError
from gapcam.eval.datasets.core import Entry, Problems, parse_int, read_text
from gapcam.eval.datasets.readers import name_by_label
from gapcam.images import IMAGE_SUFFIXES

#: Tried, in order, for an annotation whose <filename> has no suffix (ImageNet's XML).
GUESSED_SUFFIXES = (".JPEG", ".jpg", ".jpeg", ".png", ".JPG", ".PNG")
#: the largest XML file read (a VOC or ImageNet annotation is a few kilobytes)
MAX_XML_BYTES = 1024 * 1024


@dataclass
class Node:
    """An XML element: tag, the line it starts on, its text and its child elements."""

    tag: str
    line: int
    text: list[str] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)

    def find(self, tag: str) -> Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def value(self) -> str:
        return "".join(self.text).strip()


def parse_xml(path: Path) -> Node:
    """The document element of ``path``; raises ValueError(line, message) when malformed."""
    parser = expat.ParserCreate()
    top = Node("", 0)
    stack = [top]

    def start(tag: str, _attributes: dict[str, str]) -> None:
        node = Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def refuse_doctype(*_args: object) -> None:
        raise ValueError(parser.CurrentLineNumber, "a DOCTYPE declaration is not accepted")

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda _tag: stack.pop()
    parser.CharacterDataHandler = lambda data: stack[-1].text.append(data)
    parser.StartDoctypeDeclHandler = refuse_doctype
    with path.open("rb") as stream:
        data = stream.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise ValueError(1, f"over {MAX_XML_BYTES:,} bytes; not an annotation file gapcam reads")
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise ValueError(
            exc.lineno, f"not well-formed XML ({expat.ErrorString(exc.code)})"
        ) from exc
    return top.children[0]


def read_voc(
    source: Path, split: str | None, images: Path | None, problems: Problems
) -> list[Entry]:
    """Every ``*.xml`` under ``source/Annotations`` (or ``source``), narrowed by ``split``:
    ``ImageSets/Main/SPLIT.txt`` (VOC) or ``Annotations/CLS-LOC/SPLIT/`` (ImageNet)."""
    annotations = source / "Annotations" if (source / "Annotations").is_dir() else source
    wanted: set[str] | None = None
    if split:
        listing = source / "ImageSets" / "Main" / f"{split}.txt"
        if (annotations / "CLS-LOC" / split).is_dir():
            annotations = annotations / "CLS-LOC" / split
        elif listing.is_file():
            lines = read_text(listing).splitlines()
            wanted = {line.split()[0] for line in lines if line.strip()}
        else:
            raise DatasetError(
                f"split={split!r}: found neither {safe_text(listing)} nor CLS-LOC/{split}/"
            )
    files = sorted(p for p in annotations.rglob("*.xml") if wanted is None or p.stem in wanted)
    if not files:
        raise DatasetError(f"{safe_text(annotations)}: no .xml annotation files")
    entries: list[Entry] = []
    for path in files:
        entries += _read_file(path, source, annotations, images, problems)
    return entries


def _read_file(
    path: Path, source: Path, annotations: Path, images: Path | None, problems: Problems
) -> list[Entry]:
    image = str(path.relative_to(annotations).with_suffix(""))
    try:
        root = parse_xml(path)
    except (ValueError, OSError) as exc:
        line, message = exc.args if isinstance(exc, ValueError) else (0, str(exc))
        problems.add(f"{path}:{line}", f"{image}: {message}", image)
        return []
    filename = root.find("filename")
    where = f"{path}:{(filename or root).line}"
    named = filename.value() if filename else ""
    if Path(named).is_absolute() or ".." in Path(named).parts or "\x00" in named:
        base = images or source
        problems.add(where, f"{image}: <filename> {named!r} leaves {base}; refused", image)
        return []
    image_path = _find_image(
        path, filename.value() if filename else "", source, annotations, images
    )
    if image_path is None:
        looked = filename.value() if filename else path.stem
        problems.add(where, f"{image}: no image file {looked!r} found for this annotation", image)
        return []
    size = _size(root, path, problems, image)
    entries: dict[str, Entry] = {}
    objects = [node for node in root.children if node.tag == "object"]
    if not objects:
        problems.add(f"{path}:{root.line}", f"{image}: no <object> in this annotation", image)
    for node in objects:
        name = node.find("name")
        label = name.value() if name else ""
        label_where = f"{path}:{(name or node).line}"
        if not label:
            problems.add(label_where, f"{image}: an <object> without a <name>", image)
            continue
        entry = entries.get(label)
        if entry is None:
            entry = entries[label] = Entry(image, image_path, where, "", label, label_where)
            entry.size, entry.size_where = size
        box = _box(node, path, problems, image)
        if box is not None:
            entry.boxes.append(box)
    return name_by_label(list(entries.values()))


def _box(node: Node, path: Path, problems: Problems, image: str) -> tuple | None:
    """(box, file:line) of an <object>'s <bndbox>, or None after reporting what is wrong."""
    box = node.find("bndbox")
    if box is None:
        problems.add(f"{path}:{node.line}", f"{image}: an <object> without a <bndbox>", image)
        return None
    values = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        child = box.find(tag)
        text = child.value() if child is not None else ""
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            where = f"{path}:{(child if child is not None else box).line}"
            shown = f"<{tag}> {text!r} is not a number" if child is not None else f"no <{tag}>"
            problems.add(where, f"{image}: {shown}", image)
            return None
        values.append(value)
    return (values[0], values[1], values[2], values[3]), f"{path}:{box.line}"


def _size(
    root: Node, path: Path, problems: Problems, image: str
) -> tuple[tuple[int, int] | None, str]:
    """The annotated (width, height) from <size>; None when absent or 0 (unknown in VOC)."""
    size = root.find("size")
    if size is None:
        return None, ""
    where = f"{path}:{size.line}"
    width, height = (size.find(tag) for tag in ("width", "height"))
    if width is None or height is None:
        return None, ""
    w = parse_int(width.value(), "width", where, problems, image)
    h = parse_int(height.value(), "height", where, problems, image)
    if not w or not h:
        return None, ""
    return (w, h), where


def _find_image(
    xml: Path, filename: str, source: Path, annotations: Path, images: Path | None
) -> Path | None:
    """The image an annotation is about: its <filename> (or the XML's stem; suffixes guessed
    when there is none), beside the XML, in JPEGImages/, images/, ImageNet's Data/ mirror."""
    stem = filename or xml.stem
    names = [stem] if Path(stem).suffix.lower() in IMAGE_SUFFIXES else []
    names += [f"{stem}{suffix}" for suffix in GUESSED_SUFFIXES]
    relative = xml.parent.relative_to(annotations)
    if images is not None:
        folders = [images / relative, images]
    else:
        mirror = (
            [source / "Data" / xml.parent.relative_to(source / "Annotations")]
            if (annotations.is_relative_to(source / "Annotations"))
            else []
        )
        folders = [xml.parent, source / "JPEGImages", source / "images", *mirror, source]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None
