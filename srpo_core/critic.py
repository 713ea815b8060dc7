"""The credit critic of SR-PPO (single-rollout PPO with a Monte Carlo Pass@k critic; the Pass@k
critic summary in the project's paper notes) and the credits it gives.

Contract
--------
The critic predicts p_t = P(success | prompt, response tokens < t) (Pass@1) at every boundary
t = 0..T of a rollout (t = 0: the prompt alone; t = T: the whole response, before its outcome is
known). Pass@k of a prefix is P_k = 1 - (1 - p)^k (`pass_at_k`; k = 1: a plain Monte Carlo value
baseline; k -> inf: the reachability indicator 1{p > 0}).

Credits (`unit_credits`), over the units of a rollout (its tokens, or its thoughts), with values
V_0..V_U at the unit boundaries (V_u = P_k after unit u) and the outcome R:

    delta_u = V_u - V_{u-1}  (u < U),     delta_U = V_U - V_{U-1} + (R - V_U) = R - V_{U-1}
    c_u     = sum_{l >= 0} lambda^l delta_{u+l}                    (GAE with gamma = 1)

lambda = 0 (the default, the summary's definition): c_u = delta_u, the predicted success after the
unit minus before it, plus the terminal correction R - P_k(T) on the last unit, so that the credits
of a rollout sum to R - P_k(prompt). lambda = 1: c_u = R - V_{u-1} (Monte Carlo advantage against
the value before the unit); the sum property holds only at lambda = 0.

Granularity: `token` (units are tokens; V from the critic at every token boundary) or `thought`
(units are thoughts, V at the thought boundaries, the spans' ends; tokens after the last span end
belong to the last thought). Either way a thought's credit is spread evenly over its tokens, so the
token credits of a thought sum to the thought's credit and those of a rollout to R - P_k(prompt)
(`token_credits`). The learner's losses average over a sequence's tokens; SR-PPO passes
T_i * c_t (T_i: the rollout's trained tokens) so that its clipped loss is -sum_t c_t rho_t
(the token-level policy gradient sum_t c_t grad log pi), not the credit mean.

Critics (`method.options.critic`):
  learned       a value head on the policy's last hidden states, detached (`ValueHead`,
                `CreditCritic`): the policy forward runs once without gradient at the step's start
                (the LoRA policy that sampled the rollouts), the head has its own AdamW optimizer and
                is trained with binary cross-entropy on the rollout's outcome at every boundary
                (mean over a rollout's boundaries, then over rollouts). Detached, not a shared
                trunk: the critic loss never moves the policy's LoRA weights (no loss weight to tune
                between the PPO objective and the BCE, and the policy update stays the one PPO-clip
                defines), and the head's checkpoint is a few tensors beside the adapter. Its
                predictions for the credits are made before it trains on the batch (as PPO's value
                targets), so the step's calibration metrics are on rollouts it has not seen.
  reachability  exact Pass@inf on a task with a step checker (`exact_boundary_values`): a prefix can
                still reach the right answer iff it holds no wrong thought, so P_inf = 1 up to the
                first wrong thought, 0 from it on; thought granularity. Its credit is -1 exactly at
                the first wrong thought (CARO's oracle localizer) when R = 0.
  exact         exact Pass@k in the step checker's state graph (synthetic task, which has a gold
                chain): from a prefix with j right thoughts, success is the policy writing the
                remaining gold thoughts, p(v_j) = prod_{i > j} q_i with q_i the policy's probability
                of gold thought i (teacher-forced, canonical tokenization: a lower bound on the
                string's probability; sampler truncation ignored); solved on the chain graph with
                srpo_core.theory.passk; for calibration against the learned critic.

Metrics (`critic_metrics`, MLflow keys critic/...): loss (BCE before/after the head's update),
10-bin ECE of the prompt-level Pass@1 prediction (and over all boundaries) with the reliability
bins (`reliability_figure` draws them), AUROC of the prompt-level prediction for the outcome,
credit mass per thought position, and with a step checker the share of negative credit on the
true first wrong thought.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

N_BINS = 10
MASS_POSITIONS = 20  # credit mass is logged for thoughts 1..20 (later ones fold into the last)


# ---- pure math -----------------------------------------------------------------------------------


def pass_at_k(p: torch.Tensor, k: float) -> torch.Tensor:
    """1 - (1 - p)^k, stable for small p and large k; k = inf gives 1{p > 0}. [...] -> [...]."""
    if math.isinf(k):
        return (p > 0).to(p.dtype)
    return -torch.expm1(k * torch.log1p(-p.clamp(max=1.0)))


def unit_credits(values: torch.Tensor, reward: float, lam: float = 0.0) -> torch.Tensor:
    """Credits of U units from the values at their boundaries (module docstring).
    values [U + 1] (V_0: before the first unit, V_U: after the last), reward R -> credits [U]."""
    if values.dim() != 1 or values.numel() < 2:
        raise ValueError(f"unit_credits needs values at >= 2 boundaries, got shape {tuple(values.shape)}")
    delta = values[1:] - values[:-1]  # [U]
    delta = torch.cat([delta[:-1], (reward - values[-2]).reshape(1)])  # the last unit: R - V_{U-1}
    if lam == 0.0:
        return delta
    out = torch.empty_like(delta)
    acc = torch.zeros((), dtype=delta.dtype)
    for u in range(delta.numel() - 1, -1, -1):
        acc = delta[u] + lam * acc
        out[u] = acc
    return out


def thought_ends(spans: list[tuple[int, int]] | tuple, n_tokens: int) -> list[int]:
    """The unit ends (exclusive token indices) of a rollout's H thoughts: each span's end, the last
    one extended to the response's end (trailing tokens belong to the last thought); a response
    without thoughts is one unit. Spans must end in increasing order inside the response."""
    ends = [int(e) for _, e in spans]
    if any(b <= a for a, b in zip([0, *ends], ends)) or (ends and ends[-1] > n_tokens):
        raise ValueError(f"thought spans {list(spans)} do not end in increasing order within the {n_tokens} response tokens")
    return [*ends[:-1], n_tokens] if ends else [n_tokens]


def token_credits(credits: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """Unit credits [U] spread evenly over each unit's tokens: [ends[-1]] (units end at `ends`)."""
    starts = [0, *ends[:-1]]
    lengths = torch.tensor([e - s for s, e in zip(starts, ends)], dtype=torch.long)
    return torch.repeat_interleave(credits / lengths.clamp(min=1).to(credits.dtype), lengths)


