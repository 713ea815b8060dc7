"""Theorem 1 measured: how CPI-RR and CPI-CARO scale with the coverage p_pi.

On `rare_branch_chain(p)` (where p_pi = p exactly and A^{G^c}(pi^+) ~ 0, the regime in which the
theorem is tight) and for each p in a sweep of at least a decade:

(ii) sample size: the n from which on (at every larger grid point measured) one iteration of
     Algorithm 1 improves J by at least the theorem's guarantee with empirical probability
     >= 1 - delta, log-interpolated between grid points. The guarantee is tau^2 p^2 / (8 H R_max)
     for RR and tau^2 p / (16 H R_max) for CARO (Theorem 1 a, b). Theorem: n ~ p^-2 (RR),
     n ~ p^0 (CARO); CARO's oracle queries ~ p^-1.
(i)  improvement: the mean exact J(pi_new) - J(pi) at one fixed n for both variants and every p.
     By default n is twice the largest sample size measured in (ii), so that every (variant, p) is
     in the sample-size regime the theorem assumes. Theorem: ~ p^2 (RR), ~ p^1 (CARO).

The main chain's advantage eps defaults to 0, so A^{G^c}(pi^+) = 0 (the RLVR case of Table 1's
caption); `eps_frac` > 0 gives Proposition 10's small positive eps instead. The reward noise eta
matters: with eta = 0 and eps = 0 the tabular Qhat is exact off G, the greedy step ties there and
keeps pi's action, so RR's advantage estimate carries no off-G noise and RR needs only about 1/p
samples. The 1/p^2 of Theorem 1 comes from the noise of the off-G terms of line 12.

Slopes are least-squares fits of log y on log p; their 95% intervals come from a bootstrap over the
independent trials (the experiment's Monte Carlo noise), the point estimate from all trials.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from srpo_core.theory.cpi import cpi_iteration
from srpo_core.theory.exact import exact_quantities, expected_return
from srpo_core.theory.mdp import rare_branch_chain

VARIANTS = ("rr", "caro")
SAMPLES_PER_CHUNK = 1_000_000  # trials are run in chunks of about this many samples in total
STOP_AFTER = 3  # the sample-size scan stops after this many consecutive grid points at 1 - delta

# Theorem 1: per-iteration guarantee (variant, p, tau, H, R_max) -> improvement lower bound.
THEOREM_IMPROVEMENT: dict[str, Callable[[float, float, int, float], float]] = {
    "rr": lambda p, tau, H, R: tau**2 * p**2 / (8 * H * R),
    "caro": lambda p, tau, H, R: tau**2 * p / (16 * H * R),
}
THEOREM_SLOPES = {
    "slope_samples_rr": -2.0,
    "slope_samples_caro": 0.0,
    "slope_improvement_rr": 2.0,
    "slope_improvement_caro": 1.0,
    "slope_oracle_queries_caro": -1.0,
}


@dataclass(frozen=True)
class CpiExperiment:
    p_values: tuple[float, ...]
    horizon: int = 3
    n_actions: int = 2
    tau: float = 0.5
    r_max: float = 1.0
    eps_frac: float = 0.0  # eps = eps_frac * tau * min(p), the main chain's advantage (see above)
    reward_noise: float = 0.25  # eta: noisy rewards make the Q-rollouts genuinely Monte Carlo
    delta: float = 0.1
    trials: int = 200  # runs per (variant, p, n) behind each success probability
    improvement_trials: int = 10
    grid_factor: float = 2**0.5
    n_min: int = 8
    n_max: int = 2**21
    n_improvement: int | None = None  # None: improvement_n_factor x the largest n* measured in (ii)
    improvement_n_factor: float = 2.0
    bootstrap: int = 1000
    seed: int = 0


FULL = CpiExperiment(p_values=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32))
QUICK = CpiExperiment(p_values=(0.04, 0.08, 0.16, 0.32), trials=100, improvement_trials=8, bootstrap=300)


# --- pure helpers --------------------------------------------------------------------------------


def crossing(ns: np.ndarray, rates: np.ndarray, level: float) -> np.ndarray:
    """The n from which on the rate stays at or above `level`: (G,) grid, (B, G) rates -> (B,).

    Log-linear interpolation between the last grid point below the level and the next one, so a
    lucky small n that reaches the level once does not count (the theorem's claim is "for all
    n >= N"). ns[0] if no grid point is below the level; NaN if the last one is.
    """
    below = rates < level
    out = np.full(rates.shape[0], float(ns[0]))
    for b in np.nonzero(below.any(axis=1))[0]:
        k = int(np.nonzero(below[b])[0][-1])
        if k == len(ns) - 1:
            out[b] = np.nan
            continue
        lo, hi = rates[b, k], rates[b, k + 1]
        frac = (level - lo) / (hi - lo)
        out[b] = math.exp(math.log(ns[k]) + frac * (math.log(ns[k + 1]) - math.log(ns[k])))
    return out


def loglog_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of log y on log x: x (P,), y (..., P) -> (...); NaN if y has a NaN."""
    lx = np.log(x) - np.log(x).mean()
    ly = np.log(y)
    return (ly - ly.mean(-1, keepdims=True)) @ lx / (lx @ lx)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.quantile(s, (1 - level) / 2)), float(np.quantile(s, (1 + level) / 2))]


