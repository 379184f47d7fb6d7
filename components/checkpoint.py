"""Resumable training stages: epoch checkpoints, a checkpoint at the next step on SIGTERM, and the
fault points the reliability tests kill stages at.

A training stage's `checkpoints` directory (a persistent, uncached DVC output) holds `epoch_NNN.pt`
after every epoch and `last.pt`, the state to resume from, which exists only while a run is
unfinished. A rerun resumes from it by default, and only when it was written under the same params and
inputs (its fingerprint), so a run killed or preempted continues where it stopped and, on CPU, ends
with the weights an uninterrupted run ends with (tests/test_reliability.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cdc import distributed
from cdc.errors import InputError
from cdc.io import load_torch, save_torch
from cdc.params import Params
from components.stages import STAGE_BY_NAME
from components.tracking import md5

log = logging.getLogger(__name__)

FAILPOINT_ENV = "CDC_FAILPOINT"  # "<point>:<count>[:TERM]": the process signals itself there (tests)


def fingerprint(stage: str, params: Params, inputs: dict[str, Path]) -> str:
    """What a checkpoint must have been written under to be resumed: the stage's params sections and
    the hashes of its inputs."""
    sections = {k: getattr(params, k) for k in STAGE_BY_NAME[stage].params}
    dumped = {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in sections.items()}
    hashes = {name: md5(path) for name, path in sorted(inputs.items())}
    blob = json.dumps({"params": dumped, "inputs": hashes}, sort_keys=True)
    return hashlib.md5(blob.encode()).hexdigest()


class Checkpoints:
    """The checkpoints directory of one training stage."""

    def __init__(self, directory: Path, fingerprint: str, restart: bool = False) -> None:
        self.directory, self.fingerprint, self.restart = Path(directory), fingerprint, restart
        self.last = self.directory / "last.pt"

    def resume(self) -> dict[str, Any] | None:
        """The state to continue from, or None to start over (clearing old checkpoints)."""
        state = None
        if self.last.exists() and not self.restart:
            state = load_torch(self.last, "resume checkpoint")
            if isinstance(state, dict) and "fingerprint" not in state and {"model", "epoch"} <= set(state):
                # written by a cdc before fingerprints: nothing says it belongs to these params and inputs
                log.warning("%s predates resume fingerprints: starting over", self.last)
                state = {"fingerprint": None}
            if not isinstance(state, dict) or "fingerprint" not in state:
                raise InputError(
                    f"{self.last}: not a resume checkpoint; delete it or pass --restart", self.last
                )
            if state["fingerprint"] != self.fingerprint:
                log.info("%s was written under other params or inputs: starting over", self.last)
                state = None
        distributed.barrier()  # every rank has read last.pt before rank 0 may delete it
        if state is None and distributed.current().is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for old in self.directory.glob("*.pt"):
                old.unlink()
        return state

    def save(self, state: dict[str, Any], epoch: int | None = None) -> None:
        """`state` as `last.pt` (and as `epoch_NNN.pt` at the end of epoch `epoch`)."""
        if not distributed.current().is_main:  # one writer: every rank holds the same state
            return
        state = {**state, "fingerprint": self.fingerprint}
        if epoch is not None:
            save_torch(self.directory / f"epoch_{epoch:03d}.pt", state)
        save_torch(self.last, state)

    def finish(self) -> None:
        """The run is complete: nothing left to resume (the epoch checkpoints stay)."""
        if distributed.current().is_main:
            self.last.unlink(missing_ok=True)


class StopRequest:
    """Set by SIGTERM (a cluster's preemption notice) while the stage trains."""

    signalled = False

    @property
    def requested(self) -> bool:
        """Whether any process of the stage got SIGTERM: all stop at the same step."""
        return distributed.any_rank(self.signalled)


@contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """Turn SIGTERM into a request the training loop honours at the next step boundary."""
    request = StopRequest()

    def handler(signum: int, frame: object) -> None:
        log.warning("SIGTERM: checkpointing at the next step, then stopping")
        request.signalled = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)


def failpoint(point: str, count: int) -> None:
    """Signal this process (SIGKILL, or SIGTERM with a `:TERM` suffix) when `$CDC_FAILPOINT` names
    `point` at `count`: how the tests kill a stage at an exact place."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec:
        return
    name, at, *how = spec.split(":")
    if name == point and int(at) == count:
        os.kill(os.getpid(), signal.SIGTERM if how == ["TERM"] else signal.SIGKILL)
