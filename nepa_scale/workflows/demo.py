"""``nepa-scale demo``: a real, small scaling study end to end on one machine.

sweeps/demo.yaml (a ladder of 4 widths x 4 budgets x 2 seeds of a two-layer NEPA on the bundled
digits; the report predicts the largest width from the others) is launched
through submitit's local executor (or the local SLURM cluster), one run is preempted mid-way and
resumes by itself, then the runs are collected, fitted (frontier power law and Chinchilla with
bootstrap intervals) and written up as an HTML report. Completed runs are skipped on a re-run,
so a second call only rebuilds the report.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

from nepa_scale.launch import launcher
from nepa_scale.launch.advice import resolve_targets
from nepa_scale.launch.design import training_steps
from nepa_scale.launch.executors import scheduler
from nepa_scale.launch.plan import plan_table
from nepa_scale.launch.status import status_table, sweep_status
from nepa_scale.launch.sweep import PlannedRun, Sweep, load_sweep
from nepa_scale.rundir import RunDir
from nepa_scale.scaling.fits import Estimate, human
from nepa_scale.scaling.report import StudySettings, build_report, describe
from nepa_scale.scaling.study import Report
from nepa_scale.workflows.advise import advice_lines, advise_round
from nepa_scale.workflows.transfer import run_transfer

REPO = Path(__file__).resolve().parents[2]
DEMO_SWEEP = REPO / "sweeps" / "demo.yaml"
TRANSFER_SWEEP = REPO / "sweeps" / "demo_transfer.yaml"
PREEMPT_FRACTION = 0.4  # the preempted run gets its notice this far into its budget
ADVICE_HOURS = 0.05  # the demo ends with what the advisor would run with this many more device-hours


def ensure_local_slurm(out) -> None:
    """Start the single-node cluster (slurm/local/start.sh) unless a controller already answers."""
    if subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0:
        return
    print("starting the local SLURM cluster (slurm/local/start.sh)", file=out, flush=True)
    subprocess.run(["bash", str(REPO / "slurm" / "local" / "start.sh")], check=True)


class PreemptOnce:
    """Sends one run a preemption notice once it has logged ``step`` (the demo's "preemption"): a
    launcher watch, called with the runs in flight at every poll."""

    def __init__(self, sweep: Sweep, run_id: str, step: int, out=sys.stdout):
        self.sweep, self.run_id, self.step, self.out, self.sent = sweep, run_id, step, out, False

    def __call__(self, active: set[str]) -> None:
        if self.sent or self.run_id not in active:
            return
        last = RunDir(self.sweep.run(self.run_id).run_dir).last_metric("train")
        if last and last["step"] >= self.step:
            launcher.preempt(self.sweep, self.run_id)
            self.sent = True
            print(
                f"[{time.strftime('%H:%M:%S')}] preempting {self.run_id} at step {last['step']} (SIGUSR2, as a "
                "cluster would): it saves a checkpoint, exits for requeue and resumes from it",
                file=self.out,
                flush=True,
            )


def preempt_target(runs: list[PlannedRun]) -> PlannedRun | None:
    """The longest run still to do: it is the one a real cluster would most likely preempt."""
    candidates = [r for r in runs if r.config is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.config.budget.images or 0, r.run_id))


def print_fits(report: Report, out) -> None:
    """The fits, the prediction check, the noise floor and the candidate quantities, in short."""
    fits = report.fits
    print(
        f"\nfits of {report.conventions['fitted quantity']} ({report.settings.n_bootstrap} bootstrap resamples, 95% "
        "intervals; a parameter the data do not pin down is shown as not identified, with the reason)",
        file=out,
    )
    if "frontier" in fits:
        print(f"  compute frontier  L(C) = E + A * C^-alpha:  {describe(fits['frontier'])}", file=out)
    if "chinchilla" in fits:
        print(f"  Chinchilla  L(N, D) = E + A/N^alpha + B/D^beta:  {describe(fits['chinchilla'])}", file=out)
    if "isoflop" in fits:
        print(f"  IsoFLOP  N_opt ~ C^a, D_opt ~ C^b:  {describe(fits['isoflop'])}", file=out)
    check = fits.get("prediction check", {})
    if "per D" in check:
        print(f"  prediction check (the largest width held out): {check['verdict']}", file=out)
        for point in check["per D"]:
            print(
                f"    D = {human(point['D'])}: observed {point['observed mean']:.4g}, predicted "
                f"{Estimate.from_dict(point['predicted'])} (log error {point['log error']:+.3f}, "
                f"{point['z (seed SE)']:+.2g} seed SE)",
                file=out,
            )
    noise = fits.get("noise floor (seeds)")
    if noise:
        print(f"  seeds: {noise['what']}", file=out)
        if "width effect" in noise:
            print(f"  width: {noise['width effect']}", file=out)
    quantities = report.analyses.get("quantities")
    if quantities is not None:
        print(
            "  candidate quantities (seed std of log | width effect in SE | share improving in training, with D, with N):",
            file=out,
        )
        for _, row in quantities.fit.iterrows():
            print(
                f"    {row['quantity']:<20} {row['seed std of log']:6.3f} | {row['width effect (SE)']:+6.2f} | "
                + " ".join(_share(row[f"improves {along}"]) for along in ("in training", "with D", "with N"))
                + (f"  ({row['flag']})" if row["flag"] else ""),
                file=out,
            )
    for warning in report.warnings:
        print(f"  note: {warning}", file=out)


def _share(value: float) -> str:
    """A share of improving steps, or a dash where the quantity has none (the train loss has no
    evaluation points to compare)."""
    return "  - " if math.isnan(value) else f"{value:.2f}"


def run_demo(
    sweep_file: str | Path = DEMO_SWEEP,
    executor: str | None = None,
    output_root: str | Path | None = None,
    n_bootstrap: int = 1000,
    transfer_sweep: str | Path | None = TRANSFER_SWEEP,
    out=sys.stdout,
) -> int:
    started = time.time()
    settings = StudySettings(n_bootstrap=n_bootstrap)  # a bad --bootstrap is said now, not after training
    sweep = load_sweep(sweep_file, executor=executor, output_root=output_root)
    kind = sweep.runs[0].resources.executor
    if not scheduler(kind).runs_here:  # the local SLURM cluster
        ensure_local_slurm(out)
    pending, rows = launcher.to_submit(sweep)
    done = sum(row.state == "completed" for row in rows)
    waiting = sum(row.state == "waiting" for row in rows)
    print(f"NEPA scaling demo: sweep {sweep.path} -> {sweep.output_root}", file=out)
    print(plan_table(sweep), file=out)
    print(
        f"\n{done} runs already done, {len(sweep.runs) - done} to train"
        + (f" ({waiting} cooldown branches start when their trunk reaches their step)" if waiting else "")
        + f" through the {kind} executor ({'local SLURM cluster' if kind == 'slurm' else 'processes on this machine'})",
        file=out,
        flush=True,
    )
    target = preempt_target(pending)
    preempt_at = None
    if target is not None:
        steps = training_steps(target.config)
        preempt_at = PreemptOnce(sweep, target.run_id, max(1, int(PREEMPT_FRACTION * steps)), out)
    launcher.launch(sweep, watch=preempt_at)
    rows = (
        sweep_status(sweep) if scheduler(kind).runs_here else launcher.wait(sweep, watch=preempt_at, out=out)
    )
    print(status_table(rows), file=out)
    if any(r.state != "completed" for r in rows):
        print("demo: not every run completed; see the errors above (re-run to continue them)", file=out)
        return 1
    trained = time.time() - started
    transfer = run_transfer(sweep, transfer_sweep, executor, out=out) if transfer_sweep else None
    transferred = time.time() - started
    targets = resolve_targets(sweep) if sweep.targets else []  # study.json: the report opens with them
    report = build_report(sweep.output_root, None, settings)
    print_fits(report, out)
    if transfer is not None:
        print("\ntransfer (the largest model against the same model untrained)", file=out)
        for line in transfer.lines():
            print(f"  {line}", file=out)
    if targets:
        print(
            f"\nnext: the advisor's proposal for {ADVICE_HOURS:g} more device-hours (docs/advisor.md)",
            file=out,
        )
        for line in advice_lines(advise_round(sweep, targets, ADVICE_HOURS, settings)):
            print(f"  {line}", file=out)
    print(
        f"\nreport: {report.paths['html']}\nfigures: {report.paths['html'].parent / 'figures'}\n"
        f"time: {trained:.0f} s pretraining, {transferred - trained:.0f} s transfer, "
        f"{time.time() - started:.0f} s in all",
        file=out,
        flush=True,
    )
    return 0
