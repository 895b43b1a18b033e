"""List files (``data.source: list``): images and labels named in a text or CSV file.

Two formats, chosen by the file's extension:

- text (any extension but ``.csv``): one ``<path> <label>`` per line, as Caffe's ``train.txt`` / ``val.txt``; the
  label is the last whitespace-separated token (so a path may hold spaces); blank lines and lines starting with
  ``#`` are skipped.
- CSV (``.csv``): a header row, the path in column ``path_column`` and the label in ``label_column``.

Paths are relative to the list's base folder (``data.list_root``, or the folder of the list file) and must stay
inside it. A label is a class name or an integer class index. Every problem (missing file, malformed line,
missing image, a path escaping the base folder, an unknown label) is one :class:`LrkConfigError` naming the file
and the line number.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrk.errors import LrkConfigError


@dataclass
class ListEntries:
    """The images of one list file, in file order."""

    file: Path
    key: str  # the config key that named the file (for messages): list_file, val_list_file, ...
    paths: list[Path]
    labels: list[str]  # as written (stripped)
    lines: list[int]  # 1-based line numbers in ``file``

    def where(self, i: int) -> str:
        return f"{self.file}:{self.lines[i]}"


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _resolve(file: Path, lineno: int, raw: str, base: Path, base_real: Path, key: str) -> Path:
    path = Path(raw).expanduser()
    full = path if path.is_absolute() else base / path
    real = Path(os.path.realpath(full))
    if real != base_real and base_real not in real.parents:
        raise LrkConfigError(
            f"{file}:{lineno}: the path {raw!r} escapes the list's folder {base} (it resolves to {real}); "
            f"paths in data.{key} must lie inside that folder (or set data.list_root to a folder above them)"
        )
    return full


def read_list_file(
    file: Path | str,
    *,
    key: str = "list_file",
    base: Path | str | None = None,
    path_column: str = "path",
    label_column: str = "label",
) -> ListEntries:
    """Parse one list file (text ``<path> <label>`` lines, or a CSV with a header) and check that every image
    exists inside ``base`` (default: the list file's folder)."""
    file = Path(file).expanduser()
    if not file.is_file():
        what = "is not a file" if file.exists() else "does not exist"
        raise LrkConfigError(
            f"data.{key}={file} {what}: point it at a list of '<path> <label>' lines or a CSV file"
        )
    base = file.parent if base is None else Path(base).expanduser()
    if not base.is_dir():
        raise LrkConfigError(f"data.list_root={base} is not a folder: it must hold the images of data.{key}")
    base_real = Path(os.path.realpath(base))
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise LrkConfigError(f"data.{key}={file} cannot be read as text: {err}") from err
    rows: list[tuple[int, str, str]] = []  # (line, path, label)
    if file.suffix.lower() == ".csv":
        reader = csv.reader(text.splitlines())
        header = next(reader, None)
        if header is None:
            raise LrkConfigError(
                f"data.{key}={file} is empty: expected a header row with columns "
                f"{path_column!r} and {label_column!r}"
            )
        header = [h.strip() for h in header]
        missing = [c for c in (path_column, label_column) if c not in header]
        if missing:
            raise LrkConfigError(
                f"{file}:1: the CSV header has no column {', '.join(repr(c) for c in missing)} "
                f"(columns: {', '.join(repr(h) for h in header)}); set data.path_column / data.label_column"
            )
        pi, li = header.index(path_column), header.index(label_column)
        for row in reader:
            lineno = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= max(pi, li) or not row[pi].strip() or not row[li].strip():
                raise LrkConfigError(
                    f"{file}:{lineno}: malformed CSV row {','.join(row)!r}: it needs a non-empty "
                    f"{path_column!r} and {label_column!r} ({len(header)} columns as in the header)"
                )
            rows.append((lineno, row[pi].strip(), row[li].strip()))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            parts = stripped.rsplit(None, 1)
            if len(parts) != 2:
                raise LrkConfigError(
                    f"{file}:{lineno}: malformed line {line!r}: expected '<path> <label>' "
                    "(a label after the path, separated by whitespace)"
                )
            rows.append((lineno, parts[0], parts[1]))
    if not rows:
        raise LrkConfigError(f"data.{key}={file} lists no images: expected '<path> <label>' lines")
    paths = [_resolve(file, n, p, base, base_real, key) for n, p, _ in rows]
    missing_at = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing_at:
        i = missing_at[0]
        more = f" ({len(missing_at) - 1} more missing)" if len(missing_at) > 1 else ""
        raise LrkConfigError(
            f"{file}:{rows[i][0]}: the image {rows[i][1]!r} does not exist (looked for {paths[i]}){more}; "
            f"paths in data.{key} are relative to {base}"
        )
    return ListEntries(file, key, paths, [r[2] for r in rows], [r[0] for r in rows])


def class_names_of(entries: ListEntries, classes: Sequence[str] | None) -> list[str]:
    """Class names: ``classes`` when given; else the sorted label names of ``entries``, or, when every label
    is an integer, the indices ``"0" .. str(max)`` (labels are class indices, as in Caffe lists)."""
    if classes is not None:
        return list(classes)
    if all(_is_int(label) for label in entries.labels):
        values = [int(label) for label in entries.labels]
        if min(values) < 0:
            i = values.index(min(values))
            raise LrkConfigError(
                f"{entries.where(i)}: label {entries.labels[i]!r} is invalid: integer labels are class "
                "indices 0..K-1"
            )
        return [str(k) for k in range(max(values) + 1)]
    if any(_is_int(label) for label in entries.labels) and not all(
        _is_int(label) for label in entries.labels
    ):
        i = next(i for i, label in enumerate(entries.labels) if _is_int(label))
        j = next(j for j, label in enumerate(entries.labels) if not _is_int(label))
        raise LrkConfigError(
            f"{entries.where(i)}: label {entries.labels[i]!r} is an integer but {entries.where(j)} has the "
            f"name {entries.labels[j]!r}: use class names or class indices throughout, or set data.classes"
        )
    return sorted(set(entries.labels))


def label_indices(entries: ListEntries, names: Sequence[str]) -> np.ndarray:
    """``int64`` class index of every entry: a label that is a class name is that class; else an integer
    label is the index itself. Any other label is an error naming its line and the valid classes."""
    lookup = {name: k for k, name in enumerate(names)}
    out = np.empty(len(entries.labels), dtype=np.int64)
    for i, label in enumerate(entries.labels):
        if label in lookup:
            out[i] = lookup[label]
        elif _is_int(label) and 0 <= int(label) < len(names):
            out[i] = int(label)
        else:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise LrkConfigError(
                f"{entries.where(i)}: unknown label {label!r}: the classes are {shown} "
                f"(names, or indices 0..{len(names) - 1})"
            )
    return out
