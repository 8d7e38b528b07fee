import os
import sys

if sys.argv[1:2] == ["demo"]:
    # the demo's tiny model on a small shared CPU: OpenMP threads that spin while waiting stall every step
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import console_main  # noqa: E402

console_main()
