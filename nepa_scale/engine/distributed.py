"""Process group setup from torchrun / SLURM / submitit environments, and DeepSpeed config building."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nepa_scale.config import ConfigError, RunConfig
from nepa_scale.engine.settings import StepSettings


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def slurm_rendezvous() -> dict[str, str]:
    """MASTER_ADDR/PORT for a plain ``srun``: the job's first node, a port derived from the job id
    (stable across requeues, like submitit's TorchDistributedEnvironment)."""

    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    return {"MASTER_ADDR": hosts[0], "MASTER_PORT": str(20000 + job % 20000)}


def use_environment_extensions_dir() -> None:
    """DeepSpeed compiles its CPU communication op on first use into torch's extension cache. The
    build names this environment's absolute paths, so checkouts that share one cache rebuild it
    whenever another ran last (a minute each time): one cache per environment builds it once.
    A build, where one still happens, runs this environment's ninja: two ninja binaries hash the
    same build differently, and each then rebuilds after the other."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    scripts = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(scripts, "ninja")):
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != scripts:
            os.environ["PATH"] = scripts + (os.pathsep + path if path else "")


SHM_OP = "deepspeed_shm_comm"
BUILD_STAMP = "nepa_build.json"  # beside the built op: the versions it was built for


def _build_versions() -> dict[str, str]:
    import deepspeed  # heavy: `sweep plan` reads this module (deepspeed_config) without it

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": sys.version}


def prebuild_cpu_comm_op() -> None:
    """Build DeepSpeed's CPU communication op now (``make setup`` does), so that no run's start-up
    compiles it; nothing to do where DeepSpeed communicates through a GPU library. The build runs
    with this environment's ninja first on PATH, and a stamp records the versions it is for."""
    use_environment_extensions_dir()
    from deepspeed.accelerator import get_accelerator  # heavy: DeepSpeed, for a run only
    from deepspeed.comm.torch import build_shm_op  # heavy: DeepSpeed, for a run only

    if get_accelerator().device_name() != "cpu":
        return
    build_shm_op()
    stamp = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / SHM_OP / BUILD_STAMP
    stamp.write_text(json.dumps(_build_versions()))


def load_prebuilt_cpu_comm_op() -> bool:
    """Hand DeepSpeed the op ``make setup`` built, as a module, without a build step: DeepSpeed's
    own load would ask ninja whether the build is up to date, and ninja then rebuilds it (a minute
    of compiling) whenever another ninja binary last built it, or the job's snapshot or PATH differ
    (docs/performance.md). Returns False (DeepSpeed builds it then) when there is none, or it was
    built for other versions."""
    from deepspeed.accelerator import get_accelerator  # heavy: DeepSpeed, for a run only

    if get_accelerator().device_name() != "cpu":
        return False
    folder = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / SHM_OP
    library, stamp = folder / f"{SHM_OP}.so", folder / BUILD_STAMP
    try:
        if not library.is_file() or json.loads(stamp.read_text()) != _build_versions():
            return False
    except (OSError, ValueError):
        return False
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return False
    owner = next(cls for cls in type(builder).__mro__ if "_loaded_ops" in vars(cls))
    if builder.name not in owner._loaded_ops:
        spec = importlib.util.spec_from_file_location(SHM_OP, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        owner._loaded_ops[builder.name] = module  # DeepSpeed's own cache of loaded ops
    return True


def init_world(timeout_s: float = 600.0) -> World:
    """Initialise torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU); a collective
    fails after ``timeout_s`` (``distributed.timeout_s``)."""
    use_environment_extensions_dir()
    load_prebuilt_cpu_comm_op()
    import deepspeed  # heavy: `sweep plan` reads this module (deepspeed_config) without it

    rank, local_rank, world_size = world_from_env()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    if world_size > 1 and "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        os.environ.update(slurm_rendezvous())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise ConfigError("MASTER_PORT is not set for a multi-process run (use torchrun or the launcher)")
        os.environ["MASTER_PORT"] = str(_free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timedelta(seconds=timeout_s),
        )
    return World(rank, local_rank, world_size, device, backend, timeout_s)


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def control_group(world: World) -> dist.ProcessGroup | None:
    """A CPU (gloo) group for the host-side agreements the loop makes every step (preemption): an
    all-reduce over NCCL would make the host wait for the GPU. None for a single process; a
    collective call (every rank, once)."""
    if world.world_size == 1:
        return None
    if world.backend == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=world.timeout_s))


# What a collective raises when a peer rank is gone: the connection closed under it (gloo, at once)
# or the wait ran out (NCCL, after distributed.timeout_s).
PEER_LOST_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "Timed out",
    "timed out",
    "Socket Timeout",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL's watchdog",
)


def is_peer_loss(exc: BaseException) -> bool:
    """``exc`` is a collective failing because another rank is gone (not this rank's own error)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in PEER_LOST_MARKERS)


def deepspeed_config(
    config: RunConfig, world: World, settings: StepSettings, load_universal: bool
) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (the optimizer and scheduler are passed as objects)."""
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": world.device.type == "cuda"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": world.device.type == "cuda"}
    if ds.overlap_comm is not None:
        zero["overlap_comm"] = ds.overlap_comm
    if ds.reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = ds.reduce_bucket_size
    if ds.zero_stage == 3:
        # Gather every parameter on each forward: a deterministic schedule (no prefetch heuristics).
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    out: dict[str, Any] = {
        "train_batch_size": config.budget.global_batch,
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        "gradient_accumulation_steps": settings.accumulation_steps,
        "gradient_clipping": config.optim.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {
            "enabled": settings.precision == "bf16",
            "check_grad_overflow": ds.check_grad_overflow,  # DeepSpeed's default is on (config: why off)
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return merged(out, ds.extra)


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``deepspeed.extra`` over the generated config, section by section: extra's
    ``zero_optimization: {overlap_comm: true}`` adds to the stage, it does not replace it."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out
