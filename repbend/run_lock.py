"""One run per output directory: the lock a training run holds on `train.output_dir` (docs/checkpoints.md).

The lock is the file `<output_dir>/run.lock`, a JSON object {pid, host, started, proc_start, token}. It is created
whole or not at all (written to a private file, then hard-linked into place, which fails when the lock exists), so
two runs racing for one directory cannot both get it. The run that made it removes it when it ends, however it
ends (`RunLock` is a context manager; `repbend.trainer.train` holds it until it returns or raises).

A lock whose run died without removing it (kill -9, a crash of the machine) is stale: on the same host its pid is
gone (`os.kill(pid, 0)` raises ProcessLookupError) or now belongs to another process (its start time in
/proc/PID/stat differs). A stale lock is taken over with a warning naming it. A live one, or one from another host
(whose process cannot be checked from here), refuses the new run with one line naming the holder.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from .errors import TrainingError

log = logging.getLogger("repbend")

LOCK = "run.lock"


def _proc_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or None where there
    is no /proc. With the pid it names one process: a pid reused after a crash has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: dict) -> bool:
    """Whether the process that wrote `holder` (a lock of this host) still runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    recorded, now = holder.get("proc_start"), _proc_start(pid)
    return recorded is None or now is None or recorded == now


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


class RunLock:
    """`with RunLock(out): ...` holds the run directory `out` (created if needed) for one run; see the module doc.

    Errors (all `TrainingError`, one line): `out` is not a directory or cannot be written (read-only, no
    permission), or another live run holds it."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.token = secrets.token_hex(8)
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise TrainingError(f"train.output_dir {out} is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"train.output_dir {out}: cannot create it: {e.strerror or e}") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "proc_start": _proc_start(os.getpid()),
              "token": self.token}
        for _ in range(3):
            if self._create(me):
                self.held = True
                return
            holder = self._read()
            if holder is None:  # removed between our try and our read, or unreadable
                if self.path.exists():
                    raise TrainingError(f"train.output_dir {out} has a lock file {self.path} that is not a repbend "
                                        "lock (unreadable); remove it if no run uses this directory")
                continue
            if holder.get("host") == me["host"] and not _alive(holder):
                log.warning("train.output_dir %s: taking over the stale lock of a run that is gone (%s)", out,
                            _describe(holder))
                self._remove_if(holder.get("token"))
                continue
            where = "" if holder.get("host") == me["host"] else " (another host: if that run is gone, remove " \
                f"{self.path})"
            raise TrainingError(f"train.output_dir {out} is in use by another run ({_describe(holder)}){where}; "
                                "wait for it to end or choose another --train.output_dir")
        raise TrainingError(f"train.output_dir {out}: could not take its lock {self.path} (other runs keep taking "
                            "it)")

    def _create(self, me: dict) -> bool:
        """Put the whole lock file in place unless one exists: True when this run now holds it."""
        tmp = self.out / f".{LOCK}.{self.token}"
        try:
            tmp.write_text(json.dumps(me), encoding="utf-8")
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive create (a torn lock is unreadable)
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(json.dumps(me))
            return True
        except OSError as e:
            raise TrainingError(f"train.output_dir {self.out}: cannot write there: {e.strerror or e}") from None
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _remove_if(self, token) -> None:
        """Remove the lock file if it still holds `token` (not one another run took meanwhile)."""
        holder = self._read()
        if holder is not None and holder.get("token") == token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.held:
            self._remove_if(self.token)
            self.held = False
