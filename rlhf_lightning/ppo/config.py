"""Configuration dataclasses of the PPO stage (one docstring per field; shown by `--model.help`).

Groups: `GenerationConfig` (rollout sampling), `RewardConfig` (scoring and shaping),
`KLConfig` (penalty and controller), `UpdateConfig` (the optimisation loop), `CriticConfig`,
`MonitorConfig` (logging and reward-hacking checks).
"""

from __future__ import annotations

from dataclasses import dataclass

KL_ESTIMATORS = ("k1", "k2", "k3", "full")


@dataclass
class GenerationConfig:
    """How responses are sampled during rollouts (Hugging Face `generate`, KV cache on)."""

    max_new_tokens: int = 32
    """Maximum response length in tokens; generation also stops at EOS."""
    temperature: float = 1.0
    """Sampling temperature; the same value divides the logits when log-probs are computed."""
    top_k: int = 0
    """Top-k filter (0 = off). With a filter the sampler is not exactly π, so keep it off for PPO."""
    top_p: float = 1.0
    """Nucleus filter (1.0 = off); same caveat as `top_k`."""
    min_new_tokens: int = 0
    """Suppress EOS before this many tokens (0 = off)."""
    micro_batch_size: int | None = None
    """Rollout micro-batch (generation and log-prob/value passes); null = the whole prompt batch."""
    sampler_logprobs: bool | None = None
    """Take π_old log-probs and entropy from the logits `generate` computes anyway (as TRL does),
    saving one policy forward per iteration; the first-minibatch ratio check then compares the
    training forward with the sampler. null = on only when the policy computes in exact float32
    (float32 parameters, no autocast, `float32_matmul_precision` "highest"): there the ratio of the
    two is 1 ± 1e-6; in bfloat16 it was 1 ± 1e-3 on average and up to 8e-3 per token on a 4-layer
    model, so a policy forward is used. `generate` then holds one micro-batch's [b, R, V] float32
    logits. Ignored (a policy forward runs) with `kl.estimator: full` or `critic.kind: value_head`."""


@dataclass
class RewardConfig:
    """Where the sequence reward comes from and how it is shaped."""

    model: str | None = None
    """Reward-model export directory (written by the RM stage: `save_pretrained` of an
    `AutoModelForSequenceClassification` with `reward_stats.json` beside it)."""
    function: str | None = None
    """Reward callable as an import path `module:function`, called with (prompts, responses) →
    list of floats, or with (prompt, response) → float (see `function_batched`)."""
    function_kwargs: dict | None = None
    """Extra keyword arguments bound to `function` (e.g. `{word: good}`); a class is instantiated
    with them instead (see `rlhf_lightning.scorers`)."""
    function_batched: bool | None = None
    """Whether `function` takes lists; null = try lists first and fall back to one call per sample."""
    gold: str | None = None
    """Optional gold labeler `module:function` (same calling convention), logged as
    `ppo/objective/gold` and watched by the over-optimisation monitor; never used for training."""
    gold_kwargs: dict | None = None
    """Extra keyword arguments bound to `gold` (a class is instantiated with them)."""
    normalize: str = "stats"
    """`stats`: (r − mean) / std with the RM export's reward_stats.json; `running`: with running
    statistics of the rewards seen so far; `none`: raw rewards."""
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of responses that hit `max_new_tokens` without EOS (null = off)."""
    clip: float | None = 10.0
    """Clip the (normalised) reward to [−clip, clip] (null = off)."""
    micro_batch_size: int = 16
    """Rows per reward-model forward pass."""


@dataclass
class KLConfig:
    """KL(π ‖ π_ref) regularisation."""

    coef: float = 0.05
    """Initial KL coefficient β (0 disables the penalty; the KL is still measured and logged)."""
    estimator: str = "k1"
    """Per-token estimator with r = log π_ref − log π of the sampled token: `k1` (−r), `k2` (r²/2),
    `k3` (e^r − 1 − r), or `full` (exact KL over the whole vocabulary from both models' logits,
    via the kernels)."""
    mode: str = "reward"
    """`reward`: −β·KL added to the per-token reward (Ziegler et al. 2019); `loss`: β·KL added to
    the policy loss instead (gradient through the current policy)."""
    target: float | None = None
    """Target sequence KL (nats) for the adaptive controller; null = fixed coefficient."""
    horizon: int = 10000
    """Adaptive controller horizon in samples."""


@dataclass
class UpdateConfig:
    """The PPO optimisation loop over one rollout batch."""

    ppo_epochs: int = 4
    """Passes over the rollout batch."""
    num_minibatches: int = 1
    """Shuffled minibatches per epoch (one optimizer step each)."""
    micro_batch_size: int | None = None
    """Rows per forward/backward inside a minibatch (gradient accumulation); null = whole minibatch.
    Losses are normalised by the minibatch's valid-token count, so this does not change results."""
    clip_eps: float = 0.2
    """Policy ratio clip ε."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (null = off)."""
    value_clip: float | None = 0.2
    """Value clip range around the rollout values (null = unclipped value loss)."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (loss −= ent_coef · entropy)."""
    gamma: float = 1.0
    """Discount γ of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean / unit variance over valid tokens."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip per optimizer step (null = off)."""
    target_kl: float | None = None
    """Stop this iteration's epochs early once the minibatch approx-KL exceeds this (null = off)."""
    ptx_coef: float = 0.0
    """PPO-ptx weight γ of the SFT loss on demonstration batches (0 = off)."""
    ptx_batch_size: int | None = None
    """Demonstration rows per minibatch for PPO-ptx (null = the datamodule's batch size)."""
    ratio_check_tol: float | None = 1e-2
    """Max mean |π/π_old − 1| on the first minibatch before any step; larger means the update pass
    does not reproduce the rollout's log-probs (dropout, temperature or padding mismatch). float32
    gives ~1e-7; bfloat16 up to ~1e-2 (raise it there); null disables the check."""


@dataclass
class CriticConfig:
    """Where values come from."""

    kind: str = "auto"
    """`reward_model`: separate value model initialised from the RM export (trunk + head, head
    rescaled by the reward stats); `policy_copy`: separate copy of the policy trunk with a fresh
    head; `value_head`: a value head on the policy trunk (shared, one optimizer); `auto`:
    reward_model when `reward.model` is set, else policy_copy."""
    lr: float | None = None
    """Critic learning rate (null = the policy's `optim.lr`)."""


@dataclass
class MonitorConfig:
    """Logging and reward-hacking checks."""

    sample_every: int = 10
    """Write a prompt/response/reward/gold/KL text table every N iterations (0 = never)."""
    sample_rows: int = 4
    """Rows in that table."""
    histogram_every: int = 10
    """Log reward and per-token KL histograms every N iterations (0 = never)."""
    window: int = 10
    """Iterations in the proxy-vs-gold trend window."""
    trend_threshold: float = 0.5
    """|Correlation with time| above which a series counts as rising/falling."""
    ngram: int = 2
    """n of distinct-n (the repeated-n-gram signal uses n + 1)."""
    collapse_ratio: float = 0.5
    """Warn when distinct-n falls below this fraction of its first value."""
    max_repeat: float = 0.5
    """Warn when the repeated-n-gram fraction exceeds this."""


def check_choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    """One-line error for an invalid enumerated field."""
    if value not in choices:
        raise ValueError(f"model.{section}.{name}: {value!r} is not one of {', '.join(choices)}")
