"""From run directories to one tidy table: a row per run and per evaluation point.

A run's evaluation points (the ``eval_point`` column) are its final step ("final") and each
pre-registered compute budget (in training FLOPs) that the run passed: the step where it had spent
that much compute.

Reads only the run-directory contract (``nepa_scale/rundir.py``). Losses at a budget are the
mean of the logged training losses over a window of log lines ending at the budget (stated in the
``smoothing`` column); held-out, probe and diagnostic values come from the last evaluation line at
or before the point (``EVAL_PREFIXES``; ``val_gap_remaining`` = 1 - ``val_gap_closed``, positive
like an error). Runs that failed or are incomplete are kept with their status, never dropped.
``collect_evaluations`` gives every evaluation point of every run (the curves of downstream
quantities and diagnostics).

Segmentation fine-tunes attached to the study (``nepa-scale sweep attach``: beside it, in
SWEEP_DIR_<name>/) give each pretraining run's final-row ``miou`` (the completed fine-tunes' final
val mIoU, their mean when several), ``seg_error`` (1 - miou, what a power law can fit) and
``seg_runs`` (how many were averaged). Attached classification fine-tunes give ``ft_acc`` (final
val top-1, online weights), ``ft_error`` and ``ft_runs`` the same way.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from nepa_scale.config import DataConfig, LoggingConfig
from nepa_scale.errors import NepaError, UsageError
from nepa_scale.flops import CONVENTIONS, train_flops_per_image
from nepa_scale.models.zoo import count_params
from nepa_scale.rundir import RunDir, images_seen

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 5  # log lines averaged for the loss at a budget
# Evaluation-line keys the table carries: held-out loss and diagnostics, probes, effective ranks.
EVAL_PREFIXES = ("val_", "probe_", "rankme_", "erank_", "knn_", "linear_")


def check_window(window: int) -> None:
    """``--window``: a mean needs at least one log line (said before any run is read)."""
    if window < 1:
        raise UsageError(f"--window: the log lines averaged for the loss, at least 1, got {window}")


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Every directory under ``sweep_dir`` holding a run.json (the sweep directory itself included)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UsageError(f"sweep directory not found: {sweep_dir}")
    return sorted(p.parent for p in sweep_dir.rglob("run.json"))


def _run_summary(run: RunDir) -> dict:
    """The run's facts from its record; its config is checked for values only (the data it trained
    on need not be reachable from where the analysis runs)."""
    row: dict = {"run_id": run.root.name, "run_dir": str(run.root), "status": "unknown"}
    try:
        record = run.record()
        row["status"] = record.status or "unknown"
        config = record.run_config()
    except NepaError as exc:
        row.update(status="invalid", error=str(exc))
        return row
    arch = config.model.arch()
    counts = count_params(arch)
    row.update(
        task=config.task,
        data=data_description(config.data, arch.image_size),
        probe=probe_setup(config.logging),
        model=config.model.name,
        seed=config.seed,
        schedule=config.optim.schedule,
        flops_budget=config.budget.flops,  # an IsoFLOP run's compute budget (its own FLOP convention)
        # A WSD branch's trunk (its own id for other runs): branches share their trunk's steps.
        trunk=Path(config.branch.parent).name if config.branch.parent else run.root.name,
        branch_step=config.branch.step or 0,
        probe_subsets=_probe_subsets(record.probe_subsets),
        probe_classes=(record.probe_subsets or {}).get("train", {}).get("classes"),
        params=counts["total"],
        params_no_embed=counts["without_patch_embed"],
        tokens_per_image=arch.num_tokens,
        global_batch=config.budget.global_batch,
        total_steps=record.total_steps,
        restarts=len(record.restarts),
        world_size=record.world_size or 1,
        error=record.error,
        **{f"flops_per_image_{c}": train_flops_per_image(arch, c) for c in CONVENTIONS},
    )
    return row


def data_description(data: DataConfig, image_size: int) -> str:
    """What a run trained and was evaluated on, in one string (equal strings: the same data): the
    dataset, where it lives and which splits, and the image size."""
    if data.kind == "synthetic":
        what = f"synthetic ({data.synthetic_size} images)"
    elif data.root is None:
        what = data.kind
    else:
        what = f"{data.kind} {os.path.normpath(data.root)} ({data.train_split}, {data.val_split})"
    return f"{what} at {image_size} px"


def probe_setup(lg: LoggingConfig) -> str | None:
    """How a run's online probes measured (equal strings: comparable probe errors); None without them."""
    if not lg.probe_every:
        return None
    weights = "EMA" if lg.probe_ema else "online"
    scored = f", {lg.probe_folds}-fold cross-validated" if lg.probe_folds else ""
    return f"k = {lg.probe_k}, {'causal' if lg.probe_causal else 'bidirectional'}, {weights} weights{scored}"


