"""Algorithm 1 (CPI-RR / CPI-CARO) and Algorithm 3 (the rejection-sampling credit sampler)."""

import numpy as np
import pytest
from scipy import stats

from srpo_core.theory.cpi import (
    RESET_SAMPLERS,
    cpi_iteration,
    empirical_greedy,
    fit_tabular_q,
    step_caro,
    step_rr,
)
from srpo_core.theory.exact import exact_quantities, expected_return
from srpo_core.theory.experiment import THEOREM_IMPROVEMENT
from srpo_core.theory.mdp import random_mdp, random_policy, rare_branch_chain


def random_problem(seed: int, tau_quantile: float = 0.6):
    """A random MDP and stochastic policy whose G_{h,tau} holds several, but not all, (h, x)."""
    rng = np.random.default_rng(seed)
    mdp = random_mdp(n_states=5, n_actions=3, horizon=3, rng=rng, reward_noise=0.5)
    pi = random_policy(3, 5, 3, rng)
    A = exact_quantities(mdp, pi, tau=0.0).A
    tau = float(np.quantile(A.max(-1), tau_quantile))
    ex = exact_quantities(mdp, pi, tau)
    assert 1 < ex.G.sum() < ex.G.size
    return mdp, pi, ex


def test_caro_changes_policy_only_on_improvable_set():
    mdp, pi, ex = random_problem(0)
    out = cpi_iteration(mdp, pi, ex.G, n=400, variant="caro", rng=np.random.default_rng(1), trials=16)
    assert (out.alpha > 0).any()
    changed = np.abs(out.pi_new - pi).max(-1) > 0  # (T, H, S)
    assert not changed[:, ~ex.G].any()
    assert changed[:, ex.G].any()
    np.testing.assert_allclose(out.pi_new.sum(-1), 1.0)
    # the contrast: RR moves pi off G as well
    rr = cpi_iteration(mdp, pi, ex.G, n=400, variant="rr", rng=np.random.default_rng(1), trials=16)
    assert (np.abs(rr.pi_new - pi).max(-1) > 0)[:, ~ex.G].any()


def conditioned_visitation(ex):
    """P(h, x | x in G_h) for h ~ Unif[H], x ~ d^h, flattened over the G cells."""
    joint = ex.d * ex.G / ex.d.shape[0]
    return joint[ex.G] / joint.sum()


def test_rejection_sampler_matches_visitation_conditioned_on_G():
    mdp, pi, ex = random_problem(2)
    n = 20_000
    draws = RESET_SAMPLERS["caro"](mdp, pi, ex.G, n, 1, np.random.default_rng(3))
    assert ex.G[draws.h, draws.x].all()
    counts = np.zeros(ex.G.shape)
    np.add.at(counts, (draws.h[0], draws.x[0]), 1)
    expected = conditioned_visitation(ex)
    assert stats.chisquare(counts[ex.G], n * expected).pvalue > 1e-3
    # n acceptances at rate p_pi take a negative-binomial number of oracle queries
    q = draws.oracle_queries[0]
    assert abs(q - n / ex.p) < 5 * np.sqrt(n * (1 - ex.p)) / ex.p
    assert draws.resets[0] == q


def test_goodness_of_fit_rejects_per_step_conditioning():
    # Power check: a plausible bug, h ~ Unif[H] then x ~ d^h conditioned on G_h (instead of conditioning
    # the pair (h, x) jointly, which weights h by p_{pi,h}), must fail the same test on the same draws.
    mdp, pi, ex = random_problem(2)
    assert np.ptp(ex.p_h) > 0.05
    n = 20_000
    draws = RESET_SAMPLERS["caro"](mdp, pi, ex.G, n, 1, np.random.default_rng(3))
    counts = np.zeros(ex.G.shape)
    np.add.at(counts, (draws.h[0], draws.x[0]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_step = np.nan_to_num(ex.d * ex.G / ex.p_h[:, None])
    per_step = per_step[ex.G] / per_step[ex.G].sum()
    assert stats.chisquare(counts[ex.G], n * per_step).pvalue < 1e-6


def test_on_policy_sampler_matches_visitation():
    mdp, pi, ex = random_problem(4)
    n = 30_000
    draws = RESET_SAMPLERS["rr"](mdp, pi, ex.G, n, 1, np.random.default_rng(5))
    counts = np.zeros(ex.G.shape)
    np.add.at(counts, (draws.h[0], draws.x[0]), 1)
    expected = (ex.d / ex.d.shape[0]).ravel()
    keep = expected > 0
    assert stats.chisquare(counts.ravel()[keep], n * expected[keep]).pvalue > 1e-3


def test_least_squares_fit_and_greedy():
    h = np.array([[0, 0, 0, 1]])
    x = np.array([[1, 1, 1, 0]])
    y = np.array([[0, 0, 1, 1]])
    targets = np.array([[1.0, 3.0, 1.5, 4.0]])
    Qhat, counts = fit_tabular_q(h, x, y, targets, (2, 2, 2))
    assert Qhat[0, 0, 1, 0] == 2.0 and Qhat[0, 0, 1, 1] == 1.5 and Qhat[0, 1, 0, 1] == 4.0
    assert counts.sum() == 4 and np.isnan(Qhat[0, 0, 0, 0])
    pi = np.tile(np.array([0.2, 0.8]), (2, 2, 1))
    greedy = empirical_greedy(Qhat, counts, pi)
    assert greedy[0, 0, 1].argmax() == 0  # argmax of the cell means
    assert greedy[0, 1, 0].argmax() == 1  # only action seen
    assert greedy[0, 0, 0].argmax() == 1  # nothing seen: pi's most likely action


def test_step_sizes_lines_14_and_15():
    adv = np.array([-1.0, 0.0, 0.9, 100.0])
    np.testing.assert_allclose(step_rr(adv, horizon=3, r_max=1.0), [0.0, 0.0, 0.1, 1.0])
    np.testing.assert_allclose(step_caro(adv, horizon=3, r_max=1.0), [0.0, 0.0, 0.05, 1.0])


@pytest.mark.parametrize("variant", ["rr", "caro"])
def test_enough_samples_give_the_theorem_improvement(variant):
    p, tau, H = 0.2, 0.5, 3
    mdp, pi = rare_branch_chain(p, tau, H, n_actions=2, reward_noise=0.25)
    ex = exact_quantities(mdp, pi, tau)
    out = cpi_iteration(mdp, pi, ex.G, n=20_000, variant=variant, rng=np.random.default_rng(7), trials=8)
    gain = expected_return(mdp, out.pi_new) - ex.J
    assert (gain >= THEOREM_IMPROVEMENT[variant](p, tau, H, mdp.r_max)).all()
    target = {"rr": ex.adv_greedy, "caro": ex.adv_greedy_on_G}[variant]  # A_d(pi^+) of appendix 8.2
    assert abs(out.adv_hat.mean() - target) < 0.1 * target
    assert (out.oracle_queries > 0).all() == (variant == "caro")
