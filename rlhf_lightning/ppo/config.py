"""Configuration dataclasses of the PPO stage (one docstring per field; shown by `--model.help`).

Groups: `GenerationConfig` (rollout sampling), `RewardConfig` (scoring and shaping),
`KLConfig` (penalty and controller), `UpdateConfig` (the optimisation loop), `CriticConfig`,
`MonitorConfig` (logging and reward-hacking checks), `ComputeConfig` (group packing, torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass

KL_ESTIMATORS = ("k1", "k2", "k3", "full")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
"""`update.advantage` choices; every one but `gae` is critic-free (`ppo.estimators`)."""
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")
"""`update.loss_aggregation` choices (`ppo.losses.token_weights`)."""
CRITIC_KINDS = ("auto", "reward_model", "policy_copy", "value_head", "none")
COMPILE_ROLES = ("policy", "reference", "critic", "reward")
"""Model roles that `compute.compile` may name."""


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
    samples_per_prompt: int = 1
    """k responses sampled per prompt (a group). The k samples of a prompt stay together: on one
    data-parallel rank and in one minibatch of the update. Rows per iteration = `data.batch_size`
    prompts × k; GRPO and RLOO compare the samples of a group (they need k ≥ 2)."""
    micro_batch_size: int | None = None
    """Rollout micro-batch in rows (prompts × samples; generation and log-prob/value passes);
    null = the whole batch."""
    sampler_logprobs: bool | None = None
    """Take π_old log-probs and entropy from the logits `generate` computes anyway (as TRL does),
    saving one policy forward per iteration; the first-minibatch ratio check then compares the
    training forward with the sampler. null = on only when the policy computes in exact float32
    (float32 parameters, no autocast, `float32_matmul_precision` "highest"): there the ratio of the
    two is 1 ± 1e-6; in bfloat16 it was 1 ± 1e-3 on average and up to 8e-3 per token on a 4-layer
    model, so a policy forward is used. `generate` then holds one micro-batch's [b, R, V] float32
    logits. Ignored (a policy forward runs) with `kl.estimator: full` or `critic.kind: value_head`."""
    fast_cpu_sampling: bool = True
    """Draw each token on CPU by inverting the CDF with one uniform per row
    (`generation.sample_categorical`) instead of `torch.multinomial` (V exponentials per row):
    the same distribution, 0.2 vs 10 ms per step at 8 × 49152. false = torch's sampler, the
    random stream of runs before this option existed. No effect on CUDA tensors."""
    fast_cpu_decode: bool = True
    """Run the decode steps' float32 linear layers (at most 16 rows, CPU) with the
    memory-bound kernel `kernels/cpu_decode.py` instead of MKL's sgemm: 15–29 vs 6–14 GB/s of
    weights streamed at 8 rows on a 2-core AMD EPYC. Equal up to float32 summation order.
    Built once per machine with the C++ compiler (~30 s, cached); without one, torch's linear
    with a warning. false = torch's linear. No effect on CUDA tensors, in 16-bit or autocast."""


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
    """Discount γ of GAE and of the critic-free returns."""
    lam: float = 0.95
    """λ of GAE."""
    advantage: str = "gae"
    """Advantage estimator: `gae` (PPO, needs a critic), or critic-free with `critic.kind: none`:
    `grpo` ((r − group mean) / group std, Shao et al. 2024), `rloo` (r minus the mean of the other
    samples of its prompt, Ahmadian et al. 2024), `reinforce_pp` (REINFORCE++: returns of the
    KL-penalised token rewards, normalised over the batch, Hu 2025). See `ppo.estimators`."""
    scale_by_std: bool = True
    """`grpo` only: divide by the group's std; false = Dr. GRPO (Liu et al. 2025)."""
    whiten_advantages: bool | None = None
    """Normalise advantages to zero mean / unit variance over the valid tokens of the batch;
    null = each estimator's own convention: on for `gae`, off for the critic-free estimators
    (they normalise per group or over the batch themselves)."""
    loss_aggregation: str = "token_mean"
    """How per-token losses are averaged in a minibatch: `token_mean` (Σ over valid tokens /
    their number), `seq_mean_token_mean` (mean over each response's tokens, then over responses;
    the original GRPO), `token_sum_norm` (Σ over tokens / (responses × `generation.
    max_new_tokens`); Dr. GRPO). All three are invariant to `micro_batch_size`."""
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
    head; `value_head`: a value head on the policy trunk (shared, one optimizer); `none`: no
    critic (critic-free estimators: no value model, value loss or critic optimizer); `auto`: none
    for a critic-free `update.advantage`, else reward_model when `reward.model` is set, else
    policy_copy."""
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


@dataclass
class ComputeConfig:
    """How the forward passes run (`ppo.compile`, `ppo.packing`); every choice gives the same
    results up to float32 rounding."""

    pack_groups: bool = True
    """With `generation.samples_per_prompt` > 1, compute each group's shared prompt once: its k
    rows run as one packed row with a 4-D mask in the reference, critic, reward-model and update
    forwards, and the LM head only at response positions. Checked on each model at start (padded,
    with a warning, where packed ≠ padded). No effect with k = 1 (nothing is shared)."""
    padding_free: bool = True
    """Run the reference, critic, reward-model and update forwards on the real tokens only: the
    rows' real tokens as one packed row (position ids restarting per sequence), attention per
    sequence (`ppo.varlen`), the LM head only at response positions. Rows that share a prompt
    (k > 1 with `pack_groups`) are group-packed instead. Checked on each model at start (padded,
    with a warning, where padding-free ≠ padded)."""
    reuse_critic_forward: bool = True
    """With a separate critic: step 3 runs the critic on the rows of the update's first micro-batch
    with autograd on (train mode) and the update trains on that forward instead of repeating it —
    the critic's parameters have not changed yet, so given step 3's outputs the update is
    bit-identical, with one critic forward of a micro-batch fewer per iteration (step 3's values
    of the other rows come from other micro-batches and may round differently). Its activations
    are held from the end of step 3 until that micro-batch's backward — beside the PPO-ptx
    micro-batches' when `update.ptx_coef` > 0, which run first."""
    compile: bool | list[str] = False
    """`torch.compile` the training and scoring forwards of these roles (`policy`, `reference`,
    `critic`, `reward`), or of all (true); `generate` stays eager. The first iterations include the
    compile time (logged as `ppo/perf/compile_s`, graphs as `ppo/perf/compiled_graphs`)."""
    compile_dynamic: bool = True
    """Compile with dynamic shapes, so new prompt / response lengths reuse the graph instead of
    recompiling (false: one graph per shape, each compiled on first use)."""
    compile_mode: str | None = None
    """`torch.compile` mode (null = the default; e.g. `max-autotune-no-cudagraphs`)."""


