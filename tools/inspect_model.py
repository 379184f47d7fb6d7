"""`cdc inspect ARCH`: a model's prunable layers, blocks and scored tensors, without running the pipeline.

For a registered name, the layers its class declares; for `package.module:factory`, what the discovery
finds on its graph (cdc/discovery.py): every conv, prunable or why it is left whole, the tensor its
statistics are collected on, its block, and the convs that lose the same channels.
"""

from __future__ import annotations

import argparse
import json
from contextlib import suppress
from pathlib import Path
from typing import Any

from cdc.errors import InputError

IMAGENET_SHAPE = (3, 224, 224)


def add_inspect_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="list a model's prunable layers (a registered name or package.module:factory)",
        description="Build the model (random init) and print its convs: prunable or left whole (and why), "
        "the tensor each one is scored on, its block, and the convs that lose the same channels. "
        "For the workspace's own train_teacher.arch (the default), params.yaml gives the factory arguments, "
        "layer patterns, image shape and classes; another model is built for 3x224x224 images, 1000 classes.",
    )
    p.add_argument("arch", nargs="?", help="default: train_teacher.arch of --params")
    p.add_argument("--params", default="params.yaml", help="read when it exists (default: %(default)s)")
    p.add_argument(
        "--kwargs", type=json.loads, help="factory arguments as JSON, e.g. '{\"width_mult\": 0.5}'"
    )
    p.add_argument("--include", nargs="+", metavar="PATTERN", help="conv name patterns to prune (fnmatch)")
    p.add_argument("--exclude", nargs="+", metavar="PATTERN", help="conv name patterns to leave whole")
    p.add_argument(
        "--input-shape",
        nargs=3,
        type=int,
        metavar=("C", "H", "W"),
        help="default: the dataset's for the params' arch, else 3 224 224",
    )
    p.add_argument("--classes", type=int, help="default: the dataset's for the params' arch, else 1000")


def run_inspect(args: argparse.Namespace) -> int:
    from cdc.discovery import describe
    from cdc.models import Imported, build_model, is_import_path
    from cdc.params import Params, dataset_shape, load_params
    from cdc.sources import DATASETS

    params = load_params(args.params) if Path(args.params).exists() else Params()
    p = params.train_teacher
    arch = args.arch or p.arch
    same = arch == p.arch
    # the workspace's dataset for its own teacher; another model on ImageNet-sized images
    shape = tuple(args.input_shape or (dataset_shape(params.data) if same else IMAGENET_SHAPE))
    classes = args.classes or (DATASETS[params.data.dataset].num_classes or 10 if same else 1000)
    imported = None
    if is_import_path(arch):
        imported = Imported(
            args.kwargs if args.kwargs is not None else dict(p.arch_kwargs) if same else {},
            args.include if args.include is not None else p.layers_include if same else None,
            args.exclude if args.exclude is not None else p.layers_exclude if same else [],
            (shape[1], shape[2]),
        )
    elif args.kwargs or args.include or args.exclude:
        raise InputError(
            f"{arch} is a registered model: its layers are declared (no --kwargs/--include/--exclude)"
        )
    model = build_model(arch, classes, shape[0], imported=imported)
    dca = model.dca_layers()
    text = [
        f"{arch} on {'x'.join(map(str, shape))} images, {classes} classes",
        describe(model.discovered()),
        f"{len(model.layer_blocks())} blocks with prunable layers; DCA layers (fit_dca.layer): "
        f"{', '.join(dca[:6])}{' ...' if len(dca) > 6 else ''}",
    ]
    with suppress(BrokenPipeError):  # `cdc inspect ... | head`
        print("\n".join(text))
    return 0
