"""How the Pass@k reachability limit scales: time of `reachability` against |V| + |E|.

    python bench/reachability_scaling.py [--sizes 5] [--base-nodes 80000] [--degree 4] [--repeats 5]

Two graph families, both with cycles and 1% success terminals, each size doubling |V| and |E|.
The smallest size has more than 2^16 nodes, so every size sorts node ids in the same two 16-bit
counting-sort passes (smaller graphs need one):

- local: edges go to ids within +-64 of their source (state graphs numbered in expansion order
  look like this); memory access stays mostly sequential.
- uniform: endpoints uniform over all nodes, the worst case for caches: once the arrays outgrow
  the CPU caches each access costs more, so time per element rises with size even though the
  number of operations is linear.

Prints, per size, the best-of-repeats time, the time per (|V| + |E|), and the ratio of the time to
the previous size's (linear scaling: about the size ratio, 2.0), then a least-squares exponent of
time against |V| + |E| (1.0 = linear). All sizes are measured in this one run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from srpo_core.theory.passk import StateGraph, random_edge_policy, random_graph, reachability

WINDOW = 64


def local_graph(n_nodes: int, n_edges: int, success_frac: float, rng: np.random.Generator) -> StateGraph:
    src = np.sort(rng.integers(0, n_nodes, size=n_edges))
    dst = (src + rng.integers(-WINDOW, WINDOW + 1, size=n_edges)) % n_nodes
    return StateGraph(n_nodes, src, dst, rng.random(n_nodes) < success_frac)


FAMILIES = {"local": local_graph, "uniform": random_graph}


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_family(name: str, args: argparse.Namespace, rng: np.random.Generator) -> None:
    print(f"\n{name} graphs")
    print(f"{'|V|':>10} {'|E|':>10} {'|V|+|E|':>10} {'seconds':>9} {'ns/elem':>8} {'size x':>7} {'time x':>7}")
    sizes, times = [], []
    for i in range(args.sizes):
        n = args.base_nodes * 2**i
        graph = FAMILIES[name](n, args.degree * n, 0.01, rng)
        probs = random_edge_policy(graph, rng)
        size = n + graph.src.size
        t = best_time(lambda: reachability(graph, probs), args.repeats)
        ratios = ("", "") if not sizes else (f"{size / sizes[-1]:.2f}", f"{t / times[-1]:.2f}")
        print(f"{n:>10} {graph.src.size:>10} {size:>10} {t:>9.4f} {1e9 * t / size:>8.1f} {ratios[0]:>7} {ratios[1]:>7}")
        sizes.append(size)
        times.append(t)
    exponent = np.polyfit(np.log(sizes), np.log(times), 1)[0]
    print(f"exponent of time in |V| + |E| (least squares over all sizes): {exponent:.2f} (1.0 = linear)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, default=5, help="number of sizes, each double the last")
    parser.add_argument("--base-nodes", type=int, default=80_000)
    parser.add_argument("--degree", type=int, default=4, help="edges per node")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--family", choices=[*FAMILIES, "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for name in FAMILIES if args.family == "both" else [args.family]:
        run_family(name, args, rng)


if __name__ == "__main__":
    main()
