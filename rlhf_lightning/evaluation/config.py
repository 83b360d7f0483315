"""Settings of `rlhf evaluate` (one dataclass per YAML section, one docstring per key) and the
checks that turn a bad config into one clear line naming the key.

A policy is either a model (`model`: a `ModelSpec` — export folder, hub id or GGUF file) or
best-of-N over a base policy (`best_of_n`: `base` names another policy or is a `ModelSpec`, `n`
lists the N values). Scorers (the proxy and the gold judge) are either a reward-model export
folder (`reward_model`) or a `module:function` (`function`, see `rlhf_lightning.scorers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.scorers import split_import_path

SPLITS = ("all", "train", "val")


@dataclass
class BestOfNConfig:
    """Best-of-N over a base policy: N samples per (prompt, sample index), the proxy's best kept."""

    base: str | ModelSpec
    """The policy sampled from: the `name` of another entry of `policies`, or a `ModelSpec`."""
    n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """The N values (each ≥ 1); candidates are nested, so N = 4 sees the candidates of N = 2."""


@dataclass
class PolicyConfig:
    """One evaluated policy: a model, or best-of-N over a base policy (exactly one of the two)."""

    name: str
    """Name used in the report, the plot and to refer to this policy (`baseline`, `reference`)."""
    model: ModelSpec | None = None
    """Where the weights come from: `name_or_path` (export folder, hub id), `gguf_file`, ..."""
    best_of_n: BestOfNConfig | None = None
    """Best-of-N over a base policy, selected by the proxy scorer."""


@dataclass
class ScorerConfig:
    """A proxy scorer or gold judge: a reward-model export or a `module:function` (exactly one)."""

    reward_model: str | None = None
    """Folder of a reward-model export (`RewardModule`'s `export_dir`); scores the raw reward."""
    function: str | None = None
    """Import path `"module:function"` scoring (prompt, response) (see `rlhf_lightning.scorers`)."""
    args: dict | None = None
    """Keyword arguments for `function` (a class is instantiated with them)."""
    batch_size: int = 32
    """Texts per reward-model forward."""
    max_length: int = 1024
    """Reward-model texts longer than this (tokens) are truncated."""

    def describe(self) -> str:
        """`reward_model:<dir>` or `function:<module:function>`, for the report."""
        return (
            f"reward_model:{self.reward_model}"
            if self.reward_model
            else f"function:{self.function}"
        )


@dataclass
class SamplingSettings:
    """How every policy samples (the same for all): plain ancestral sampling at `temperature`."""

    max_new_tokens: int = 48
    """Cap on generated tokens per response."""
    temperature: float = 1.0
    """Sampling temperature (> 0); the KL is measured at the same temperature."""
    samples_per_prompt: int = 2
    """Responses per prompt and policy; win rates pair them by (prompt, sample index)."""
    seed: int = 0
    """Seed of the sampling and the bootstrap: the same inputs give the same report."""
    batch_size: int = 16
    """Prompts per generation call (best-of-N draws samples_per_prompt × max(N) per prompt)."""


@dataclass
class EvaluateConfig:
    """Settings of `rlhf evaluate` (each one is a key of the YAML config)."""

    policies: list[PolicyConfig]
    """The evaluated policies, in report order."""
    prompts: DataSource
    """Held-out prompts (any record layout; its prompt part is used)."""
    proxy: ScorerConfig
    """The proxy scorer (the reward model RL trained against); selects best-of-N samples."""
    gold: ScorerConfig
    """The gold judge: mean gold score and the win rates are judged by it."""
    baseline: str
    """Name of the policy the win rates are against (ties count ½)."""
    out_dir: str
    """Folder for report.md, report.json, gold_vs_kl.png and tb/ (TensorBoard)."""
    reference: str | None = None
    """Name of the model policy the KL is measured against; None = the baseline."""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    """Sampling settings, the same for every policy."""
    split: str = "all"
    """Which prompts of `prompts`: `all` (every record), `train` or `val` (its val split)."""
    tokenizer: str | None = None
    """Tokenizer shared by all policies; None = the reference policy's `name_or_path`."""
    tokenizer_gguf_file: str | None = None
    """GGUF file inside `tokenizer` to read the tokenizer from."""
    max_prompt_length: int = 256
    """Prompts longer than this (tokens) are left-truncated."""
    bootstrap_resamples: int = 1000
    """Resamples of the prompts for the win rates' 95% intervals (paired bootstrap)."""
    distinct_n: int = 2
    """n of the distinct-n diversity signal (unique / total word n-grams)."""
    side_by_side: int = 8
    """Prompts shown with every policy's first response in report.md and TensorBoard."""
    tensorboard: bool = True
    """Write TensorBoard scalars and the side-by-side text table under `<out_dir>/tb`."""
    device: str = "cpu"
    """Torch device of the policies and reward models."""


