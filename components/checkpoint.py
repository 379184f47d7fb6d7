"""Resumable training stages: epoch checkpoints, a checkpoint at the next step on SIGTERM, and the
fault points the reliability tests kill stages at.

A training stage's `checkpoints` directory (a persistent, uncached DVC output) holds `epoch_NNN.pt`
after every epoch and `last.pt`, the state to resume from, which exists only while a run is
unfinished. A rerun resumes from it by default, and only when it was written under the same params and
inputs (its fingerprint), so a run killed or preempted continues where it stopped and, on CPU, ends
with the weights an uninterrupted run ends with (tests/test_reliability.py).

On a cluster the directory dies with the pod, so with `$CDC_CHECKPOINT_ROOT` set (the Kubeflow
pipeline's `checkpoint_root`) every checkpoint is also copied to `<root>/<stage>/<fingerprint>/` on
durable storage (any fsspec URL: s3://..., a PVC path) and a task whose directory is empty starts from
there: a retried or re-submitted task of the same inputs and params resumes (tests/test_kfp.py).
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
CHECKPOINT_ROOT_ENV = "CDC_CHECKPOINT_ROOT"  # durable copies of the checkpoints (set by Kubeflow tasks)


def fingerprint(stage: str, params: Params, inputs: dict[str, Path]) -> str:
    """What a checkpoint must have been written under to be resumed: the stage's params sections and
    the hashes of its inputs."""
    sections = {k: params.get(k) for k in STAGE_BY_NAME[stage].params}
    dumped = {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in sections.items()}
    hashes = {name: md5(path) for name, path in sorted(inputs.items())}
    blob = json.dumps({"params": dumped, "inputs": hashes}, sort_keys=True)
    return hashlib.md5(blob.encode()).hexdigest()


class Mirror:
    """Durable copies of a checkpoints directory at an fsspec URL (s3://bucket/prefix, a mounted path)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def pull(self, directory: Path) -> int:
        """Copy every checkpoint found at the URL into `directory`; how many."""
        found = self.fs.glob(f"{self.root}/*.pt") if self.fs.exists(self.root) else []
        directory.mkdir(parents=True, exist_ok=True)
        for remote in found:
            self.fs.get(remote, str(directory / Path(remote).name))
        return len(found)

    def push(self, file: Path) -> None:
        """Copy `file` up (a failure is a warning: training goes on, less durably)."""
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.put(str(file), f"{self.root}/{file.name}.partial")
            self.fs.mv(f"{self.root}/{file.name}.partial", f"{self.root}/{file.name}")
        except Exception as err:  # noqa: BLE001 - storage errors come in many classes
            log.warning("could not copy %s to %s: %s", file.name, self.url, err)

    def clear(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


class Checkpoints:
    """The checkpoints directory of one training stage (and its durable mirror, if any)."""

    def __init__(
        self, directory: Path, fingerprint: str, restart: bool = False, mirror: Mirror | None = None
    ) -> None:
        self.directory, self.fingerprint, self.restart = Path(directory), fingerprint, restart
        self.last = self.directory / "last.pt"
        self.mirror = mirror

    @classmethod
    def of_stage(
        cls, stage: str, directory: Path, params: Params, inputs: dict[str, Path], restart: bool
    ) -> Checkpoints:
        """`stage`'s checkpoints, mirrored under `$CDC_CHECKPOINT_ROOT` when that is set."""
        key = fingerprint(stage, params, inputs)
        root = os.environ.get(CHECKPOINT_ROOT_ENV)
        return cls(directory, key, restart, Mirror(f"{root.rstrip('/')}/{stage}/{key}") if root else None)

    def resume(self) -> dict[str, Any] | None:
        """The state to continue from, or None to start over (clearing old checkpoints)."""
        pull = self.mirror and not self.restart and not self.last.exists() and distributed.current().is_main
        if pull and (count := self.mirror.pull(self.directory)):  # type: ignore[union-attr]
            log.info("%d checkpoints copied from %s", count, self.mirror.url)  # type: ignore[union-attr]
        distributed.barrier()  # rank 0 has pulled before any rank reads
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
        written = [self.last]
        if epoch is not None:
            written.insert(0, self.directory / f"epoch_{epoch:03d}.pt")
            save_torch(written[0], state)
        save_torch(self.last, state)
        for file in written if self.mirror else ():
            self.mirror.push(file)  # type: ignore[union-attr]

    def finish(self) -> None:
        """The run is complete: nothing left to resume (the epoch checkpoints stay; the mirror goes)."""
        if distributed.current().is_main:
            self.last.unlink(missing_ok=True)
            if self.mirror:
                self.mirror.clear()


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