def _probe_subsets(recorded: dict | None) -> str | None:
    """The probe's images in one string (equal strings: equal images): seed, then each split's digest."""
    if not recorded:
        return None
    folds = f", {recorded['folds']['k']} folds {recorded['folds']['digest']}" if recorded.get("folds") else ""
    return f"seed {recorded['seed']}: train {recorded['train']['digest']}, val {recorded['val']['digest']}{folds}"


def _eval_lines(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated step (lines of the same step merged, the last value of each key)."""
    kind = metrics["kind"] if "kind" in metrics else pd.Series("train", index=metrics.index)
    evals = metrics[kind == "eval"].sort_values("step", kind="stable")
    if evals.empty:
        return evals
    merged = evals.groupby("step", as_index=False, sort=True).last()
    if "val_gap_closed" in merged:
        merged["val_gap_remaining"] = 1.0 - merged["val_gap_closed"]
    if "val_loss" in merged:
        merged["val_cosine_distance"] = 1.0 + merged["val_loss"]
    return merged


def _eval_values(line: pd.Series) -> dict:
    return {
        key: value
        for key, value in line.items()
        if str(key).startswith(EVAL_PREFIXES) and not isinstance(value, str)
    }


def _gpu_hours(train: pd.DataFrame, world_size: int, global_batch: int) -> float:
    """Device-hours from the logged throughput: images of each interval / img/s, times the ranks."""
    if train.empty or "img_per_s" not in train:
        return float("nan")
    images = images_seen(train["step"].diff().fillna(train["step"].iloc[0]), global_batch)
    seconds = (images / train["img_per_s"].replace(0, np.nan)).sum()
    return float(seconds * world_size / 3600)


def collect(
    sweep_dir: str | Path,
    budgets: list[float] | None = None,
    window: int = DEFAULT_WINDOW,
    convention: str = "6N+attn",
) -> pd.DataFrame:
    """The tidy table. ``budgets`` are training FLOPs under ``convention`` (pre-registered evaluation
    points); every run also gets a ``final`` row at its last logged step."""
    check_window(window)
    rows = []
    for path in run_dirs(Path(sweep_dir)):
        run = RunDir(path)
        summary = _run_summary(run)
        log = run.read_metrics_log()
        summary["metrics_unreadable"] = ", ".join(map(str, log.unreadable)) or None
        metrics = pd.DataFrame(log.records)
        if summary["status"] == "invalid" or metrics.empty:
            rows.append({**summary, "eval_point": "final", "images_seen": 0, "loss": math.nan})
            continue
        kind = metrics["kind"] if "kind" in metrics else pd.Series("train", index=metrics.index)
        train = metrics[kind == "train"].sort_values("step").drop_duplicates("step", keep="last")
        evals = _eval_lines(metrics)
        per_image = summary[f"flops_per_image_{convention}"]
        summary["gpu_hours"] = _gpu_hours(train, summary["world_size"], summary["global_batch"])
        complete = summary["status"] == "completed"
        last_step = int(train["step"].iloc[-1]) if len(train) else 0
        points = [("final", last_step)]
        for budget in budgets or []:
            step = math.ceil(budget / (per_image * summary["global_batch"]))
            if step <= last_step:
                points.append((f"{budget:.4g}", step))
        for label, step in points:
            upto = train[train["step"] <= step]
            if upto.empty:
                continue
            images = images_seen(step, summary["global_batch"])
            row = {
                **summary,
                "eval_point": label,
                "step": step,
                "images_seen": images,
                "complete": complete,
                "smoothing": f"mean of last {window} log lines",
            }
            for c in CONVENTIONS:
                row[f"flops_{c}"] = images * summary[f"flops_per_image_{c}"]
            row["loss"] = float(upto["loss"].tail(window).mean())
            row["loss_last_line"] = float(upto["loss"].iloc[-1])
            row["cosine_distance"] = 1.0 + row["loss"]
            ev = evals[evals["step"] <= step] if len(evals) else evals
            if len(ev):
                row.update(_eval_values(ev.iloc[-1]))
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        raise UsageError(f"no runs (run.json) under {sweep_dir}")
    final = table["eval_point"] == "final"
    resolved = table["run_dir"].map(lambda d: str(Path(d).resolve()))
    for task, (score, error, count) in ATTACHED_COLUMNS.items():
        attached = attached_scores(Path(sweep_dir), task)
        if attached:
            scores = resolved.map(lambda d, found=attached: found.get(d, []))
            table[score] = [
                float(np.mean(s)) if s and f else math.nan for s, f in zip(scores, final, strict=True)
            ]
            table[error] = 1.0 - table[score]
            table[count] = [len(s) if f else 0 for s, f in zip(scores, final, strict=True)]
    table.attrs["convention"] = convention
    return table


# task -> (score column, error column, count column) of the downstream runs attached to a study;
# the score is each fine-tune's last val evaluation (the last, not the best: the best would pick
# the val split's favourite).
ATTACHED_COLUMNS = {
    "segment": ("miou", "seg_error", "seg_runs"),
    "finetune": ("ft_acc", "ft_error", "ft_runs"),
}
ATTACHED_SCORE = {"segment": "val_miou", "finetune": "val_acc"}


def attached_scores(sweep_dir: Path, task: str) -> dict[str, list[float]]:
    """The final val score (mIoU, top-1) of the completed ``task`` runs in SWEEP_DIR_*/, by the
    resolved path of the pretraining run they started from."""
    scores: dict[str, list[float]] = {}
    key = ATTACHED_SCORE[task]
    for folder in sorted(sweep_dir.parent.glob(f"{sweep_dir.name}_*")):
        for path in run_dirs(folder) if folder.is_dir() else []:
            run = RunDir(path)
            try:
                record = run.record()
                config = record.run_config()
            except NepaError:
                continue
            source = config.segment.pretrained if task == "segment" else config.finetune.pretrained
            if config.task != task or record.status != "completed" or not source or not Path(source).is_dir():
                continue
            evals = [m for m in run.read_metrics() if m.get("kind") == "eval" and key in m]
            if evals:
                scores.setdefault(str(Path(source).resolve()), []).append(float(evals[-1][key]))
    return scores


def unreadable_line_warnings(table: pd.DataFrame) -> list[str]:
    """One warning per run whose metrics.jsonl has lines that are not JSON (a last line being
    written excepted): the table and the fits go on without them, and say so."""
    if "metrics_unreadable" not in table:
        return []
    runs = table.dropna(subset=["metrics_unreadable"]).drop_duplicates("run_id")
    warnings = []
    for _, row in runs.iterrows():
        lines = row["metrics_unreadable"]
        which = f"lines {lines} are" if "," in lines else f"line {lines} is"
        warnings.append(
            f"run {row['run_id']}: {Path(row['run_dir']) / 'metrics.jsonl'} {which} not JSON: skipped, so the "
            "table and the fits lack what it held (restore it from a copy, or compare the fits without this run)"
        )
    return warnings


def write_table(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": out_dir / "table.parquet", "csv": out_dir / "table.csv"}
    table.to_parquet(paths["parquet"], index=False)
    table.to_csv(paths["csv"], index=False)
    return paths


def collect_curves(
    sweep_dir: str | Path, window: int = DEFAULT_WINDOW, convention: str = "6N+attn"
) -> pd.DataFrame:
    """Every run's training curve: one row per logged step, loss smoothed over ``window`` lines."""
    frames = []
    for path in run_dirs(Path(sweep_dir)):
        run = RunDir(path)
        summary = _run_summary(run)
        metrics = pd.DataFrame(run.read_metrics())
        if summary["status"] == "invalid" or metrics.empty or "loss" not in metrics:
            continue
        kind = metrics["kind"] if "kind" in metrics else pd.Series("train", index=metrics.index)
        train = metrics[kind == "train"].sort_values("step").drop_duplicates("step", keep="last")
        frame = pd.DataFrame(
            {
                "run_id": summary["run_id"],
                "model": summary["model"],
                "params": summary["params"],
                "params_no_embed": summary["params_no_embed"],
                "status": summary["status"],
                "step": train["step"].to_numpy(),
                "images_seen": images_seen(train["step"].to_numpy(), summary["global_batch"]),
                "loss": train["loss"].rolling(window, min_periods=1).mean().to_numpy(),
            }
        )
        frame["flops"] = frame["images_seen"] * summary[f"flops_per_image_{convention}"]
        frame["cosine_distance"] = 1.0 + frame["loss"]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collect_evaluations(sweep_dir: str | Path, convention: str = "6N+attn") -> pd.DataFrame:
    """Every evaluation point of every completed run: one row per (run, step) with the run's facts,
    the compute spent by then, and the evaluation's values. A WSD branch's rows before its branch
    step are its trunk's (``own`` is False there): count them once, from the trunk."""
    frames = []
    for path in run_dirs(Path(sweep_dir)):
        run = RunDir(path)
        summary = _run_summary(run)
        if summary["status"] != "completed":
            continue
        evals = _eval_lines(pd.DataFrame(run.read_metrics()))
        if evals.empty:
            continue
        values = evals[[c for c in evals.columns if c == "step" or str(c).startswith(EVAL_PREFIXES)]]
        frame = values.assign(
            **{
                k: summary[k]
                for k in ("run_id", "trunk", "branch_step", "model", "seed", "params", "params_no_embed")
            }
        )
        frame["images_seen"] = images_seen(frame["step"].to_numpy(), summary["global_batch"])
        frame["flops"] = frame["images_seen"] * summary[f"flops_per_image_{convention}"]
        frame["own"] = (frame["branch_step"] == 0) | (frame["step"] > frame["branch_step"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