def _check_scorer(scorer: ScorerConfig, key: str) -> None:
    if (scorer.reward_model is None) == (scorer.function is None):
        raise ValueError(f"{key}: set exactly one of 'reward_model' and 'function'")
    if scorer.function is not None:
        split_import_path(scorer.function, f"{key}.function")
    if scorer.batch_size < 1:
        raise ValueError(f"{key}.batch_size: must be >= 1, got {scorer.batch_size}")


def _check_policies(cfg: EvaluateConfig) -> dict[str, PolicyConfig]:
    names: dict[str, PolicyConfig] = {}
    if not cfg.policies:
        raise ValueError("policies: at least one policy is needed")
    for i, policy in enumerate(cfg.policies):
        key = f"policies[{i}]"
        if policy.name in names:
            raise ValueError(f"{key}.name: duplicate policy name {policy.name!r}")
        names[policy.name] = policy
        if (policy.model is None) == (policy.best_of_n is None):
            raise ValueError(
                f"{key}: policy {policy.name!r} needs exactly one of 'model' and 'best_of_n'"
            )
        bon = policy.best_of_n
        if bon is not None:
            if not bon.n or any(n < 1 for n in bon.n):
                raise ValueError(f"{key}.best_of_n.n: every N must be >= 1, got {bon.n}")
    for i, policy in enumerate(cfg.policies):
        base = policy.best_of_n.base if policy.best_of_n else None
        if isinstance(base, str) and (base not in names or names[base].model is None):
            raise ValueError(
                f"policies[{i}].best_of_n.base: {base!r} is not a model policy "
                f"(model policies: {', '.join(n for n, p in names.items() if p.model) or 'none'})"
            )
    return names


def check_config(cfg: EvaluateConfig) -> None:
    """Raise a one-line `ValueError` naming the key for anything wrong with `cfg`."""
    names = _check_policies(cfg)
    if cfg.baseline not in names:
        raise ValueError(
            f"baseline: unknown policy {cfg.baseline!r} (policies: {', '.join(names)})"
        )
    reference = cfg.reference or cfg.baseline
    if reference not in names or names[reference].model is None:
        key = "reference" if cfg.reference else "baseline"
        raise ValueError(f"{key}: the KL reference {reference!r} is not a model policy")
    _check_scorer(cfg.proxy, "proxy")
    _check_scorer(cfg.gold, "gold")
    s = cfg.sampling
    if s.temperature <= 0:
        raise ValueError(f"sampling.temperature: must be > 0, got {s.temperature}")
    for name in ("max_new_tokens", "samples_per_prompt", "batch_size"):
        if getattr(s, name) < 1:
            raise ValueError(f"sampling.{name}: must be >= 1, got {getattr(s, name)}")
    if cfg.split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    if cfg.bootstrap_resamples < 1:
        raise ValueError(f"bootstrap_resamples: must be >= 1, got {cfg.bootstrap_resamples}")
    if cfg.distinct_n < 1:
        raise ValueError(f"distinct_n: must be >= 1, got {cfg.distinct_n}")
