"""Where the Kubeflow pods go and how big they are: what `cdc kfp compile` (and submit/schedule, which
recompile) compiles into the spec. No KFP import here: the CLI builds its options from these defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from components.stages import Stage
from pipeline.defaults import DEFAULT_IMAGE

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Toleration:
    key: str
    effect: str  # NoSchedule, PreferNoSchedule or NoExecute
    value: str | None = None  # None: operator Exists

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """`KEY[=VALUE]:EFFECT`, as `kubectl taint` writes a taint."""
        spec, _, effect = text.rpartition(":")
        key, _, value = spec.partition("=")
        if not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(
                f"toleration {text!r}: give KEY[=VALUE]:EFFECT with EFFECT one of NoSchedule, "
                "PreferNoSchedule, NoExecute"
            )
        return cls(key, effect, value or None)


@dataclass(frozen=True)
class PodSettings:
    """Where and how big the pods are: fixed when the spec is compiled (`cdc kfp compile` options).

    A stage that runs as several processes (torchrun) gets `gpus` GPUs and `cpu_per_gpu`/`memory_gb_per_gpu`
    times as many CPUs and GiB; a one-process model stage gets one GPU's worth; the others `cpu_task`.
    Requests equal limits (Guaranteed QoS: the last pods a node evicts); the memory limit includes the
    memory-backed /dev/shm (`shm_gb`), which Kubernetes counts against it. Tolerations and node selectors
    apply to the GPU tasks only, so that the CPU tasks stay off the GPU pool.
    """

    image: str = DEFAULT_IMAGE
    gpus: int = 1
    accelerator: str = GPU_RESOURCE
    tolerations: tuple[Toleration, ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()
    cpu_per_gpu: int = 4
    memory_gb_per_gpu: int = 16
    shm_gb: int = 8
    cpu_task: tuple[int, int] = (1, 4)  # (CPUs, GiB) of a task that runs no model
    gpu_timeout_h: float = 48.0
    cpu_timeout_h: float = 6.0
    image_pull_secret: str | None = None
    # a failed task (an evicted or preempted pod too) is retried; its checkpoints let it resume
    retries: int = 2
    retry_backoff_s: int = 60  # doubling

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus {self.gpus}: a model task needs at least one")

    def gpus_of(self, stage: Stage, device_of: Callable[[str], object] | None = None) -> int:
        """GPUs of `stage`'s task: `gpus` for a multi-process stage, one for the other model stages and
        for a stage whose own device param (`device_of(key)`, the compiled params) names CUDA."""
        if stage.device_key:
            return int(device_of is not None and str(device_of(stage.device_key)).startswith("cuda"))
        return (self.gpus if stage.distributed else 1) if stage.runs_model else 0
