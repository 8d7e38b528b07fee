"""Read raw records from a local file or a Hugging Face Hub dataset, as `(origin, row_dict)` pairs.

Local files, by extension:
    .jsonl   one JSON object a line, UTF-8 (blank lines are ignored; line numbers stay those of the file). Each
             line is decoded on its own, so a line with a byte that is not UTF-8 is one bad record (named by
             line and, where the line still parses, field), skippable like a malformed line.
    .json    a list of objects, or an object {"data": [...]}, UTF-8; a bad byte or malformed JSON makes the whole
             file unusable (DataError naming the line).
    .parquet read with pyarrow, one record batch at a time; a truncated or corrupt file is a DataError naming it.
A leading UTF-8 byte-order mark is ignored. Anything else that exists on disk is an error, and a missing file is
`DataFileNotFound` (a DataError and a FileNotFoundError). A string that is not an existing path and does not end in
one of these extensions is a Hub spec `NAME[:CONFIG][@SPLIT]`, e.g. `allenai/wildguardmix:wildguardtrain@train`,
read with `datasets.load_dataset` (imported only then; the readers supply default config and split).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from repbend.data.errors import DataError, DataFileNotFound, HubUnavailable

LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet")
BOM = b"\xef\xbb\xbf"
# the code points that errors="surrogateescape" maps undecodable bytes to
_ESCAPED = re.compile("[\udc80-\udcff]")

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
    check_file(path)
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


def check_file(path: str, what: str = "data file") -> None:
    """DataFileNotFound when `path` does not exist, DataError when it is not a regular file."""
    if not os.path.exists(path):
        raise DataFileNotFound(path, what)
    if not os.path.isfile(path):
        raise DataError(path, f"not a file (expected a {what})", reason="not a file")


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except OSError as e:  # permissions, a file removed since the check, ...
        raise DataError(path, f"cannot be read ({e.strerror or e})", reason="unreadable file") from None


def read_text(path, what: str = "data file", *, json_fields: bool = False) -> str:
    """The whole file as UTF-8 text (a leading byte-order mark dropped); DataFileNotFound / DataError naming the
    file, and for a byte that is not UTF-8 its line and column (and with `json_fields` its JSON field)."""
    path = os.path.expanduser(os.fspath(path))
    check_file(path, what)
    with _open_binary(path) as f:
        data = f.read()
    return decode_utf8(data.removeprefix(BOM), path, json_fields=json_fields)


def decode_utf8(data: bytes, where: str, *, first_line: int = 1, json_fields: bool = False) -> str:
    """`data` decoded as UTF-8, or a DataError at `where:LINE` naming the first undecodable byte and its byte
    column; with `json_fields`, also the JSON field that holds it when the text still parses as JSON."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        field = _field_with_bad_bytes(data) if json_fields else None
        raise DataError(f"{where}:{line}", f"not valid UTF-8 (byte 0x{data[e.start]:02x} at byte column {column})",
                        field=field, reason="not valid UTF-8") from None


def _field_with_bad_bytes(data: bytes) -> str | None:
    """The path (e.g. "prompt", "data[3].messages[0].content") of the first JSON string holding an undecodable
    byte, or None when the text is not JSON."""
    try:
        doc = json.loads(data.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError:
        return None

    def find(value, path: str) -> str | None:
        if isinstance(value, str):
            return path if _ESCAPED.search(value) else None
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
            if isinstance(key, str) and _ESCAPED.search(key):
                return sub
            found = find(child, sub)
            if found:
                return found
        return None

    return find(doc, "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_jsonl(path: str, on_error) -> Iterator[Record]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                line = decode_utf8(raw, path, first_line=lineno, json_fields=True)
            except DataError as err:
                _emit(err, on_error)
                continue
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
    text = read_text(path, json_fields=True)  # a bad byte makes the whole file unusable: never skippable
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
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
    """Rows of a Parquet file; pyarrow's errors (a truncated file, a corrupt page, a non-Parquet file) become a
    DataError naming the file and, once reading has started, the first row that could not be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    broken = (pa.ArrowException, OSError, UnicodeDecodeError)
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except broken as e:
        raise DataError(path, f"not a readable Parquet file ({_first_line(e)})",
                        reason="corrupt Parquet file") from None
    i = 0
    while True:
        try:
            batch = next(batches, None)
            rows = None if batch is None else batch.to_pylist()
        except broken as e:
            raise DataError(f"{path}:row {i}", f"corrupt Parquet data from this row on ({_first_line(e)})",
                            reason="corrupt Parquet file") from None
        if rows is None:
            return
        for row in rows:
            yield f"{path}:row {i}", row
            i += 1


def _read_hub(spec: HubSpec) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise HubUnavailable(
            spec.name, "not a local file, and reading it from the Hugging Face Hub needs the `datasets` package "
            "(pip install datasets); or pass a local .jsonl/.json/.parquet file instead", reason="no datasets package"
        ) from None
    label = f"{spec.name}{':' + spec.config if spec.config else ''}[{spec.split}]"
    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except Exception as e:  # network, cache, unknown name/config/split: all input problems, kept in one line
        raise DataError(label, f"cannot be loaded from the Hugging Face Hub ({type(e).__name__}: {_first_line(e)})",
                        reason="hub load error") from e
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


def get_label(row: dict, origin: str, name: str, allowed: tuple[str, ...] | None = None,
              normalised=None) -> str | None:
    """A label field, matched one way for every label of every format: surrounding whitespace trimmed and case
    folded. None stays None; a non-string, or (when `allowed` is given) a value outside it, is a DataError naming the
    field. Each value the matching changed is counted in `normalised[name]` (a Counter, the data report's)."""
    value = get_field(row, origin, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(origin, f"expected a label string, got {value!r}", field=name,
                        reason=f"non-string label in '{name}'")
    norm = value.strip().lower()
    if allowed is not None and norm not in allowed:
        raise DataError(origin, f"unknown label {value!r} (expected {'/'.join(allowed)})", field=name,
                        reason=f"unknown label in '{name}'")
    if norm != value and normalised is not None:
        normalised[name] += 1
    return norm


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
