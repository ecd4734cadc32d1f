"""The advisor as a command and as a closed loop.

``sweep advise SWEEP --budget-gpu-hours X`` fits the study's completed runs, predicts its targets,
ranks the candidate runs (launch/advice.py builds them, scaling/advise.py chooses) and writes the
chosen ones as a sweep file in the study's ``advice/`` folder.

``sweep launch SWEEP --advise --budget-gpu-hours X --until-interval W`` repeats that in rounds: it
brings every planned run home (the sweep's, then each advice file's), refits, stops once every
target's 95% interval is narrower than W (relative to the prediction), and otherwise advises the
next round with a share of the budget left (``rounds``). It keeps no state of its own: what it has
done is the advice files and the run directories, so a loop killed at any point and started again
goes on where it was, and submits nothing twice (the launcher skips completed and in-flight runs).
One loop runs per study at a time (the study's owner lock). ``submit_loop`` runs it as a small CPU
job that the scheduler requeues.
"""

from __future__ import annotations

import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import submitit

from nepa_scale.errors import ConfigError, FitError
from nepa_scale.launch import launcher
from nepa_scale.launch.advice import (
    advice_files,
    advice_spec,
    candidate_pool,
    resolve_targets,
    study_runs,
    write_advice,
)
from nepa_scale.launch.executors import scheduler
from nepa_scale.launch.plan import plan_run
from nepa_scale.launch.submission import snapshot_code
from nepa_scale.launch.sweep import Sweep, load_sweep
from nepa_scale.launch.targets import TargetSpec, target_spec
from nepa_scale.ownership import acquire
from nepa_scale.rundir import RunDir
from nepa_scale.scaling.advise import Advice, advise
from nepa_scale.scaling.estimates import human
from nepa_scale.scaling.report import study_points
from nepa_scale.scaling.study import StudySettings
from nepa_scale.scaling.target import Target, TargetStudy, predict_targets


@dataclass
class Round:
    """One round of advice: the study as fitted, the advice (None: nothing affordable), its file."""

    study: TargetStudy
    quantity: str
    advice: Advice | None
    path: Path | None
    spent_before: float


def check_budget(budget: float) -> None:
    if not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
        raise ConfigError(f"--budget-gpu-hours: expected a positive number of GPU-hours, got {budget}")


def spent_on_advice(sweep: Sweep) -> float:
    """GPU-hours the advice files planned (the planner's, each run once: a trunk repeated in a later
    file is not paid twice, nor a run of the sweep itself)."""
    seen = {run.run_id for run in sweep.runs}
    spent = 0.0
    for path in advice_files(sweep):
        for run in load_sweep(path).runs:
            if run.run_id in seen or run.error:
                continue
            seen.add(run.run_id)
            plan = plan_run(run)
            spent += plan.spent_device_hours or 0.0
    return spent


def next_advice_path(sweep: Sweep) -> Path:
    return sweep.output_root / "advice" / f"advice-{len(advice_files(sweep)) + 1:02d}.yaml"


def fit_study(
    sweep: Sweep, targets: list[Target], settings: StudySettings
) -> tuple[TargetStudy, str, pd.DataFrame]:
    """The study's completed runs fitted and its targets predicted."""
    study, trivial, _ = study_points(sweep.output_root, settings)
    if not len(study.final):
        raise FitError(f"{sweep.output_root}: the study has no completed run to fit: launch it first")
    goal = [t.counted(settings.n_kind, settings.d_kind) for t in targets]
    predicted = predict_targets(
        study.final, goal, n_bootstrap=settings.n_bootstrap, seed=settings.seed, trivial=trivial
    )
    return predicted, study.quantity_short, study.final


def advise_round(
    sweep: Sweep, targets: list[Target], budget: float, settings: StudySettings, spent: float = 0.0
) -> Round:
    """Fit, build the pool, choose within ``budget`` and write the advice file (if anything is chosen)."""
    predicted, quantity, final = fit_study(sweep, targets, settings)
    goal = [p.target for p in predicted.predictions]
    pool = candidate_pool(sweep, goal, settings.n_kind, settings.d_kind)
    if not len(pool):
        return Round(predicted, quantity, None, None, spent)
    advice = advise(final, pool, goal, budget, study=predicted)
    if not len(advice.chosen):
        return Round(predicted, quantity, advice, None, spent)
    path = next_advice_path(sweep)
    note = (
        f"Advice {path.stem}: {len(advice.chosen)} runs for {human(advice.spent)} of {human(budget)} GPU-hours, "
        f"chosen to narrow the predictive interval of {', '.join(t.label for t in goal)}"
    )
    write_advice(path, advice_spec(sweep, advice.chosen, note))
    return Round(predicted, quantity, advice, path, spent)


