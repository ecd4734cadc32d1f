"""Cluster profiles: where and how a sweep's jobs run (slurm/profiles/NAME.yaml).

A profile holds what a site's sbatch line holds (partition, account, qos, constraint, nodes,
GPUs, CPUs, memory, time limit, the preemption-notice delay, extra flags) plus how many
time-limit requeues a run may use and the throughput the planner assumes. A sweep names a
profile and may override any field for all its runs (``resources:``) or per run (``resources.*``
keys in its axes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from nepa_scale.config.files import read_yaml_mapping
from nepa_scale.config.schema import Float, Int, Refusal, Section, Str, validated
from nepa_scale.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "slurm" / "profiles"
EXECUTORS = ("slurm", "local")


class ClusterProfile(Section):
    # slurm | local (submitit's LocalExecutor: processes on this machine)
    executor: Literal[EXECUTORS] = "slurm"
    partition: Str | None = None
    account: Str | None = None
    qos: Str | None = None
    constraint: Str | None = None
    nodes: Int = Field(1, ge=1)
    gpus_per_node: Int = Field(0, ge=0)
    tasks_per_node: Int = Field(1, ge=1)  # one task per GPU on GPU nodes
    cpus_per_task: Int = Field(1, ge=1)  # also the torch thread count of each task
    mem_gb: Float | None = None  # per node; None: the partition's default
    time_min: Int = Field(60, ge=1)
    signal_delay_s: Int = Field(90, ge=0)  # SIGUSR2 this long before the time limit
    max_requeues: Int = Field(3, ge=0)  # time-limit requeues per run (preemptions do not count)
    array_parallelism: Int = Field(64, ge=1)  # at most this many runs at once (job arrays; local executor)
    sbatch_extra: dict[str, Any] = Field(default_factory=dict)  # any other sbatch flag, e.g. reservation
    setup: list[Str] = Field(default_factory=list)  # shell lines before the job (module load, ...)
    # Planner assumptions (sweep plan): achieved training TFLOP/s (default: an eager bf16 DeepSpeed
    # step measured on one H100, docs/performance.md) and memory per device.
    device_tflops: Float = Field(160.0, gt=0)
    device_memory_gb: Float = 80.0
    # Measured one-device steps (nepa-scale bench --out FILE; paths relative to the profile file):
    # the planner takes a run's compute time from the case of its model, else from device_tflops.
    bench_results: list[Str] = Field(default_factory=list)
    # Communication (nepa_scale/comm.py): nccl-tests bus bandwidth (GB/s) of large collectives within
    # a node (NVLink) and per device across nodes (its share of the network), and a latency per call.
    intra_node_gbps: Float = Field(360.0, gt=0)
    inter_node_gbps: Float = Field(40.0, gt=0)
    collective_latency_us: Float = Field(30.0, ge=0)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def devices(self) -> int:
        """GPUs per run, or tasks when the profile has no GPUs (CPU runs)."""
        return self.nodes * self.gpus_per_node if self.gpus_per_node else self.world_size

    @field_validator("bench_results")
    @classmethod
    def _bench_files_exist(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not Path(path).is_file():
                raise ValueError(f"no such file {path}")
        return paths

    @model_validator(mode="after")
    def _tasks_fit_the_nodes(self) -> ClusterProfile:
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise Refusal(
                "tasks_per_node",
                f"one task per GPU, so it must equal gpus_per_node ({self.gpus_per_node}), got {self.tasks_per_node}",
            )
        if self.executor == "local" and self.nodes != 1:
            raise Refusal("nodes", "the local executor runs on one machine (nodes: 1)")
        return self


def profile_path(name: str, relative_to: Path | None = None) -> Path:
    """A profile file: a path (absolute or relative to ``relative_to``), or a name in slurm/profiles/."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    candidates.append(PROFILE_DIR / f"{name}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
    raise ConfigError(f"profile: '{name}' is neither a file nor a profile in {PROFILE_DIR} (known: {known})")


def load_profile(
    name: str, overrides: dict[str, Any] | None = None, relative_to: Path | None = None
) -> ClusterProfile:
    path = profile_path(name, relative_to)
    data = read_yaml_mapping(path, "profile")
    data.pop("description", None)
    overrides = dict(overrides or {})
    # bench_results: relative to the file that names them (the profile, or the sweep)
    for where, source in ((path.parent, data), (relative_to or Path.cwd(), overrides)):
        if isinstance(source.get("bench_results"), list):
            source["bench_results"] = [str((where / str(b)).resolve()) for b in source["bench_results"]]
    data.update(overrides)
    return validated(ClusterProfile, data, f"profile {path.stem}: ")
