"""The paper's theory on small exact problems: numpy only, no model.

- `mdp`: finite-horizon tabular MDPs, a generator that plants tau-improvable states with a chosen
  coverage p_pi, and Monte Carlo simulation (resets into d_pi^h, Q-rollouts).
- `exact`: V, Q, A, d_pi^h, G_{h,tau}, p_pi, policy advantages and J by backward induction.
- `cpi`: Algorithm 1 (CPI-RR / CPI-CARO) with Algorithm 3's rejection-sampling credit sampler.
- `experiment`: Theorem 1's scaling in p_pi, measured (`srpo theory cpi`).
- `passk`: Pass@k on explicit state graphs and its reachability limit (`srpo theory passk`).
"""