def advice_lines(r: Round) -> list[str]:
    """The study now, the chosen runs (cost, and each target's expected interval after each), the file."""
    lines = [f"now: {p.line(r.quantity)}" for p in r.study.predictions]
    if r.advice is None or not len(r.advice.chosen):
        return lines + ["advice: no candidate run fits the budget (or none would narrow the interval)"]
    a, labels = r.advice, [p.target.label for p in r.study.predictions]
    lines.append(
        f"advice: {len(a.chosen)} runs, {human(a.spent)} of {human(a.budget)} GPU-hours (the planner's, on the "
        "study's profile); each row's interval is the target's expected 95% interval once it and the rows above are in"
    )
    head = f"  {'run':<52} {'kind':<16} {'N':>10} {'D':>12} {'seed':>4} {'GPU-h':>9} {'total':>9}  expected interval"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for _, row in a.chosen.iterrows():
        kind = "branch" if str(row["kind"]).startswith("branch") else row["kind"]
        low, high = row[f"after: {labels[0]}"]
        lines.append(
            f"  {row['candidate']:<52} {kind:<16} {human(row['N']):>10} {human(row['D']):>12} {row['seed']:>4} "
            f"{row['marginal_cost']:>9.3g} {row['spent']:>9.3g}  [{low:.4g}, {high:.4g}]"
        )
    for i, p in enumerate(r.study.predictions):
        before, after = a.expected_interval(i, a.std_before[i]), a.expected_interval(i, a.std_after[i])
        lines.append(
            f"{p.target.label}: expected 95% interval [{before[0]:.4g}, {before[1]:.4g}] now -> "
            f"[{after[0]:.4g}, {after[1]:.4g}] after these runs (predictive std of log {a.std_before[i]:.3g} -> "
            f"{a.std_after[i]:.3g}; one run's seed noise, {r.study.noise_std:.3g}, stays)"
        )
    if r.path is not None:
        lines.append(f"wrote {r.path}: launch it with `nepa-scale sweep launch {r.path}`")
    return lines


def _completed(run_dir: Path) -> bool:
    rd = RunDir(run_dir)
    return rd.run_json.is_file() and rd.record().status == "completed"


def run_advice(
    sweep: Sweep,
    budget: float,
    settings: StudySettings,
    specs: list[TargetSpec] | None = None,
    out=sys.stdout,
) -> Round:
    """``sweep advise``: one round, printed."""
    check_budget(budget)
    if not (specs if specs is not None else sweep.targets):
        raise ConfigError(f"{sweep.path}: no target: add a target: section or pass --target MODEL:images=N")
    if not any(_completed(run.run_dir) for run in study_runs(sweep)):
        raise FitError(f"{sweep.output_root}: the study has no completed run to fit: launch it first")
    r = advise_round(sweep, resolve_targets(sweep, specs), budget, settings)
    for line in advice_lines(r):
        print(line, file=out, flush=True)
    return r


def bring_home(sweep: Sweep, out=sys.stdout) -> None:
    """Every run planned so far trained: the sweep's, then each advice file's (in order). The
    launcher skips what is completed or in flight; a run in flight is waited for, never submitted
    again (on this machine ``launch`` runs the jobs and returns when they end; on SLURM it submits
    and ``wait`` follows them)."""
    for planned in [sweep, *(load_sweep(path) for path in advice_files(sweep))]:
        launcher.launch(planned)
        launcher.wait(planned, out=out)


