"""PPOModule: reinforcement learning from a reward model with PPO (stage 3 of RLHF).

One `training_step` is one PPO iteration on a batch of prompts from the shared datamodule, as
five functions whose arguments say what they use (docs/architecture.md):

    1. rollout     `ppo.generation.rollout`       prompts → `Rollout` (HF `generate`, eval, no_grad)
    2. score       `ppo.scoring.score`            → `Scores` (RM export or callable; normalise,
                                                    EOS penalty, clip)
    3. log-probs   `ppo.logprobs.logprobs_values` → `TokenStats` (π_old, π_ref, entropy, KL, values)
    4. advantages  `ppo.advantages.estimate_advantages` → `Advantages` (KL-penalised rewards, GAE
                                                    or a critic-free estimator, whitening)
    5. update      `ppo.update.ppo_update`        `Experience` → `UpdateStats` (clipped surrogate,
                                                    value loss, entropy, KL loss, PPO-ptx)

The models are built once (`ppo.build.build_models` → `PPOModels`); the update reaches Lightning
only through `LightningOps` (backward, optimizer steps, DDP no_sync, all-reduce). The KL
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
from dataclasses import replace

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rlhf_lightning.data.sampling import EpochBatches
from rlhf_lightning.models.loading import ModelSpec, export_pretrained
from rlhf_lightning.modules.base import StageModule, coerce_config
from rlhf_lightning.modules.common import (
    OptimConfig,
    build_optimizer,
    fused_allowed,
    log_text_table,
)
from rlhf_lightning.modules.lightning_ops import LightningOps
from rlhf_lightning.ppo import advantages, generation, logprobs, minibatches, scoring, update
from rlhf_lightning.ppo.build import ModelSpecs, build_models
from rlhf_lightning.ppo.compile import compile_roles, compile_tags, configure_forwards
from rlhf_lightning.ppo.config import (
    KL_ESTIMATORS,
    ComputeConfig,
    CriticConfig,
    GenerationConfig,
    KLConfig,
    MonitorConfig,
    RewardConfig,
    UpdateConfig,
    check_choice,
    check_groups,
    resolve_critic_kind,
)
from rlhf_lightning.ppo.distributed import CrossRank, module_ranks
from rlhf_lightning.ppo.experience import Experience
from rlhf_lightning.ppo.kl_control import build_kl_controller
from rlhf_lightning.ppo.models import PPOModels
from rlhf_lightning.ppo.monitor import RewardHackingMonitor
from rlhf_lightning.ppo.reporting import iteration_stats, log_histograms, sample_rows
from rlhf_lightning.ppo.rollout import PromptBatch
from rlhf_lightning.ppo.running_moments import RunningMoments
from rlhf_lightning.ppo.state import get_rng_state, rank_rng_state, set_rng_state
from rlhf_lightning.ppo.stats import IterationStats, StepTimings


def _timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), wall-clock seconds)."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def refuse_fp16_two_optimizers(precision: str, critic_kind: str) -> None:
    """Raise for `16-mixed` with a separate critic: Lightning's fp16 plugin unscales and updates its
    loss scaler once per optimizer, so after one shared backward the critic would be unscaled with
    the policy's updated scale (2× or 0.5× its gradient). bf16-mixed has no scaler; a value head
    shares the policy's optimizer."""
    if precision.startswith("16"):
        raise ValueError(
            f"trainer.precision={precision} with a separate critic (model.critic.kind={critic_kind}) "
            "is not supported: one loss scaler cannot serve two optimizers stepped after one "
            "backward; use bf16-mixed, 32, or critic.kind: value_head"
        )


