"""The params schema: one pydantic model per `params.yaml` section, validated up front.

A bad value fails with its full key (e.g. `prune.ratio`), the value given and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cdc.criteria import CRITERIA
from cdc.device import DEVICE_PATTERN
from cdc.errors import InputError
from cdc.inference import INFERENCE_FORMS
from cdc.models import MODELS, Imported, PrunableNet, build_model, is_import_path
from cdc.pruning import BUDGETS, budget_reads
from cdc.registry import Registry
from cdc.sources import COARSE_MAPS, DATASETS, DEFAULT_IMAGE_SIZE


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(Section):
    """Per-channel mean and std of images scaled to [0, 1] (ImageNet's for torchvision weights:
    mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225])."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_per_channel(self) -> Normalization:
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError("data.normalization: mean and std need one value per channel, std > 0")
        return self


class DataParams(Section):
    dataset: str = "fashion_mnist"
    root: str = Field(
        "data/raw",
        description="the raw dataset's folder; relative paths are inside the workspace (absolute: anywhere)",
    )
    image_size: int | None = Field(
        None, ge=8, description="imagefolder: side of the square images the model sees (null: 224)"
    )
    storage: Literal["auto", "memory", "files"] = Field(
        "auto", description="imagefolder: decode into memory, or stream the files (auto: by memory_limit_mb)"
    )
    memory_limit_mb: int = Field(
        2048,
        ge=1,
        description="imagefolder, storage auto: decoded size up to which the images are held in memory",
    )
    workers: int = Field(
        2, ge=0, description="DataLoader workers decoding streamed image files (speed only, not results)"
    )
    val_size: int = Field(5000, ge=1, description="images held out of the training set for validation")
    normalization: Normalization | None = Field(
        None, description="the input mean/std the model expects (null: computed from the training images)"
    )
    train_limit: int | None = Field(None, ge=10, description="class-balanced cap on training images")
    test_limit: int | None = Field(None, ge=10, description="class-balanced cap on test images")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return _check_registry(v, DATASETS)

    @field_validator("root")
    @classmethod
    def _inside_workspace(cls, v: str) -> str:
        return workspace_path(v)

    @model_validator(mode="after")
    def _file_settings_for_file_datasets(self) -> DataParams:
        if self.dataset != "imagefolder":
            for key, default in (("image_size", None), ("storage", "auto")):
                if getattr(self, key) != default:
                    raise ValueError(f"data.{key} is read by dataset imagefolder only, not {self.dataset}")
        return self


class TrainTeacherParams(Section):
    arch: str = Field(
        "resnet20",
        description="a registered model, or package.module:factory (a callable returning the CNN; modules "
        "import from the workspace first: models/mynet.py is models.mynet:build)",
    )
    arch_kwargs: dict[str, object] = Field(
        {},
        description="import-path arch: keyword arguments of its factory (num_classes is passed when taken)",
    )
    layers_include: list[str] | None = Field(
        None,
        description="import-path arch: conv names (fnmatch patterns) to prune among the discovered ones; "
        "may name the stem or a classifier input (null: every prunable one; `cdc inspect` lists them)",
    )
    layers_exclude: list[str] = Field([], description="import-path arch: conv name patterns left whole")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if is_import_path(v):
            module, _, factory = v.partition(":")
            if not module or not factory:
                raise ValueError(f"expected a registered name or package.module:factory, got {v!r}")
            return v
        return _check_registry(v, MODELS)

    @model_validator(mode="after")
    def _discovery_settings_for_imported(self) -> TrainTeacherParams:
        if not is_import_path(self.arch):
            for key, default in (("arch_kwargs", {}), ("layers_include", None), ("layers_exclude", [])):
                if getattr(self, key) != default:
                    raise ValueError(f"train_teacher.{key} is read for a package.module:factory arch only")
        if self.epochs == 0 and self.init_checkpoint is None:
            raise ValueError(
                "train_teacher.epochs 0 imports a trained model: set train_teacher.init_checkpoint"
            )
        return self

    epochs: int = Field(
        8, ge=0, description="0: the init_checkpoint is the teacher as it is (evaluated, not trained)"
    )
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    augment: bool = True
    hflip: bool = True
    init_checkpoint: str | None = Field(
        None, description="start from these weights (a torchvision-style state dict; null: random init)"
    )

    @field_validator("init_checkpoint")
    @classmethod
    def _checkpoint_in_workspace(cls, v: str | None) -> str | None:
        return v if v is None else workspace_path(v)


