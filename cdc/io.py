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

from cdc.errors import InputError, reading
from cdc.models import MODELS, Imported, ImportedNet, PrunableNet, build_model, is_import_path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or directory) that is renamed onto it on success.

    An interrupted writer leaves only the hidden temporary behind, never a half-written artifact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    remove(tmp)
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    with reading(path, what):
        return json.loads(Path(path).read_text())


def save_model(path: str | Path, model: PrunableNet, arch: str, num_classes: int, in_channels: int) -> None:
    record = {
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "widths": model.prunable_widths(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},  # loads anywhere
    }
    if isinstance(model, ImportedNet):  # how its factory builds it again
        record["imported"] = model._imported.record()
    save_torch(path, record)


def save_torch(path: str | Path, obj: Any) -> None:
    """`torch.save` whose bytes depend on `obj` only: saved to a file, PyTorch names the archive's
    records after the file, so the same weights under two names would hash differently (lineage
    compares hashes across directories and runners)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_torch(path: str | Path, what: str) -> Any:
    """`torch.load` with `weights_only=True` (a file cannot run code), on the CPU; a missing, empty,
    truncated or foreign file is an InputError naming it."""
    with reading(path, what):
        return torch.load(path, map_location="cpu", weights_only=True)


MODEL_KEYS = ("arch", "num_classes", "in_channels", "widths", "state_dict")


def load_model(path: str | Path, what: str = "model file") -> tuple[PrunableNet, dict[str, Any]]:
    """Rebuild a (possibly pruned) model from the registry; returns it with its record (eval mode)."""
    record = load_torch(path, what)
    if not isinstance(record, dict) or not set(MODEL_KEYS) <= set(record):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{path}: not a cdc {what} (expected keys {list(MODEL_KEYS)}, found {found})", path)
    if record["arch"] not in MODELS and not is_import_path(record["arch"]):
        raise InputError(f"{path}: {what} of unknown architecture {record['arch']!r}", path)
    with reading(path, what):  # widths or weights that do not fit the architecture
        model = build_like(record, record["widths"])
        model.load_state_dict(record["state_dict"])
    return model.eval(), record


def build_like(record: dict[str, Any], widths: list[int] | None = None) -> PrunableNet:
    """The architecture of a model file's record, with `widths` (None: the full widths)."""
    imported = Imported.from_record(record["imported"]) if "imported" in record else None
    return build_model(record["arch"], record["num_classes"], record["in_channels"], widths, imported)


def expect_model(path: str | Path, record: dict[str, Any], fix: str, **expected: Any) -> None:
    """Refuse a model file whose record differs from what the stage expects (another dataset's class
    count, another architecture): `fix` says what to do."""
    for key, want in expected.items():
        if record[key] != want:
            raise InputError(f"{path}: model has {key} {record[key]!r}, expected {want!r}; {fix}", path)


def load_initial_weights(model: PrunableNet, path: str | Path) -> list[str]:
    """Start `model` from a user's weights: a torchvision-style state dict (or a cdc model file, or a
    dict holding one under `state_dict`/`model`), loaded with `weights_only`. Every tensor must fit,
    except the classifier's when the class count differs (a new head); returns the keys left as
    initialized."""
    record = load_torch(path, "initial weights (a state dict)")
    state = record
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict (a mapping of parameter names to tensors)", path)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    own = model.state_dict()
    head = _classifier_keys(model)
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - set(head))
    misfit = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape and k not in head)
    if unknown or missing or misfit:
        shown = {"unexpected": unknown[:3], "missing": missing[:3], "of another shape": misfit[:3]}
        detail = "; ".join(f"{what}: {keys}" for what, keys in shown.items() if keys)
        raise InputError(f"{path}: weights do not fit this architecture ({detail})", path)
    fresh = sorted(k for k in head if k not in state or state[k].shape != own[k].shape)
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh


def _classifier_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict keys of the last Linear layer (the head a new class count replaces)."""
    name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    return {f"{name}.{k}" for k, _ in model.get_submodule(name).named_parameters()}
