"""PPO building blocks used by `rlhf_lightning.modules.ppo.PPOModule`.

- `advantages`: KL-penalised per-token rewards, whitening, GAE(γ, λ) — pure functions.
- `losses`: clipped surrogate (optional dual-clip), clipped value loss, entropy, KL and PPO-ptx
  terms normalised by a global token count, and the `PPOStats` accumulator.
- `kl_control`: fixed and adaptive (Ziegler et al. 2019) KL-coefficient controllers.
- `monitor`: proxy-vs-gold trend and degenerate-output (distinct-n, repeated n-gram) warnings.
- `rollout`: the shape-documented `Rollout` container, generation, log-prob/value passes, running
  reward moments; `experience` (steps 1–4) and `step` (step 5) of one PPO iteration. Reward and
  gold callables load through `rlhf_lightning.scorers`; masks, positions, EOS and last-token
  scoring come from `rlhf_lightning.models` (`masks`, `heads`, `reward_export`).
- `models`: critic, frozen reference, dropout control; `config`: the option dataclasses;
  `reporting`: metrics/tables/histograms;
  `state`: RNG snapshots; `toy`: trivial rewards for smoke tests; `distributed`: the
  cross-rank reductions (`CrossRank`) that keep batch statistics global under DDP.

Submodules are imported explicitly (nothing is re-exported here, to keep imports light).
"""
