"""Pass@k on explicit state graphs and its k -> infinity limit, the reachability indicator."""

import numpy as np
import pytest

from srpo_core.theory.passk import (
    BRUTE_FORCE_K,
    SUCCESS_SOLVERS,
    StateGraph,
    pass_at_k,
    random_edge_policy,
    random_graph,
    reachability,
    success_probability_iterate,
    success_probability_linear,
)


def hand_graph():
    """0 -> 0 (1/2), 0 -> 1 (1/4), rest fails; 1 succeeds; 2 -> 2 (1), a closed loop;
    3 -> 2 (1/2), 3 -> 0 (1/2); 4 -> 1 with probability 0; 5 has no edges."""
    src = np.array([0, 0, 2, 3, 3, 4])
    dst = np.array([0, 1, 2, 2, 0, 1])
    probs = np.array([0.5, 0.25, 1.0, 0.5, 0.5, 0.0])
    success = np.array([False, True, False, False, False, False])
    return StateGraph(6, src, dst, success), probs


@pytest.mark.parametrize("solver", sorted(SUCCESS_SOLVERS))
def test_hand_graph_success_probability(solver):
    graph, probs = hand_graph()
    p = SUCCESS_SOLVERS[solver](graph, probs)
    # p(0) = 0.25 / (1 - 0.5), p(3) = 0.5 * 0 + 0.5 * p(0)
    np.testing.assert_allclose(p, [0.5, 1.0, 0.0, 0.25, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(reachability(graph, probs), [True, True, False, True, False, False])
    np.testing.assert_allclose(pass_at_k(p, 3), [1 - 0.5**3, 1.0, 0.0, 1 - 0.75**3, 0.0, 0.0])


@pytest.mark.parametrize("seed", range(12))
def test_reachability_is_the_brute_force_limit_of_pass_at_k(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    graph = random_graph(n, int(rng.integers(n, 4 * n)), success_frac=0.08, rng=rng)
    probs = random_edge_policy(graph, rng, zero_frac=0.2)
    # The iteration uses no reachability, so the limit below is computed independently of the traversal.
    p = success_probability_iterate(graph, probs, max_iter=200_000)
    reach = reachability(graph, probs)
    limit = pass_at_k(p, BRUTE_FORCE_K)
    np.testing.assert_array_equal(limit, reach.astype(float))
    np.testing.assert_allclose(success_probability_linear(graph, probs), p, atol=1e-9)
    # Pass@k grows with k towards the limit, and is already there on success terminals
    ks = [1, 10, 1e3, 1e6, 1e12]
    curve = np.array([pass_at_k(p, k) for k in ks])
    assert (np.diff(curve, axis=0) >= -1e-15).all()
    assert (curve <= limit + 1e-15).all()
    assert (curve[:, graph.success] == 1.0).all()


def test_random_graphs_have_cycles_and_unreachable_nodes():
    # guard for the test above: the graphs it draws are not all DAGs or all-reachable
    rng = np.random.default_rng(0)
    graph = random_graph(40, 100, success_frac=0.08, rng=rng)
    probs = random_edge_policy(graph, rng, zero_frac=0.2)
    assert (graph.src == graph.dst).any() or np.intersect1d(graph.src * 40 + graph.dst, graph.dst * 40 + graph.src).size
    reach = reachability(graph, probs)
    assert 0 < reach.sum() < graph.n_nodes


def test_pass_at_k_limits():
    p = np.array([0.0, 1e-12, 0.3, 1.0])
    np.testing.assert_array_equal(pass_at_k(p, np.inf), [0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(pass_at_k(p, 1), p)
    assert pass_at_k(np.array([1e-12]), 1e6)[0] == pytest.approx(1e-6, rel=1e-5)


def test_counting_sort_order_is_a_stable_sort():
    from srpo_core.theory.passk import counting_sort_order

    rng = np.random.default_rng(0)
    for n_keys in (7, 70_000, 5 * 10**9):  # one, two and three 16-bit passes
        keys = rng.integers(0, n_keys, 5000)
        np.testing.assert_array_equal(counting_sort_order(keys, n_keys), np.argsort(keys, kind="stable"))


def test_reachability_through_a_long_chain():
    # one frontier level per node: 0 -> 1 -> ... -> n-1 (success); node n hangs off a zero-probability edge
    n = 300
    src = np.r_[np.arange(n - 1), n]
    dst = np.r_[np.arange(1, n), 0]
    probs = np.r_[np.ones(n - 1), 0.0]
    graph = StateGraph(n + 1, src, dst, np.arange(n + 1) == n - 1)
    np.testing.assert_array_equal(reachability(graph, probs), np.arange(n + 1) < n)
