"""Bad input, named precisely: `DataError` says which file, row and field was wrong; `SkipLog` counts the
rows dropped with `skip_invalid=True`, by reason.

Where a row comes from (its *origin*) is a string:
    "data/wgm.jsonl:17"                          JSONL: 1-based line number
    "data/wgm.json:row 3", "data/x.parquet:row 3"  JSON list / Parquet: 0-based row index
    "allenai/wildguardmix[train]:row 3"          a Hugging Face Hub dataset: 0-based row index
    "data/wgm.jsonl"                             the whole file (missing, unreadable, corrupt)

Every message is one line, so that a command can print it as `repbend: error: <message>`.
`DataFileNotFound` is both a DataError and a FileNotFoundError, `HubUnavailable` both a DataError and an
ImportError (callers that catch either see them).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """A row (or a whole file) that cannot be used.

    str(err) reads `"<origin>: field '<field>': <problem>"`, e.g.
    `data/wgm.jsonl:17: field 'prompt_harm_label': unknown label 'maybe' (expected harmful/unharmful)`.
    `reason` is a short, value-free category ("unknown label in 'prompt_harm_label'") under which
    `SkipLog` counts the row when invalid rows are skipped.
    """

    def __init__(self, origin: str, problem: str, field: str | None = None, reason: str | None = None):
        self.origin = origin
        self.field = field
        self.problem = problem
        self.reason = reason or (f"{problem} in '{field}'" if field else problem)
        where = f"{origin}: field '{field}'" if field else origin
        super().__init__(f"{where}: {problem}")


class DataFileNotFound(DataError, FileNotFoundError):
    """An input file (or directory) that does not exist: `"<path>: <what> not found[ (<hint>)]"`."""

    def __init__(self, path, what: str = "data file", hint: str = ""):
        super().__init__(str(path), f"{what} not found" + (f" ({hint})" if hint else ""), reason="file not found")
        self.filename = str(path)

    def __str__(self) -> str:  # OSError would format "[Errno None] ..." once `filename` is set
        return self.args[0]


class HubUnavailable(DataError, ImportError):
    """A Hub dataset spec given while the `datasets` package is not installed (often a local path that lacks its
    extension)."""


@dataclass
class SkipLog:
    """Rows skipped because they were invalid: counts by `DataError.reason`, plus the first few full
    messages (with their origins) so that a report can show where to look."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, err: DataError) -> None:
        self.counts[err.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": list(self.examples)}
