"""Read raw records from a local file or a Hugging Face Hub dataset, as `(origin, row_dict)` pairs.

Local files, by extension:
    .jsonl   one JSON object a line (blank lines are ignored; line numbers stay those of the file)
    .json    a list of objects, or an object {"data": [...]}
    .parquet read with pyarrow, one record batch at a time
Anything else that exists on disk is an error. A string that is not an existing path and does not end in
one of these extensions is a Hub spec `NAME[:CONFIG][@SPLIT]`, e.g. `allenai/wildguardmix:wildguardtrain@train`,
read with `datasets.load_dataset` (imported only then; the readers supply default config and split).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from repbend.data.errors import DataError

LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet")

Record = tuple[str, dict]


@dataclass(frozen=True)
class HubSpec:
    name: str
    config: str | None = None
    split: str = "train"


def is_local(source: str | os.PathLike) -> bool:
    s = os.fspath(source)
    return os.path.exists(s) or s.endswith(LOCAL_EXTENSIONS) or s.startswith((".", "/", "~"))


def parse_hub_spec(spec: str, default_config: str | None = None, default_split: str = "train") -> HubSpec:
    """`NAME[:CONFIG][@SPLIT]` -> HubSpec; the parts left out take the given defaults."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return HubSpec(name, config or default_config, split or default_split)


def read_records(source: str | os.PathLike, *, on_error: Callable[[DataError], None] | None = None,
                 hub_config: str | None = None, hub_split: str = "train") -> Iterator[Record]:
    """Yield `(origin, row)` for every record of `source`.

    A record that cannot be parsed (a malformed JSON line, a JSON value that is not an object) raises
    `DataError` naming file and line, or, when `on_error` is given, is passed to it and skipped.
    `hub_config` / `hub_split` are the defaults for a Hub spec that does not name them.
    """
    if not is_local(source):
        yield from _read_hub(parse_hub_spec(os.fspath(source), hub_config, hub_split))
        return
    path = os.path.expanduser(os.fspath(source))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith(".jsonl"):
        yield from _read_jsonl(path, on_error)
    elif path.endswith(".json"):
        yield from _read_json(path, on_error)
    elif path.endswith(".parquet"):
        yield from _read_parquet(path)
    else:
        raise DataError(path, f"unsupported file type (expected one of {', '.join(LOCAL_EXTENSIONS)})",
                        reason="unsupported file type")


def _emit(err: DataError, on_error) -> None:
    if on_error is None:
        raise err
    on_error(err)


def _read_jsonl(path: str, on_error) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                _emit(DataError(origin, f"malformed JSON ({e.msg} at column {e.colno})", reason="malformed JSON"),
                      on_error)
                continue
            if not isinstance(row, dict):
                _emit(DataError(origin, f"expected a JSON object, got {type(row).__name__}",
                                reason="not a JSON object"), on_error)
                continue
            yield origin, row


def _read_json(path: str, on_error) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:  # the whole file is unusable: never skippable
            raise DataError(f"{path}:{e.lineno}", f"malformed JSON ({e.msg} at column {e.colno})",
                            reason="malformed JSON") from None
    rows = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise DataError(path, 'expected a JSON list of objects or {"data": [...]}', reason="bad JSON layout")
    for i, row in enumerate(rows):
        origin = f"{path}:row {i}"
        if not isinstance(row, dict):
            _emit(DataError(origin, f"expected a JSON object, got {type(row).__name__}",
                            reason="not a JSON object"), on_error)
            continue
        yield origin, row


def _read_parquet(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{path}:row {i}", row
            i += 1


def _read_hub(spec: HubSpec) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading {spec.name!r} from the Hugging Face Hub needs the `datasets` package "
            "(pip install datasets); or pass a local .jsonl/.json/.parquet file instead") from None
    ds = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    label = f"{spec.name}{':' + spec.config if spec.config else ''}[{spec.split}]"
    for i, row in enumerate(ds):
        yield f"{label}:row {i}", dict(row)


def validated(source, parse: Callable[[str, dict], object], report, *, skip_invalid: bool,
              hub_config: str | None = None, hub_split: str = "train") -> Iterator[object]:
    """Read `source` and yield `parse(origin, row)` for every record.

    Counts every record in `report.rows_read`. A `DataError` (from the file or from `parse`) is raised, or
    with `skip_invalid` counted in `report.skipped` and the record dropped.
    """
    def skip(err: DataError) -> None:
        report.rows_read += 1
        report.skipped.add(err)

    for origin, row in read_records(source, on_error=skip if skip_invalid else None,
                                    hub_config=hub_config, hub_split=hub_split):
        report.rows_read += 1
        try:
            parsed = parse(origin, row)
        except DataError as err:
            if not skip_invalid:
                raise
            report.skipped.add(err)
            continue
        yield parsed


def get_field(row: dict, origin: str, name: str):
    """`row[name]`, or a DataError naming the field when the row lacks it."""
    if name not in row:
        keys = ", ".join(sorted(map(str, row))) or "no fields"
        raise DataError(origin, f"missing (the row has: {keys})", field=name, reason=f"missing field '{name}'")
    return row[name]


def get_text(row: dict, origin: str, name: str, *, nullable: bool = False) -> str | None:
    """A non-empty (not only whitespace) string field; None passes only when `nullable`."""
    value = get_field(row, origin, name)
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise DataError(origin, f"expected a string, got {type(value).__name__}", field=name,
                        reason=f"not a string in '{name}'")
    if not value.strip():
        raise DataError(origin, "empty", field=name, reason=f"empty '{name}'")
    return value
