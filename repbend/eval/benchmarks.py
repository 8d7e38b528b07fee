"""Readers for the public evaluation files: HarmBench behaviours (JSON or CSV), XSTest prompts (CSV), transfer
attack prompts (JSON or JSONL) and plain prompt lists (for `rep-shift`). Every reader returns plain data and raises
`BenchmarkFormatError` naming the file, the row and the field when a file is malformed.

HarmBench JSON (the format of the paper's evaluation):
    {"data": [{"behavior": str, "context": str?, "default_target": str?, "messages": [{role, content}]?,
               "id" | "behavior_id" | "BehaviorID" | "meta": {"BehaviorID": ...}?: str, "category"?: str}, ...]}
  `messages`, when present, is the conversation sent as is (its last turn must be the user's); otherwise the user
  message is built from `behavior` and `context` as HarmBench does (`context + "\\n\\n---\\n\\n" + behavior`).
  Rows without an id are numbered by their position ("0", "1", ...).
HarmBench CSV (`harmbench_behaviors_text_*.csv`): Behavior, FunctionalCategory, SemanticCategory, Tags,
  ContextString, BehaviorID. The CSV has no targets; pass HarmBench's targets file (a JSON object BehaviorID ->
  target string) as `targets` to enable the attacks that need one. Copyright behaviours are skipped: HarmBench judges
  them with a hash check, not with the classifier, and the paper's 240 test items are standard + contextual ones.
XSTest CSV: id, type, prompt, ... Types starting with "contrast_" are the unsafe contrast prompts (subset
  "contrast"); all other types are safe prompts (subset "safe").
Transfer file: ready-made attack prompts keyed by HarmBench BehaviorID, each prompt the complete user message:
  JSON  : {"<BehaviorID>": ["prompt", ...] or [{"prompt": str, "method": str?}, ...], ...}
  JSONL : one {"behavior_id": str, "prompt": str, "method": str?} per line ("id" is accepted for "behavior_id").
  A prompt with a method is run as attack "transfer:<method>", without one as "transfer".
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from repbend.data.errors import DataError

# HarmBench's own separator between a contextual behaviour's context and its request
CONTEXT_SEPARATOR = "\n\n---\n\n"


class BenchmarkFormatError(DataError):
    """A benchmark file that does not follow its format. str(err) reads
    `"<file>: row <row>: field '<field>': <problem>"` (row and field where they apply); CSV rows are 1-based data
    rows (file line = row + 1), JSON rows 0-based indices into "data", JSONL rows 1-based lines."""

    def __init__(self, path, row, field_name, problem):
        origin = f"{path}" + (f": row {row}" if row is not None else "")
        super().__init__(origin, problem, field=field_name)
        self.path, self.row = str(path), row


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


def harmbench_user_message(behavior: str, context: str | None) -> str:
    """The user message HarmBench sends for a behaviour: the context first, then the request."""
    return f"{context}{CONTEXT_SEPARATOR}{behavior}" if context else behavior


def _str_field(path, row, rec, names, required=False):
    """The first of `names` present in `rec` as a string; None when absent/empty and not required."""
    for name in names:
        if name in rec and rec[name] is not None:
            value = rec[name]
            if not isinstance(value, (str, int)):
                raise BenchmarkFormatError(path, row, name, f"expected a string, got {type(value).__name__}")
            value = str(value)
            if value.strip():
                return value
    if required:
        raise BenchmarkFormatError(path, row, names[0], "missing or empty")
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


def _unique(path, items: list[Item], rows: list):
    seen = {}
    for item, row in zip(items, rows):
        if item.id in seen:
            raise BenchmarkFormatError(path, row, "id", f"duplicate id {item.id!r} (first at row {seen[item.id]})")
        seen[item.id] = row
    return items


def read_harmbench(path, targets=None) -> list[Item]:
    """HarmBench behaviours from a JSON (`{"data": [...]}`) or CSV file; `targets` is an optional JSON file or dict
    BehaviorID -> target string (overrides/adds `default_target`)."""
    path = Path(path)
    if isinstance(targets, (str, Path)):
        try:
            targets = json.loads(Path(targets).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(targets, None, None, f"not valid JSON ({e})") from e
        if not isinstance(targets, dict):
            raise BenchmarkFormatError(targets, None, None, "expected a JSON object BehaviorID -> target")
    targets = targets or {}
    if path.suffix.lower() == ".csv":
        items, rows = _read_harmbench_csv(path)
    else:
        items, rows = _read_harmbench_json(path)
    for item in items:
        if item.id in targets:
            item.target = str(targets[item.id])
    return _unique(path, items, rows)


def _read_harmbench_json(path: Path):
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(path, None, None, f"not valid JSON ({e})") from e
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
        else:
            messages = [{"role": "user", "content": harmbench_user_message(behavior, context)}]
        subset = (_str_field(path, i, rec, ["category", "FunctionalCategory"])
                  or _str_field(path, i, meta, ["FunctionalCategory"]) or ("contextual" if context else "standard"))
        items.append(Item("harmbench", bid, messages[-1]["content"], messages, behavior, context, target, subset))
    return items, list(range(len(items)))


def _read_csv(path: Path, required: list[str]):
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for name in required:
            if name not in header:
                raise BenchmarkFormatError(path, "header", name, f"missing column (columns: {', '.join(header)})")
        # row numbers are 1-based data rows; the file line is row + 1 (the header)
        return [(n, rec) for n, rec in enumerate(reader, start=1)]


def _read_harmbench_csv(path: Path):
    items, rows = [], []
    for n, rec in _read_csv(path, ["Behavior", "BehaviorID"]):
        if None in rec:
            raise BenchmarkFormatError(path, n, None, "more cells than header columns")
        category = (rec.get("FunctionalCategory") or "standard").strip()
        if category == "copyright":
            continue
        behavior = _str_field(path, n, rec, ["Behavior"], required=True)
        bid = _str_field(path, n, rec, ["BehaviorID"], required=True)
        context = _str_field(path, n, rec, ["ContextString"])
        message = harmbench_user_message(behavior, context)
        meta = {k: rec.get(k) for k in ("SemanticCategory", "Tags") if rec.get(k)}
        items.append(Item("harmbench", bid, message, [{"role": "user", "content": message}], behavior, context,
                          None, category, meta))
        rows.append(n)
    return items, rows


def read_xstest(path) -> list[Item]:
    """XSTest prompts (CSV with id, type, prompt); subset "contrast" for `contrast_*` types, else "safe"."""
    path = Path(path)
    items, rows = [], []
    for n, rec in _read_csv(path, ["id", "type", "prompt"]):
        if None in rec:
            raise BenchmarkFormatError(path, n, None, "more cells than header columns")
        pid = _str_field(path, n, rec, ["id"], required=True)
        kind = _str_field(path, n, rec, ["type"], required=True).strip()
        prompt = _str_field(path, n, rec, ["prompt"], required=True)
        subset = "contrast" if kind.startswith("contrast_") else "safe"
        items.append(Item("xstest", pid, prompt, [{"role": "user", "content": prompt}], prompt, None, None, subset,
                          {"type": kind}))
        rows.append(n)
    return _unique(path, items, rows)


def read_transfer(path) -> dict[str, list[dict]]:
    """Transfer attack prompts: BehaviorID -> [{"prompt": str, "method": str | None}, ...] in file order."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
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
        for n, rec in _jsonl_objects(path, text.splitlines(), "an object"):
            add(n, _str_field(path, n, rec, ["behavior_id", "id", "BehaviorID"], required=True), rec)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(path, None, None, f"not valid JSON ({e})") from e
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
    lines = path.read_text(encoding="utf-8").splitlines()
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


def _jsonl_objects(path, lines, expected: str):
    """(line number, object) for each non-blank JSONL line; a line that is not a JSON object is an error."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(path, n, None, f"not valid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise BenchmarkFormatError(path, n, None, f"expected {expected}")
        yield n, rec
