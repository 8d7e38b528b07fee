"""A torchrun rank for tests/test_distributed.py: `repbend.cli.main` as `python -m repbend` runs it, then the names of
the threads this process still has and whether the run left its process group (what `console_main` reads), written
to $REPBEND_PROBE_DIR/rank-$RANK.json before the interpreter's teardown
(Linux names its threads in /proc/self/task/*/comm: gloo's are gloo_tcp_loop and pt_gloo_runloop)."""
import json
import os
import sys
from pathlib import Path

from repbend.cli import main


def thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(names)


if __name__ == "__main__":
    code = main()
    from repbend.distributed import left_group
    seen = {"threads": thread_names(), "left_group": left_group()}
    Path(os.environ["REPBEND_PROBE_DIR"], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(seen))
    sys.exit(code)