class DumpStatsParams(Section):
    batch_size: int = Field(256, ge=1)
    grid: int | None = Field(
        4, ge=1, description="pool each map to grid x grid cells for the `di` statistics (null: skip them)"
    )
    tensor: Literal["post_relu", "pre_relu"] = Field(
        "post_relu", description="the scored tensor: post-BN-ReLU activation or the BN output before ReLU"
    )
    bn_mode: Literal["eval", "batch"] = Field(
        "eval", description="BN running statistics (eval) or each batch's own (batch, the released code)"
    )


class ScoreParams(Section):
    criterion: str = "symdiv"
    hierarchy: bool = Field(
        True, description="coarse labels for the layers of blocks 1..T (false: fine labels everywhere)"
    )
    taylor_batches: int = Field(20, ge=1, description="training batches (of 128) for the taylor criterion")
    eps: float | None = Field(
        None,
        gt=0,
        description="discriminant ridge (symdiv 0.05, others 1e-4, di rho 1e-4; null: those)",
    )
    n_coarse: int = Field(4, ge=1, description="coarse groups from spectral clustering")
    coarse_blocks: int | None = Field(
        None, ge=0, description="T: blocks 1..T use coarse labels (the released code's 0-based T plus 1)"
    )
    coarse_fraction: float = Field(0.52, ge=0, le=1, description="T = round(fraction * blocks) when unset")
    coarse_map: list[int] | Literal["cifar100_superclasses"] | None = Field(
        None, description="explicit fine->coarse group ids, or a dataset's own (cifar100_superclasses)"
    )

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        return _check_registry(v, CRITERIA)


class PruneParams(Section):
    budget: str = "uniform"
    ratio: float = Field(0.53, ge=0, lt=1, description="uniform: fraction of channels removed per layer")
    ratios: list[float] | None = Field(None, description="per_layer: one removal fraction per layer")
    round_to: int = Field(1, ge=1, description="kept widths rounded to a multiple of this (1: no rounding)")
    flops_target: float = Field(
        0.5, gt=0, lt=1, description="flops_target: fraction of the teacher's FLOPs the pruned model keeps"
    )
    sensitivity_images: int = Field(1000, ge=10, description="flops_target: validation images per probe")
    sensitivity_step: float = Field(
        0.02,
        gt=0,
        lt=1,
        description="flops_target, latency_target: cost (fraction of the teacher's) each probe removes",
    )
    latency_target: float = Field(
        0.7, gt=0, lt=1, description="latency_target: fraction of the teacher's predicted latency kept"
    )

    @field_validator("budget")
    @classmethod
    def _known_budget(cls, v: str) -> str:
        return _check_registry(v, BUDGETS)

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not 0 <= r < 1 for r in v):
            raise ValueError(f"every ratio must be in [0, 1), got {v}")
        return v


class FitDcaParams(Section):
    layer: str = Field(
        "layer2",
        description="module path of the feature map: a stage output (the model's feature_layers) or a "
        "prunable layer's activation (its dca_layers)",
    )
    pool: int | None = Field(4, ge=1, description="average-pool the map to pool x pool before flattening")
    labels: Literal["coarse", "fine"] = "coarse"
    max_images: int | None = Field(10000, ge=10, description="class-balanced cap on fitting images")
    batch_size: int = Field(256, ge=1)


class DistillParams(Section):
    epochs: int = Field(5, ge=0, description="0: no fine-tune (BN recalibration only)")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.02, gt=0, description="low: a high lr wipes out the pruned weights")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    kd_weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    dca_weight: float = Field(0.1, ge=0)
    refit_every: int = Field(2, ge=1, description="refit the student's DCA basis every R epochs")
    bn_recalibration_batches: int = Field(100, ge=0, description="fresh BN stats first (0: off)")
    augment: bool = True
    hflip: bool = True


class EvaluateParams(Section):
    batch_size: int = Field(512, ge=1)
    bn_recalibration_batches: int = Field(100, ge=1)
    latency_batch_sizes: list[int] = [1, 64]
    latency_form: str = Field("folded", description="inference form timed (cdc.inference.INFERENCE_FORMS)")
    latency_threads: int | None = Field(None, ge=1, description="CPU threads while timing (null: torch's)")
    latency_rounds: int = Field(30, ge=3, description="interleaved rounds; medians and spreads over them")

    @field_validator("latency_form")
    @classmethod
    def _known_form(cls, v: str) -> str:
        return _check_registry(v, INFERENCE_FORMS)


