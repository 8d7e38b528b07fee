"""Readers for the public evaluation files: HarmBench behaviours (JSON or CSV), XSTest prompts (CSV), transfer
attack prompts (JSON or JSONL) and plain prompt lists (for `rep-shift`). Every reader returns plain data and raises
`BenchmarkFormatError` naming the file, the row and the field when a file is malformed; a missing file is
`DataFileNotFound`, a byte that is not UTF-8 a DataError naming its line. All files are UTF-8.

HarmBench JSON (the format of the paper's evaluation):
    {"data": [{"behavior": str, "context": str?, "default_target": str?, "messages": [{role, content}]?,
               "id" | "behavior_id" | "BehaviorID" | "meta": {"BehaviorID": ...}?: str, "category"?: str}, ...]}
  The user message carries the context as HarmBench lays it out: `context + "\\n\\n---\\n\\n" + request`. Without
  `messages` it is built from `behavior` and `context`. With `messages` (the file published with the RepBend code,
  whose user turn holds the behaviour alone) the conversation is sent as given (its last turn must be the user's),
  except that when `context` is present the last user message becomes `context + "\\n\\n---\\n\\n" + message`, as
  the reference evaluation does (left alone when it already starts with that context and separator).
  Rows without an id are numbered by their position ("0", "1", ...).
HarmBench CSV (`harmbench_behaviors_text_*.csv`): Behavior, FunctionalCategory, SemanticCategory, Tags,
  ContextString, BehaviorID (a quoted ContextString may span lines). The CSV has no targets; pass HarmBench's
  targets file (a JSON object BehaviorID -> target string) as `targets` to enable the attacks that need one.
  Copyright behaviours are skipped: HarmBench judges them with a hash check, not with the classifier, and the
  paper's 240 test items are standard + contextual ones.
XSTest CSV: id, type, prompt, ... Types starting with "contrast_" are the unsafe contrast prompts (subset
  "contrast"); all other types are safe prompts (subset "safe"). XSTest prompts are single-line: a record holding a
  line break (e.g. an unterminated quote that swallowed the following rows) is an error. An optional `answer`
  column (not in XSTest itself; the demo writes one) gives a prompt's expected answer, which the `demo` judge checks.
A benchmark file that yields no item (no data rows, or only HarmBench copyright behaviours) is an error naming it.
CSV records must have exactly as many cells as the header has columns.
Transfer file: ready-made attack prompts keyed by HarmBench BehaviorID, each prompt the complete user message:
  JSON  : {"<BehaviorID>": ["prompt", ...] or [{"prompt": str, "method": str?}, ...], ...}
  JSONL : one {"behavior_id": str, "prompt": str, "method": str?} per line ("id" is accepted for "behavior_id").
  A prompt with a method is run as attack "transfer:<method>", without one as "transfer".
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from repbend.data.errors import DataError
from repbend.data.sources import read_text

# HarmBench's own separator between a contextual behaviour's context and its request
CONTEXT_SEPARATOR = "\n\n---\n\n"


class BenchmarkFormatError(DataError):
    """A benchmark file that does not follow its format. str(err) reads
    `"<file>[:<line>]: row <row>: field '<field>': <problem>"` (line, row and field where they apply); CSV rows are
    1-based data rows and `line` the file line their record starts on, JSON rows 0-based indices into "data",
    JSONL rows 1-based lines."""

    def __init__(self, path, row, field_name, problem, *, line: int | None = None):
        origin = f"{path}" + (f":{line}" if line is not None else "") + (f": row {row}" if row is not None else "")
        super().__init__(origin, problem, field=field_name)
        self.path, self.row, self.line = str(path), row, line


@dataclass
class Item:
    """One benchmark prompt.

    `messages` is the conversation sent to the model (ends with the user turn) and `prompt` its last user message,
    context included. `behavior`/`context` are what the HarmBench classifier is shown; `target` is HarmBench's
    `default_target` (None where the benchmark has none). `subset`: "standard"/"contextual"/... for HarmBench,
    "safe"/"contrast" for XSTest."""
    benchmark: str
    id: str
    prompt: str
    messages: list[dict]
    behavior: str
    context: str | None = None
    target: str | None = None
    subset: str = "all"
    meta: dict = field(default_factory=dict)
    answer: str | None = None  # an expected answer (XSTest's optional `answer` column), checked by the demo judge


def harmbench_user_message(behavior: str, context: str | None) -> str:
    """The user message HarmBench sends for a behaviour: the context first, then the request."""
    return f"{context}{CONTEXT_SEPARATOR}{behavior}" if context else behavior


def _str_field(path, row, rec, names, required=False, line=None):
    """The first of `names` present in `rec` as a string; None when absent/empty and not required."""
    for name in names:
        if name in rec and rec[name] is not None:
            value = rec[name]
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise BenchmarkFormatError(path, row, name, f"expected a string, got {type(value).__name__}",
                                           line=line)
            value = str(value)
            if value.strip():
                return value
    if required:
        raise BenchmarkFormatError(path, row, names[0], "missing or empty", line=line)
    return None


def _check_messages(path, row, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BenchmarkFormatError(path, row, "messages", "expected a non-empty list of {role, content}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BenchmarkFormatError(path, row, f"messages[{k}]", "expected {\"role\": str, \"content\": str}")
    if messages[-1]["role"] != "user":
        raise BenchmarkFormatError(path, row, "messages", "the last message must be the user's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _unique(path, items: list[Item], rows: list[tuple]):
    """`rows`: (row, file line or None) of each item."""
    seen = {}
    for item, (row, line) in zip(items, rows):
        if item.id in seen:
            raise BenchmarkFormatError(path, row, "id", f"duplicate id {item.id!r} (first at row {seen[item.id]})",
                                       line=line)
        seen[item.id] = row
    return items


def read_harmbench(path, targets=None) -> list[Item]:
    """HarmBench behaviours from a JSON (`{"data": [...]}`) or CSV file; `targets` is an optional JSON file or dict
    BehaviorID -> target string (overrides/adds `default_target`)."""
    path = Path(path)
    if isinstance(targets, (str, Path)):
        targets_path = targets
        try:
            targets = json.loads(read_text(targets_path, "HarmBench targets file", json_fields=True))
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(targets_path, None, None, f"not valid JSON ({e.msg} at column {e.colno})",
                                       line=e.lineno) from None
        if not isinstance(targets, dict):
            raise BenchmarkFormatError(targets_path, None, None, "expected a JSON object BehaviorID -> target")
    targets = targets or {}
    if path.suffix.lower() == ".csv":
        items, rows = _read_harmbench_csv(path)
    else:
        items, rows = _read_harmbench_json(path)
    for item in items:
        if item.id in targets:
            item.target = str(targets[item.id])
    return _unique(path, _nonempty(path, items, "HarmBench behaviours"), rows)


def _nonempty(path, items: list, what: str) -> list:
    if not items:
        raise BenchmarkFormatError(path, None, None, f"no {what} in the file (an empty file, or every row skipped): "
                                   "nothing to evaluate")
    return items


def _read_harmbench_json(path: Path):
    try:
        doc = json.loads(read_text(path, "HarmBench file", json_fields=True))
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(path, None, None, f"not valid JSON ({e.msg} at column {e.colno})",
                                   line=e.lineno) from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise BenchmarkFormatError(path, None, "data", "expected a top-level object with a list \"data\"")
    items = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise BenchmarkFormatError(path, i, None, "expected an object")
        meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
        behavior = _str_field(path, i, rec, ["behavior"], required=True)
        context = _str_field(path, i, rec, ["context", "ContextString"]) or _str_field(path, i, meta, ["ContextString"])
        bid = (_str_field(path, i, rec, ["id", "behavior_id", "BehaviorID"])
               or _str_field(path, i, meta, ["BehaviorID"]) or str(i))
        target = _str_field(path, i, rec, ["default_target", "target"])
        if "messages" in rec and rec["messages"] is not None:
            messages = _check_messages(path, i, rec["messages"])
            last = messages[-1]["content"]
            if context and not last.startswith(context + CONTEXT_SEPARATOR):
                messages[-1]["content"] = harmbench_user_message(last, context)
        else:
            messages = [{"role": "user", "content": harmbench_user_message(behavior, context)}]
        subset = (_str_field(path, i, rec, ["category", "FunctionalCategory"])
                  or _str_field(path, i, meta, ["FunctionalCategory"]) or ("contextual" if context else "standard"))
        items.append(Item("harmbench", bid, messages[-1]["content"], messages, behavior, context, target, subset))
    return items, [(i, None) for i in range(len(items))]


def _read_csv(path: Path, what: str, required: list[str], *, single_line: bool = False):
    """[(row, line, {column: cell})] for the data records of a CSV file: `row` counts data records from 1, `line` is
    the file line the record starts on. Blank lines are skipped. A record must have exactly one cell per header
    column; with `single_line` no cell may hold a line break."""
    reader = csv.reader(io.StringIO(read_text(path, what), newline=""))
    records, end = [], 0
    try:
        header = next(reader, None)
        end = reader.line_num
        if not header:
            raise BenchmarkFormatError(path, None, None, "empty file (expected a header line)")
        for name in required:
            if name not in header:
                raise BenchmarkFormatError(path, "header", name, f"missing column (columns: {', '.join(header)})",
                                           line=1)
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            row = len(records) + 1
            _check_cells(path, row, start, end, header, cells, single_line)
            records.append((row, start, dict(zip(header, cells))))
    except csv.Error as e:
        raise BenchmarkFormatError(path, None, None, f"not valid CSV ({e})", line=end + 1) from None
    return records


def _check_cells(path, row, start, end, header, cells, single_line):
    if single_line:
        for name, cell in zip(header + ["(extra cell)"] * len(cells), cells):
            if "\n" in cell or "\r" in cell:
                span = f"lines {start}-{end}" if end > start else f"line {start}"
                raise BenchmarkFormatError(path, row, name, f"the record spans {span} but XSTest records are "
                                           "single-line (an unterminated quote?)", line=start)
    if len(cells) < len(header):
        raise BenchmarkFormatError(path, row, header[len(cells)], f"missing: the record has {len(cells)} cells, "
                                   f"the header {len(header)} columns ({', '.join(header)})", line=start)
    if len(cells) > len(header):
        raise BenchmarkFormatError(path, row, None, f"the record has {len(cells)} cells, the header "
                                   f"{len(header)} columns ({', '.join(header)}): an unquoted comma?", line=start)


def _read_harmbench_csv(path: Path):
    items, rows = [], []
    for n, line, rec in _read_csv(path, "HarmBench file", ["Behavior", "BehaviorID"]):
        category = (rec.get("FunctionalCategory") or "standard").strip()
        if category == "copyright":  # HarmBench judges these by hashing, not with the classifier
            continue
        behavior = _str_field(path, n, rec, ["Behavior"], required=True, line=line)
        bid = _str_field(path, n, rec, ["BehaviorID"], required=True, line=line)
        context = _str_field(path, n, rec, ["ContextString"], line=line)
        message = harmbench_user_message(behavior, context)
        meta = {k: rec.get(k) for k in ("SemanticCategory", "Tags") if rec.get(k)}
        items.append(Item("harmbench", bid, message, [{"role": "user", "content": message}], behavior, context,
                          None, category, meta))
        rows.append((n, line))
    return items, rows


def read_xstest(path) -> list[Item]:
    """XSTest prompts (CSV with id, type, prompt); subset "contrast" for `contrast_*` types, else "safe"."""
    path = Path(path)
    items, rows = [], []
    for n, line, rec in _read_csv(path, "XSTest file", ["id", "type", "prompt"], single_line=True):
        pid = _str_field(path, n, rec, ["id"], required=True, line=line)
        kind = _str_field(path, n, rec, ["type"], required=True, line=line).strip()
        prompt = _str_field(path, n, rec, ["prompt"], required=True, line=line)
        subset = "contrast" if kind.startswith("contrast_") else "safe"
        answer = _str_field(path, n, rec, ["answer"], line=line)
        items.append(Item("xstest", pid, prompt, [{"role": "user", "content": prompt}], prompt, None, None, subset,
                          {"type": kind}, answer))
        rows.append((n, line))
    return _unique(path, _nonempty(path, items, "XSTest prompts"), rows)


def read_transfer(path) -> dict[str, list[dict]]:
    """Transfer attack prompts: BehaviorID -> [{"prompt": str, "method": str | None}, ...] in file order."""
    path = Path(path)
    text = read_text(path, "transfer file", json_fields=True)
    out: dict[str, list[dict]] = {}

    def add(row, bid, entry):
        if isinstance(entry, str):
            entry = {"prompt": entry}
        if not isinstance(entry, dict):
            raise BenchmarkFormatError(path, row, "prompt", "expected a string or {\"prompt\", \"method\"?}")
        prompt = _str_field(path, row, entry, ["prompt"], required=True)
        method = _str_field(path, row, entry, ["method"])
        out.setdefault(str(bid), []).append({"prompt": prompt, "method": method})

    if path.suffix.lower() == ".jsonl":
        for n, rec in _jsonl_objects(path, _lines(text), "an object"):
            add(n, _str_field(path, n, rec, ["behavior_id", "id", "BehaviorID"], required=True), rec)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(path, None, None, f"not valid JSON ({e.msg} at column {e.colno})",
                                       line=e.lineno) from None
        if not isinstance(doc, dict):
            raise BenchmarkFormatError(path, None, None, "expected an object BehaviorID -> list of prompts")
        for bid, entries in doc.items():
            if not isinstance(entries, list):
                raise BenchmarkFormatError(path, bid, bid, "expected a list of prompts")
            for k, entry in enumerate(entries):
                add(f"{bid}[{k}]", bid, entry)
    return out


def read_prompts(path) -> list[str]:
    """Prompts for `rep-shift`: JSONL with a "prompt" field (by extension .jsonl/.json, or when the first non-empty
    line starts with "{"), else plain text, one prompt a line (blank lines skipped)."""
    path = Path(path)
    lines = _lines(read_text(path, "prompt file"))
    first = next((ln for ln in lines if ln.strip()), "")
    prompts = []
    if path.suffix.lower() in (".jsonl", ".json") or first.lstrip().startswith("{"):
        for n, rec in _jsonl_objects(path, lines, "an object with a \"prompt\" field"):
            prompts.append(_str_field(path, n, rec, ["prompt"], required=True))
    else:
        prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise BenchmarkFormatError(path, None, None, "no prompts")
    return prompts


def _lines(text: str) -> list[str]:
    """Lines split at "\\n" only: str.splitlines would also split at U+2028 and other separators, which JSON writes
    unescaped inside strings."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _jsonl_objects(path, lines, expected: str):
    """(line number, object) for each non-blank JSONL line; a line that is not a JSON object is an error."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(path, n, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise BenchmarkFormatError(path, n, None, f"expected {expected}")
        yield n, rec
