"""The Go runtime behind OPA's engine never takes a stop signal: its threads start with
SIGTERM and SIGINT blocked, and the thread that made the engine gets them back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

# A process of its own: the runtime starts once per process, with the mask of that moment.
PROGRAM = """
import json, os, threading
from pdp.engine.rego import compile_modules
compile_modules({"p.rego": "package p\\nx := 1"}, {}).eval_query("data.p.x")
def blocked(task):
    with open(f"/proc/self/task/{task}/status") as status:
        line = next(line for line in status if line.startswith("SigBlk:"))
    return int(line.split()[1], 16)
main = str(threading.get_native_id())
print(json.dumps({task: blocked(task) for task in os.listdir("/proc/self/task")} | {"main": main}))
"""


def test_the_engine_threads_block_the_stop_signals_and_the_main_thread_does_not() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    masks = json.loads(out)
    main = masks.pop("main")
    stops = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    assert masks.pop(main) & stops == 0
    assert masks, "the engine started no thread of its own"
    assert all(mask & stops == stops for mask in masks.values()), masks