def resolve_critic_kind(kind: str, advantage: str, has_reward_model: bool) -> str:
    """The concrete `critic.kind` (`auto` resolved), or ValueError (one line) for a critic that the
    estimator cannot use: `gae` needs values, the critic-free estimators train no critic."""
    check_choice("update", "advantage", advantage, ADVANTAGE_ESTIMATORS)
    check_choice("critic", "kind", kind, CRITIC_KINDS)
    critic_free = advantage != "gae"
    if kind == "auto":
        if critic_free:
            return "none"
        return "reward_model" if has_reward_model else "policy_copy"
    if kind == "none" and not critic_free:
        raise ValueError(
            "model.critic.kind: 'none' leaves GAE without values; use update.advantage: "
            "grpo | rloo | reinforce_pp, or a critic (reward_model | policy_copy | value_head)"
        )
    if kind != "none" and critic_free:
        raise ValueError(
            f"model.critic.kind: {kind!r} with the critic-free update.advantage: {advantage!r} "
            "would build a critic that nothing trains; set critic.kind: none (or auto)"
        )
    if kind == "reward_model" and not has_reward_model:
        raise ValueError("model.critic.kind: 'reward_model' needs model.reward.model")
    return kind


def resolve_whitening(upd: UpdateConfig) -> bool:
    """`update.whiten_advantages`, null resolved: on for `gae`, off for critic-free estimators."""
    if upd.whiten_advantages is None:
        return upd.advantage == "gae"
    return bool(upd.whiten_advantages)


def check_groups(gen: GenerationConfig, upd: UpdateConfig) -> None:
    """One-line errors for group settings the estimator cannot use."""
    k = gen.samples_per_prompt
    if k < 1:
        raise ValueError(f"model.generation.samples_per_prompt: {k} must be >= 1")
    if upd.advantage in ("grpo", "rloo") and k < 2:
        raise ValueError(
            f"model.generation.samples_per_prompt: {k} with update.advantage: {upd.advantage} — "
            "it compares the samples of a prompt, so it needs >= 2 (with 1 every advantage "
            + ("is 0)" if upd.advantage == "grpo" else "has no leave-one-out baseline)")
        )
    check_choice("update", "loss_aggregation", upd.loss_aggregation, LOSS_AGGREGATIONS)


def check_choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    """One-line error for an invalid enumerated field."""
    if value not in choices:
        raise ValueError(f"model.{section}.{name}: {value!r} is not one of {', '.join(choices)}")
