"""Atomic artifact writes and the checkpoint format (arch + widths + state dict, no pickled code)."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cdc.models import PrunableNet, build_model


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or directory) that is renamed onto it on success.

    An interrupted writer leaves only the hidden temporary behind, never a half-written artifact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_model(path: str | Path, model: PrunableNet, arch: str, num_classes: int, in_channels: int) -> None:
    record = {
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "widths": model.widths(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},  # loads anywhere
    }
    save_torch(path, record)


def save_torch(path: str | Path, obj: Any) -> None:
    """`torch.save` whose bytes depend on `obj` only: saved to a file, PyTorch names the archive's
    records after the file, so the same weights under two names would hash differently (lineage
    compares hashes across directories and runners)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_model(path: str | Path) -> tuple[PrunableNet, dict[str, Any]]:
    """Rebuild a (possibly pruned) model from the registry; returns it with its record (eval mode)."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(record["arch"], record["num_classes"], record["in_channels"], record["widths"])
    model.load_state_dict(record["state_dict"])
    return model.eval(), record
