"""Finite-horizon tabular MDPs (paper section 2) and their simulation.

An MDP is (X, Y, P, r, H, mu): `transitions[h, x, y, x'] = P_h(x' | x, y)`, mean rewards
`rewards[h, x, y] = r_h(x, y)` in [0, R_max], initial distribution `initial[x] = mu(x)`. Time is
0-based in code (h = 0..H-1 is the paper's h = 1..H). A policy is an array `pi[h, x, y]` whose last
axis sums to one. Sampled rewards have mean `rewards` and stay in [0, R_max]: with probability
`reward_noise` (eta) a reward is R_max * Bernoulli(r / R_max), otherwise it is r itself, so eta = 0
gives deterministic rewards and eta = 1 binary (verifier-like) ones.

Generators:

- `rare_branch_chain`: the tight case of Theorem 1. At every step the environment takes a rare
  branch with probability p, whatever the state and action, into a state where action 1 is better
  than the base action 0 by exactly tau; on the main chain no action beats action 0 by more than
  eps < tau. It is the single-step construction of Proposition 10 (appendix 8.3) stacked H times,
  so the tau-improvable sets are G_h = {branch} and p_pi = p exactly for every policy.
- `random_mdp`: dense random kernels and rewards, for property tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAIN, BRANCH = 0, 1  # states of `rare_branch_chain`
BASE_ACTION, GOOD_ACTION = 0, 1  # the base policy's action and the tau-better one on the branch


@dataclass(frozen=True, eq=False)
class TabularMDP:
    transitions: np.ndarray  # (H, S, A, S)  P_h(x' | x, y)
    rewards: np.ndarray  # (H, S, A)  mean r_h(x, y) in [0, r_max]
    initial: np.ndarray  # (S,)  mu
    r_max: float
    reward_noise: float = 0.0  # eta in [0, 1]

    def __post_init__(self) -> None:
        P = np.array(self.transitions, dtype=float)
        r = np.array(self.rewards, dtype=float)
        mu = np.array(self.initial, dtype=float)
        H, S, A, S2 = P.shape
        if S2 != S or r.shape != (H, S, A) or mu.shape != (S,):
            raise ValueError(f"shapes P {P.shape}, r {r.shape}, mu {mu.shape} do not agree")
        if (P < 0).any() or not np.allclose(P.sum(-1), 1.0):
            raise ValueError("every P_h(. | x, y) must be a distribution")
        if (mu < 0).any() or not np.isclose(mu.sum(), 1.0):
            raise ValueError("mu must be a distribution")
        if (r < 0).any() or (r > self.r_max + 1e-12).any():
            raise ValueError("mean rewards must lie in [0, r_max]")
        if not 0.0 <= self.reward_noise <= 1.0:
            raise ValueError("reward_noise must lie in [0, 1]")
        for name, arr in (("transitions", P), ("rewards", r), ("initial", mu)):
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    @property
    def horizon(self) -> int:
        return self.transitions.shape[0]

    @property
    def n_states(self) -> int:
        return self.transitions.shape[1]

    @property
    def n_actions(self) -> int:
        return self.transitions.shape[2]


def deterministic_policy(actions: np.ndarray, n_actions: int) -> np.ndarray:
    """One-hot policy from chosen actions: (..., H, S) int -> (..., H, S, A)."""
    return np.eye(n_actions)[actions]


def rare_branch_chain(
    p: float,
    tau: float,
    horizon: int,
    n_actions: int,
    r_max: float = 1.0,
    eps: float = 0.0,
    reward_noise: float = 0.0,
) -> tuple[TabularMDP, np.ndarray]:
    """The planted MDP and its base policy (always action 0); returns (mdp, pi (H, 2, A)).

    Rewards: every action earns the baseline r_max / 2, except action 1, which earns tau more on
    the branch and eps more on the main chain. Under the base policy V_h is the same in both
    states, so A_h(branch, 1) = tau, A_h(main, 1) = eps and every other advantage is 0.
    """
    if not 0.0 < p < 1.0:
        raise ValueError("p must lie in (0, 1)")
    if not 0.0 <= eps < tau <= r_max / 2:
        raise ValueError("need 0 <= eps < tau <= r_max / 2")
    if n_actions < 2:
        raise ValueError("need at least two actions")
    step = np.array([1.0 - p, p])  # next-state law, whatever (x, y)
    transitions = np.broadcast_to(step, (horizon, 2, n_actions, 2))
    rewards = np.full((horizon, 2, n_actions), r_max / 2)
    rewards[:, BRANCH, GOOD_ACTION] += tau
    rewards[:, MAIN, GOOD_ACTION] += eps
    mdp = TabularMDP(transitions, rewards, step, r_max, reward_noise)
    pi = deterministic_policy(np.full((horizon, 2), BASE_ACTION), n_actions)
    return mdp, pi


def random_mdp(
    n_states: int,
    n_actions: int,
    horizon: int,
    rng: np.random.Generator,
    r_max: float = 1.0,
    concentration: float = 0.5,
    reward_noise: float = 0.0,
) -> TabularMDP:
    """Dirichlet(concentration) kernels and initial law, uniform mean rewards in [0, r_max]."""
    transitions = rng.dirichlet(np.full(n_states, concentration), size=(horizon, n_states, n_actions))
    rewards = rng.uniform(0.0, r_max, size=(horizon, n_states, n_actions))
    initial = rng.dirichlet(np.full(n_states, 1.0))
    return TabularMDP(transitions, rewards, initial, r_max, reward_noise)


def random_policy(horizon: int, n_states: int, n_actions: int, rng: np.random.Generator) -> np.ndarray:
    """A fully stochastic policy, (H, S, A)."""
    return rng.dirichlet(np.ones(n_actions), size=(horizon, n_states))


# --- simulation -----------------------------------------------------------------------------


def sample_categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row: (..., K) probabilities -> (...) indices."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[:-1])[..., None] * cdf[..., -1:]
    return np.minimum((u >= cdf).sum(-1), probs.shape[-1] - 1)


def sample_rewards(
    mdp: TabularMDP, h: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Rewards with mean r_h(x, y) in [0, R_max]: (m,) indices -> (m,)."""
    mean = mdp.rewards[h, x, y]
    if mdp.reward_noise == 0.0:
        return mean
    noisy = rng.random(mean.shape) < mdp.reward_noise
    binary = mdp.r_max * (rng.random(mean.shape) * mdp.r_max < mean)
    return np.where(noisy, binary, mean)


