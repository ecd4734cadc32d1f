"""Scaling analysis: parameter recovery, IsoFLOP optimum, degenerate inputs, collect, figures, report."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from nepa_scale.config import RunConfig
from nepa_scale.flops import train_flops_per_image
from nepa_scale.models.zoo import count_params
from nepa_scale.rundir import Restart, RunDir, RunRecord
from nepa_scale.scaling import figures
from nepa_scale.scaling.analyses import fit_entry
from nepa_scale.scaling.collect import collect, collect_curves
from nepa_scale.scaling.fits import (
    Estimate,
    FitError,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law,
    holdout,
    interval_spread,
    judged,
    pareto_frontier,
    resample,
    seed_spread,
)
from nepa_scale.scaling.render import describe, write_html, write_markdown
from nepa_scale.scaling.report import StudySettings, build_report, fit_table, identified_in_words, read_fits
from nepa_scale.scaling.study import AnalysisResult, Report

TRUE = {"E": 0.05, "A": 40.0, "B": 200.0, "alpha": 0.34, "beta": 0.28}


def law(n, d, p=TRUE):
    return p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"] + p["B"] / np.asarray(d, float) ** p["beta"]


def test_chinchilla_recovers_known_parameters():
    rng = np.random.default_rng(1)
    n = np.repeat(np.logspace(6, 9, 8), 30)  # 8 model sizes x 30 data budgets = 240 runs
    d = np.tile(np.logspace(7, 10, 30), 8)
    observed = law(n, d) * np.exp(rng.normal(0, 0.01, n.shape))  # 1% multiplicative noise
    fit = fit_chinchilla(n, d, observed, n_bootstrap=300, seed=0)
    est = {k: v.value for k, v in fit.params.items()}
    assert abs(est["alpha"] - TRUE["alpha"]) < 0.03 and abs(est["beta"] - TRUE["beta"]) < 0.03
    for key in ("E", "A", "B"):
        assert abs(math.log(est[key] / TRUE[key])) < math.log(1.4), (key, est[key])
    for key, value in TRUE.items():
        assert fit.params[key].contains(value), (key, str(fit.params[key]), value)
    assert fit.n_bootstrap == 300 and not fit.warnings


def test_power_law_recovers_frontier_exponent():
    rng = np.random.default_rng(2)
    c = np.logspace(15, 20, 25)
    y = (0.08 + 3e3 * c**-0.25) * np.exp(rng.normal(0, 0.005, c.shape))
    fit = fit_power_law(c, y, n_bootstrap=300)
    assert abs(fit.alpha.value - 0.25) < 0.02 and fit.alpha.contains(0.25)
    assert abs(fit.E.value / 0.08 - 1) < 0.1 and fit.E.contains(0.08)


def test_pareto_frontier_keeps_only_improving_points():
    x = np.array([1, 2, 3, 4, 5, 6])
    y = np.array([5, 6, 4, 4.5, 2, 3])
    assert pareto_frontier(x, y).tolist() == [0, 2, 4]


def test_isoflop_recovers_the_known_optimum():
    """With C = 6ND the loss-optimal N grows as C^(beta/(alpha+beta)) (Chinchilla's closed form)."""
    budgets = np.logspace(17, 20, 5)
    rows = []
    for c in budgets:
        for n in np.logspace(math.log10(c) / 2 - 4.5, math.log10(c) / 2 - 0.5, 9):
            rows.append((c, n, c / (6 * n)))
    c, n, d = (np.array(x) for x in zip(*rows, strict=True))
    rng = np.random.default_rng(3)
    y = law(n, d) * np.exp(rng.normal(0, 0.002, n.shape))
    iso = fit_isoflop(c, n, d, y, n_bootstrap=200)
    exponent = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert abs(iso.n_exponent.value - exponent) < 0.03 and iso.n_exponent.contains(exponent)
    assert abs(iso.d_exponent.value - (1 - exponent)) < 0.03
    g = (TRUE["alpha"] * TRUE["A"] / (TRUE["beta"] * TRUE["B"])) ** (1 / (TRUE["alpha"] + TRUE["beta"]))
    analytic = g * (budgets / 6) ** exponent
    assert np.all(np.abs(np.log(iso.n_opt / analytic)) < np.log(1.3))
    # Every parabola's minimum and N_opt(C) come with intervals, which contain the truth.
    assert all(m.identified and m.has_interval for m in iso.minima) and iso.n_exponent.identified
    middle = budgets[2]
    low, high = iso.interval_at(middle)
    assert low < g * (middle / 6) ** exponent < high and high / low < 2


def test_holdout_predicts_the_largest_model():
    rng = np.random.default_rng(4)
    n = np.repeat(np.logspace(6, 9, 6), 12)
    d = np.tile(np.logspace(7, 10, 12), 6)
    y = law(n, d) * np.exp(rng.normal(0, 0.005, n.shape))
    result = holdout(n, d, y, largest=1, n_bootstrap=0)
    assert result.held_out_sizes == [1e9] and len(result.observed) == 12
    assert result.mean_abs_rel_error < 0.05


@pytest.mark.parametrize(
    "args,match",
    [
        (
            (np.array([1e6, 1e7, 1e8]), np.array([1e8, 1e9, 1e7]), np.array([0.3, 0.2, 0.25])),
            "at least 6 points for 5 parameters, got 3",
        ),
        ((np.full(20, 1e7), np.logspace(7, 9, 20), np.linspace(0.3, 0.2, 20)), "at least two model sizes"),
        ((np.logspace(6, 8, 20), np.full(20, 1e9), np.linspace(0.3, 0.2, 20)), "at least two data budgets"),
    ],
)
def test_degenerate_chinchilla_inputs_raise_clear_errors(args, match):
    with pytest.raises(FitError, match=match):
        fit_chinchilla(*args, n_bootstrap=0)


def test_nan_losses_are_dropped_with_a_warning():
    n = np.repeat(np.logspace(6, 9, 4), 6)
    d = np.tile(np.logspace(7, 10, 6), 4)
    y = law(n, d)
    y[[2, 7]] = np.nan
    fit = fit_chinchilla(n, d, y, n_bootstrap=0)
    assert fit.n_points == 22 and any("dropped 2 point(s)" in w for w in fit.warnings)


def test_isoflop_with_one_budget_is_an_error():
    n = np.logspace(6, 8, 5)
    with pytest.raises(FitError, match="at least two compute budgets"):
        fit_isoflop(np.full(5, 1e18), n, 1e18 / (6 * n), law(n, 1e18 / (6 * n)), n_bootstrap=0)


# ----------------------------------------------------------------------------- synthetic sweep directory

DIMS = (48, 96, 192)
BUDGET_STEPS = (100, 200, 400)


def _arch_overrides(dim: int) -> dict:
    return {"dim": dim, "depth": 2, "num_heads": 3}


def make_run(
    root,
    run_id: str,
    dim: int,
    steps: int,
    status: str = "completed",
    logged: int | None = None,
    noise: float = 0.0,
    seed: int = 0,
    loss=None,
    probe=None,
):
    """A run directory as the engine writes it: run.json with the resolved config, metrics.jsonl.
    ``loss(n, images, step, steps)``: the cosine distance at a step (default: the law at the images seen);
    ``probe(n, images, step, steps)``: the linear-probe error on the evaluation lines (default: none)."""
    config = RunConfig(seed=seed, budget={"global_batch": 128, "images": steps * 128})
    config.model.overrides = _arch_overrides(dim)
    arch = config.model.arch()
    n = count_params(arch)["total"]
    per_image = train_flops_per_image(arch)
    run = RunDir(root / run_id)
    run.root.mkdir(parents=True)
    run.write_record(
        RunRecord(
            status=status,
            config=config.to_dict(),
            total_steps=steps,
            world_size=1,
            restarts=[Restart(from_step=10)] if run_id.endswith("r") else [],
            error="RuntimeError: boom" if status == "failed" else None,
        )
    )
    rng = np.random.default_rng(abs(hash(run_id)) % 2**32)
    for step in range(10, (logged or steps) + 1, 10):
        exact = law(n, step * 128) if loss is None else loss(n, step * 128, step, steps)
        cos_dist = exact * math.exp(rng.normal(0, noise))
        run.append_metrics(
            {
                "kind": "train",
                "step": step,
                "images_seen": step * 128,
                "flops_seen": step * 128 * per_image,
                "loss": cos_dist - 1.0,
                "img_per_s": 1000.0,
            }
        )
        if step % 100 == 0:
            line = {
                "kind": "eval",
                "step": step,
                "val_loss": cos_dist - 1.0 + 0.01,
                "probe_error": 0.5 * cos_dist,
            }
            if probe is not None:
                error = probe(n, step * 128, step, steps) * math.exp(rng.normal(0, noise))
                line |= {
                    "probe_linear_error": error,
                    "probe_knn_error": 1.2 * error,
                    "rankme_features": 1 - error,
                }
            run.append_metrics(line)
    return n, per_image


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    info = {}
    for dim in DIMS:
        for steps in BUDGET_STEPS:
            info[f"d{dim}_s{steps}"] = make_run(root, f"d{dim}_s{steps}", dim, steps)
    make_run(root, "failed_run", 96, 400, status="failed", logged=50)
    make_run(root, "incomplete_r", 48, 400, status="preempted", logged=120)
    return root, info


def test_collect_builds_the_tidy_table(sweep):
    root, info = sweep
    n48, per_image48 = info["d48_s100"]
    budget = 150 * 128 * per_image48  # a pre-registered compute budget: step 150 of the dim-48 model
    table = collect(root, budgets=[budget], window=1)
    assert set(table["run_id"]) == set(info) | {"failed_run", "incomplete_r"}
    final = table[table["eval_point"] == "final"].set_index("run_id")
    assert (
        final.loc["failed_run", "status"] == "failed"
        and final.loc["failed_run", "error"] == "RuntimeError: boom"
    )
    assert final.loc["incomplete_r", "status"] == "preempted" and final.loc["incomplete_r", "step"] == 120
    assert final.loc["incomplete_r", "restarts"] == 1 and not final.loc["incomplete_r", "complete"]
    row = final.loc["d48_s200"]
    assert row["params"] == n48 and row["images_seen"] == 200 * 128
    assert row["flops_6N+attn"] == pytest.approx(200 * 128 * per_image48)
    assert row["cosine_distance"] == pytest.approx(law(n48, 200 * 128))
    assert row["val_loss"] == pytest.approx(law(n48, 200 * 128) - 1 + 0.01)
    assert row["gpu_hours"] == pytest.approx(200 * 128 / 1000 / 3600)
    at_budget = table[(table["eval_point"] != "final") & (table["run_id"] == "d48_s200")]
    assert len(at_budget) == 1 and at_budget["step"].iloc[0] == 150
    assert "d48_s100" not in set(table[table["eval_point"] != "final"]["run_id"])  # budget beyond its run
    assert row["smoothing"] == "mean of last 1 log lines"


def test_figures_have_the_expected_axes_and_series(sweep):
    root, _ = sweep
    curves = collect_curves(root, window=1)
    idx = pareto_frontier(curves["flops"], curves["cosine_distance"])
    frontier = curves.iloc[idx]
    fit = fit_power_law(frontier["flops"], frontier["cosine_distance"], n_bootstrap=50)
    fig = figures.loss_curves(curves, frontier, fit, "mean cosine distance (1 + loss)", "6N+attn")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "6N+attn" in ax.get_xlabel() and "1 + loss" in ax.get_ylabel()
    run_lines = [line for line in ax.get_lines() if str(line.get_gid()).startswith("run:")]
    assert len(run_lines) == curves["run_id"].nunique() == 11
    assert any(line.get_gid() == "fit" for line in ax.get_lines())
    assert any(c.get_gid() == "band" for c in ax.collections)  # the fit's 95% bootstrap band
    colors = {line.get_gid(): line.get_color() for line in run_lines}
    assert colors["run:d48_s100"] == colors["run:d48_s400"] != colors["run:d192_s400"]  # one colour per size
    plt.close(fig)
    table = fit_table(collect(root).query("status == 'completed'"), StudySettings())
    chin = fit_chinchilla(table["N"], table["D"], table["quantity"], table["run_id"], n_bootstrap=0)
    fig = figures.residuals(table, chin, "images seen", "total parameters")
    assert len([c for c in fig.axes[0].collections if str(c.get_gid()).startswith("resid:")]) == len(DIMS)
    assert np.abs(np.concatenate([c.get_offsets()[:, 1] for c in fig.axes[0].collections])).max() < 0.02
    plt.close(fig)
    # Loss vs N: one line per D joining sizes in order (no zig-zag across budgets), with the fit's band.
    final = table[table["eval_point"] == "final"]
    chin = fit_chinchilla(final["N"], final["D"], final["quantity"], final["run_id"], n_bootstrap=30)
    fig = figures.loss_vs_params(final, chin, "q", "total parameters", "images seen")
    lines = [line for line in fig.axes[0].get_lines() if str(line.get_gid()).startswith("D:")]
    assert len(lines) == final["D"].nunique() == len(BUDGET_STEPS)
    assert all(np.all(np.diff(line.get_xdata()) > 0) for line in lines)
    assert sum(str(c.get_gid()).startswith("band:") for c in fig.axes[0].collections) == len(BUDGET_STEPS)
    plt.close(fig)


def test_report_from_a_synthetic_sweep(sweep, tmp_path):
    root, info = sweep
    budgets = [100 * 128 * info["d192_s100"][1], 200 * 128 * info["d192_s100"][1]]
    result = build_report(
        root, tmp_path, StudySettings(n_bootstrap=60, budgets=budgets, window=1, downstream=["probe_error"])
    )
    html = (tmp_path / "report.html").read_text()
    for text in (
        "Conventions",
        "6N+attn",
        "1 + loss",
        "chinchilla",
        "frontier",
        "failed_run is failed",
        "data:image/png;base64,",
    ):
        assert text in html, text
    assert (tmp_path / "report.md").exists() and (tmp_path / "table.parquet").exists()
    # It opens with what the study shows: the first section, before any warning or figure.
    markdown = (tmp_path / "report.md").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", html)[0] == "What this study shows"
    assert html.index("What this study shows") < html.index("class='warn'") < html.index("<figure")
    assert markdown.split("\n## ")[1].startswith("What this study shows\n")
    assert "Fitted quantity" in html[: html.index("<h2>Warnings")]
    # Tables name what their numbers are and never print NaN (the failed run has no loss).
    text = re.sub(r"data:image/png;base64,[^'\"]+", "", html) + markdown
    assert not re.search(r"\bNaN\b|>nan<|\| nan \|", text)
    assert "training FLOPs (6N+attn)" in html and "flops_6N+attn" not in text
    for name in ("loss_curves", "residuals", "loss_vs_params", "downstream_probe_error"):
        assert (tmp_path / "figures" / f"{name}.png").exists() and (
            tmp_path / "figures" / f"{name}.svg"
        ).exists()
    fits = json.loads((tmp_path / "fits.json").read_text())
    assert {"frontier", "chinchilla", "prediction check"} <= set(fits["fits"])
    assert any("IsoFLOP" in w for w in result.warnings)  # 3 sizes at 2 budgets, but not all reach them
    chin = result.fit("chinchilla")
    assert abs(chin.params["alpha"].value - TRUE["alpha"]) < 0.05  # noise-free synthetic runs
    assert pd.read_parquet(tmp_path / "table.parquet")["run_id"].nunique() == 11


def test_report_cli_names_a_missing_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "sweep directory not found" in out.stderr


def test_analysis_scripts_run_on_a_sweep(sweep, tmp_path):
    root, _ = sweep
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            str(repo / "analysis" / "compute_optimal.py"),
            str(root),
            "--compute",
            "1e21",
            "--bootstrap",
            "20",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "alpha" in out.stdout
    # 1e21 FLOPs is far beyond these ~1e5-parameter models: said so, or no allocation at all.
    assert "outside the trained sizes" in out.stdout or "N_opt, D_opt: not identified" in out.stdout, (
        out.stdout
    )
    figure = tmp_path / "compare.png"
    out = subprocess.run(
        [
            sys.executable,
            str(repo / "analysis" / "compare_sweeps.py"),
            str(root),
            str(root),
            "--labels",
            "a",
            "b",
            "--out",
            str(figure),
            "--bootstrap",
            "20",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert figure.exists() and out.stdout.count("alpha") == 2


def test_seeds_are_grouped_and_their_spread_is_the_noise_floor(tmp_path):
    """Three seeds of each (N, D) with 2% log-normal noise per logged loss: the pooled spread of
    the final points recovers it, and the report states it."""
    for dim in DIMS[:3]:
        for steps in BUDGET_STEPS[:2]:
            for seed in range(3):
                make_run(tmp_path / "study", f"d{dim}_s{steps}_seed{seed}", dim, steps, noise=0.02, seed=seed)
    table = collect(tmp_path / "study", window=1)
    final = table[table["eval_point"] == "final"]
    assert sorted(set(final["seed"])) == [0, 1, 2]
    spread = seed_spread(final["params"], final["images_seen"], final["cosine_distance"], final["seed"])
    assert spread.cells == 6 and spread.replicates == 18
    assert 0.01 < spread.std_log < 0.03
    assert (
        seed_spread(final["params"], final["images_seen"], final["cosine_distance"], [0] * len(final)) is None
    )
    # The bootstrap draws seeds whole, then runs within each drawn seed.
    groups = [np.array([2 * i, 2 * i + 1]) for i in range(6)]  # six runs of two points
    strata = np.array([0, 0, 0, 1, 1, 1])  # two seeds of three runs
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = resample(groups, strata, rng)
        runs = sorted({int(i) // 2 for i in idx})
        assert len(idx) == 12 and all(2 * r in idx and 2 * r + 1 in idx for r in runs)
        per_seed = [
            sum(int(i) // 2 in (0, 1, 2) for i in idx) // 2,
            sum(int(i) // 2 in (3, 4, 5) for i in idx) // 2,
        ]
        assert sorted(per_seed) in ([0, 6], [3, 3])  # a seed drawn twice, or each once
    settings = StudySettings(n_bootstrap=20, window=1, quantity="cosine_distance")
    results = build_report(tmp_path / "study", tmp_path / "report", settings)
    floor = results.fits["noise floor (seeds)"]
    assert floor["cells"] == 6 and floor["std_log"] == pytest.approx(spread.std_log)
    assert "### Noise floor: the seeds' spread" in (tmp_path / "report" / "report.md").read_text()


def test_estimates_at_a_bound_or_too_wide_are_not_identified():
    assert judged(Estimate(0.35, 0.32, 0.38), 0.0, 5.0).identified
    at_bound = judged(Estimate(2.19, 0.08, 5.0), 0.0, 5.0)
    assert (
        not at_bound.identified and "upper bound 5" in at_bound.reason and "factor of 62.5" in at_bound.reason
    )
    pinned = judged(Estimate(1.5e-14, 1.5e-14, 1.5e-14), floor=1e-6)
    assert not pinned.identified and "lower bound 0" in pinned.reason and "zero width" in pinned.reason
    assert str(pinned).startswith("not identified (")
    assert str(Estimate(403712.0, 400000.5, 410000.25)) == "403,712 [4e+05, 4.1e+05]"
    assert Estimate.from_dict(json.loads(json.dumps(at_bound.to_dict()))) == at_bound


def test_intervals_too_wide_for_a_factor_are_said_in_words(tmp_path):
    """Bug: a parameter the data do not constrain read "its 95% interval spans a factor of 1e+183";
    past a factor of 100 the report says orders of magnitude, in words, wherever it shows the reason."""
    assert interval_spread(0.1, 8.46) == "a factor of 84.6"
    assert interval_spread(1.0, 3.42e4) == "about 5 orders of magnitude"
    assert interval_spread(1e-100, 1e83) == "many orders of magnitude (more than 6)"
    huge = judged(Estimate(2.0, 1e-100, 1e83))
    assert not huge.identified and "many orders of magnitude" in huge.reason
    at_zero = judged(Estimate(9.696e-12, 1e-20, 1e-3), floor=1e-7)
    entry = fit_entry({"E": at_zero, "A": huge, "alpha": judged(Estimate(0.5, 0.4, 0.6), 0.0, 5.0)})
    assert identified_in_words(entry) == "alpha = 0.5 [0.4, 0.6]; E and A not identified (see Warnings)"
    report = Report(
        StudySettings(),
        "q",
        pd.DataFrame(),
        {"chinchilla": AnalysisResult(entry)},
        [f"chinchilla: not identified: {entry['reason']}"],
        {},
        ["Fitted quantity: q"],
        [],
    )
    shown = "\n".join(
        (
            describe(entry),
            write_html(tmp_path, report).read_text(),
            write_markdown(tmp_path, report).read_text(),
        )
    )
    assert "A: not identified (its 95% interval spans many orders of magnitude (more than 6))" in shown
    assert not re.search(r"factor of [0-9.]+e[+-]?[0-9]+", shown), shown
    assert "e+83" not in shown and "e+183" not in shown and "fitted 9.7e-12" in shown


def test_single_size_and_degenerate_studies_are_not_identified(tmp_path):
    """Bugs: a one-size study printed a "law" (its frontier is one model's curve); a study whose
    loss does not depend on N or D printed exponents at the bounds of their search."""
    for steps in BUDGET_STEPS:
        make_run(tmp_path / "one_size", f"d96_s{steps}", 96, steps)
    results = build_report(tmp_path / "one_size", tmp_path / "r1", StudySettings(n_bootstrap=50, window=1))
    assert not results.fits["frontier"]["identified"] and "1 model size" in results.fits["frontier"]["reason"]
    assert not results.fits["chinchilla"]["identified"]
    assert "at least two model sizes" in results.fits["chinchilla"]["reason"]
    assert results.warnings[0].startswith(("frontier: not identified", "chinchilla: not identified"))

    def flat(n, images, step, steps):  # nothing to learn from N or D
        return 0.5

    for dim in DIMS:
        for steps in BUDGET_STEPS:
            make_run(tmp_path / "flat", f"d{dim}_s{steps}", dim, steps, loss=flat, noise=0.01)
    results = build_report(tmp_path / "flat", tmp_path / "r2", StudySettings(n_bootstrap=100, window=1))
    chinchilla = results.fits["chinchilla"]
    assert not chinchilla["identified"] and (
        "bound" in chinchilla["reason"] or "factor" in chinchilla["reason"]
    )
    shown = (tmp_path / "r2" / "report.md").read_text()
    assert "not identified (" in shown and "np.float64" not in shown


def test_mid_schedule_points_stay_out_of_the_n_d_fits(tmp_path):
    """Bug: --budgets put mid-run points of cosine runs into the Chinchilla fit. A decaying schedule
    ends lower than its mid-run points: here a run at fraction f of its length sits 15% (1 - f)
    above the law, so mid-run points bias beta; only each run's end may enter."""

    def cosine_like(n, images, step, steps):
        return law(n, images) * (1 + 0.15 * (1 - step / steps))

    for dim in (24, 48, 96, 192):
        for steps in (100, 200, 400, 800):
            make_run(tmp_path / "cosine", f"d{dim}_s{steps}", dim, steps, loss=cosine_like)
    per_image = make_run(tmp_path / "probe", "p", 96, 100)[1]
    budgets = [150 * 128 * per_image, 300 * 128 * per_image]
    results = build_report(
        tmp_path / "cosine", tmp_path / "r", StudySettings(n_bootstrap=50, window=1, budgets=budgets)
    )
    chinchilla = results.fits["chinchilla"]
    assert chinchilla["points"] == 16  # the runs' ends, not the budget rows
    assert abs(chinchilla["params"]["beta"]["value"] - TRUE["beta"]) < 0.02
    assert any("--budgets rows are mid-run points" in w for w in results.warnings)
    table = pd.read_parquet(tmp_path / "r" / "table.parquet")
    assert (table["eval_point"] != "final").sum() > 0  # still in the table


def test_fits_json_holds_numbers_and_round_trips(sweep, tmp_path):
    root, _ = sweep
    results = build_report(root, tmp_path, StudySettings(n_bootstrap=40, window=1))
    raw = json.loads((tmp_path / "fits.json").read_text())
    alpha = raw["fits"]["chinchilla"]["params"]["alpha"]
    assert (
        isinstance(alpha["value"], float)
        and isinstance(alpha["low"], float)
        and alpha["identified"] in (True, False)
    )
    back = read_fits(tmp_path / "fits.json")
    assert back["fits"]["chinchilla"]["params"] == results.fit("chinchilla").params
    html = (tmp_path / "report.html").read_text()
    assert html.index("<h2>Warnings") < html.index("<h2>Figures") < html.index("<h2>Fits")


def test_the_frontier_fit_starts_past_the_initial_plateau(tmp_path):
    """Bug: the frontier fit ran through the plateau before learning starts (1 + loss near 1) and
    read about 1.5 where the data is 1.0. By default it starts where the frontier has covered 10%
    of its drop; --frontier-from sets the start."""

    top = law(3e4, 10 * 128)  # above every later point: nothing improves on it before step 40

    def plateau_then_law(n, images, step, steps):
        return top if step <= 40 else law(n, images)

    for dim in DIMS:
        for steps in (200, 400):
            make_run(tmp_path / "study", f"d{dim}_s{steps}", dim, steps, loss=plateau_then_law)
    results = build_report(tmp_path / "study", tmp_path / "r", StudySettings(n_bootstrap=30, window=1))
    frontier = results.fits["frontier"]
    curves = collect_curves(tmp_path / "study", window=1)
    plateau_end = curves[curves["step"] == 40]["flops"].min()
    assert frontier["starts at FLOPs"] > plateau_end
    fit = results.fit("frontier")
    last = curves.sort_values("flops").iloc[-1]
    assert abs(fit.predict(last["flops"]) / last["cosine_distance"] - 1) < 0.1
    chosen = build_report(
        tmp_path / "study", tmp_path / "r2", StudySettings(n_bootstrap=0, window=1, frontier_from=3e12)
    )
    assert chosen.fits["frontier"]["starts at FLOPs"] == 3e12


def test_width_effect_is_measured_against_the_seed_spread():
    from nepa_scale.scaling.fits import seed_spread, width_effect

    rng = np.random.default_rng(0)
    n = np.repeat([1e4, 1e5], 12)
    d = np.tile(np.repeat([1e4, 1e5], 6), 2)
    seeds = np.tile(np.arange(6), 4)
    noise = rng.normal(0, 0.05, size=24)
    noise -= np.array([noise[i : i + 6].mean() for i in range(0, 24, 6)]).repeat(6)  # cell means exact
    for shift, expected in ((0.2, True), (0.0, False)):
        q = np.exp(np.where(n == 1e4, shift, 0.0) - 0.1 * np.log10(d) + noise)
        spread = seed_spread(n, d, q, seeds)
        effect = width_effect(n, d, q, spread)
        assert effect.log_ratio == pytest.approx(shift, abs=1e-9) and effect.budgets == 2
        assert effect.standard_error == pytest.approx(spread.std_log * np.sqrt(2 / 6) / np.sqrt(2))
        assert (effect.z >= 2) is expected
        assert ("does not stand above" not in str(effect)) is expected


DOWNSTREAM = {"E": 0.02, "A": 25.0, "B": 14.0, "alpha": 0.5, "beta": 0.45}


def test_a_synthetic_study_with_a_known_downstream_law_is_recovered(tmp_path):
    """Four sizes x four budgets x three seeds whose linear-probe error follows a known law (2%
    log-normal noise per evaluation) and whose NEPA loss follows another: the report fits the probe
    error by default (no loss warning), and its intervals hold the true exponents."""

    def error(n, images, step, steps):
        return law(n, images, DOWNSTREAM)

    for dim in (24, 48, 96, 192):
        for steps in (100, 200, 400, 800):
            for seed in range(3):
                make_run(
                    tmp_path / "study",
                    f"d{dim}_s{steps}_{seed}",
                    dim,
                    steps,
                    noise=0.02,
                    seed=seed,
                    probe=error,
                )
    report = build_report(tmp_path / "study", tmp_path / "r", StudySettings(n_bootstrap=200, window=1))
    assert report.quantity == "probe_linear_error"
    assert not any("NEPA loss" in w for w in report.warnings)
    chinchilla = report.fit("chinchilla")
    for key in ("alpha", "beta"):
        assert chinchilla.params[key].identified and chinchilla.params[key].contains(DOWNSTREAM[key]), (
            key,
            str(chinchilla.params[key]),
        )
    assert (
        "linear-probe error" in report.summary[0]
        and "linear-probe error" in report.conventions["fitted quantity"]
    )
    check = report.fits["prediction check"]
    assert check["observed inside the 95% interval"] >= 0.5 and check["mean |log error|"] < 0.1
    table = pd.DataFrame(report.fits["quantities"]["table"]).set_index("quantity")
    assert table.loc["probe_linear_error", "kind"] == "fitted"
    assert table.loc["probe_linear_error", "seed std of log"] == pytest.approx(0.02, abs=0.01)
    assert (
        table.loc["probe_linear_error", "improves with N"] == 1.0
        and table.loc["probe_linear_error", "flag"] == ""
    )
    assert report.fits["diagnostics"]["Spearman with probe_linear_error"]["rankme_features"] < -0.9
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.index("What this study shows") < html.index("<h2>Warnings") and "prediction_check" in html


def test_quantity_auto_falls_back_to_the_loss_with_a_warning(sweep, tmp_path):
    from nepa_scale.scaling.quantities import resolve_quantity

    root, _ = sweep
    report = build_report(root, tmp_path, StudySettings(n_bootstrap=20, window=1))
    assert report.quantity == "val_cosine_distance"
    assert any("each model's own embeddings" in w for w in report.warnings)
    final = pd.DataFrame(
        {"probe_linear_error": [0.1, 0.2], "probe_knn_error": [0.2, 0.3], "val_cosine_distance": [1, 1]}
    )
    assert resolve_quantity(final, "auto") == ("probe_linear_error", [])
    partial = final.assign(probe_linear_error=[0.1, None])  # not every run probed: the next candidate
    assert resolve_quantity(partial, "auto") == ("probe_knn_error", [])
    column, warnings = resolve_quantity(final[["val_cosine_distance"]], "auto")
    assert (
        column == "val_cosine_distance"
        and "not comparable" not in warnings[0]
        and "two different tasks" in warnings[0]
    )


def blas_threads(_task) -> int:
    """In a bootstrap worker: the most threads any loaded BLAS (numpy's, scipy's own) may use."""
    import scipy.optimize  # noqa: F401  (what a fit's worker loads: scipy brings its own OpenBLAS)
    from threadpoolctl import threadpool_info

    return max((lib["num_threads"] for lib in threadpool_info()), default=1)


def test_bootstrap_workers_each_use_one_blas_thread():
    """Two processes on two cores with a BLAS thread each, never BLAS threads on top of them: the
    limit once missed scipy's OpenBLAS (loaded after the pool's initializer) and the demo's
    Chinchilla bootstrap took five times as long."""
    from nepa_scale.scaling.estimates import _parallel_map

    assert _parallel_map(blas_threads, [None, None]) == [1, 1]
