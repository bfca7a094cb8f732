"""Where clips come from: CSV/JSONL manifests, folders with sidecar captions, class folders -> ClipRecords.

Three layouts, picked by `load_records(path, format="auto")`:

- manifest: a .csv (header row) or .jsonl (one object a line) with `path` and `caption`, optional
  `label` (int), `start` and `end` (seconds). Relative paths are relative to the manifest's folder.
  A folder holding `manifest.csv` or `manifest.jsonl` reads that manifest.
- captions: a folder (searched recursively) of videos/images, each with a `.txt` caption of the same
  stem next to it. A media file without its .txt is skipped and counted (one warning for all of them):
  training a text-to-video model on a silently empty caption teaches it to ignore text; write an empty
  .txt to mean "no caption" on purpose.
- classes: a folder of class folders (UCF-101 style); label = index of the class among the sorted
  folders that hold media, caption derived from the name ("ApplyEyeMakeup" -> "apply eye makeup").

Rows naming a missing file are skipped, counted, and reported in one warning with their line
numbers; malformed rows are errors naming file, line and column. Files are only stat'ed here, never
opened: checking that they decode is ClipDataset's job.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from minisora.io import IMAGE_EXTS, VIDEO_EXTS

MEDIA_EXTS = IMAGE_EXTS | VIDEO_EXTS
FORMATS = ("auto", "manifest", "captions", "classes")
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
MAX_LISTED = 5  # files named in one warning or error before "... and N more"


@dataclass(frozen=True)
class ClipRecord:
    path: str  # absolute path of a video or image
    caption: str
    label: int = -1  # class index, -1 when the source has no classes
    start: float | None = None  # seconds; the clip is sampled within [start, end]
    end: float | None = None
    source_line: int | None = None  # line in the manifest, for error messages


Skipped = list[tuple[str, str]]  # (path, reason)


def class_caption(name: str) -> str:
    """A caption from a class folder name: 'ApplyEyeMakeup' -> 'apply eye makeup', 'playing_guitar' -> 'playing guitar'."""
    words = re.split(r"[\s_\-]+", name.strip())
    # Split camelCase at lower->Upper and at the end of an acronym ("HTMLParser" -> "HTML Parser").
    split = [w for word in words for w in re.split(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", word)]
    return " ".join(w.lower() for w in split if w)


def is_media(path: Path) -> bool:
    return path.suffix.lower() in MEDIA_EXTS and not path.name.startswith(".")


def short_list(items: list[str]) -> str:
    """The first few items joined with '; ', then how many more there are."""
    more = f"; ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


# ---------------------------------------------------------------------------------------------
# Manifests


def _label(raw, where: str) -> int:
    """An optional integer class label; empty means -1 (no class)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return -1
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        return int(raw)
    raise ValueError(f"{where}, column 'label': expected an integer, got {raw!r}")


