"""Pass@k on an explicit state graph, and its k -> infinity limit: reachability.

A graph has nodes V, directed edges E and absorbing success terminals. A policy puts probability
pi(e) on each out-edge of a non-terminal node; a node's out-probabilities sum to at most one and
the rest of the mass ends the episode in failure (so a node without edges fails). The success
probability p(s) is the least non-negative solution of

    p(s) = 1 on success terminals,    p(s) = sum_{e = (s -> t)} pi(e) p(t) elsewhere,

Pass@k(s) = 1 - (1 - p(s))^k (k independent attempts from s), and as k -> infinity

    Pass@k(s) -> 1{p(s) > 0} = 1{some success terminal is reachable from s by edges with pi(e) > 0},

which one reverse traversal from the terminals computes in O(|V| + |E|) (single-rollout Pass@k
critic summary; `reachability` is a breadth-first search over a counting-sorted reverse
adjacency). Solvers for p (`SUCCESS_SOLVERS`), both exact on graphs with cycles:

- "linear": p = 0 off the set R of non-terminal nodes that can reach success, and
  (I - P_RR) p_R = b_R on R, where b is the one-step success mass. I - P_RR is non-singular because
  from every node of R the chain leaves R or succeeds with positive probability. Dense, O(|R|^3).
- "iterate": the monotone fixed-point iteration p <- 1{success} + P p from p = 1{success}. It needs
  no reachability, converges to the least solution, and is slow when a loop has probability ~1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)
class StateGraph:
    n_nodes: int
    src: np.ndarray  # (E,) int
    dst: np.ndarray  # (E,) int
    success: np.ndarray  # (V,) bool, absorbing success terminals

    def __post_init__(self) -> None:
        src, dst = np.asarray(self.src, dtype=np.int64), np.asarray(self.dst, dtype=np.int64)
        success = np.asarray(self.success, dtype=bool)
        if src.shape != dst.shape or success.shape != (self.n_nodes,):
            raise ValueError("src/dst must have one entry per edge and success one per node")
        if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= self.n_nodes):
            raise ValueError("edge endpoint out of range")
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", dst)
        object.__setattr__(self, "success", success)


def check_policy(graph: StateGraph, probs: np.ndarray) -> None:
    """Edge probabilities (E,) must be >= 0 and sum to <= 1 out of every node."""
    if probs.shape != graph.src.shape or (probs < 0).any():
        raise ValueError("need one non-negative probability per edge")
    if (np.bincount(graph.src, weights=probs, minlength=graph.n_nodes) > 1 + 1e-9).any():
        raise ValueError("out-probabilities of a node sum to more than one")


def live_edges(graph: StateGraph, probs: np.ndarray) -> np.ndarray:
    """Edges the policy can take: positive probability, out of a non-terminal node; (E,) bool."""
    return (probs > 0) & ~graph.success[graph.src]


def counting_sort_order(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """Stable order of integer keys in [0, n_keys): (E,) -> (E,) in O(E + n_keys) per pass.

    LSD radix sort on 16-bit digits; NumPy's stable sort of 16-bit integers is itself a radix
    sort, so each pass is linear. One pass for n_keys <= 2^16, two up to 2^32.
    """
    order = np.arange(keys.size)
    shift = 0
    while True:
        digit = ((keys[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
        if n_keys <= 1 << shift:
            return order


def reachability(graph: StateGraph, probs: np.ndarray) -> np.ndarray:
    """1{success is reachable from s} (V,) bool, by one reverse traversal: O(|V| + |E|).

    Reverse adjacency (CSR of predecessors over live edges) by counting sort, then a
    breadth-first search from all success terminals. Every node joins the frontier at most once
    and its predecessor list is scanned once, so the work is linear; each level costs a constant
    number of numpy calls on top.
    """
    keep = live_edges(graph, probs)
    src, dst = graph.src[keep], graph.dst[keep]
    V = graph.n_nodes
    indegree = np.bincount(dst, minlength=V)  # (V,)
    start = np.cumsum(indegree) - indegree  # (V,) predecessors of v: preds[start[v] : start[v] + indegree[v]]
    preds = src[counting_sort_order(dst, V)]  # (E_live,)
    seen = graph.success.copy()
    frontier = np.nonzero(seen)[0]
    slot = np.empty(V, dtype=np.int64)
    while frontier.size:
        lens = indegree[frontier]
        total = int(lens.sum())
        if total == 0:
            break
        gather = np.repeat(start[frontier] - (np.cumsum(lens) - lens), lens) + np.arange(total)
        cand = preds[gather]
        cand = cand[~seen[cand]]
        slot[cand] = np.arange(cand.size)  # keep one copy of each newly reached node
        frontier = cand[slot[cand] == np.arange(cand.size)]
        seen[frontier] = True
    return seen


def success_probability_linear(graph: StateGraph, probs: np.ndarray) -> np.ndarray:
    """Exact p (V,) by one linear solve on the nodes that can reach success (see module doc)."""
    reach = reachability(graph, probs)
    R = np.nonzero(reach & ~graph.success)[0]
    p = graph.success.astype(float)
    if R.size == 0:
        return p
    index = np.full(graph.n_nodes, -1)
    index[R] = np.arange(R.size)
    keep = live_edges(graph, probs) & reach[graph.src]
    s, t, w = index[graph.src[keep]], graph.dst[keep], probs[keep]
    into_R = index[t] >= 0
    M = np.zeros((R.size, R.size))  # P restricted to R
    np.add.at(M, (s[into_R], index[t[into_R]]), w[into_R])
    b = np.bincount(s, weights=w * graph.success[t], minlength=R.size)  # one-step success mass
    p[R] = np.linalg.solve(np.eye(R.size) - M, b)
    return p


def success_probability_iterate(
    graph: StateGraph, probs: np.ndarray, tol: float = 1e-14, max_iter: int = 1_000_000
) -> np.ndarray:
    """p (V,) by the monotone iteration p <- 1{success} + P p, started at 1{success}.

    Stops when an iteration changes p by less than `tol` (after at least |V| iterations, so that
    every node with p > 0 has become positive) or after max_iter iterations.
    """
    keep = live_edges(graph, probs)
    src, dst, w = graph.src[keep], graph.dst[keep], probs[keep]
    p = graph.success.astype(float)
    for it in range(max_iter):
        new = np.where(graph.success, 1.0, np.bincount(src, weights=w * p[dst], minlength=graph.n_nodes))
        done = np.abs(new - p).max() < tol and it >= graph.n_nodes
        p = new
        if done:
            break
    return p


SUCCESS_SOLVERS: dict[str, Callable[[StateGraph, np.ndarray], np.ndarray]] = {
    "linear": success_probability_linear,
    "iterate": success_probability_iterate,
}


def pass_at_k(p: np.ndarray, k: float) -> np.ndarray:
    """1 - (1 - p)^k, stable for small p and huge k; k = inf gives 1{p > 0}. (...) -> (...)."""
    p = np.asarray(p, dtype=float)
    if np.isinf(k):
        return (p > 0).astype(float)
    with np.errstate(divide="ignore"):
        return -np.expm1(k * np.log1p(-p))


# --- random graphs ------------------------------------------------------------------------------


def random_graph(
    n_nodes: int, n_edges: int, success_frac: float, rng: np.random.Generator
) -> StateGraph:
    """Uniform random directed multigraph (cycles and self-loops included) with random terminals."""
    src = rng.integers(0, n_nodes, size=n_edges)
    dst = rng.integers(0, n_nodes, size=n_edges)
    success = rng.random(n_nodes) < success_frac
    return StateGraph(n_nodes, src, dst, success)


def random_edge_policy(
    graph: StateGraph, rng: np.random.Generator, zero_frac: float = 0.1, max_fail: float = 0.3
) -> np.ndarray:
    """Edge probabilities (E,): a `zero_frac` share of edges gets 0, the rest random weights scaled
    so that each node keeps a random failure mass in [0, max_fail)."""
    w = rng.random(graph.src.size) * (rng.random(graph.src.size) >= zero_frac)
    total = np.bincount(graph.src, weights=w, minlength=graph.n_nodes)
    keep_mass = 1.0 - max_fail * rng.random(graph.n_nodes)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(total > 0, keep_mass / total, 0.0)
    return w * scale[graph.src]


# --- experiment ---------------------------------------------------------------------------------


BRUTE_FORCE_K = 1e300  # (1 - p)^k underflows to 0 for any p > 1e-290 at this k


@dataclass(frozen=True)
class PassKExperiment:
    n_nodes: int = 2000
    n_edges: int = 5000
    success_frac: float = 0.01
    ks: tuple[float, ...] = tuple(float(4**i) for i in range(13))  # 1 .. 4^12
    seed: int = 0


FULL = PassKExperiment()
QUICK = PassKExperiment(n_nodes=300, n_edges=750)


def run_passk_experiment(exp: PassKExperiment) -> dict:
    """Pass@k on a random cyclic graph against the reachability limit; returns a summary dict."""
    rng = np.random.default_rng(exp.seed)
    graph = random_graph(exp.n_nodes, exp.n_edges, exp.success_frac, rng)
    probs = random_edge_policy(graph, rng)
    reach = reachability(graph, probs)
    p = success_probability_linear(graph, probs)
    p_iter = success_probability_iterate(graph, probs, max_iter=20_000)
    positive = p[reach]
    curve = []
    for k in exp.ks:
        pk = pass_at_k(p, k)
        curve.append({"k": k, "mean_pass_at_k": float(pk.mean()), "max_gap_to_limit": float(np.abs(pk - reach).max())})
    p_min = float(positive.min()) if positive.size else float("nan")
    return {
        "params": asdict(exp),
        "reachable_fraction": float(reach.mean()),
        # brute force, independent of the traversal: Pass@k at a huge k from the iterated p
        "limit_equals_reachability": bool(np.array_equal(pass_at_k(p_iter, BRUTE_FORCE_K), reach.astype(float))),
        "iterate_vs_linear_max_abs": float(np.abs(p - p_iter).max()),
        "min_positive_success_probability": p_min,
        # Pass@k >= 1 - 1e-3 on every reachable node needs k >= log(1e-3) / log(1 - p_min)
        "k_for_gap_1e-3": float(np.log(1e-3) / np.log1p(-p_min)) if positive.size else float("nan"),
        "curve": curve,
    }


def write_outputs(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "passk_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ks = [c["k"] for c in summary["curve"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(ks, [c["mean_pass_at_k"] for c in summary["curve"]], "o-", label="mean Pass@k over nodes")
    ax.plot(ks, [c["max_gap_to_limit"] for c in summary["curve"]], "s-", label="max |Pass@k - reachability|")
    ax.axhline(summary["reachable_fraction"], ls=":", color="k", label="reachable fraction (k -> inf)")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.legend(fontsize=8)
    ax.set_title("Pass@k tends to the reachability indicator", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "passk.png", dpi=120)
    plt.close(fig)
