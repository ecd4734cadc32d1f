"""Transfer of a study's largest model: does pretraining help a downstream task?

Two comparisons, each against the same architecture without pretraining:

- **linear probe** (and kNN) on frozen features of the largest, longest-trained run, against the
  same model at its random initialisation;
- **few-label fine-tune**: a short fine-tune on a class-stratified share of the training labels
  (``finetune.label_fraction``) from the pretrained weights, against the same fine-tune from scratch.

The fine-tunes are a sweep of their own (a transfer sweep file such as sweeps/demo_transfer.yaml,
given the source run's model shape and the axis ``finetune.pretrained: [source run, null]``), so they
share the engine's checkpoints, resume and run records, and a re-run skips what is done. The result
is written to SWEEP_DIR/transfer.json, which the report shows; the fine-tunes live beside the
study, in SWEEP_DIR_transfer/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from nepa_scale.config import read_yaml_mapping
from nepa_scale.errors import ConfigError
from nepa_scale.rundir import RunDir

TRANSFER_FILE = "transfer.json"


def largest_run(sweep) -> Path:
    """The completed run with the most parameters, the longest-trained of those (not a branch of a
    shorter budget): the model whose transfer a study is most interested in."""
    from nepa_scale.models.zoo import count_params

    done = [
        r for r in sweep.runs if r.config is not None and RunDir(r.run_dir).record().status == "completed"
    ]
    if not done:
        raise ConfigError(
            f"transfer: sweep {sweep.name} has no completed run to take the pretrained model from"
        )
    best = max(
        done,
        key=lambda r: (count_params(r.config.model.arch())["total"], r.config.budget.images or 0, r.run_id),
    )
    return best.run_dir


def transfer_sweep(spec_file: str | Path, source: Path, output_root: Path, executor: str | None = None):
    """The transfer sweep for ``source``: the file's recipe, the source's model shape, and one run
    from the pretrained weights and one from scratch. The resolved file is kept with the runs."""
    from nepa_scale.launch.sweep import load_sweep

    spec = read_yaml_mapping(spec_file, "transfer sweep")
    recorded = RunDir(source).record().run_config()
    spec["base"] = str((Path(spec_file).parent / spec["base"]).resolve())
    spec["set"] = {
        "model.name": recorded.model.name,
        **{f"model.overrides.{k}": v for k, v in recorded.model.overrides.items()},
        **(spec.get("set") or {}),
    }
    spec["axes"] = [{"grid": {"finetune.pretrained": [str(source), None]}}]
    spec["output_root"] = str(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    resolved = output_root / "transfer_sweep.yaml"
    resolved.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_sweep(resolved, executor=executor)


def final_accuracy(run_dir: Path) -> dict[str, float]:
    """Top-1 on the whole val split at the end of a fine-tune (online and EMA weights): the last
    evaluation, not the best one, which would pick the val split's favourite."""
    evals = [m for m in RunDir(run_dir).read_metrics() if m.get("kind") == "eval" and "val_acc" in m]
    if not evals:
        raise ConfigError(f"transfer: {run_dir} logged no evaluation")
    last = evals[-1]
    return {k: float(last[k]) for k in ("val_acc", "val_acc_ema") if k in last} | {"step": last["step"]}


def run_transfer(sweep, spec_file: str | Path, executor: str | None = None, out=sys.stdout) -> dict:
    """Probe and fine-tune the sweep's largest model against its untrained twin; write transfer.json."""
    from nepa_scale.engine.export import export_run
    from nepa_scale.eval.probes import probe_run
    from nepa_scale.launch import launcher

    source = largest_run(sweep)
    print(f"\ntransfer of {source.name} (the largest, longest-trained model)", file=out, flush=True)
    probes = {w: probe_run(source, weights=w, reuse=True)[0] for w in ("online", "random_init")}
    if not (RunDir(source).export / "model.safetensors").is_file():
        export_run(source)
    # Beside the study, not in it: the analysis collects every run under the study's directory.
    root = sweep.output_root.parent / f"{sweep.output_root.name}_transfer"
    ft_sweep = transfer_sweep(spec_file, source, root, executor)
    launcher.launch(ft_sweep)
    if ft_sweep.runs[0].resources.executor == "slurm":
        launcher.wait(ft_sweep, out=out)
    finetunes = {}
    for run in ft_sweep.runs:
        if RunDir(run.run_dir).record().status != "completed":
            raise ConfigError(f"transfer: fine-tune {run.run_dir} did not complete (see its run.json)")
        init = "pretrained" if run.config.finetune.pretrained else "scratch"
        finetunes[init] = {"run": str(run.run_dir), **final_accuracy(run.run_dir)}
    ft = ft_sweep.runs[0].config
    result = {
        "source": str(source),
        "probe": {
            "what": f"logistic regression and kNN (k={probes['online']['k']}) on frozen mean-pooled features "
            f"(causal attention, as pretrained), {probes['online']['n_train']} training and "
            f"{probes['online']['n_test']} held-out images",
            "pretrained": {k: probes["online"][k] for k in ("linear_acc", "knn_acc", "step")},
            "random_init": {k: probes["random_init"][k] for k in ("linear_acc", "knn_acc")},
        },
        "finetune": {
            "what": f"{ft.finetune.label_fraction:.0%} of the training labels, {ft.budget.images:,} images "
            f"(batch {ft.budget.global_batch}), lr {ft.optim.lr:g}, layer decay {ft.finetune.layer_decay:g}, "
            f"patch embedding {'frozen' if ft.finetune.freeze_patch_embed else 'trained'}; top-1 on the whole "
            "val split at the end (online weights; EMA beside)",
            **finetunes,
        },
    }
    (sweep.output_root / TRANSFER_FILE).write_text(json.dumps(result, indent=2))
    return result


def transfer_lines(result: dict) -> list[str]:
    """The comparison in words, for the console and the report."""
    p, f = result["probe"], result["finetune"]
    lines = [
        f"linear probe: pretrained {p['pretrained']['linear_acc']:.3f} vs random init "
        f"{p['random_init']['linear_acc']:.3f} (kNN {p['pretrained']['knn_acc']:.3f} vs "
        f"{p['random_init']['knn_acc']:.3f}); {p['what']}",
    ]
    if "pretrained" in f and "scratch" in f:

        def acc(entry: dict) -> str:
            ema = f" (EMA {entry['val_acc_ema']:.3f})" if "val_acc_ema" in entry else ""
            return f"{entry['val_acc']:.3f}{ema}"

        lines.append(
            f"few-label fine-tune: from pretrained {acc(f['pretrained'])} vs from scratch "
            f"{acc(f['scratch'])}; {f['what']}"
        )
    return lines
