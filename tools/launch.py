"""The `cdc` console script. Under `cdc repro` or `cdc compare` a stage command is run by their stage server
(`components/stage_server.py`) before anything heavy is imported here; everything else by `tools.cli`."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from components.stage_server import forward


def console() -> NoReturn:
    status = forward(sys.argv)
    if status is None:
        from tools.cli import console as run_here

        run_here()
    os._exit(status)