def per_thought(token_values: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """Sum of token credits [T] over each thought (ends as `thought_ends`) -> [H]."""
    starts = [0, *ends[:-1]]
    return torch.stack([token_values[s:e].sum() for s, e in zip(starts, ends)]) if ends else token_values.new_zeros(0)


def expected_calibration_error(conf: torch.Tensor, outcome: torch.Tensor, n_bins: int = N_BINS) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ECE over `n_bins` equal-width bins of [0, 1] (a confidence of 1 in the last bin):
    sum_b |B_b| / N * |mean outcome_b - mean conf_b|. conf, outcome [N] -> (ece, mean conf [B],
    mean outcome [B], count [B]); an empty bin has nan means and count 0."""
    conf, outcome = conf.double().flatten(), outcome.double().flatten()
    if conf.numel() == 0:
        nan = torch.full((n_bins,), float("nan"), dtype=torch.float64)
        return float("nan"), nan, nan.clone(), torch.zeros(n_bins, dtype=torch.float64)
    b = (conf * n_bins).long().clamp(0, n_bins - 1)  # [N]
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, torch.ones_like(conf))
    sum_c = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, conf)
    sum_o = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, outcome)
    ece = float(((sum_o - sum_c).abs()).sum() / conf.numel())  # sum_b |B_b|/N * |o_b - c_b| = sum_b |S_o - S_c| / N
    safe = count.clamp(min=1)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return ece, torch.where(count > 0, sum_c / safe, nan), torch.where(count > 0, sum_o / safe, nan), count


def auroc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve of `score` for binary `label` (ties count half; Mann-Whitney U).
    [N], [N] -> float; nan when one class is absent."""
    score, label = score.double().flatten(), label.bool().flatten()
    pos, neg = score[label], score[~label]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


def reliability_figure(conf: list[float], acc: list[float], count: list[float], title: str = "critic reliability (prompt-level Pass@1)"):
    """A matplotlib reliability diagram of binned predictions (from `expected_calibration_error`
    or the critic/reliability/* metrics): mean outcome against mean prediction per bin, the
    diagonal, and the bins' counts. Returns the figure (the caller saves or logs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(count)
    centers = [(i + 0.5) / n for i in range(n)]
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.5, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls=":", color="k", label="perfect calibration")
    live = [i for i in range(n) if count[i] > 0 and not math.isnan(acc[i])]
    ax.bar([centers[i] for i in live], [acc[i] for i in live], width=1 / n, edgecolor="k", alpha=0.6, label="mean outcome per bin")
    ax.plot([conf[i] for i in live], [acc[i] for i in live], "o", color="C3", label="(mean prediction, mean outcome)")
    ax.set(ylabel="outcome rate", ylim=(0, 1), title=title)
    ax.legend(fontsize=7, loc="upper left")
    ax_n.bar(centers, count, width=1 / n, edgecolor="k")
    ax_n.set(xlabel="predicted success", ylabel="count", xlim=(0, 1))
    fig.tight_layout()
    return fig


def reliability_from_metrics(metrics: dict[str, float]) -> tuple[list[float], list[float], list[float]]:
    """The bins of the critic/reliability/{b}/{conf,acc,count} metrics of one step (or summed
    counts and count-weighted means over steps when given lists of (conf, acc, count) dicts)."""
    conf = [metrics.get(f"critic/reliability/{b}/conf", float("nan")) for b in range(N_BINS)]
    acc = [metrics.get(f"critic/reliability/{b}/acc", float("nan")) for b in range(N_BINS)]
    count = [metrics.get(f"critic/reliability/{b}/count", 0.0) for b in range(N_BINS)]
    return conf, acc, count


# ---- exact critics on the synthetic task's state graph --------------------------------------------


def chain_success_probability(log_q: list[float]) -> list[float]:
    """p(v_j), j = 0..H, on the chain graph v_0 -> v_1 -> ... -> v_H (success) whose edge j -> j+1
    the policy takes with probability q_{j+1} = exp(log_q[j]) (the rest fails), solved by
    theory.passk.success_probability_linear (= prod_{i > j} q_i)."""
    import numpy as np

    from srpo_core.theory.passk import StateGraph, success_probability_linear

    h = len(log_q)
    graph = StateGraph(h + 1, np.arange(h), np.arange(1, h + 1), np.arange(h + 1) == h)
    return [float(x) for x in success_probability_linear(graph, np.exp(np.asarray(log_q, dtype=float)))]


def chain_reachable(n_gold: int) -> list[bool]:
    """1{success reachable from v_j}, j = 0..n_gold, on the checker's chain graph under a policy
    with full support (every gold step has positive probability): theory.passk.reachability."""
    import numpy as np

    from srpo_core.theory.passk import StateGraph, reachability

    graph = StateGraph(n_gold + 1, np.arange(n_gold), np.arange(1, n_gold + 1), np.arange(n_gold + 1) == n_gold)
    return [bool(x) for x in reachability(graph, np.ones(n_gold))]


def exact_boundary_values(first_error: int | None, n_thoughts: int, node_value: list[float]) -> list[float]:
    """P_k at a rollout's thought boundaries 0..n_thoughts from the checker's graph: the prefix of
    thoughts 1..j is the node v_j while it holds no wrong thought (first_error None or > j), and
    the failure sink (0) from its first wrong thought on. node_value [H + 1]: P_k(v_j)."""
    out = []
    for j in range(n_thoughts + 1):
        valid = first_error is None or first_error > j
        out.append(node_value[j] if valid and j < len(node_value) else 0.0)
    return out


# ---- the learned critic --------------------------------------------------------------------------


class ValueHead(torch.nn.Module):
    """Success logit of a prefix from the policy's last hidden state: Linear (hidden = 0) or
    Linear -> tanh -> Linear. [..., width] -> [...] logits."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Linear(width, 1) if hidden == 0 else torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


CRITIC_FILE = "critic.pt"  # in the checkpoint's critic/ directory, beside adapter/
ROWS_FILE = "credits.json"  # per trained rollout: credits per thought and P_k at the boundaries


@dataclass
class CriticSettings:
    hidden: int
    lr: float
    steps: int
    seed: int


class CreditCritic:
    """The value head with its own AdamW optimizer; `fit` runs full-batch steps on the step's
    features. Deterministic given the seed and the features (CPU float32)."""

    def __init__(self, width: int, settings: CriticSettings):
        self.width, self.settings = width, settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.head = ValueHead(width, settings.hidden).double()
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=settings.lr, weight_decay=0.0)
        self.steps_done = 0
        self.rows: list[dict] = []  # the last update's per-rollout rows (credits, boundary P_k)

    def predict(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pass@1 predictions: features [T_i + 1, width] each -> p [T_i + 1] each (no gradient)."""
        with torch.no_grad():
            return [torch.sigmoid(self.head(f.double())) for f in feats]

    def loss(self, feats: list[torch.Tensor], targets: list[float]) -> torch.Tensor:
        """BCE at every boundary of each rollout against its outcome; mean per rollout, then over rollouts."""
        flat = torch.cat([f.double() for f in feats])  # [sum (T_i + 1), width]
        sizes = torch.tensor([f.shape[0] for f in feats])
        y = torch.repeat_interleave(torch.tensor(targets, dtype=torch.float64), sizes)  # [sum]
        w = torch.repeat_interleave(1.0 / sizes.double() / len(feats), sizes)  # [sum]
        return (torch.nn.functional.binary_cross_entropy_with_logits(self.head(flat), y, reduction="none") * w).sum()

    def fit(self, feats: list[torch.Tensor], targets: list[float]) -> tuple[float, float]:
        """`settings.steps` full-batch AdamW steps; (loss before, loss after)."""
        if not feats:
            return float("nan"), float("nan")
        with torch.no_grad():
            before = float(self.loss(feats, targets))
        for _ in range(self.settings.steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(feats, targets)
            loss.backward()
            self.optimizer.step()
            self.steps_done += 1
        with torch.no_grad():
            after = float(self.loss(feats, targets))
        return before, after

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        state = {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(), "width": self.width, "hidden": self.settings.hidden, "steps_done": self.steps_done}
        torch.save(state, str(directory / CRITIC_FILE))
        return directory / CRITIC_FILE

    @classmethod
    def load(cls, directory: Path, settings: CriticSettings) -> "CreditCritic":
        path = directory / CRITIC_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: the checkpoint has no SR-PPO critic (was it written by another method?)")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if state["hidden"] != settings.hidden:
            raise ValueError(f"{path}: the critic has hidden={state['hidden']}, method.options.critic_hidden is {settings.hidden}")
        critic = cls(int(state["width"]), settings)
        critic.head.load_state_dict(state["head"])
        critic.optimizer.load_state_dict(state["optimizer"])
        critic.steps_done = int(state["steps_done"])
        return critic


def write_rows(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ROWS_FILE).write_text(json.dumps(rows))
    return directory / ROWS_FILE


def read_rows(directory: Path) -> list[dict]:
    path = directory / ROWS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: the step checkpoint has no SR-PPO credit rows")
    return json.loads(path.read_text())


# ---- metrics -------------------------------------------------------------------------------------


def critic_metrics(
    prompt_p1: list[float], boundary_p1: list[list[float]], outcomes: list[float], thought_credits: list[list[float]], first_errors: list[int | None], has_checker: bool
) -> dict[str, float]:
    """critic/* of one step. prompt_p1: Pass@1 prediction at each rollout's prompt; boundary_p1:
    at all its boundaries; outcomes: R; thought_credits: credit per thought; first_errors: the
    step checker's first wrong thought (None: none, or no checker)."""
    m: dict[str, float] = {}
    y = torch.tensor([float(r >= 1.0) for r in outcomes], dtype=torch.float64)
    p = torch.tensor(prompt_p1, dtype=torch.float64)
    ece, conf, acc, count = expected_calibration_error(p, y)
    m["critic/ece"] = ece
    for b in range(N_BINS):
        m[f"critic/reliability/{b}/count"] = float(count[b])
        if count[b] > 0:
            m[f"critic/reliability/{b}/conf"] = float(conf[b])
            m[f"critic/reliability/{b}/acc"] = float(acc[b])
    if boundary_p1:
        allp = torch.cat([torch.tensor(v, dtype=torch.float64) for v in boundary_p1])
        ally = torch.cat([torch.full((len(v),), float(o >= 1.0), dtype=torch.float64) for v, o in zip(boundary_p1, outcomes)])
        m["critic/ece_boundaries"] = expected_calibration_error(allp, ally)[0]
    m["critic/auroc"] = auroc(p, y)
    m["critic/brier"] = float(((p - y) ** 2).mean()) if p.numel() else float("nan")
    m["critic/prompt_p1_mean"] = float(p.mean()) if p.numel() else float("nan")
    mass = [0.0] * MASS_POSITIONS
    signed = [0.0] * MASS_POSITIONS
    for cs in thought_credits:
        for j, c in enumerate(cs):
            mass[min(j, MASS_POSITIONS - 1)] += abs(c)
            signed[min(j, MASS_POSITIONS - 1)] += c
    total = sum(mass)
    for j in range(MASS_POSITIONS):
        if mass[j] > 0:
            m[f"critic/credit_mass/{j + 1}"] = mass[j] / total
            m[f"critic/credit_sum/{j + 1}"] = signed[j] / max(len(thought_credits), 1)
    if has_checker:
        from srpo_core.rollouts import oracle_reset

        on, neg = 0.0, 0.0
        for cs, e in zip(thought_credits, first_errors):
            if e is None or not cs:
                continue
            k = oracle_reset(e, len(cs))
            neg += sum(-c for c in cs if c < 0)
            on += -cs[k - 1] if cs[k - 1] < 0 else 0.0
        if neg > 0:
            m["critic/neg_credit_on_first_error"] = on / neg
    return m
