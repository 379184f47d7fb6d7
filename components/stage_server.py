"""The stage server: one process, started by `cdc repro` and `cdc compare`, that imports torch, MLflow and
the stage code once; every `cdc <stage>` that `dvc repro` runs under it is forked from it instead of
starting Python and importing all that again (3-4 s a stage on 2 cores: most of a small stage's time).
A fork of an idle process that has imported torch is what a PyTorch DataLoader worker is.

The `cdc` command (`forward`) connects to the Unix socket named by $CDC_STAGE_SERVER and sends its
arguments, working directory and environment, with its stdin, stdout and stderr attached. The server
forks a child that takes all of them and runs the command as `cdc` would, answers with the child's pid,
then with its exit status. The command forwards the signals it gets to the child and ends as the child
did (the same exit code, or killed by the same signal); if the command is killed, the server SIGKILLs
the child, as the stage process would have died. A command whose import-time environment differs from
the server's (thread counts, CPU kernel path, Python path: `IMPORT_TIME_ENV`), or that finds no server,
runs the stage in its own process as before. Only the standard library is imported at module level:
`forward` is on the path of every `cdc` command.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SERVER_ENV = "CDC_STAGE_SERVER"
# read by torch, its OpenMP/MKL runtimes or Python when they load: a command whose values differ from the
# server's would not run as it would in a process of its own, so it runs in one
IMPORT_TIME_ENV = (
    "OMP_",
    "MKL_",
    "KMP_",
    "GOMP_",
    "OPENBLAS_",
    "DNNL_",
    "ONEDNN_",
    "ATEN_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "PYTHON",
    "LD_",
    "MALLOC_",
    "VIRTUAL_ENV",
)
# what every stage imports, before the first fork (5-6 s on 2 cores, while dvc starts); then, while the first
# stage runs, what several import: torch._dynamo, which the first FLOPs count (prune, evaluate: the dispatch
# mode of torch.utils.flop_counter) and the ONNX export each import (1.3-2.3 s); scikit-learn for score;
# Torch-Pruning for prune (2.3 s with the timm it loads when installed)
# (torchvision only where the data or the model needs it: not here)
PRELOAD = ("torch", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "components.cli", "components.runner")
LATER = ("sklearn.cluster", "torch._dynamo", "torch_pruning")
# passed on to the child; SIGINT and SIGQUIT only when the child is outside the command's process group
# (inside it, a terminal's Ctrl-C or Ctrl-\ reaches the child directly)
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
TERMINAL = (signal.SIGINT, signal.SIGQUIT)

_forked = False  # set in a child of the server: `components.tracking` forks its tracking worker too


def forked() -> bool:
    """Whether this process is a stage forked from the server (MLflow is imported, fork is cheap)."""
    return _forked


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


# --------------------------------------------------------------------------------------------- the command


def forward(argv: list[str]) -> int | None:
    """Run `cdc argv[1:]` in a child of the server named by $CDC_STAGE_SERVER; its exit status (the
    command dies of the child's signal if it was killed), or None where no server takes it (none set or
    listening, or refused): then the caller runs the command itself."""
    path = os.environ.get(SERVER_ENV)
    if not path or len(argv) < 2:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "python": _python()}
        socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    except OSError:
        sock.close()
        return None
    answers = sock.makefile("rb")
    started = answers.readline()
    if not started or "pid" not in (answer := json.loads(started)):
        return None  # refused (another environment) or the server is gone: run it here
    pid = answer["pid"]

    def relay(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    same_group = _process_group(pid) == os.getpgrp()
    for signum in FORWARDED + (() if same_group else TERMINAL):
        signal.signal(signum, relay)
    if same_group:
        for signum in TERMINAL:  # the child has it too and decides what it means
            signal.signal(signum, signal.SIG_IGN)
    ended = answers.readline()
    if not ended:
        print(f"cdc: the stage server ended while the stage ran (pid {pid})", file=sys.stderr)
        return 1
    status = int(json.loads(ended)["status"])
    if status < 0:  # killed: die the same way, so that dvc and shells see what a stage process shows
        if -status != signal.SIGKILL:  # the one whose action is not ours to set
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


def _python() -> str:
    """This interpreter and environment (`python` and `python3` of one venv are the same)."""
    return f"{os.path.realpath(sys.executable)} {sys.prefix}"


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


# ----------------------------------------------------------------------------------------------- the server


def _preload(names: tuple[str, ...]) -> None:
    import importlib

    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _read_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    conn.settimeout(10)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise ConnectionError("the command closed its connection mid-request")
        data += more
    conn.settimeout(None)
    return json.loads(data), fds


def _refusal(request: dict[str, Any], ours: dict[str, str]) -> str | None:
    from components.stages import STAGE_BY_NAME

    command = next((a for a in request["argv"][1:] if not a.startswith("-")), "")  # after -v, --verbose
    if command not in STAGE_BY_NAME:  # repro, summary, the tools' commands: not a stage
        return f"not a stage: {command!r}"
    if request["python"] != _python():
        return f"another Python ({request['python']})"
    theirs = import_time_env(request["env"])
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    return f"another import-time environment ({', '.join(differ)})" if differ else None


def _run_child(request: dict[str, Any], fds: list[int], keep_closed: list[int]) -> None:
    """In the forked child: become the command (its fds, directory, environment, argv), run it, exit."""
    global _forked
    _forked = True
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in keep_closed:
        with contextlib.suppress(OSError):
            os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    status = 1
    try:
        from components.cli import main

        status = main(sys.argv[1:])
    except SystemExit as done:  # argparse's --help and usage errors, as the interpreter would report them
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        status = done.code if isinstance(done.code, int) else int(done.code is not None)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        from components.cli import exit_now

        exit_now(status)


def serve(path: str) -> None:
    """Listen on `path` (right away: early commands wait in the backlog), import, then fork a child per
    command until the parent (`cdc repro`) is gone or sends SIGTERM."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()
    for signum in (signal.SIGINT, signal.SIGQUIT):  # a terminal's Ctrl-C is for the stages, not for this
        signal.signal(signum, signal.SIG_IGN)
    started_with = import_time_env(dict(os.environ))  # the imports set some (KMP_INIT_AT_FORK, ...)
    from components.stages import STAGES

    _preload(PRELOAD + tuple(stage.module for stage in STAGES))
    later = LATER
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    while not stopping and os.getppid() == parent:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                _accept(conn, children, selector, [listener.fileno(), wake_read, wake_write], started_with)
                _preload(later)
                later = ()
            elif key.fileobj == wake_read:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 4096)
            else:  # a command's connection: readable only when the command is gone
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                selector.unregister(conn)
                pid = next(p for p, c in children.items() if c is conn)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _reap(children, selector)
    for pid in children:  # left behind by a parent that is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _accept(
    conn: socket.socket,
    children: dict[int, socket.socket],
    selector: selectors.BaseSelector,
    ours: list[int],
    started_with: dict[str, str],
) -> None:
    try:
        request, fds = _read_request(conn)
    except (OSError, ValueError):
        conn.close()
        return
    refused = _refusal(request, started_with)
    if refused is not None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"refused": refused}).encode() + b"\n")
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        others = [c.fileno() for c in children.values()] + [conn.fileno(), selector.fileno(), *ours]  # type: ignore[attr-defined]
        _run_child(request, fds, others)
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    selector.register(conn, selectors.EVENT_READ)


def _reap(children: dict[int, socket.socket], selector: selectors.BaseSelector) -> None:
    while children:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}).encode() + b"\n")
        conn.close()


@contextlib.contextmanager
def running(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A stage server for the commands run with the returned environment (`env` plus $CDC_STAGE_SERVER),
    stopped on exit. CDC_STAGE_SERVER=off in `env` turns it off: every stage then starts its own process."""
    if env.get(SERVER_ENV) == "off":
        yield {k: v for k, v in env.items() if k != SERVER_ENV}
        return
    with tempfile.TemporaryDirectory(prefix="cdc-stages-") as folder:
        path = str(Path(folder) / "socket")
        # the code a `cdc` command run with `env` would import (PYTHONPATH, the installed package), not the
        # working directory's (-P)
        server = subprocess.Popen(
            [sys.executable, "-P", "-m", "components.stage_server", path], env=env, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # bound in milliseconds; the imports come after
        try:
            yield {**env, SERVER_ENV: path} if server.poll() is None else env
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":  # through the module's own name, whose `forked()` the stage code asks
    from components.stage_server import serve as serve_from_module

    serve_from_module(sys.argv[1])