def bootstrap_means(values: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `reps` resamples with replacement: (T,) -> (reps,)."""
    return values[rng.integers(0, values.size, size=(reps, values.size))].mean(1)


def sample_grid(n_min: int, n_max: int, factor: float) -> np.ndarray:
    """Distinct integers n_min * factor^k <= n_max."""
    k = np.arange(int(math.floor(math.log(n_max / n_min) / math.log(factor))) + 1)
    return np.unique(np.round(n_min * factor**k).astype(int))


# --- running Algorithm 1 -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Runs:
    gain: np.ndarray  # (T,) exact J(pi_new) - J(pi)
    alpha: np.ndarray  # (T,)
    oracle_queries: np.ndarray  # (T,)
    q_rollouts: np.ndarray  # (T,)


def run_trials(mdp, pi, G, J: float, n: int, variant: str, trials: int, rng: np.random.Generator) -> Runs:
    """`trials` independent iterations of Algorithm 1 from pi, in memory-bounded chunks."""
    chunk = max(1, SAMPLES_PER_CHUNK // n)
    parts = []
    for start in range(0, trials, chunk):
        out = cpi_iteration(mdp, pi, G, n, variant, rng, trials=min(chunk, trials - start))
        parts.append((expected_return(mdp, out.pi_new) - J, out.alpha, out.oracle_queries, out.q_rollouts))
    return Runs(*(np.concatenate(col) for col in zip(*parts)))


@dataclass(frozen=True, eq=False)
class Scan:
    ns: np.ndarray  # (G,) grid points evaluated
    success: np.ndarray  # (G, T) bool: gain >= theorem bound
    queries_per_sample: float  # mean oracle queries / n over the scan


def scan_sample_size(mdp, pi, G, J, variant, bound, exp: CpiExperiment, rng, bar) -> Scan:
    """Walk up the grid until `STOP_AFTER` consecutive grid points reach success rate 1 - delta."""
    level = 1.0 - exp.delta
    ns, rows, q, rollouts = [], [], 0.0, 0.0
    for n in sample_grid(exp.n_min, exp.n_max, exp.grid_factor):
        runs = run_trials(mdp, pi, G, J, int(n), variant, exp.trials, rng)
        ns.append(int(n))
        rows.append(runs.gain >= bound)
        q, rollouts = q + runs.oracle_queries.sum(), rollouts + runs.q_rollouts.sum()
        bar.set_postfix_str(f"{variant} n={n} rate={rows[-1].mean():.2f}")
        if len(rows) >= STOP_AFTER and all(r.mean() >= level for r in rows[-STOP_AFTER:]):
            break
    return Scan(np.array(ns), np.array(rows), float(q / rollouts))


# --- the experiment ------------------------------------------------------------------------------


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def run_cpi_experiment(exp: CpiExperiment, progress: bool = True) -> dict:
    """Runs (ii) then (i); returns the summary dict (see module docstring)."""
    p_values = np.array(exp.p_values, dtype=float)
    eps = exp.eps_frac * exp.tau * p_values.min()
    problems = []
    for p in p_values:
        mdp, pi = rare_branch_chain(p, exp.tau, exp.horizon, exp.n_actions, exp.r_max, eps, exp.reward_noise)
        problems.append((mdp, pi, exact_quantities(mdp, pi, exp.tau)))
    level = 1.0 - exp.delta
    bar = tqdm(total=2 * len(VARIANTS) * len(p_values), desc="theory cpi", disable=not progress)

    # (ii) sample size to improve by the theorem's guarantee with probability >= 1 - delta
    scans: dict[str, list[Scan]] = {v: [] for v in VARIANTS}
    for vi, variant in enumerate(VARIANTS):
        for k, (mdp, pi, ex) in enumerate(problems):
            bound = THEOREM_IMPROVEMENT[variant](ex.p, exp.tau, exp.horizon, exp.r_max)
            scans[variant].append(
                scan_sample_size(mdp, pi, ex.G, ex.J, variant, bound, exp, _rng(exp.seed, 2, vi, k), bar)
            )
            bar.update()
    n_star = {v: np.array([crossing(s.ns, s.success.mean(1)[None], level)[0] for s in scans[v]]) for v in VARIANTS}
    n_fixed = exp.n_improvement or int(
        math.ceil(exp.improvement_n_factor * np.nanmax(np.concatenate(list(n_star.values()))))
    )

    # (i) improvement at the fixed sample size
    gains: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS}
    alphas: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for vi, variant in enumerate(VARIANTS):
        for k, (mdp, pi, ex) in enumerate(problems):
            runs = run_trials(
                mdp, pi, ex.G, ex.J, n_fixed, variant, exp.improvement_trials, _rng(exp.seed, 1, vi, k)
            )
            gains[variant].append(runs.gain)
            alphas[variant].append(float(runs.alpha.mean()))
            bar.set_postfix_str(f"{variant} improvement p={ex.p:.3g}")
            bar.update()
    bar.close()

    # slopes and bootstrap intervals: series name -> (point estimate (P,), bootstrap replicates (B, P))
    boot = np.random.default_rng([exp.seed, 3])
    boot_n, boot_gain, series = {}, {}, {}
    for variant in VARIANTS:
        reps = []
        for s in scans[variant]:
            idx = boot.integers(0, s.success.shape[1], size=(exp.bootstrap,) + s.success.shape)
            rates = np.take_along_axis(s.success[None], idx, axis=2).mean(2)  # (B, G)
            reps.append(crossing(s.ns, rates, level))
        boot_n[variant] = np.stack(reps, axis=1)
        boot_gain[variant] = np.stack([bootstrap_means(g, exp.bootstrap, boot) for g in gains[variant]], axis=1)
        series[f"slope_samples_{variant}"] = (n_star[variant], boot_n[variant])
        series[f"slope_improvement_{variant}"] = (np.array([g.mean() for g in gains[variant]]), boot_gain[variant])
    q_ratio = np.array([s.queries_per_sample for s in scans["caro"]])  # oracle queries per accepted draw
    series["slope_oracle_queries_caro"] = (n_star["caro"] * q_ratio, boot_n["caro"] * q_ratio)

    summary: dict = {}
    for key, (point, reps) in series.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            point = np.where(point > 0, point, np.nan)
            summary[key] = float(loglog_slope(p_values, point))
            summary[key + "_ci"] = percentile_interval(loglog_slope(p_values, np.where(reps > 0, reps, np.nan)))
            local = np.diff(np.log(point)) / np.diff(np.log(p_values))  # consecutive-pair slopes
            summary.setdefault("local_slopes", {})[key] = local.tolist()
    summary["theorem"] = dict(THEOREM_SLOPES)
    summary["n_improvement"] = n_fixed

    rows = []
    for variant in VARIANTS:
        for k, (_, _, ex) in enumerate(problems):
            g = gains[variant][k]
            rows.append(
                {
                    "variant": variant,
                    "p_pi": ex.p,
                    "n_star": float(n_star[variant][k]),
                    "n_star_ci": percentile_interval(boot_n[variant][:, k]),
                    "q_rollouts_at_n_star": float(n_star[variant][k]),
                    "oracle_queries_at_n_star": float(n_star[variant][k] * (q_ratio[k] if variant == "caro" else 0.0)),
                    "improvement_mean": float(g.mean()),
                    "improvement_ci": percentile_interval(boot_gain[variant][:, k]),
                    "improvement_theorem_bound": THEOREM_IMPROVEMENT[variant](ex.p, exp.tau, exp.horizon, exp.r_max),
                    "alpha_mean": alphas[variant][k],
                    "adv_greedy_exact": ex.adv_greedy,
                    "adv_greedy_on_G_exact": ex.adv_greedy_on_G,
                    "adv_greedy_off_G_exact": ex.adv_greedy_off_G,
                }
            )
    summary["rows"] = rows
    summary["params"] = {**asdict(exp), "eps": eps}
    return summary


# --- outputs -------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    "variant",
    "p_pi",
    "n_star",
    "q_rollouts_at_n_star",
    "oracle_queries_at_n_star",
    "improvement_mean",
    "improvement_theorem_bound",
    "alpha_mean",
)


def write_table(rows: list[dict], out: Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TABLE_COLUMNS + ("n_star_ci_lo", "n_star_ci_hi", "improvement_ci_lo", "improvement_ci_hi"))
        for r in rows:
            w.writerow([r[c] for c in TABLE_COLUMNS] + r["n_star_ci"] + r["improvement_ci"])
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        cells = [r["variant"]] + [f"{r[c]:.4g}" for c in TABLE_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def slopes_markdown(summary: dict) -> str:
    lines = ["| quantity | measured slope | 95% CI | theorem |", "|---|---|---|---|"]
    for key, theory in THEOREM_SLOPES.items():
        lo, hi = summary[key + "_ci"]
        lines.append(f"| {key} | {summary[key]:.3f} | [{lo:.3f}, {hi:.3f}] | {theory:g} |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"rr": "tab:red", "caro": "tab:blue"}
    panels = (
        ("n_star", "samples (Q-rollouts) to improve w.p. >= 1 - delta", "slope_samples"),
        ("improvement_mean", f"J(pi_new) - J(pi) at n = {summary['n_improvement']}", "slope_improvement"),
    )
    for ax, (field, title, slope_key) in zip(axes, panels):
        for variant in VARIANTS:
            rows = [r for r in summary["rows"] if r["variant"] == variant]
            p = np.array([r["p_pi"] for r in rows])
            y = np.array([r[field] for r in rows])
            ci = "n_star_ci" if field == "n_star" else "improvement_ci"
            err = np.abs(np.array([r[ci] for r in rows]).T - y)
            key = f"{slope_key}_{variant}"
            ax.errorbar(p, y, yerr=err, fmt="o", color=colors[variant], capsize=3,
                        label=f"{variant.upper()}: slope {summary[key]:.2f} (theorem {THEOREM_SLOPES[key]:g})")
            ok = np.isfinite(y) & (y > 0)
            if ok.sum() >= 2:
                lp = np.log(p[ok])
                fit_c = np.log(y[ok]).mean() - summary[key] * lp.mean()
                thy_c = np.log(y[ok]).mean() - THEOREM_SLOPES[key] * lp.mean()
                ax.plot(p[ok], np.exp(fit_c + summary[key] * lp), "-", color=colors[variant], alpha=0.7)
                ax.plot(p[ok], np.exp(thy_c + THEOREM_SLOPES[key] * lp), ":", color=colors[variant], alpha=0.7)
            if field == "n_star" and variant == "caro":
                q = np.array([r["oracle_queries_at_n_star"] for r in rows])
                ax.plot(p, q, "s", mfc="none", color=colors[variant],
                        label=f"CARO oracle queries: slope {summary['slope_oracle_queries_caro']:.2f} (theorem -1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("p_pi (coverage of the tau-improvable set)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Theorem 1 on rare_branch_chain: fitted slopes (solid) vs theorem slopes (dotted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(summary: dict, out: Path, run_name: str) -> bool:
    """Logs params, slope metrics and the output folder when MLFLOW_TRACKING_URI is set."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # this URI, whatever an earlier caller in this process set
    mlflow.set_experiment("srpo-theory")
    with mlflow.start_run(run_name=run_name):
        mlflow.log_params({k: (list(v) if isinstance(v, tuple) else v) for k, v in summary["params"].items()})
        metrics = {}
        for key in THEOREM_SLOPES:
            metrics[key] = summary[key]
            metrics[key + "_ci_lo"], metrics[key + "_ci_hi"] = summary[key + "_ci"]
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        mlflow.log_artifacts(str(out))
    return True


def write_outputs(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_table(summary["rows"], out)
    (out / "slopes.md").write_text(slopes_markdown(summary))
    plot_summary(summary, out / "cpi_scaling.png")