class LatencyParams(Section):
    """The deployment target a latency table is measured on (stage latency_table, budget latency_target)."""

    device: str = Field("cpu", pattern=f"^({DEVICE_PATTERN})$", description="cpu | cuda | cuda:N")
    batch_size: int = Field(64, ge=1, description="images per forward on the target")
    threads: int | None = Field(None, ge=1, description="CPU threads (null: torch's default)")
    form: str = Field("folded", description="inference form timed (cdc.inference.INFERENCE_FORMS)")
    step: int = Field(8, ge=1, description="kept widths measured in steps of this many channels")
    rounds: int = Field(10, ge=3, description="interleaved rounds per layer; medians over rounds")

    @field_validator("device")
    @classmethod
    def _a_device_not_auto(cls, v: str) -> str:
        if v == "auto":
            raise ValueError("the target is a device the model will run on: cpu, cuda or cuda:N, not auto")
        return v

    @field_validator("form")
    @classmethod
    def _known_form(cls, v: str) -> str:
        return _check_registry(v, INFERENCE_FORMS)


class ExportParams(Section):
    model_name: str = Field(
        "cdc-student",
        description="MLflow registered model the student joins as @candidate ('': not registered)",
    )
    check_images: int = Field(256, ge=2, description="test images each exported form must reproduce")
    tolerance: float = Field(1e-3, gt=0, description="largest logit difference allowed, x the largest logit")


class RuntimeParams(Section):
    device: str = Field(
        "auto", pattern=f"^({DEVICE_PATTERN})$", description="auto | cpu | cuda | cuda:N (auto: CUDA if any)"
    )
    mixed_precision: bool = Field(
        True, description="CUDA only: bf16 (else fp16 + scaler) autocast in training"
    )
    deterministic: bool = Field(False, description="CUDA only: deterministic kernels, cudnn.benchmark off")


class Params(Section):
    seed: int = 0
    runtime: RuntimeParams = RuntimeParams()
    data: DataParams = DataParams()
    train_teacher: TrainTeacherParams = TrainTeacherParams()
    dump_stats: DumpStatsParams = DumpStatsParams()
    score: ScoreParams = ScoreParams()
    latency: LatencyParams = LatencyParams()
    prune: PruneParams = PruneParams()
    fit_dca: FitDcaParams = FitDcaParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()

    def get(self, dotted: str) -> object:
        """The value of a dotted key, e.g. `data.root`."""
        value: object = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    @model_validator(mode="after")
    def _di_needs_grid_statistics(self) -> Params:
        if self.score.criterion == "di" and self.dump_stats.grid is None:
            raise ValueError("score.criterion di reads the pooled-grid statistics: set dump_stats.grid")
        return self

    @model_validator(mode="after")
    def _no_ignored_settings(self) -> Params:
        """A setting the chosen option never reads is a mistake the user would not notice."""
        s, pr = self.score, self.prune
        if pr.ratios is not None and pr.budget != "per_layer":
            raise ValueError(f"prune.ratios is read by budget per_layer only, not {pr.budget}; set it null")
        if pr.budget == "per_layer" and pr.ratios is None:
            raise ValueError("prune.budget per_layer needs prune.ratios, a removal fraction per layer")
        if budget_reads(pr.budget).latency and self.latency.step % pr.round_to:
            raise ValueError(
                f"prune.round_to {pr.round_to} must divide latency.step {self.latency.step}: the budget "
                "keeps widths the latency table measured (multiples of latency.step)"
            )
        for key in ("coarse_map", "coarse_blocks"):
            if not s.hierarchy and getattr(s, key) is not None:
                raise ValueError(f"score.{key} is read with score.hierarchy true only: set it null")
        return self

    @model_validator(mode="after")
    def _fits_model_and_dataset(self) -> Params:
        """Rules that need the model's layers or the dataset's classes, checked now rather than when the
        stage that reads them runs, hours later."""
        model = model_layout(self)
        layers = model.prunable_layers()
        if self.fit_dca.layer not in model.dca_layers():
            raise ValueError(
                f"fit_dca.layer {self.fit_dca.layer!r} is not a feature layer of {self.train_teacher.arch}; "
                f"choose from {model.feature_layers()} or a prunable layer's activation "
                f"(e.g. {model.dca_layers()[-1]})"
            )
        if self.prune.ratios is not None and len(self.prune.ratios) != len(layers):
            raise ValueError(
                f"prune.ratios has {len(self.prune.ratios)} entries, {self.train_teacher.arch} has "
                f"{len(layers)} prunable layers"
            )
        t, n_blocks = self.score.coarse_blocks, len(model.layer_blocks())
        if t is not None and t > n_blocks:
            arch = self.train_teacher.arch
            raise ValueError(f"score.coarse_blocks {t} > {n_blocks}, the blocks of {arch}")
        k = DATASETS[self.data.dataset].num_classes
        cmap = self.score.coarse_map
        if isinstance(cmap, str):
            if COARSE_MAPS[cmap] != self.data.dataset:
                raise ValueError(
                    f"score.coarse_map {cmap} comes with dataset {COARSE_MAPS[cmap]}, not {self.data.dataset}"
                )
            return self
        if k is None:  # the class count is found in the data: `score` checks it
            return self
        if cmap is not None and (len(cmap) != k or min(cmap) < 0):
            raise ValueError(
                f"score.coarse_map needs a group id >= 0 for each of the {k} classes of {self.data.dataset}, "
                f"got {len(cmap)} entries"
            )
        if self.score.hierarchy and cmap is None and self.score.n_coarse > k:
            raise ValueError(f"score.n_coarse {self.score.n_coarse} > the {k} classes of {self.data.dataset}")
        return self


