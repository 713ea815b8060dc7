"""Algorithm 1 (CPI-RR / CPI-CARO) and Algorithm 3 (the rejection-sampling credit sampler).

One iteration from policy pi with n samples (paper section 3.1; line numbers are Algorithm 1's):

    lines 3-8   (x_i, h_i) ~ Sampler,  y_i ~ Unif(Y),  Qhat_i = QRollout(pi, x_i, y_i, h_i)
    line 10     Qhat = argmin_{f in F} sum_i (f(x_i, y_i, h_i) - Qhat_i)^2    (F tabular: cell means)
    line 11     pihat^+_h(x) = argmax_y Qhat(x, y, h)
    line 12     Ahat = (1/n) sum_i |Y| (pihat^+_{h_i}(y_i | x_i) - pi_{h_i}(y_i | x_i)) Qhat(x_i, y_i, h_i)
    line 14/15  alpha = min{1, Ahat / (c H^2 R_max)}
    line 16/17  pi_alpha = (1 - alpha) pi + alpha pihat^+ on the update set, pi elsewhere

The variants differ in exactly two steps:

    CPI-RR    line 4:  h ~ Unif[H], x ~ d_pi^h (one on-policy reset);  c = 1;  update on all states.
    CPI-CARO  line 5:  the same draw conditioned on x in G_{h,tau}, by Algorithm 3: draw on-policy
                       and keep the draw iff the membership oracle O(x, h) = 1{x in G_{h,tau}} says
                       so; c = 2 (Corollary 5);  update only on G_{h,tau} (pi unchanged off G).

CARO pays about n / p_pi cheap (reset + oracle query) trials for n accepted draws; both variants
run exactly n Q-rollouts. The counts are returned separately.

Choices the paper leaves open, made here:
- Tabular least squares leaves unvisited cells free. The greedy step takes the argmax over the
  actions seen at (x, h) and keeps pi's most likely action where no action was seen.
- A non-positive Ahat gives no valid mixture coefficient (appendix 8.3, after Proposition 10), so
  alpha is clipped at 0: the iteration then leaves pi unchanged.

Everything carries a leading trial axis T so that many independent runs go through numpy at once;
trial t uses only its own samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from srpo_core.theory.mdp import TabularMDP, q_rollouts, reset_states

MAX_DRAWS_PER_BATCH = 2_000_000  # memory cap on one batch of rejection-sampling candidates


@dataclass(frozen=True, eq=False)
class ResetDraws:
    x: np.ndarray  # (T, n) states
    h: np.ndarray  # (T, n) times, 0-based
    resets: np.ndarray  # (T,) trajectory prefixes simulated (one per candidate draw)
    oracle_queries: np.ndarray  # (T,) calls to O(x, h)


@dataclass(frozen=True, eq=False)
class CpiOutcome:
    pi_new: np.ndarray  # (T, H, S, A)
    greedy: np.ndarray  # (T, H, S, A) one-hot pihat^+
    alpha: np.ndarray  # (T,)
    adv_hat: np.ndarray  # (T,)  Ahat of line 12
    q_rollouts: np.ndarray  # (T,)  = n
    resets: np.ndarray  # (T,)
    oracle_queries: np.ndarray  # (T,)


# --- line 4 / line 5: reset samplers ----------------------------------------------------------


def on_policy_sampler(
    mdp: TabularMDP, pi: np.ndarray, G: np.ndarray, n: int, trials: int, rng: np.random.Generator
) -> ResetDraws:
    """Line 4: h ~ Unif[H], x ~ d_pi^h; no oracle use (G is ignored)."""
    h = rng.integers(0, mdp.horizon, size=(trials, n))
    x = reset_states(mdp, pi, h.ravel(), rng).reshape(trials, n)
    return ResetDraws(x, h, np.full(trials, n), np.zeros(trials, dtype=int))


def credit_sampler(
    mdp: TabularMDP,
    pi: np.ndarray,
    G: np.ndarray,
    n: int,
    trials: int,
    rng: np.random.Generator,
    max_queries: int = 10**9,
) -> ResetDraws:
    """Line 5 by Algorithm 3: draw (x, h) on-policy (line 4 of Alg. 3), keep it iff O(x, h) = 1 (line 5),
    until n draws are kept (line 3). Every candidate costs one reset and one oracle query.

    Candidates are drawn in batches; each trial is charged exactly the candidates up to its n-th
    acceptance, as the sequential loop would be.
    """
    x_out = np.zeros((trials, n), dtype=int)
    h_out = np.zeros((trials, n), dtype=int)
    filled = np.zeros(trials, dtype=int)
    queries = np.zeros(trials, dtype=int)
    seen, kept = 0, 0  # running acceptance-rate estimate, only used to size batches
    while (need_all := n - filled).any():
        active = np.nonzero(need_all > 0)[0]
        need = need_all[active]
        if queries[active].max() > max_queries:
            raise RuntimeError("credit sampler: too many rejections (is p_pi ~ 0?)")
        rate = (kept + 1) / (seen + 1)
        m = int(min(np.ceil(1.2 * need.max() / rate) + 16, max(MAX_DRAWS_PER_BATCH // active.size, 1)))
        h = rng.integers(0, mdp.horizon, size=(active.size, m))
        x = reset_states(mdp, pi, h.ravel(), rng).reshape(active.size, m)
        ok = G[h, x]  # (a, m) the oracle O(x, h)
        seen, kept = seen + ok.size, kept + int(ok.sum())
        cum = np.cumsum(ok, axis=1)  # (a, m)
        enough = cum[:, -1] >= need
        stop = np.where(enough, np.argmax(cum >= need[:, None], axis=1) + 1, m)  # candidates charged
        queries[active] += stop
        take = ok & (np.arange(m) < stop[:, None])
        rows, cols = np.nonzero(take)
        slot = filled[active[rows]] + cum[rows, cols] - 1
        x_out[active[rows], slot] = x[rows, cols]
        h_out[active[rows], slot] = h[rows, cols]
        filled[active] += take.sum(1)
    return ResetDraws(x_out, h_out, queries.copy(), queries)


Sampler = Callable[[TabularMDP, np.ndarray, np.ndarray, int, int, np.random.Generator], ResetDraws]
RESET_SAMPLERS: dict[str, Sampler] = {"rr": on_policy_sampler, "caro": credit_sampler}


# --- lines 10-12: fit, greedy, advantage estimate ----------------------------------------------


def fit_tabular_q(
    h: np.ndarray, x: np.ndarray, y: np.ndarray, targets: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Line 10 for the tabular class: the least-squares fit is the mean target of each cell.

    h, x, y, targets (T, n); shape = (H, S, A). Returns Qhat (T, H, S, A), NaN where a cell has no
    sample, and the cell counts (T, H, S, A).
    """
    T = h.shape[0]
    full = (T,) + tuple(shape)
    trial = np.broadcast_to(np.arange(T)[:, None], h.shape)
    cell = np.ravel_multi_index((trial, h, x, y), full).ravel()
    size = int(np.prod(full))
    counts = np.bincount(cell, minlength=size).reshape(full)
    sums = np.bincount(cell, weights=targets.ravel(), minlength=size).reshape(full)
    with np.errstate(invalid="ignore", divide="ignore"):
        Qhat = np.where(counts > 0, sums / counts, np.nan)
    return Qhat, counts


