"""Exact MDP quantities against values worked out by hand, and the planted generator."""

import numpy as np
import pytest

from srpo_core.theory.exact import (
    advantages,
    coverage,
    exact_quantities,
    expected_return,
    greedy_policy,
    improvable_sets,
    policy_advantage,
    q_values,
    visitation,
)
from srpo_core.theory.mdp import BRANCH, GOOD_ACTION, MAIN, TabularMDP, q_rollouts, rare_branch_chain


def hand_mdp():
    """H = 2, two states, two actions, R_max = 2; state 1 is unreachable at h = 1.

    h=1, x=0: y=0 pays 1 and stays in 0; y=1 pays 0 and moves to 0 or 1 with probability 1/2.
    h=2: r(0, .) = (0, 1), r(1, .) = (1.5, 0.5).
    pi_1(.|0) = (1/2, 1/2), pi_1(.|1) = (1, 0), pi_2(.|0) = (1, 0), pi_2(.|1) = (1/2, 1/2).
    """
    P = np.zeros((2, 2, 2, 2))
    P[0, 0, 0] = [1.0, 0.0]
    P[0, 0, 1] = [0.5, 0.5]
    P[0, 1, :] = [0.0, 1.0]
    P[1, :, :] = [1.0, 0.0]
    r = np.zeros((2, 2, 2))
    r[0, 0] = [1.0, 0.0]
    r[1, 0] = [0.0, 1.0]
    r[1, 1] = [1.5, 0.5]
    pi = np.array([[[0.5, 0.5], [1.0, 0.0]], [[1.0, 0.0], [0.5, 0.5]]])
    return TabularMDP(P, r, np.array([1.0, 0.0]), r_max=2.0), pi


def test_hand_worked_values():
    mdp, pi = hand_mdp()
    Q, V = q_values(mdp, pi)
    # h=2: V = (0, 1); h=1: Q(0,.) = (1 + V_2(0), 0.5 V_2(0) + 0.5 V_2(1)) = (1, 0.5), Q(1,.) = (1, 1)
    np.testing.assert_allclose(V, [[0.75, 1.0], [0.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(Q, [[[1.0, 0.5], [1.0, 1.0]], [[0.0, 1.0], [1.5, 0.5]]])
    A = advantages(Q, V)
    np.testing.assert_allclose(A, [[[0.25, -0.25], [0.0, 0.0]], [[0.0, 1.0], [0.5, -0.5]]])
    assert expected_return(mdp, pi) == pytest.approx(0.75)
    d = visitation(mdp, pi)
    np.testing.assert_allclose(d, [[1.0, 0.0], [0.75, 0.25]])


def test_hand_worked_improvable_set_and_coverage():
    mdp, pi = hand_mdp()
    ex = exact_quantities(mdp, pi, tau=0.75)
    # max_y A: h=1 (0.25, 0), h=2 (1, 0.5) -> only (h=2, x=0) reaches 0.75
    np.testing.assert_array_equal(ex.G, [[False, False], [True, False]])
    np.testing.assert_allclose(ex.p_h, [0.0, 0.75])
    assert ex.p == pytest.approx(0.375)
    # A(pi^+) = (1/2)(1 * 0.25 + 0.75 * 1 + 0.25 * 0.5); on G: 1; off G: (0.25 + 0.25 * 0.5) / 1.25
    assert ex.adv_greedy == pytest.approx(0.5625)
    assert ex.adv_greedy_on_G == pytest.approx(1.0)
    assert ex.adv_greedy_off_G == pytest.approx(0.3)
    # Lemma 2: A = p A^G + (1 - p) A^{G^c}
    assert ex.adv_greedy == pytest.approx(ex.p * ex.adv_greedy_on_G + (1 - ex.p) * ex.adv_greedy_off_G)
    assert exact_quantities(mdp, pi, tau=0.5).p == pytest.approx(0.5)  # adds (h=2, x=1): (0 + 1) / 2


def test_policy_advantage_is_performance_difference_for_one_step():
    # With H = 1 the performance difference is exact: J(pi') - J(pi) = H * A_{pi,mu}(pi').
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(3), size=(1, 3, 2))
    mdp = TabularMDP(P, rng.uniform(0, 1, (1, 3, 2)), np.array([0.2, 0.3, 0.5]), r_max=1.0)
    pi = rng.dirichlet(np.ones(2), size=(1, 3))
    Q, V = q_values(mdp, pi)
    plus = greedy_policy(advantages(Q, V))
    gain = expected_return(mdp, plus) - expected_return(mdp, pi)
    assert gain == pytest.approx(policy_advantage(visitation(mdp, pi), advantages(Q, V), plus))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3])
def test_rare_branch_chain_plants_coverage(p):
    mdp, pi = rare_branch_chain(p, tau=0.4, horizon=4, n_actions=3, eps=0.01)
    ex = exact_quantities(mdp, pi, tau=0.4)
    assert ex.G[:, BRANCH].all() and not ex.G[:, MAIN].any()
    assert ex.p == pytest.approx(p)
    np.testing.assert_allclose(ex.A[:, BRANCH, GOOD_ACTION], 0.4)
    np.testing.assert_allclose(ex.A[:, MAIN, GOOD_ACTION], 0.01)
    assert ex.adv_greedy == pytest.approx(p * 0.4 + (1 - p) * 0.01)
    assert coverage(ex.d, improvable_sets(ex.A, 0.4))[1] == pytest.approx(p)


def test_q_rollouts_are_unbiased():
    rng = np.random.default_rng(1)
    mdp, pi = rare_branch_chain(0.3, tau=0.5, horizon=3, n_actions=2, reward_noise=1.0)
    Q, _ = q_values(mdp, pi)
    m = 40_000
    for h in range(3):
        for x in range(2):
            for y in range(2):
                ret = q_rollouts(mdp, pi, np.full(m, x), np.full(m, y), np.full(m, h), rng)
                assert ret.min() >= 0 and ret.max() <= (3 - h) * mdp.r_max
                assert abs(ret.mean() - Q[h, x, y]) <= 5 * ret.std() / np.sqrt(m) + 1e-12