def advise_loop(
    sweep: Sweep,
    budget: float,
    until: float,
    settings: StudySettings,
    rounds: int = 3,
    specs: list[TargetSpec] | None = None,
    out=sys.stdout,
) -> int:
    """The closed loop (module docstring); 0 once the intervals are narrow enough, else 0 with what
    stopped it (the budget, or the rounds)."""
    check_budget(budget)
    if not (math.isfinite(until) and until > 0):
        raise ConfigError(f"--until-interval: expected a positive relative width (e.g. 0.2), got {until}")
    targets = resolve_targets(sweep, specs)
    if not targets:
        raise ConfigError(f"{sweep.path}: no target: add a target: section or pass --target MODEL:images=N")
    with acquire(sweep.output_root, "advise loop"):  # one loop per study (a second is refused, naming it)
        return _rounds(sweep, targets, budget, until, settings, rounds, out)


def _rounds(
    sweep: Sweep,
    targets: list[Target],
    budget: float,
    until: float,
    settings: StudySettings,
    rounds: int,
    out,
) -> int:
    while True:
        bring_home(sweep, out)
        done = len(advice_files(sweep))
        spent = spent_on_advice(sweep)
        predicted, quantity, _ = fit_study(sweep, targets, settings)
        widths = [p.relative_width for p in predicted.predictions]
        for p in predicted.predictions:
            print(f"round {done}: {p.line(quantity)}", file=out, flush=True)
        if all(w <= until for w in widths):
            print(f"stop: every target's interval is narrower than {until:g} of its prediction", file=out)
            return 0
        if done >= rounds:
            print(f"stop: {rounds} rounds of advice done ({human(spent)} GPU-hours spent)", file=out)
            return 0
        if budget - spent <= 0:
            print(f"stop: the budget is spent ({human(spent)} of {human(budget)} GPU-hours)", file=out)
            return 0
        r = advise_round(sweep, targets, (budget - spent) / (rounds - done), settings, spent)
        for line in advice_lines(r):
            print(line, file=out, flush=True)
        if r.path is None:
            print(
                f"stop: nothing more fits the budget ({human(spent)} of {human(budget)} GPU-hours spent)",
                file=out,
            )
            return 0
        advised = load_sweep(r.path)  # launched now: until then it is a proposal (advice_files)
        launcher.launch(advised)
        launcher.wait(advised, out=out)


class AdviceLoopJob(submitit.helpers.Checkpointable):
    """``advise_loop`` as a job: stateless like the loop itself, so a requeue (preemption, time
    limit: submitit calls ``checkpoint()``, which resubmits it unchanged) simply starts it again."""

    def __init__(self, sweep_file: str, options: dict, loop: dict):
        self.sweep_file, self.options, self.loop = sweep_file, options, loop

    def __call__(self) -> int:
        # The job's Python starts with the notices blocked (executors.job_python, for the runs'
        # engine); this job lets submitit's own handler take them: checkpoint() and requeue.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2, signal.SIGTERM})
        sweep = load_sweep(self.sweep_file, **self.options)
        loop = dict(self.loop)
        loop["settings"] = StudySettings(**loop["settings"])
        loop["specs"] = (
            [target_spec(s, "target") for s in loop["specs"]] if loop["specs"] is not None else None
        )
        return advise_loop(sweep, **loop)


def submit_loop(
    sweep_file: str,
    budget: float,
    until: float,
    settings: StudySettings,
    rounds: int,
    specs: list[TargetSpec] | None,
    executor: str | None = None,
    output_root: str | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Submit the loop as a one-task CPU job on the sweep's scheduler and profile; its id."""
    options = {"executor": executor, "output_root": output_root, "overrides": overrides}
    sweep = load_sweep(sweep_file, **options)
    profile = sweep.runs[0].resources.model_copy(
        update={"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 2, "mem_gb": None}
    )
    loop = {
        "budget": budget,
        "until": until,
        "rounds": rounds,
        "settings": {
            "quantity": settings.quantity,
            "n_bootstrap": settings.n_bootstrap,
            "seed": settings.seed,
        },
        "specs": [s.to_dict() for s in specs] if specs is not None else None,
    }
    job_kind = scheduler(profile.executor)
    folder = job_kind.folder(sweep.output_root)
    pool = job_kind.executor(profile, folder, snapshot_code(sweep.output_root), f"{sweep.name}-advise")
    (job,) = job_kind.submit(pool, [AdviceLoopJob(str(Path(sweep_file).resolve()), options, loop)])
    return str(job.job_id)