def empirical_greedy(Qhat: np.ndarray, counts: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Line 11: argmax_y Qhat over the actions seen at (x, h); pi's mode where none was seen.

    Qhat, counts (T, H, S, A); pi (H, S, A) -> one-hot (T, H, S, A).
    """
    seen = counts > 0
    best = np.where(seen, Qhat, -np.inf).argmax(-1)  # (T, H, S)
    choice = np.where(seen.any(-1), best, pi.argmax(-1))
    return np.eye(Qhat.shape[-1])[choice]


def advantage_estimate(
    greedy: np.ndarray, pi: np.ndarray, Qhat: np.ndarray, h: np.ndarray, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Line 12: (1/n) sum_i |Y| (pihat^+ - pi)(y_i | x_i, h_i) Qhat(x_i, y_i, h_i); -> (T,)."""
    trial = np.arange(h.shape[0])[:, None]
    diff = greedy[trial, h, x, y] - pi[h, x, y]  # (T, n)
    return pi.shape[-1] * (diff * Qhat[trial, h, x, y]).mean(-1)


# --- lines 14-17: step size and conservative update ---------------------------------------------


def step_rr(adv_hat: np.ndarray, horizon: int, r_max: float) -> np.ndarray:
    """Line 14 (Kakade & Langford): alpha = min{1, Ahat / (H^2 R_max)}, clipped at 0."""
    return np.clip(adv_hat / (horizon**2 * r_max), 0.0, 1.0)


def step_caro(adv_hat: np.ndarray, horizon: int, r_max: float) -> np.ndarray:
    """Line 15 (Corollary 5): alpha = min{1, Ahat / (2 H^2 R_max)}, clipped at 0."""
    return np.clip(adv_hat / (2 * horizon**2 * r_max), 0.0, 1.0)


STEP_SIZES: dict[str, Callable[[np.ndarray, int, float], np.ndarray]] = {"rr": step_rr, "caro": step_caro}


def update_everywhere(G: np.ndarray) -> np.ndarray:
    """Line 16: the mixture applies on all states."""
    return np.ones_like(G, dtype=bool)


def update_on_improvable(G: np.ndarray) -> np.ndarray:
    """Line 17: the mixture applies on G_{h,tau} only."""
    return G.astype(bool)


UPDATE_SETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"rr": update_everywhere, "caro": update_on_improvable}


