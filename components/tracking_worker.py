"""The tracking worker: one stage's MLflow run, logged from a process of its own (`WorkerRunLog`).

It loads MLflow and opens the tracking store at once, while the stage process loads torch, then reads
JSON lines on stdin: `start` (answered with the run id, or the error), `metrics`, `tags`, and `finish`
(answered with what `LostLogging` dropped). The stage process owns the signals: this one ignores SIGINT
and SIGTERM, and when its stdin closes without `finish` (the stage was killed) it ends the run as KILLED;
closed before `start` (the stage failed on its params), it exits at once, having logged nothing.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
from typing import Any

from cdc.errors import InputError


def _read(requests: queue.Queue[dict[str, Any] | None], started: threading.Event) -> None:
    for line in sys.stdin:
        message = json.loads(line)
        started.set()
        requests.put(message)
    if not started.is_set():
        os._exit(0)  # the stage ended before asking for a run: nothing to log, nothing to wait for
    requests.put(None)


# the answers go to the stage on the original stdout; whatever MLflow prints goes to stderr
_answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr


def _answer(message: dict[str, Any]) -> None:
    _answers.write(json.dumps(message) + "\n")
    _answers.flush()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read, args=(requests, threading.Event()), daemon=True).start()

    from components.tracking import LocalRunLog

    try:
        run: LocalRunLog | None = LocalRunLog()
        failure: dict[str, Any] = {}
    except Exception as err:  # answered to `start`: the stage raises it before its work
        run = None
        failure = {"error": str(err) or type(err).__name__, "input_error": isinstance(err, InputError)}
    while (message := requests.get()) is not None:
        op = message["op"]
        if op == "start":
            if run is None:
                _answer(failure)
                return 1
            try:
                run_id = run.start(message["name"], message["parent"], message["tags"], message["params"])
                _answer({"run_id": run_id})
            except Exception as err:
                _answer({"error": f"MLflow could not open the stage's run: {err}"})
                return 1
        elif run is None:
            return 1
        elif op == "metrics":
            run.log_metrics(message["metrics"], message["step"], message["timestamp"])
        elif op == "tags":
            run.set_tags(message["tags"])
        elif op == "finish":
            dropped, first = run.finish(message["status"], [tuple(o) for o in message["outputs"]])
            _answer({"dropped": dropped, "first": first})
            return 0
    if run is not None and run.run_id:  # stdin closed without `finish`: the stage process was killed
        run.finish("KILLED", [])
    return 0


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    sys.stderr.flush()
    # every call is answered and the run ended: skip the interpreter's teardown of MLflow and SQLAlchemy
    # (about a second), which the stage's caller would wait for on the stderr this process shares
    os._exit(status)
