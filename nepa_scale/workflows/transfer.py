"""Transfer of a study's largest model: does pretraining help a downstream task?

Two comparisons, each against the same architecture without pretraining:

- **linear probe** (and kNN) on frozen features of the largest, longest-trained run (each seed's),
  against the same model at its random initialisation;
- **few-label fine-tune**: a short fine-tune on a class-stratified share of the training labels
  (``finetune.label_fraction``) from the pretrained weights, against the same fine-tune from scratch.

The fine-tunes are a sweep of their own: a transfer sweep file such as sweeps/demo_transfer.yaml,
given the source runs' model shape and, per source seed, one run from its weights and one from
scratch. They share the engine's checkpoints, resume and run records, and a re-run skips what is
done. The result is written to SWEEP_DIR/transfer.json, which the report shows; the fine-tunes live
beside the study, in SWEEP_DIR_transfer/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nepa_scale.config.files import read_yaml_mapping
from nepa_scale.engine.export import export_run, stale_export
from nepa_scale.errors import ConfigError
from nepa_scale.launch import launcher
from nepa_scale.launch.executors import scheduler
from nepa_scale.launch.sweep import load_sweep
from nepa_scale.models.zoo import count_params
from nepa_scale.rundir import RunDir
from nepa_scale.scaling.transfer_record import FinetuneComparison, ProbeComparison, TransferRecord
from nepa_scale.workflows.attach import resolved_sweep_file
from nepa_scale.workflows.probe import probe_run


def largest_runs(sweep) -> list[Path]:
    """The completed runs with the most parameters and the longest budget, one per seed: the model
    whose transfer a study is most interested in, as many times as the study trained it."""
    done = [
        r for r in sweep.runs if r.config is not None and RunDir(r.run_dir).record().status == "completed"
    ]
    if not done:
        raise ConfigError(
            f"transfer: sweep {sweep.name} has no completed run to take the pretrained model from"
        )

    def size(run) -> tuple[int, int]:
        return count_params(run.config.model.arch())["total"], run.config.budget.images or 0

    largest = max(size(r) for r in done)
    return [r.run_dir for r in sorted((r for r in done if size(r) == largest), key=lambda r: r.config.seed)]


def transfer_sweep(
    spec_file: str | Path, sources: list[Path], output_root: Path, executor: str | None = None
):
    """The transfer sweep for ``sources``: the file's recipe, their model shape, and for each source a
    fine-tune from its weights and one from scratch, with the source's seed. The resolved file is kept
    with the runs."""
    spec = read_yaml_mapping(spec_file, "transfer sweep")
    recorded = [RunDir(source).config() for source in sources]
    spec["set"] = {
        "model.name": recorded[0].model.name,
        **{f"model.overrides.{k}": v for k, v in recorded[0].model.overrides.items()},
        **(spec.get("set") or {}),
    }
    seeds = [config.seed for config in recorded]
    axes = [
        {"zip": {"finetune.pretrained": [str(s) for s in sources] + [None] * len(sources), "seed": seeds * 2}}
    ]
    return load_sweep(
        resolved_sweep_file(spec_file, spec, output_root, axes, "transfer_sweep.yaml"), executor=executor
    )


def final_accuracy(run_dir: Path) -> dict[str, float]:
    """Top-1 on the whole val split at the end of a fine-tune (online and EMA weights): the last
    evaluation, not the best one, which would pick the val split's favourite."""
    evals = [m for m in RunDir(run_dir).read_metrics() if m.get("kind") == "eval" and "val_acc" in m]
    if not evals:
        raise ConfigError(f"transfer: {run_dir} logged no evaluation")
    last = evals[-1]
    return {k: float(last[k]) for k in ("val_acc", "val_acc_ema") if k in last} | {"step": last["step"]}


def run_transfer(sweep, spec_file: str | Path, executor: str | None = None, out=sys.stdout) -> TransferRecord:
    """Probe and fine-tune the sweep's largest model against its untrained twin; write transfer.json."""
    sources = largest_runs(sweep)
    names = ", ".join(source.name for source in sources)
    print(f"\ntransfer of {names} (the largest, longest-trained model)", file=out, flush=True)
    probes: dict[str, list[dict]] = {"pretrained": [], "random_init": []}
    for source in sources:
        probes["pretrained"].append(probe_run(source, weights="online", reuse=True)[0])
        probes["random_init"].append(probe_run(source, weights="random_init", reuse=True)[0])
        if stale_export(source) is not None:
            export_run(source)
    # Beside the study, not in it: the analysis collects every run under the study's directory.
    root = sweep.output_root.parent / f"{sweep.output_root.name}_transfer"
    ft_sweep = transfer_sweep(spec_file, sources, root, executor)
    launcher.launch(ft_sweep)
    if not scheduler(ft_sweep.runs[0].resources.executor).runs_here:  # submitted: follow the jobs
        launcher.wait(ft_sweep, out=out)
    finetunes: dict[str, list[dict]] = {"pretrained": [], "scratch": []}
    for run in ft_sweep.runs:
        if RunDir(run.run_dir).record().status != "completed":
            raise ConfigError(f"transfer: fine-tune {run.run_dir} did not complete (see its run.json)")
        init = "pretrained" if run.config.finetune.pretrained else "scratch"
        finetunes[init].append(
            {"run": str(run.run_dir), "seed": run.config.seed, **final_accuracy(run.run_dir)}
        )
    ft, first = ft_sweep.runs[0].config, probes["pretrained"][0]
    keep = ("linear_acc", "knn_acc", "step")
    record = TransferRecord(
        sources=[str(source) for source in sources],
        probe=ProbeComparison(
            what=f"logistic regression and kNN (k={first['k']}) on frozen mean-pooled features (causal "
            f"attention, as pretrained), {first['n_train']} training and {first['n_test']} held-out images",
            pretrained=[{k: r[k] for k in keep} for r in probes["pretrained"]],
            random_init=[{k: r[k] for k in keep} for r in probes["random_init"]],
        ),
        finetune=FinetuneComparison(
            what=f"{ft.finetune.label_fraction:.0%} of the training labels, "
            + (f"{ft.budget.images:,} images" if ft.budget.images else f"{ft.budget.epochs:g} epochs")
            + f" (batch {ft.budget.global_batch}), lr {ft.optim.lr:g}, layer decay {ft.finetune.layer_decay:g}, "
            f"{'causal' if ft.finetune.causal else 'bidirectional'} attention, patch embedding "
            f"{'frozen' if ft.finetune.freeze_patch_embed else 'trained'}; top-1 on the whole val split at the "
            "end (online weights; EMA beside)",
            **finetunes,
        ),
    )
    record.write(sweep.output_root)
    return record