def conservative_update(pi: np.ndarray, greedy: np.ndarray, alpha: np.ndarray, where: np.ndarray) -> np.ndarray:
    """pi_alpha = (1 - alpha) pi + alpha pihat^+ on `where`, pi elsewhere.

    pi (H, S, A), greedy (T, H, S, A), alpha (T,), where (H, S) bool -> (T, H, S, A).
    """
    a = alpha[:, None, None, None]
    mixed = (1.0 - a) * pi + a * greedy
    return np.where(where[..., None], mixed, pi)


# --- one iteration ------------------------------------------------------------------------------


def cpi_iteration(
    mdp: TabularMDP,
    pi: np.ndarray,
    G: np.ndarray,
    n: int,
    variant: str,
    rng: np.random.Generator,
    trials: int = 1,
) -> CpiOutcome:
    """`trials` independent runs of Algorithm 1 from pi (H, S, A) with n samples each.

    G (H, S) bool is the membership oracle's answer table; only CARO reads it.
    """
    draws = RESET_SAMPLERS[variant](mdp, pi, G, n, trials, rng)  # lines 4/5
    h, x = draws.h, draws.x
    y = rng.integers(0, mdp.n_actions, size=h.shape)  # line 6
    targets = q_rollouts(mdp, pi, x.ravel(), y.ravel(), h.ravel(), rng).reshape(h.shape)  # line 7
    Qhat, counts = fit_tabular_q(h, x, y, targets, pi.shape)  # line 10
    greedy = empirical_greedy(Qhat, counts, pi)  # line 11
    adv_hat = advantage_estimate(greedy, pi, Qhat, h, x, y)  # line 12
    alpha = STEP_SIZES[variant](adv_hat, mdp.horizon, mdp.r_max)  # lines 14/15
    pi_new = conservative_update(pi, greedy, alpha, UPDATE_SETS[variant](G))  # lines 16/17
    return CpiOutcome(
        pi_new=pi_new,
        greedy=greedy,
        alpha=alpha,
        adv_hat=adv_hat,
        q_rollouts=np.full(trials, n),
        resets=draws.resets,
        oracle_queries=draws.oracle_queries,
    )
