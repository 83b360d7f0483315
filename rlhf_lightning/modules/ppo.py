"""PPOModule: reinforcement learning from a reward model with PPO (stage 3 of RLHF).

One `training_step` is one PPO iteration on a batch of prompts from the shared datamodule:

    1. rollout     — sample responses with the policy (HF `generate`, KV cache, eval, no_grad)
    2. score       — RM export (normalised with its stats) or a reward callable; EOS penalty; clip
    3. log-probs   — old policy / reference log-probs, entropy, per-token KL, critic values
    4. advantages  — KL-penalised per-token rewards → GAE(γ, λ) → whitening
    5. update      — ppo_epochs × minibatches × micro-batches (clipped surrogate, clipped value
                     loss, entropy bonus, optional KL loss and PPO-ptx), manual optimisation

Steps 1–4 live in `rlhf_lightning.ppo.experience`, step 5 in `rlhf_lightning.ppo.step`. The KL
controller, reward-hacking monitor, running reward statistics, RNG state (one per rank) and the
PPO-ptx data position are saved in checkpoints so that `fit(..., ckpt_path=...)` continues
exactly; frozen models that can be reloaded from disk (reward model, reference of a pretrained
policy) are left out. Under DDP each rank rolls out its own prompts; every batch statistic is
reduced over the ranks (`rlhf_lightning.ppo.distributed`, docs/distributed.md).

References: Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022 (InstructGPT, PPO-ptx);
Schulman et al. 2017 (PPO); Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO").
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, is_dataclass, replace

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rlhf_lightning.data.sampling import EpochBatches
from rlhf_lightning.data.templates import response_separator
from rlhf_lightning.models.heads import ValueHead
from rlhf_lightning.models.loading import (
    ModelSpec,
    export_pretrained,
    is_peft,
    load_causal_lm,
)
from rlhf_lightning.models.reward_export import load_reward_model
from rlhf_lightning.modules.base import StageModule
from rlhf_lightning.modules.common import (
    OptimConfig,
    build_optimizer,
    fused_allowed,
    log_text_table,
)
from rlhf_lightning.ppo import models as ppo_models
from rlhf_lightning.ppo.config import (
    KL_ESTIMATORS,
    CriticConfig,
    GenerationConfig,
    KLConfig,
    MonitorConfig,
    RewardConfig,
    UpdateConfig,
    check_choice,
)
from rlhf_lightning.ppo.distributed import module_ranks
from rlhf_lightning.ppo.experience import collect_experience, hf_generation_config
from rlhf_lightning.ppo.kl_control import build_kl_controller
from rlhf_lightning.ppo.monitor import RewardHackingMonitor
from rlhf_lightning.ppo.reporting import (
    eos_fraction,
    iteration_metrics,
    log_histograms,
    sample_rows,
)
from rlhf_lightning.ppo.rollout import Rollout, RunningMoments
from rlhf_lightning.ppo.state import (
    coerce_config,
    get_rng_state,
    rank_rng_state,
    same_vocabulary,
    set_rng_state,
)
from rlhf_lightning.ppo.step import ppo_update
from rlhf_lightning.scorers import load_scorer


class PPOModule(StageModule):
    """PPO with a KL penalty to a frozen reference, a critic, and a reward model or function."""

    data_kind = "prompt"

    def __init__(
        self,
        policy: ModelSpec,
        reward: RewardConfig | None = None,
        generation: GenerationConfig | None = None,
        kl: KLConfig | None = None,
        update: UpdateConfig | None = None,
        critic: CriticConfig | None = None,
        monitor: MonitorConfig | None = None,
        optim: OptimConfig | None = None,
        reference: ModelSpec | None = None,
        export_dir: str | None = None,
    ):
        """Build the module; models are created in `configure_model()`.

        Args:
            policy: the policy to train, usually the SFT export (see `ModelSpec`; LoRA allowed).
            reward: reward source (RM export dir or `module:function`), gold labeler, shaping.
            generation: rollout sampling (max_new_tokens, temperature, top-k/p, micro-batch).
            kl: KL coefficient, estimator (k1/k2/k3/full), in-reward or loss, adaptive target.
            update: PPO epochs, minibatches, micro-batches, clipping, coefficients, GAE, ptx.
            critic: value model choice (from the RM, a policy copy, or a shared value head).
            monitor: sample tables, histograms, reward-hacking and collapse warnings.
            optim: AdamW + warmup/cosine for the policy (the critic uses it with `critic.lr`).
            reference: explicit reference model; null = frozen copy of the initial policy (or
                the base weights with adapters disabled for a LoRA policy).
            export_dir: where the final policy is written with `save_pretrained`; null =
                `<log_dir>/export`.
        """
        super().__init__()
        self.automatic_optimization = False
        self.policy_spec = coerce_config(ModelSpec, policy)
        self.reference_spec = coerce_config(ModelSpec, reference) if reference is not None else None
        self.reward_cfg = coerce_config(RewardConfig, reward)
        self.generation_cfg = coerce_config(GenerationConfig, generation)
        self.kl_cfg = coerce_config(KLConfig, kl)
        self.update_cfg = coerce_config(UpdateConfig, update)
        self.critic_cfg = coerce_config(CriticConfig, critic)
        self.monitor_cfg = coerce_config(MonitorConfig, monitor)
        self.optim = coerce_config(OptimConfig, optim)
        self.export_dir = export_dir
        # plain types only, so that checkpoints load with torch.load(weights_only=True); under the
        # CLI the hparams are its config dump (with `_class_path`, used by `--ckpt_path` resume)
        self.save_hyperparameters()
        for hparams in (self.hparams, self._hparams_initial):
            for key, value in list(hparams.items()):
                if is_dataclass(value):
                    hparams[key] = asdict(value)
        self._validate()
        self.policy = self.reference = self.critic = self.value_head = self.reward_model = None
        self.reward_fn = self.gold_fn = self.reward_stats = self.reward_tokenizer = None
        self.kl_ctl = build_kl_controller(self.kl_cfg.coef, self.kl_cfg.target, self.kl_cfg.horizon)
        m = self.monitor_cfg
        self.monitor = RewardHackingMonitor(
            m.window, m.trend_threshold, m.ngram, m.collapse_ratio, m.max_repeat
        )
        self.running = RunningMoments()
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.warnings: list[str] = []
        self._rng: dict | None = None
        self._ptx_start = {"epoch": 0, "consumed": 0}  # until `_ptx` is built (or restored)
        self._ptx: EpochBatches | None = None

    def _validate(self) -> None:
        r, k = self.reward_cfg, self.kl_cfg
        if (r.model is None) == (r.function is None):
            raise ValueError("model.reward: set exactly one of 'model' (RM export) and 'function'")
        check_choice("reward", "normalize", r.normalize, ("stats", "running", "none"))
        check_choice("kl", "estimator", k.estimator, KL_ESTIMATORS)
        check_choice("kl", "mode", k.mode, ("reward", "loss"))
        kinds = ("auto", "reward_model", "policy_copy", "value_head")
        check_choice("critic", "kind", self.critic_cfg.kind, kinds)
        if self.critic_cfg.kind == "reward_model" and r.model is None:
            raise ValueError("model.critic.kind: 'reward_model' needs model.reward.model")
        if self.generation_cfg.temperature <= 0:
            raise ValueError("model.generation.temperature: must be > 0 (PPO samples)")

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """Build policy, reference, reward source and critic (once)."""
        if self.policy is not None:
            return
        tok = self.tokenizer
        self.eos_ids = [tok.eos_token_id]
        self.response_separator = response_separator(tok)
        self.hf_generation = hf_generation_config(self.generation_cfg, tok)
        self.policy = load_causal_lm(
            self.policy_spec, vocab_size=len(tok), pad_token_id=tok.pad_token_id
        )
        # from_pretrained returns eval mode; every model stays in train mode with dropout off
        # (training_step switches to eval around rollouts), so Lightning sees one mode
        ppo_models.disable_dropout(self.policy).train()
        if self.reference_spec is not None:
            ref = load_causal_lm(
                self.reference_spec, vocab_size=len(tok), pad_token_id=tok.pad_token_id
            )
            self.reference = ppo_models.frozen_copy(ppo_models.disable_dropout(ref))
        elif not is_peft(self.policy):
            self.reference = ppo_models.frozen_copy(self.policy)
        r = self.reward_cfg
        if r.model is not None:
            rm, rm_tok, self.reward_stats = load_reward_model(r.model)
            # train mode like the rest of the module (Lightning warns otherwise); dropout is off
            # and training_step switches the frozen models to eval before using them
            self.reward_model = ppo_models.disable_dropout(rm).train()
            if not same_vocabulary(tok, rm_tok):
                self.reward_tokenizer = rm_tok
            if r.normalize == "stats" and not self.reward_stats:
                rank_zero_warn(
                    f"model.reward.model: {r.model} has no reward_stats.json; raw rewards"
                )
        else:
            self.reward_fn = load_scorer(
                r.function, "model.reward.function", r.function_kwargs, r.function_batched
            )
        if r.gold is not None:
            self.gold_fn = load_scorer(r.gold, "model.reward.gold", r.gold_kwargs)
        kind = self.critic_cfg.kind
        if kind == "auto":
            kind = "reward_model" if r.model is not None else "policy_copy"
        if kind == "reward_model":
            stats = self.reward_stats if r.normalize == "stats" else None
            self.critic = ppo_models.critic_from_reward_model(self.reward_model, stats)
        elif kind == "policy_copy":
            self.critic = ppo_models.critic_from_policy(self.policy)
        else:
            self.value_head = ValueHead(self.policy.config.hidden_size)

    def configure_optimizers(self):
        """Policy (+ shared value head) optimizer and, with a separate critic, a critic optimizer."""
        upd = self.update_cfg
        total = None
        if self._trainer is not None and self.trainer.max_steps > 0:
            # Lightning counts every optimizer's step towards max_steps
            total = self.trainer.max_steps // (1 if self.critic is None else 2)
        elif self._trainer is not None:
            iterations = self.trainer.estimated_stepping_batches  # one batch = one PPO iteration
            total = iterations * upd.ppo_epochs * upd.num_minibatches
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        fused = fused_allowed(self._trainer)
        opt, sched = build_optimizer(params, self.optim, total, fused)
        if self.critic is None:
            return [opt], [sched]
        critic_optim = replace(self.optim, lr=self.critic_cfg.lr or self.optim.lr)
        c_opt, c_sched = build_optimizer(self.critic.parameters(), critic_optim, total, fused)
        return [opt, c_opt], [sched, c_sched]

    def ppo_optimizers(self) -> list:
        """The Lightning-wrapped optimizers as a list."""
        opts = self.optimizers()
        return list(opts) if isinstance(opts, list | tuple) else [opts]

    def ppo_schedulers(self) -> list:
        """The schedulers as a list aligned with `ppo_optimizers()`."""
        scheds = self.lr_schedulers()
        if scheds is None:
            return [None] * len(self.ppo_optimizers())
        return list(scheds) if isinstance(scheds, list | tuple) else [scheds]

    # ------------------------------------------------------------------ data helpers
    def next_ptx_batch(self) -> dict:
        """Next demonstration batch for PPO-ptx, in the datamodule's seeded epoch order
        (`EpochBatches`; its position is saved in checkpoints)."""
        if self._ptx is None:
            dm = self.trainer.datamodule
            loader = dm.dataloader(
                "demonstration", "train", batch_size=self.update_cfg.ptx_batch_size, shuffle=False
            )
            self._ptx = EpochBatches(
                loader.dataset,
                loader.collate_fn,
                loader.batch_size,
                seed=int(getattr(dm, "seed", 0)),
                position=self._ptx_start,
            )
        batch = next(self._ptx)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @property
    def ptx_position(self) -> dict[str, int]:
        """PPO-ptx data position `{"epoch", "consumed"}` (saved in checkpoints)."""
        return self._ptx.state_dict() if self._ptx is not None else dict(self._ptx_start)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One PPO iteration (steps 1–5, then logging)."""
        if self._rng is not None:
            set_rng_state(self._rng)
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.eval()
        rollout, info = collect_experience(self, batch)  # steps 1–4
        info["eos_fraction"] = eos_fraction(rollout, self.eos_ids)
        t0 = time.perf_counter()
        update_stats = ppo_update(self, rollout)  # step 5
        info["update_s"] = time.perf_counter() - t0
        ranks = module_ranks(self)  # what follows is over all data-parallel ranks
        metrics = iteration_metrics(rollout, info, update_stats, self.kl_ctl.value, ranks)
        n_samples = int(ranks.sum(torch.tensor(float(len(rollout)), device=self.device)))
        self.kl_ctl.update(metrics["objective/kl"], n_samples)
        responses = ranks.gather(info["responses"])
        report = self.monitor.update(
            metrics["objective/reward_raw"], metrics.get("objective/gold"), responses
        )
        metrics.update({f"monitor/{k}": v for k, v in report.signals.items()})
        for message in report.warnings:
            self.warnings.append(message)
            rank_zero_warn(message)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(rollout))
        self._log_samples(rollout, info)
        self.history.append(metrics)
        self.iteration += 1
        self._rng = get_rng_state()

    def _log_samples(self, rollout: Rollout, info: dict) -> None:
        m = self.monitor_cfg
        if self.logger is None:
            return
        if m.sample_every and self.iteration % m.sample_every == 0:
            rows = sample_rows(rollout, info, m.sample_rows)
            log_text_table(self.loggers, "samples/ppo", rows, self.iteration)
        if m.histogram_every and self.iteration % m.histogram_every == 0:
            log_histograms(self.loggers, rollout, self.iteration)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the gradient norm (`update.max_grad_norm`) right before each optimizer step: under
        `16-mixed` Lightning unscales the gradients just before this hook, so clipping in the
        training loop instead would act on scaled gradients."""
        max_norm = self.update_cfg.max_grad_norm
        if max_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm"
            )

    def on_fit_start(self) -> None:
        """Silence ModelCheckpoint's manual-optimisation notice: the post-step state is intended.
        Under DDP, a fresh run offsets the torch seed by the rank (as `accelerate.set_seed(...,
        device_specific=True)` does), so that ranks do not sample with the same random numbers."""
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        if self._rng is None and self.trainer.world_size > 1:
            torch.manual_seed((torch.initial_seed() + self.global_rank) % 2**63)

    def on_fit_end(self) -> None:
        """Export the trained policy (merged LoRA) and tokenizer with `save_pretrained`."""
        if self.trainer.global_rank != 0 or self.policy is None:
            return
        out = self.resolved_export_dir()
        export_pretrained(self.policy, self.tokenizer, out)
        rank_zero_info(f"PPO policy exported to {out}")

    # ------------------------------------------------------------------ checkpoints
    def _rebuildable_prefixes(self) -> tuple[str, ...]:
        prefixes = ["reward_model."]
        if self.reference_spec is not None or self.policy_spec.config is None:
            prefixes.append("reference.")
        return tuple(prefixes)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop frozen weights that are reloaded from disk; add the PPO state."""
        prefixes = self._rebuildable_prefixes()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(prefixes)]:
            del state[key]
        rng = self._rng if self._rng is not None else get_rng_state()
        checkpoint["ppo_state"] = {
            "iteration": self.iteration,
            "kl_controller": self.kl_ctl.state_dict(),
            "monitor": self.monitor.state_dict(),
            "running": self.running.state_dict(),
            "rng": rng,
            "rng_per_rank": module_ranks(self).gather([rng]),  # one state per data-parallel rank
            "ptx_position": self.ptx_position,
            "history": self.history,
            "warnings": self.warnings,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the PPO state; re-insert the frozen weights left out at save time."""
        state = checkpoint["state_dict"]
        prefixes = self._rebuildable_prefixes()
        for key, value in self.state_dict().items():
            if key.startswith(prefixes) and key not in state:
                state[key] = value
        ppo = checkpoint.get("ppo_state")
        if ppo is None:
            rank_zero_warn(
                "checkpoint has no 'ppo_state' (not written by PPOModule); fresh PPO state"
            )
            return
        self.iteration = ppo["iteration"]
        self.kl_ctl.load_state_dict(ppo["kl_controller"])
        self.monitor.load_state_dict(ppo["monitor"])
        self.running.load_state_dict(ppo["running"])
        self._rng = rank_rng_state(ppo, self.global_rank, getattr(self._trainer, "world_size", 1))
        self._ptx_start, self._ptx = dict(ppo["ptx_position"]), None
        self.history, self.warnings = list(ppo["history"]), list(ppo["warnings"])
