"""The one exception a user fixes rather than a bug: an input the stage cannot use.

Raised for a bad param, or a file that is missing, empty, corrupt, of the wrong kind or from another
model. The message names the key or file, what is wrong and what to do; the CLI prints it as one line
(no traceback unless `-v`) and exits with status 2 before any declared output is touched.
"""

from __future__ import annotations

import pickle
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InputError(ValueError):
    """A param or input file the stage cannot use; `path` is the file (None for a param)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


# what a reader raises on bytes of the wrong kind: JSON, pickle/zip (torch), npz, Parquet (Arrow's
# errors derive from ValueError/OSError), truncated files
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    EOFError,
    OSError,
    RuntimeError,
    pickle.UnpicklingError,
)


@contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Turn a reader's failure on `path` into an InputError naming the file and what it should hold.

    Wrap only the call that decodes the file, so that bugs in the code after it keep their traceback.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found", path)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: {what} is an empty file (an interrupted copy?)", path)
    try:
        yield
    except InputError:
        raise
    except _DECODE_ERRORS as err:
        reason = " ".join(str(err).split())
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in reason:
            reason = "corrupt, or it holds pickled Python objects, which are never loaded (weights_only)"
        elif isinstance(err, KeyError) or len(reason) < 8:
            reason = f"unexpected content: {type(err).__name__} {reason}".strip()
        reason = reason[:160].removesuffix(".")
        raise InputError(f"{path}: not a readable {what} ({reason})", path) from err


class Preempted(Exception):
    """SIGTERM arrived during training; the stage saved a checkpoint at the step boundary and stops."""


PREEMPTED_STATUS = 128 + signal.SIGTERM  # the exit status a process stopped by SIGTERM reports