def reset_states(mdp: TabularMDP, pi: np.ndarray, h: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x ~ d_pi^h by one reset into pi's trajectory distribution: (m,) times -> (m,) states.

    Each draw starts at x_1 ~ mu and follows pi and P until its own time h.
    """
    x = sample_categorical(np.broadcast_to(mdp.initial, (h.size, mdp.n_states)), rng)
    alive = np.nonzero(h > 0)[0]
    for t in range(mdp.horizon - 1):
        if alive.size == 0:
            break
        xa = x[alive]
        ya = sample_categorical(pi[t, xa], rng)
        x[alive] = sample_categorical(mdp.transitions[t, xa, ya], rng)
        alive = alive[h[alive] > t + 1]
    return x


def q_rollouts(
    mdp: TabularMDP,
    pi: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    h: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Monte Carlo Q-rollouts: play y at (x, h), then pi to the horizon; (m,) -> (m,) returns.

    Unbiased for Q_h^pi(x, y) and in [0, H R_max] (QRollout of Algorithm 1, line 7).
    """
    ret = sample_rewards(mdp, h, x, y, rng)
    x = sample_categorical(mdp.transitions[h, x, y], rng)
    for t in range(1, mdp.horizon):
        alive = np.nonzero(h < t)[0]  # draws that acted before t continue under pi
        if alive.size == 0:
            continue
        xa = x[alive]
        ya = sample_categorical(pi[t, xa], rng)
        ret[alive] += sample_rewards(mdp, np.full(alive.size, t), xa, ya, rng)
        x[alive] = sample_categorical(mdp.transitions[t, xa, ya], rng)
    return ret
