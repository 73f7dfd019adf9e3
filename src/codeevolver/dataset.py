"""Datasets: ``.jsonl``, ``.json`` or ``.csv`` files of examples (one dict per row).

A bad file or row becomes a :class:`DatasetError` naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from codeevolver.errors import DatasetError

Example = dict[str, Any]


def load_dataset(path: Path, input_keys: list[str] | None = None) -> list[Example]:
    """Load every row of ``path``; check each has the ``input_keys``."""
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist", "fix the path in codeevolver.toml [program]")
    suffix = path.suffix.lower()
    loaders = {".jsonl": _load_jsonl, ".json": _load_json, ".csv": _load_csv}
    if suffix not in loaders:
        raise DatasetError(f"dataset {path} has an unsupported extension {suffix!r}", "use .jsonl, .json or .csv")
    try:
        rows = loaders[suffix](path)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"dataset {path} is not UTF-8 text ({exc.reason})", "save it as UTF-8") from None
    if not rows:
        raise DatasetError(f"dataset {path} has no rows", "add at least one example")
    for line, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(
                f"{path}:{line}: row is {type(row).__name__}, expected an object",
                'write each example as a JSON object, e.g. {"question": ..., "answer": ...}',
            )
        missing = [key for key in input_keys or [] if key not in row]
        if missing:
            raise DatasetError(
                f"{path}:{line}: row lacks the input key(s) {', '.join(missing)} the program takes",
                f"give every row the keys {input_keys} or fix [program] input_keys",
            )
    return [row for _, row in rows]


def _load_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            rows.append((number, json.loads(text)))
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})",
                "fix that line; each line must be one JSON object",
            ) from None
    return rows


def _load_json(path: Path) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})", "fix the file") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: top level is {type(data).__name__}", "make it a JSON list of objects")
    return [(index + 1, row) for index, row in enumerate(data)]


def _load_csv(path: Path) -> list[tuple[int, Any]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = []
        for row in reader:
            if None in row:
                raise DatasetError(
                    f"{path}:{reader.line_num}: more fields than the header has",
                    "fix that row's commas/quoting",
                )
            rows.append((reader.line_num, dict(row)))
    return rows


def split(rows: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``seed`` and split off a validation set (at least one row each)."""
    if len(rows) < 2:
        raise DatasetError(
            f"the trainset has {len(rows)} row(s); at least 2 are needed to split off a valset",
            "add rows or give [program] valset",
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    val = [rows[i] for i in order[:n_val]]
    train = [rows[i] for i in order[n_val:]]
    return train, val
