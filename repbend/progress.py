"""Progress on long work: a tqdm bar on a terminal, and in a log file (output that is not a terminal) one plain line
every tenth of the way instead of a bar's redraws.

    bar = progress_bar(total=450, desc="repbend", unit="step")
    bar.update(1); bar.set_postfix(loss="0.1234"); bar.close()
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("repbend")


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True, stream=None):
    """A tqdm bar when `stream` (default stderr) is a terminal, else `LineProgress`; None when not `enabled`."""
    if not enabled:
        return None
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, unit, initial)


class LineProgress:
    """tqdm's update / set_postfix / close for output that is not a terminal: one log line per tenth of `total`
    (and at the end), with the rate and the latest postfix."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = max(1, total // 10)
        self.postfix = ""
        self._t0, self._n0, self._last = time.perf_counter(), initial, initial

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._last >= self.every or self.n >= self.total:
            self._emit()

    def _emit(self) -> None:
        self._last = self.n
        rate = (self.n - self._n0) / max(time.perf_counter() - self._t0, 1e-9)
        log.info("%s: %d/%d %s (%.2f %s/s)%s", self.desc, self.n, self.total, self.unit + "s", rate, self.unit,
                 f", {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.n != self._last:
            self._emit()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
