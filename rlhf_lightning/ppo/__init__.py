"""PPO building blocks used by `rlhf_lightning.modules.ppo.PPOModule` (docs/architecture.md).

One iteration is five steps, each a function returning a frozen, shape-documented result:
`generation.rollout` → `rollout.Rollout`; `scoring.score` → `Scores`; `logprobs.logprobs_values`
→ `TokenStats`; `advantages.estimate_advantages` → `Advantages`; `update.ppo_update` (on an
`experience.Experience`) → `stats.UpdateStats`. Around them:

- `models` / `build`: the `PPOModels` bundle (policy, reference, critic or value head, reward
  scorer, gold, vocabulary) and its construction by model role; `config`: the option dataclasses.
- `losses`: clipped surrogate (optional dual-clip), clipped value loss, entropy, KL and PPO-ptx
  terms normalised by a global token count, and the `PPOStats` accumulator.
- `running_moments`: running reward mean/std; `kl_control`: fixed and adaptive (Ziegler et al.
  2019) KL controllers; `monitor`: proxy-vs-gold trend and degenerate-output warnings.
- `stats` / `reporting`: typed statistics, their `ppo/…` TensorBoard tags, tables, histograms.
- `distributed`: the cross-rank reductions (`CrossRank`) that keep batch statistics global under
  DDP; `state`: RNG snapshots and the vocabulary check; `toy`: trivial rewards for smoke tests.

Reward and gold callables load through `rlhf_lightning.scorers`; masks, positions, EOS and
last-token scoring come from `rlhf_lightning.models` (`masks`, `heads`, `reward_export`).
Submodules are imported explicitly (nothing is re-exported here, to keep imports light).
"""