def _seconds(raw, column: str, where: str) -> float | None:
    """An optional time in seconds (>= 0); empty means unset."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        value = math.nan if isinstance(raw, bool) else float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}, column {column!r}: expected seconds >= 0, got {raw!r}")
    return value


def _record(row: dict, root: Path, where: str, line: int) -> ClipRecord:
    path, caption = row.get("path"), row.get("caption")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{where}, column 'path': expected a file path, got {path!r}")
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        raise ValueError(f"{where}, column 'caption': expected text, got {caption!r}")  # noqa: TRY004 (bad data)
    label = _label(row.get("label"), where)
    start, end = _seconds(row.get("start"), "start", where), _seconds(row.get("end"), "end", where)
    if start is not None and end is not None and end <= start:
        raise ValueError(f"{where}: 'end' ({end:g} s) must be after 'start' ({start:g} s)")
    full = os.path.normpath(os.path.join(root, os.path.expanduser(path.strip())))
    return ClipRecord(full, caption.strip(), label, start, end, line)


def _csv_rows(manifest: Path):
    """(line, row dict) for each data row; the line is where the row starts (quoted fields may span lines)."""
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{manifest}: empty manifest; expected a header row with 'path' and 'caption'")
        header = [h.strip().lower() for h in header]
        missing = [c for c in ("path", "caption") if c not in header]
        if missing:
            raise ValueError(
                f"{manifest}, line 1: missing column(s) {', '.join(map(repr, missing))}; "
                f"the header has {header}, expected at least 'path' and 'caption' (optional 'label', 'start', 'end')"
            )
        line = reader.line_num + 1
        for values in reader:
            if any(v.strip() for v in values):
                if len(values) > len(header):
                    raise ValueError(
                        f"{manifest}, line {line}: {len(values)} fields for {len(header)} columns; quote captions that contain commas"
                    )
                yield line, dict(zip(header, values))
            line = reader.line_num + 1


def _jsonl_rows(manifest: Path):
    with open(manifest, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}, line {line}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{manifest}, line {line}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004
            missing = [c for c in ("path", "caption") if c not in row]
            if missing:
                raise ValueError(
                    f"{manifest}, line {line}: missing key(s) {', '.join(map(repr, missing))}; "
                    f"found {sorted(row)}, expected at least 'path' and 'caption'"
                )
            yield line, row


def read_manifest(manifest: str | Path) -> tuple[list[ClipRecord], Skipped]:
    """Records from a .csv or .jsonl manifest; rows whose file is missing are skipped with one warning."""
    manifest = Path(manifest)
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{manifest}: unknown manifest type {suffix!r}; expected .csv or .jsonl")
    root = Path(os.path.abspath(manifest.parent))
    rows = _csv_rows(manifest) if suffix == ".csv" else _jsonl_rows(manifest)
    records, skipped, missing = [], [], []
    for line, row in rows:
        record = _record(row, root, f"{manifest}, line {line}", line)
        if os.path.isfile(record.path):
            records.append(record)
        else:
            skipped.append((record.path, f"{manifest.name} line {line}: file not found"))
            missing.append(f"line {line}: {row['path']}")
    if missing:
        warnings.warn(
            f"{manifest}: skipped {len(missing)} row(s) whose file does not exist: {short_list(missing)}", stacklevel=3
        )
    return records, skipped


# ---------------------------------------------------------------------------------------------
# Folders


def _media_files(folder: Path) -> list[Path]:
    """Media files under folder, recursively, sorted; hidden files and folders (".cache/") are left out."""
    return sorted(
        p for p in folder.rglob("*")
        if is_media(p) and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip


def read_caption_folder(folder: str | Path) -> tuple[list[ClipRecord], Skipped]:
    """Records from media files with same-stem .txt captions (recursive); files without one are skipped."""
    folder = Path(folder)
    records, skipped = [], []
    for media in _media_files(folder):
        sidecar = media.with_suffix(".txt")
        if sidecar.is_file():
            caption = " ".join(sidecar.read_text(encoding="utf-8-sig").split())
            records.append(ClipRecord(os.path.abspath(media), caption))
        else:
            skipped.append((os.path.abspath(media), f"no caption file {sidecar.name}"))
    if skipped:
        names = [os.path.relpath(p, folder) for p, _ in skipped]
        warnings.warn(
            f"{folder}: skipped {len(skipped)} media file(s) without a .txt caption of the same name: {short_list(names)}",
            stacklevel=3,
        )
    return records, skipped


def read_class_folders(folder: str | Path) -> tuple[list[ClipRecord], Skipped]:
    """Records from one folder per class; label = index in sorted class names, caption from the name."""
    folder = Path(folder)
    folders = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = [(d, files) for d in folders if (files := _media_files(d))]  # empty folders are not classes
    records = []
    for label, (class_dir, files) in enumerate(classes):
        caption = class_caption(class_dir.name)
        records.extend(ClipRecord(os.path.abspath(p), caption, label) for p in files)
    return records, []


def detect_format(path: str | Path) -> str:
    """'manifest', 'captions' or 'classes' from what is at `path`."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in (".csv", ".jsonl"):
            return "manifest"
        raise ValueError(f"{path}: a file source must be a .csv or .jsonl manifest, got {path.suffix!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such manifest or folder")
    if any((path / name).is_file() for name in MANIFEST_NAMES):
        return "manifest"
    top_media = [p for p in path.iterdir() if is_media(p) and p.is_file()]
    if any(p.with_suffix(".txt").is_file() for p in top_media):
        return "captions"
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not top_media and any(_media_files(d) for d in subdirs):
        return "classes"
    if top_media:
        return "captions"  # media without any captions: read_caption_folder says which are missing
    raise ValueError(
        f"{path}: cannot tell the layout; expected manifest.csv/.jsonl, media files with .txt captions, "
        "or one subfolder of media per class"
    )


def load_records(path: str, format: str = "auto") -> tuple[list[ClipRecord], Skipped]:
    """(records, skipped) from a manifest, a caption folder or class folders; errors when nothing is usable."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    source = Path(path)
    if format == "auto":
        format = detect_format(source)
    if format == "manifest" and source.is_dir():
        source = next((source / n for n in MANIFEST_NAMES if (source / n).is_file()), source / MANIFEST_NAMES[0])
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such {'manifest' if format == 'manifest' else 'folder'}")
    if format != "manifest" and not source.is_dir():
        raise ValueError(f"{source}: format {format!r} needs a folder")
    reader = {"manifest": read_manifest, "captions": read_caption_folder, "classes": read_class_folders}[format]
    records, skipped = reader(source)
    if not records:
        detail = f"; skipped {len(skipped)}: {short_list([f'{p} ({r})' for p, r in skipped])}" if skipped else ""
        raise ValueError(f"{source}: no usable clips (format {format!r}){detail}")
    return records, skipped
