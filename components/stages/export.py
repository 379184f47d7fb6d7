"""Stage `export`: the student as a serving stack takes it, checked and registered.

The student, with its input normalization in front and BN folded (`cdc.inference.Deployable`: float
images in [0, 1] in, logits out), is exported to ONNX and TorchScript; both must reproduce the PyTorch
logits on `export.check_images` test images within `export.tolerance`, or the stage fails. The same
module is logged to MLflow (torch.export format, signature, an input example of batch 2 so the batch
dimension stays dynamic) and registered as `export.model_name` with the alias `candidate` and tags that
lead back to its lineage; `cdc promote` moves `champion` to it.

The report holds only what the inputs determine (no registry version, no times): DVC hashes it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cdc.data import load_prepared
from cdc.errors import InputError
from cdc.inference import (
    Deployable,
    export_onnx,
    export_torchscript,
    fold_batchnorm,
    load_torchscript,
    onnx_session,
)
from cdc.io import atomic_path, expect_model, load_model, write_json
from cdc.params import Params
from components.tracking import StageTracker, md5

log = logging.getLogger(__name__)


for _chatty in ("onnxscript", "onnx_ir"):  # the ONNX exporter logs every optimization pass at INFO
    logging.getLogger(_chatty).setLevel(logging.WARNING)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    p = params.export
    data = load_prepared(inputs["prepared"])
    student, record = load_model(inputs["student"], "student model")
    expect_model(
        inputs["student"],
        record,
        "it was trained on another dataset: rerun the pipeline",
        num_classes=data.num_classes,
        in_channels=data.input_shape[0],
    )
    deployable = Deployable(fold_batchnorm(student), data.meta["mean"], data.meta["std"]).eval()
    images = torch.from_numpy(data.images("test", p.check_images)).float() / 255.0
    with torch.no_grad():
        reference = student((images - deployable.mean) / deployable.std).numpy()

    with atomic_path(outputs["onnx"]) as tmp, exporting("ONNX", record["arch"]):
        onnx_bytes = export_onnx(deployable, images[:2], tmp)
    session = onnx_session(onnx_bytes)
    with atomic_path(outputs["torchscript"]) as tmp, exporting("TorchScript", record["arch"]):
        export_torchscript(deployable, images[:2], tmp)
    scripted = load_torchscript(outputs["torchscript"])
    with torch.no_grad():
        produced = {
            "onnx": session.run(None, {"images": images.numpy()})[0],
            "torchscript": scripted(images).numpy(),
        }
    scale = float(np.abs(reference).max())
    checks = {}
    for form, logits in produced.items():
        worst = float(np.abs(logits - reference).max())
        agree = float((logits.argmax(1) == reference.argmax(1)).mean())
        checks[form] = {"max_abs_diff": worst, "relative_diff": worst / scale, "same_class": agree}
        tracker.log_metrics({f"{form}.relative_diff": worst / scale, f"{form}.same_class": agree})
        if worst > p.tolerance * scale:
            raise InputError(
                f"the {form} export differs from the PyTorch student by {worst:.3g} (largest logit "
                f"{scale:.3g}, export.tolerance {p.tolerance}): not exported"
            )
    report = {
        "input": {"name": "images", "shape": [-1, *data.input_shape], "dtype": "float32", "range": [0, 1]},
        "output": {"name": "logits", "classes": data.meta["classes"]},
        "checked_images": len(images),
        "checks": checks,
    }
    write_json(outputs["report"], report)
    log.info(
        "exported to %s and %s; on %d test images the logits match within %.2g (relative)",
        outputs["onnx"],
        outputs["torchscript"],
        len(images),
        max(c["relative_diff"] for c in checks.values()),
    )
    if p.model_name:
        version = tracker.register_model(
            deployable,
            p.model_name,
            images[:2].numpy(),
            reference[:2],
            {"cdc.student.md5": md5(inputs["student"]), "cdc.student.path": str(inputs["student"])},
        )
        log.info("registered as models:/%s/%s, alias candidate", p.model_name, version)


@contextmanager
def exporting(form: str, arch: str) -> Iterator[None]:
    """A model the exporter cannot handle (a user's architecture) fails the stage with one line; what the
    earlier stages wrote (the student, its evaluation) stays valid, and nothing half-written is left."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - the exporter's own failure, whatever it is
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # the exporter colours its messages
        first = text.splitlines()[0][:300] if text else ""
        raise InputError(
            f"the {form} exporter cannot export {arch}: {type(err).__name__}: {first} "
            "(the student and its evaluation are unaffected; -v for the traceback)"
        ) from err
