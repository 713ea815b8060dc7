"""Exact quantities of a tabular MDP under a policy (paper sections 2 and 3.1).

Backward induction, with V_{H+1} = 0:

    Q_h(x, y) = r_h(x, y) + sum_x' P_h(x' | x, y) V_{h+1}(x'),   V_h(x) = sum_y pi_h(y | x) Q_h(x, y),
    A_h = Q_h - V_h,   J(pi) = sum_x mu(x) V_1(x).

Forward visitation: d^1 = mu, d^{h+1}(x') = sum_{x, y} d^h(x) pi_h(y | x) P_h(x' | x, y).
Improvable sets G_{h,tau} = {x : max_y A_h(x, y) >= tau}, coverage p_{pi,h} = d^h(G_{h,tau}) and
p_pi = mean_h p_{pi,h}. Policy advantage A_{pi,mu}(pi') = (1/H) sum_h E_{d^h} E_{pi'_h}[A_h], and
its parts on and off G (Lemma 2): A = p_pi A^G + (1 - p_pi) A^{G^c}.

Policies may carry leading batch axes (..., H, S, A); the MDP never does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from srpo_core.theory.mdp import TabularMDP

# Membership in G_{h,tau} tolerates this much floating-point error, so that an advantage built
# to equal tau exactly (as in `rare_branch_chain`) counts as tau-improvable.
IMPROVABLE_ATOL = 1e-9


def q_values(mdp: TabularMDP, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q (..., H, S, A) and V (..., H + 1, S) of pi (..., H, S, A), V[..., H, :] = 0."""
    H = mdp.horizon
    batch = pi.shape[:-3]
    Q = np.zeros(batch + (H, mdp.n_states, mdp.n_actions))
    V = np.zeros(batch + (H + 1, mdp.n_states))
    for h in range(H - 1, -1, -1):
        Q[..., h, :, :] = mdp.rewards[h] + np.einsum("xyz,...z->...xy", mdp.transitions[h], V[..., h + 1, :])
        V[..., h, :] = (pi[..., h, :, :] * Q[..., h, :, :]).sum(-1)
    return Q, V


def advantages(Q: np.ndarray, V: np.ndarray) -> np.ndarray:
    """A_h(x, y) = Q_h(x, y) - V_h(x): (..., H, S, A), (..., H + 1, S) -> (..., H, S, A)."""
    return Q - V[..., :-1, :, None]


def expected_return(mdp: TabularMDP, pi: np.ndarray) -> np.ndarray:
    """J(pi) = mu . V_1: (..., H, S, A) -> (...)."""
    _, V = q_values(mdp, pi)
    return V[..., 0, :] @ mdp.initial


def visitation(mdp: TabularMDP, pi: np.ndarray) -> np.ndarray:
    """d_pi^h(x) = P(x_h = x): (H, S, A) -> (H, S); each row sums to one."""
    d = np.zeros((mdp.horizon, mdp.n_states))
    d[0] = mdp.initial
    for h in range(mdp.horizon - 1):
        d[h + 1] = np.einsum("x,xy,xyz->z", d[h], pi[h], mdp.transitions[h])
    return d


def improvable_sets(A: np.ndarray, tau: float) -> np.ndarray:
    """G_{h,tau} as a mask: (H, S, A) advantages -> (H, S) bool."""
    return A.max(-1) >= tau - IMPROVABLE_ATOL


def coverage(d: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, float]:
    """(p_{pi,h} (H,), p_pi) from visitation d (H, S) and mask G (H, S)."""
    p_h = (d * G).sum(-1)
    return p_h, float(p_h.mean())


def greedy_policy(A: np.ndarray) -> np.ndarray:
    """pi^+_h(x) = argmax_y A_h(x, y) (lowest index on ties): (..., H, S, A) -> one-hot (..., H, S, A)."""
    return np.eye(A.shape[-1])[A.argmax(-1)]


def policy_advantage(d: np.ndarray, A: np.ndarray, pi_prime: np.ndarray, mask: np.ndarray | None = None) -> float:
    """(1/H) sum_h E_{x ~ d^h} E_{y ~ pi'_h(x)}[A_h(x, y)], optionally conditioned on x in mask.

    d (H, S), A (H, S, A), pi_prime (H, S, A), mask (H, S) bool. With mask = G this is A^G, with
    ~G it is A^{G^c}; each is normalised by the (h, x)-mass of its mask, as in section 3.1.
    """
    per_state = (pi_prime * A).sum(-1)  # (H, S)
    weight = d if mask is None else d * mask
    mass = weight.sum()
    if mask is not None:
        return float((weight * per_state).sum() / mass) if mass > 0 else 0.0
    return float((weight * per_state).sum() / A.shape[0])


@dataclass(frozen=True, eq=False)
class Exact:
    """Every exact quantity Algorithm 1 and Theorem 1 refer to, for one (MDP, pi, tau)."""

    Q: np.ndarray  # (H, S, A)
    V: np.ndarray  # (H + 1, S)
    A: np.ndarray  # (H, S, A)
    d: np.ndarray  # (H, S)
    G: np.ndarray  # (H, S) bool
    p_h: np.ndarray  # (H,)
    p: float  # p_pi
    J: float
    adv_greedy: float  # A_{pi,mu}(pi^+)
    adv_greedy_on_G: float  # A^G_{pi,mu}(pi^+)
    adv_greedy_off_G: float  # A^{G^c}_{pi,mu}(pi^+)


def exact_quantities(mdp: TabularMDP, pi: np.ndarray, tau: float) -> Exact:
    Q, V = q_values(mdp, pi)
    A = advantages(Q, V)
    d = visitation(mdp, pi)
    G = improvable_sets(A, tau)
    p_h, p = coverage(d, G)
    plus = greedy_policy(A)
    return Exact(
        Q=Q,
        V=V,
        A=A,
        d=d,
        G=G,
        p_h=p_h,
        p=p,
        J=float(V[0] @ mdp.initial),
        adv_greedy=policy_advantage(d, A, plus),
        adv_greedy_on_G=policy_advantage(d, A, plus, G),
        adv_greedy_off_G=policy_advantage(d, A, plus, ~G),
    )
