"""One benchmark case: what it runs (model, attention, ZeRO stage, compile scope, engine, data) and
the run config it runs with, built as ``nepa-scale train`` builds one."""

from __future__ import annotations

from dataclasses import dataclass

from nepa_scale.config import load_config
from nepa_scale.data import check_input_paths

RESULT_PREFIX = "BENCH_RESULT "  # the child's result line on its stdout
ENGINES = ("deepspeed", "plain")
PHASES = ("data", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class BenchCase:
    model: str
    micro_batch: int
    attention: str = "auto"
    zero_stage: int = 2
    compile: str = "none"
    engine: str = "deepspeed"
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    data: str = "synthetic"  # synthetic | digits | an ImageNet-style folder (root/train/<class>/*.jpg)
    decode: str = "cpu"  # for a folder: cpu (PIL in the workers) | device (data.decode=device)
    num_workers: int = 0
    steps: int = 10  # per repeat
    repeats: int = 3
    warmup: int = 3
    grad_checkpointing: str = "false"  # model.grad_checkpointing: false | true | N blocks | auto
    overrides: tuple[str, ...] = ()  # model.overrides as key=value, e.g. ("image_size=32",)
    profile: int = 0  # steps run under torch.profiler after the timed ones (0: none)
    settings: tuple[str, ...] = ()  # any run-config override KEY=VALUE, applied last (--set)

    def label(self) -> str:
        return (
            f"{self.model} {self.engine} z{self.zero_stage} {self.attention} compile={self.compile} "
            f"b{self.micro_batch} data={data_label(self.data, self.decode)}"
        ) + "".join(f" {item}" for item in self.settings)


def data_label(data: str, decode: str) -> str:
    return data if data in ("synthetic", "digits") else f"folder/{decode}"


def case_config(case: BenchCase, output_dir: str):
    timed = case.warmup + case.steps * case.repeats + case.profile
    data = ["data.kind=synthetic", f"data.synthetic_size={case.micro_batch * (timed + 1)}"]
    if case.data == "digits":
        data = ["data.kind=digits", "data.crop_scale=[0.35,1.0]", "data.hflip=0.0"]
    elif case.data != "synthetic":
        data = ["data.kind=imagefolder", f"data.root={case.data}"]
    config = load_config(
        None,
        [
            f"model.name={case.model}",
            f"model.attention={case.attention}",
            f"model.compile={case.compile}",
            f"model.grad_checkpointing={case.grad_checkpointing}",
            *(f"model.overrides.{item}" for item in case.overrides),
            *data,
            f"data.decode={case.decode}",
            f"data.num_workers={case.num_workers}",
            f"budget.global_batch={case.micro_batch}",
            f"budget.images={case.micro_batch * timed}",  # the lr schedule spans the benchmark
            f"deepspeed.zero_stage={case.zero_stage}",
            f"deepspeed.precision={case.precision}",
            "logging.progress=never",
            f"output_dir={output_dir}",
            *case.settings,
        ],
    )
    check_input_paths(config)
    return config