def model_layout(params: Params) -> PrunableNet:
    """The teacher's architecture built on the CPU, for its layer names and widths. Not on the meta
    device: its first random init imports torch._dynamo (2-3 s of every stage's start-up), more than
    building any zoo model costs (ResNet-50: 0.6 s, ResNet-20: 15 ms). An import-path arch is built for
    the dataset's image shape and classes (its layers are discovered on it)."""
    arch = params.train_teacher.arch
    with torch.no_grad():
        if not is_import_path(arch):
            return build_model(arch, num_classes=10, in_channels=3)
        shape = dataset_shape(params.data)
        classes = DATASETS[params.data.dataset].num_classes or 10
        return build_model(arch, classes, shape[0], imported=imported_arch(params, shape))


def dataset_shape(data: DataParams) -> tuple[int, int, int]:
    """(channels, height, width) of the images the model sees, known from the params."""
    known = DATASETS[data.dataset].input_shape
    side = data.image_size or DEFAULT_IMAGE_SIZE
    return known or (3, side, side)


def imported_arch(params: Params, input_shape: tuple[int, ...]) -> Imported | None:
    """How an import-path teacher is built (None for a registered arch)."""
    p = params.train_teacher
    if not is_import_path(p.arch):
        return None
    return Imported(dict(p.arch_kwargs), p.layers_include, p.layers_exclude, tuple(input_shape[1:3]))


class ParamsError(InputError):
    """A params file that does not match the schema; the message lists every bad key."""


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping: YAML keeps the last silently (an appended `prune:` section
    would reset every other prune key to its default), so a params file refuses it."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in first:
                raise DuplicateKey(
                    None,
                    None,
                    f"{key!r} is given twice (first at line {first[key] + 1}); YAML would keep only the "
                    "last one: merge the two",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found", path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKey as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        raise ParamsError(f"{path}: line {line}: {err.problem}", path) from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ParamsError(f"{path}: YAML syntax error{line}: {problem}", path) from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got a {type(raw).__name__}", path)
    return validate_params(raw or {}, str(path))


def validate_params(raw: dict, source: str) -> Params:
    """The params in `raw` (a parsed params file), or a ParamsError naming every bad key of `source`."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            value = e.get("input")
            if key:
                lines.append(f"  {key}: {e['msg']} (got {value!r})")
            else:  # a rule across sections: the message names its keys
                lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        joined = lines[0].strip() if len(lines) == 1 else "\n" + "\n".join(lines)
        raise ParamsError(f"invalid params in {source}: {joined}") from None


def workspace_path(v: str) -> str:
    """A path param: a relative path climbing out of the workspace would read whatever happens to lie
    beside it (and DVC would hash it); data outside is named by an absolute path, deliberately."""
    if not Path(v).is_absolute() and os.path.normpath(v).split(os.sep)[0] == "..":
        raise ValueError(f"relative path {v!r} leaves the workspace; name outside files by an absolute path")
    return v


def _check_registry(value: str, registry: Registry) -> str:
    registry.get(value)  # an unknown name lists the known ones
    return value
