"""Cluster profiles: where and how a sweep's jobs run (slurm/profiles/NAME.yaml).

A profile holds what a site's sbatch line holds (partition, account, qos, constraint, nodes,
GPUs, CPUs, memory, time limit, the preemption-notice delay, extra flags) plus how many
time-limit requeues a run may use and the throughput the planner assumes. A sweep names a
profile and may override any field for all its runs (``resources:``) or per run (``resources.*``
keys in its axes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nepa_scale.config import ConfigError, build_dataclass, read_yaml_mapping

PROFILE_DIR = Path(__file__).resolve().parents[2] / "slurm" / "profiles"
EXECUTORS = ("slurm", "local")


@dataclass
class ClusterProfile:
    executor: str = "slurm"  # slurm | local (submitit's LocalExecutor: processes on this machine)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # one task per GPU on GPU nodes
    cpus_per_task: int = 1  # also the torch thread count of each task
    mem_gb: float | None = None  # per node; None: the partition's default
    time_min: int = 60
    signal_delay_s: int = 90  # SIGUSR2 this long before the time limit
    max_requeues: int = 3  # time-limit requeues per run (preemptions do not count)
    array_parallelism: int = 64  # at most this many runs at once (job arrays; local executor)
    sbatch_extra: dict[str, Any] = field(default_factory=dict)  # any other sbatch flag, e.g. reservation
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load, ...)
    # Planner assumptions (sweep plan): achieved training TFLOP/s and memory per device.
    device_tflops: float = 160.0  # measured eager bf16 DeepSpeed step on one H100 (docs/performance.md)
    device_memory_gb: float = 80.0
    # Measured one-device steps (nepa-scale bench --out FILE; paths relative to the profile file):
    # the planner takes a run's compute time from the case of its model, else from device_tflops.
    bench_results: list[str] = field(default_factory=list)
    # Communication (nepa_scale/comm.py): nccl-tests bus bandwidth (GB/s) of large collectives within
    # a node (NVLink) and per device across nodes (its share of the network), and a latency per call.
    intra_node_gbps: float = 360.0
    inter_node_gbps: float = 40.0
    collective_latency_us: float = 30.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def devices(self) -> int:
        """GPUs per run, or tasks when the profile has no GPUs (CPU runs)."""
        return self.nodes * self.gpus_per_node if self.gpus_per_node else self.world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_profile(p: ClusterProfile, where: str) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {message}")

    require(p.executor in EXECUTORS, f"executor: must be one of {', '.join(EXECUTORS)}, got '{p.executor}'")
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
        require(getattr(p, name) >= 1, f"{name}: must be >= 1, got {getattr(p, name)}")
    require(p.gpus_per_node >= 0, f"gpus_per_node: must be >= 0, got {p.gpus_per_node}")
    require(
        p.gpus_per_node == 0 or p.tasks_per_node == p.gpus_per_node,
        f"tasks_per_node: one task per GPU, so it must equal gpus_per_node ({p.gpus_per_node}), got {p.tasks_per_node}",
    )
    require(p.signal_delay_s >= 0, f"signal_delay_s: must be >= 0, got {p.signal_delay_s}")
    require(p.max_requeues >= 0, f"max_requeues: must be >= 0, got {p.max_requeues}")
    require(p.executor != "local" or p.nodes == 1, "nodes: the local executor runs on one machine (nodes: 1)")
    for name in ("device_tflops", "intra_node_gbps", "inter_node_gbps"):
        require(getattr(p, name) > 0, f"{name}: must be > 0, got {getattr(p, name)}")
    require(
        p.collective_latency_us >= 0, f"collective_latency_us: must be >= 0, got {p.collective_latency_us}"
    )
    for path in p.bench_results:
        require(Path(path).is_file(), f"bench_results: no such file {path}")


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
    profile = build_dataclass(ClusterProfile, data, "resources")
    validate_profile(profile, f"profile {path.stem}")
    return profile