class PPOModule(StageModule):
    """PPO with a KL penalty to a frozen reference, a critic (or a critic-free estimator: GRPO,
    RLOO, REINFORCE++), and a reward model or function."""

    data_kind = "prompt"

    def __init__(
        self,
        model_spec: ModelSpec,
        reward: RewardConfig | None = None,
        generation: GenerationConfig | None = None,
        kl: KLConfig | None = None,
        update: UpdateConfig | None = None,
        critic: CriticConfig | None = None,
        monitor: MonitorConfig | None = None,
        optim: OptimConfig | None = None,
        compute: ComputeConfig | None = None,
        reference_spec: ModelSpec | None = None,
        export_dir: str | None = None,
    ):
        """Build the module; models are created in `configure_model()`.

        Args:
            model_spec: the policy to train, usually the SFT export (`ModelSpec`; LoRA allowed).
            reward: reward source (RM export dir or `module:function`), gold labeler, shaping.
            generation: rollout sampling (max_new_tokens, temperature, top-k/p, micro-batch).
            kl: KL coefficient, estimator (k1/k2/k3/full), in-reward or loss, adaptive target.
            update: PPO epochs, minibatches, micro-batches, clipping, coefficients, advantage
                estimator (gae | grpo | rloo | reinforce_pp), loss aggregation, ptx.
            critic: value model choice (from the RM, a policy copy, a shared value head, or none
                for the critic-free estimators).
            monitor: sample tables, histograms, reward-hacking and collapse warnings.
            optim: AdamW + warmup/cosine for the policy (the critic uses it with `critic.lr`).
            compute: how the forwards run (k > 1 groups packed; optional `torch.compile` per
                role); results equal up to float32 rounding (`ppo.compile`, `ppo.packing`).
            reference_spec: explicit reference model; null = frozen copy of the initial policy
                (or the base weights with adapters disabled for a LoRA policy).
            export_dir: where the final policy is written with `save_pretrained`; null =
                `<log_dir>/export`.
        """
        super().__init__()
        self.automatic_optimization = False
        self.model_spec = coerce_config(ModelSpec, model_spec)
        self.reference_spec = (
            coerce_config(ModelSpec, reference_spec) if reference_spec is not None else None
        )
        self.reward_cfg = coerce_config(RewardConfig, reward)
        self.generation_cfg = coerce_config(GenerationConfig, generation)
        self.kl_cfg = coerce_config(KLConfig, kl)
        self.update_cfg = coerce_config(UpdateConfig, update)
        self.critic_cfg = coerce_config(CriticConfig, critic)
        self.monitor_cfg = coerce_config(MonitorConfig, monitor)
        self.compute_cfg = coerce_config(ComputeConfig, compute)
        compile_roles(self.compute_cfg)  # unknown roles fail here, as one line
        self.optim = coerce_config(OptimConfig, optim)
        self.export_dir = export_dir
        self.save_plain_hparams()
        self._validate()
        self.models: PPOModels | None = None
        self.policy = self.reference = self.critic = self.value_head = self.reward_model = None
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
        self.critic_kind = resolve_critic_kind(
            self.critic_cfg.kind, self.update_cfg.advantage, r.model is not None
        )
        check_groups(self.generation_cfg, self.update_cfg)
        if self.generation_cfg.temperature <= 0:
            raise ValueError("model.generation.temperature: must be > 0 (PPO samples)")

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """Build the `PPOModels` bundle once (`ppo.build`); register its models as submodules."""
        if self.policy is not None:
            return
        specs = ModelSpecs(
            self.model_spec,
            self.reference_spec,
            self.reward_cfg,
            self.generation_cfg,
            replace(self.critic_cfg, kind=self.critic_kind),
        )
        self.models = models = build_models(specs, self.tokenizer)
        self.policy, self.reference = models.policy, models.reference
        self.reward_model = getattr(models.reward, "model", None)
        self.critic, self.value_head = models.critic, models.value_head
        configure_forwards(models, self.compute_cfg, self.generation_cfg.samples_per_prompt)

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
        refuse_fp16_two_optimizers(str(getattr(self._trainer, "precision", "")), self.critic_kind)
        critic_optim = replace(self.optim, lr=self.critic_cfg.lr or self.optim.lr)
        c_opt, c_sched = build_optimizer(self.critic.parameters(), critic_optim, total, fused)
        return [opt, c_opt], [sched, c_sched]

    # ------------------------------------------------------------------ data helpers
    def _ptx_batch(self) -> dict:
        """Next demonstration batch for PPO-ptx, in the datamodule's seeded epoch order
        (`EpochBatches`; its position is saved in checkpoints), on this module's device."""
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
        """One PPO iteration: steps 1–5, then logging."""
        if self._rng is not None:
            set_rng_state(self._rng)
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.eval()
        m, ranks = self.models, module_ranks(self)  # ranks: reductions over data-parallel ranks
        gen, kl, upd = self.generation_cfg, self.kl_cfg, self.update_cfg
        with torch.no_grad():
            with m.sampling_mode():
                sampler = logprobs.uses_sampler_logprobs(m, gen, kl)
                prompts = PromptBatch.from_batch(batch)
                rollout, t1 = _timed(generation.rollout, m, prompts, gen, sampler_logprobs=sampler)
                scores, t2 = _timed(scoring.score, m, rollout, self.reward_cfg, self.running, ranks)
                first = self._plan_first_micro_batch(rollout)
                rows = None if first is None else first.rows
                tokens, t3 = _timed(logprobs.logprobs_values, m, rollout, gen, kl, rows)
            beta = self.kl_ctl.value if kl.mode == "reward" else 0.0
            adv = advantages.estimate_advantages(scores, tokens, rollout, upd, beta, ranks)
        self.running = scores.running
        update_stats, t5 = _timed(
            update.ppo_update,
            m,
            Experience.join(rollout, tokens, adv),
            upd,
            kl,
            gen,
            kl_coef=self.kl_ctl.value,
            ops=LightningOps(self),
            next_ptx=self._ptx_batch if upd.ptx_coef > 0 else None,
            first_micro=None if first is None else first.with_values(tokens.values_graph),
        )
        timings = StepTimings(t1, t2, t3, t5)
        stats = iteration_stats(
            rollout, scores, tokens, adv, update_stats, timings, self.kl_ctl.value, ranks
        )
        self._log_iteration(stats, rollout, scores, tokens, ranks)
        self._rng = get_rng_state()

    def _plan_first_micro_batch(self, rollout) -> minibatches.FirstMicroBatch | None:
        """Epoch 0's minibatches drawn before step 3 so that its critic forward of the first
        micro-batch is reused (`compute.reuse_critic_forward`, separate critic only), else None."""
        upd = self.update_cfg
        if not self.compute_cfg.reuse_critic_forward or self.models.critic is None:
            return None
        if upd.ppo_epochs < 1:  # no update to reuse it in
            return None
        device = rollout.response_ids.device
        return minibatches.plan_first_micro_batch(rollout.group, len(rollout), upd, device)

    def _log_iteration(self, stats: IterationStats, rollout, scores, tokens, ranks: CrossRank):
        """KL controller and monitor updates, then the tags, tables and histograms."""
        n_samples = int(ranks.sum(torch.tensor(float(len(rollout)), device=self.device)))
        self.kl_ctl.update(stats.kl, n_samples)
        report = self.monitor.update(stats.reward_raw, stats.gold, ranks.gather(scores.responses))
        stats = replace(stats, monitor=dict(report.signals))
        for message in report.warnings:
            self.warnings.append(message)
            rank_zero_warn(message)
        tags = {**stats.to_tags(), **compile_tags()}
        self.log_dict(tags, on_step=True, on_epoch=False, batch_size=len(rollout))
        m = self.monitor_cfg
        if self.logger is not None:
            if m.sample_every and self.iteration % m.sample_every == 0:
                rows = sample_rows(rollout, scores, tokens, m.sample_rows)
                log_text_table(self.loggers, "ppo/samples", rows, self.iteration)
            if m.histogram_every and self.iteration % m.histogram_every == 0:
                log_histograms(self.loggers, scores, tokens, rollout.response_mask, self.iteration)
        self.history.append(tags)
        self.iteration += 1

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
        if self.update_cfg.ptx_coef > 0 and getattr(self.trainer, "datamodule", None) is not None:
            self.trainer.datamodule.records("demonstration", "train")  # fail now, not at step 1

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
        if self.reference_spec is not None or self.model_spec.config is None:
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
        self.running = RunningMoments.from_state(ppo["running"])
        self._rng = rank_rng_state(ppo, self.global_rank, getattr(self._trainer, "world_size", 1))
        self._ptx_start, self._ptx = dict(ppo["ptx_position"]), None
        self.history, self.warnings = list(ppo["history"]), list(ppo["warnings"])
