"""Standalone driver of the data-parallel tests: fits tiny SFT / RM / PPO runs and saves results.

Lightning's `strategy="ddp"` on CPU re-launches this script (same argv) for every rank > 0, so
it cannot run inside pytest; `tests/ddp/conftest.py` runs it in a subprocess:

    python tests/ddp/_driver.py OUT DEVICES PRECISIONS SCENARIOS
    e.g.  python tests/ddp/_driver.py /tmp/x 2 32-true sft,rm,ppo_fixed,ppo_resume
    (critic-free: grpo_fixed, reinforce_pp_fixed — tests/ddp/test_ddp_groups.py)

Every scenario is fitted once per precision with `devices` CPU processes (gloo, one intra-op thread
each) and the same GLOBAL batch whatever the number of ranks (per-rank batch = global / devices).
Each rank writes `OUT/<scenario>_w<devices>_<precision>_rank<r>.pt`: the gradients of the first
optimizer step, the final parameters, the training rows it saw per step and, for PPO, the metric
history and the KL-controller / running-moment / monitor state. The tests compare the files.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402

from rlhf_lightning.data.datamodule import RLHFDataModule  # noqa: E402
from rlhf_lightning.data.sources import DataSource  # noqa: E402
from rlhf_lightning.models.loading import ModelSpec  # noqa: E402
from rlhf_lightning.modules.common import OptimConfig  # noqa: E402

GLOBAL_BATCH = 4  # SFT rows / RM prompts per optimizer step, over all ranks
PPO_GLOBAL_BATCH = 8  # prompts per PPO iteration, over all ranks
WORDS = "the movie was great good bad and acting plot boring film review".split()
CORPUS = [" ".join(WORDS), "a b c d e f g h i j k l m n o p", "0 1 2 3 4 5 6 7 8 9 ! , . ?"]
TOY = "rlhf_lightning.ppo.toy"


def tiny_llama(vocab_size: int) -> dict:
    """A ~50k-parameter Llama config (as in tests/conftest.py)."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }


def tokenizer():
    from rlhf_lightning.tasks.tokenizer import build_word_tokenizer

    return build_word_tokenizer(CORPUS)


def sentence(i: int, n: int) -> str:
    """A deterministic n-word sentence (varying lengths make token counts differ per rank)."""
    return " ".join(WORDS[(i * 5 + 3 * k) % len(WORDS)] for k in range(n))


class Recorder(pl.Callback):
    """Rows seen per step, gradients of the first optimizer step (after any module rescaling)."""

    def __init__(self, manual: bool):
        self.manual, self.rows, self.grads = manual, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if "prompt_text" in batch:
            self.rows.append(list(batch["prompt_text"]))
            return
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()  # [B, T]
        self.rows.append([tuple(row[keep].tolist()) for row, keep in zip(ids, mask)])

    def _grab(self, module):
        named = module.named_parameters()
        self.grads = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.manual and self.grads is None:  # PPO: the first (policy) step; critic grads too
            self._grab(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not self.manual and self.grads is None and trainer.global_step == 1:
            self._grab(module)  # automatic optimisation keeps .grad until the next step


def trainer(devices: int, precision: str, root: Path, **kw) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    args.update(kw)
    return pl.Trainer(**args)


def save(out: Path, name: str, tr: pl.Trainer, module, recorder: Recorder, **extra) -> None:
    result = {
        "rows": recorder.rows,
        "grads": recorder.grads,
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        **extra,
    }
    torch.save(result, out / f"{name}_rank{tr.global_rank}.pt")


def run_sft(out: Path, name: str, devices: int, precision: str) -> None:
    """3 optimizer steps; on 2 ranks with micro-batch 1 × accumulate 2 (global batch 4)."""
    from rlhf_lightning.modules.sft import SFTModule, SFTSampleConfig

    tok = tokenizer()
    records = [
        {"prompt": sentence(i, 2 + i % 3), "response": sentence(i + 1, 1 + i % 5)}
        for i in range(16)
    ]
    accumulate = 2 if devices > 1 else 1
    dm = RLHFDataModule(
        tok,
        demonstrations=DataSource(records=records, val_fraction=0.0),
        batch_size=GLOBAL_BATCH // devices // accumulate,
        max_length=64,
        seed=1,
    )
    module = SFTModule(
        ModelSpec(config=tiny_llama(len(tok))),
        optim=OptimConfig(lr=1e-2, total_steps=10),
        samples=SFTSampleConfig(every_n_steps=0),
        export_dir=str(out / f"{name}_export"),
    )
    rec = Recorder(manual=False)
    tr = trainer(
        devices, precision, out, max_steps=3, accumulate_grad_batches=accumulate, callbacks=[rec]
    )
    tr.fit(module, datamodule=dm)
    save(out, name, tr, module, rec)


def run_rm(out: Path, name: str, devices: int, precision: str) -> None:
    """3 optimizer steps on pairs and 3-way rankings (per-prompt loss mean)."""
    from rlhf_lightning.modules.reward import RewardExportConfig, RewardLogConfig, RewardModule

    tok = tokenizer()
    records = []
    for i in range(16):
        ranked = [sentence(i + k, 1 + (i + k) % 4) for k in range(2 + i % 2)]
        records.append({"prompt": sentence(i, 2 + i % 3), "responses": ranked})
    dm = RLHFDataModule(
        tok,
        preferences=DataSource(records=records, val_fraction=0.0),
        batch_size=GLOBAL_BATCH // devices,
        max_length=64,
        seed=2,
    )
    module = RewardModule(
        ModelSpec(config=tiny_llama(len(tok))),
        optim=OptimConfig(lr=1e-2, total_steps=10),
        logging=RewardLogConfig(histogram_every_n_steps=0, worst_pairs=0),
        export=RewardExportConfig(enabled=False),
    )
    rec = Recorder(manual=False)
    tr = trainer(devices, precision, out, max_steps=3, callbacks=[rec])
    tr.fit(module, datamodule=dm)
    save(out, name, tr, module, rec)


def fixed_generate(model, query_ids, query_mask, *, eos_token_id, pad_token_id, samples=1, **kw):
    """Stand-in for `generation.generate`: a response that depends only on the prompt's tokens, so a
    PPO iteration is a deterministic function of its prompts (no sampling noise). With `samples`
    = k > 1 the rows of a prompt come as adjacent runs of k; the j-th of them (j = position in
    the run of equal prompts mod k) gets its own response."""
    from rlhf_lightning.models.masks import response_mask
    from rlhf_lightning.ppo.generation import Samples

    eos = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    good = [t for t in range(5, model.config.vocab_size) if t not in (eos, pad_token_id)]
    rows, previous, run = [], None, 0
    for ids, mask in zip(query_ids.tolist(), query_mask.tolist()):
        prompt = [i for i, m in zip(ids, mask) if m]  # without the batch's left padding
        run = run + 1 if prompt == previous else 0
        previous = prompt
        key = sum(i * (k + 1) for k, i in enumerate(prompt)) + 11 * (run % samples)
        ends = key % 3 > 0  # else: no EOS within max_new_tokens (8), as a real sampler would
        row = [good[(key * 7 + 13 * t) % len(good)] for t in range(1 + key % 6 if ends else 8)]
        rows.append(row + [eos] if ends else row)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])  # [B, R]
    return Samples(ids, response_mask(ids, eos))


def ppo_module(tok, **kw):
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.ppo.config import (
        GenerationConfig,
        KLConfig,
        MonitorConfig,
        RewardConfig,
        UpdateConfig,
    )

    args = dict(
        model_spec=ModelSpec(config=tiny_llama(len(tok))),
        reward=RewardConfig(
            function=f"{TOY}:word_frequency",
            function_kwargs={"word": "good"},
            gold=f"{TOY}:response_length",
            normalize="running",
            clip=None,
        ),
        generation=GenerationConfig(max_new_tokens=8, sampler_logprobs=False),
        kl=KLConfig(coef=0.05, estimator="k3", target=2.8, horizon=50),  # KL/target − 1 unclipped
        # one whole-batch minibatch per epoch (its shuffle cannot matter); no ratio / value clip,
        # so that float32 rounding cannot flip a token between branches (tests/ppo covers them);
        # PPO-ptx on (every rank draws the same demonstration batch)
        update=UpdateConfig(
            ppo_epochs=2,
            num_minibatches=1,
            micro_batch_size=3,
            clip_eps=10.0,
            value_clip=None,
            ptx_coef=0.5,
            ptx_batch_size=3,
        ),
        optim=OptimConfig(lr=1e-2, total_steps=32),
        monitor=MonitorConfig(window=3, sample_every=0, histogram_every=0),
    )
    args.update(kw)
    return PPOModule(**args)


def prompt_data(tok, n: int, devices: int) -> RLHFDataModule:
    prompts = [{"prompt": sentence(i, 1 + i % 4)} for i in range(n)]
    demos = [{"prompt": sentence(i, 2), "response": sentence(i, 1 + i % 3)} for i in range(7)]
    return RLHFDataModule(
        tok,
        prompts=DataSource(records=prompts, val_fraction=0.0),
        demonstrations=DataSource(records=demos, val_fraction=0.0),  # PPO-ptx
        batch_size=PPO_GLOBAL_BATCH // devices,
        seed=3,
    )


def ppo_extra(module) -> dict:
    return {
        "history": module.history,
        "kl_coef": module.kl_ctl.value,
        "running": module.running.state_dict(),
        "monitor": module.monitor.state_dict(),
        "rng": torch.get_rng_state(),
    }


def run_ppo_fixed(out: Path, name: str, devices: int, precision: str) -> None:
    """4 PPO iterations on fixed responses: 2 epochs × one whole-batch minibatch each."""
    import rlhf_lightning.ppo.generation as generation

    tok = tokenizer()
    module = ppo_module(tok, export_dir=str(out / f"{name}_export"))
    rec = Recorder(manual=True)
    tr = trainer(devices, precision, out, max_epochs=1, callbacks=[rec])
    sampler, generation.generate = generation.generate, fixed_generate
    try:
        tr.fit(module, datamodule=prompt_data(tok, 4 * PPO_GLOBAL_BATCH, devices))
    finally:
        generation.generate = sampler
    save(out, name, tr, module, rec, **ppo_extra(module))


def run_ppo_resume(out: Path, name: str, devices: int, precision: str) -> None:
    """Sampled PPO, 2 epochs × 3 iterations straight (checkpoint after iteration 2, mid-epoch),
    then a second fit resumed from that checkpoint; both save their results."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rlhf_lightning.ppo.config import GenerationConfig, UpdateConfig

    tok = tokenizer()
    ckpt_dir = out / f"{name}_ckpt"
    for part in ("straight", "resumed"):
        pl.seed_everything(0)
        module = ppo_module(
            tok,
            generation=GenerationConfig(max_new_tokens=8),
            update=UpdateConfig(
                ppo_epochs=1, num_minibatches=2, micro_batch_size=3, ptx_coef=0.5, ptx_batch_size=3
            ),
            export_dir=str(out / f"{name}_export"),
        )
        rec = Recorder(manual=True)
        callbacks: list = [rec]
        ckpt = None
        if part == "straight":  # 2 optimizers × 2 minibatches: step 8 = after iteration 2
            callbacks.append(ModelCheckpoint(ckpt_dir, every_n_train_steps=8, save_top_k=-1))
        else:
            ckpt = str(next(ckpt_dir.glob("*step=8.ckpt")))
        tr = trainer(
            devices,
            precision,
            out / part,
            max_epochs=2,
            callbacks=callbacks,
            enable_checkpointing=part == "straight",
        )
        dm = prompt_data(tok, 3 * PPO_GLOBAL_BATCH, devices)
        tr.fit(module, datamodule=dm, ckpt_path=ckpt)
        prompts = [r.prompt[-1]["content"] for r in dm.records("prompt")]
        save(out, f"{name}_{part}", tr, module, rec, prompts=prompts, **ppo_extra(module))


def run_critic_free_fixed(out: Path, name: str, devices: int, precision: str, advantage: str):
    """2 critic-free iterations on fixed responses, k = 2 samples per prompt (4 prompts per rank
    vs 8 in one process): 2 epochs × one whole-batch minibatch; each rollout's groups saved."""
    import rlhf_lightning.ppo.generation as generation
    from rlhf_lightning.ppo.config import GenerationConfig, RewardConfig, UpdateConfig

    tok = tokenizer()
    module = ppo_module(
        tok,
        # the response length (1–8 words) differs within most groups: non-zero advantages
        reward=RewardConfig(
            function=f"{TOY}:response_length", gold=f"{TOY}:word_frequency", normalize="running"
        ),
        generation=GenerationConfig(max_new_tokens=8, sampler_logprobs=False, samples_per_prompt=2),
        update=UpdateConfig(
            advantage=advantage,
            loss_aggregation="seq_mean_token_mean" if advantage == "reinforce_pp" else "token_mean",
            ppo_epochs=2,
            num_minibatches=1,
            micro_batch_size=3,  # cuts through groups
            clip_eps=10.0,
            ptx_coef=0.5,
            ptx_batch_size=3,
        ),
        export_dir=str(out / f"{name}_export"),
    )
    rec, rollouts = Recorder(manual=True), []
    sampler, rollout = generation.generate, generation.rollout

    def recording_rollout(*args, **kw):
        result = rollout(*args, **kw)
        rollouts.append({"group": result.group.tolist(), "prompts": list(result.prompts)})
        return result

    tr = trainer(devices, precision, out, max_epochs=1, callbacks=[rec])
    generation.generate = functools.partial(fixed_generate, samples=2)
    generation.rollout = recording_rollout
    try:
        tr.fit(module, datamodule=prompt_data(tok, 2 * PPO_GLOBAL_BATCH, devices))
    finally:
        generation.generate, generation.rollout = sampler, rollout
    save(out, name, tr, module, rec, rollouts=rollouts, **ppo_extra(module))


SCENARIOS = {
    "sft": run_sft,
    "rm": run_rm,
    "ppo_fixed": run_ppo_fixed,
    "ppo_resume": run_ppo_resume,
    "grpo_fixed": lambda *args: run_critic_free_fixed(*args, advantage="grpo"),
    "reinforce_pp_fixed": lambda *args: run_critic_free_fixed(*args, advantage="reinforce_pp"),
}


def main(argv: list[str]) -> None:
    out, devices, precisions, scenarios = Path(argv[0]), int(argv[1]), argv[2], argv[3]
    torch.set_num_threads(1)  # tiny models: one intra-op thread per rank on a 2-core machine
    out.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios.split(","):
        for precision in precisions.split(","):
            pl.seed_everything(0)
            name = f"{scenario}_w{devices}_{precision}"
            SCENARIOS[scenario](out, name, devices, precision)


if __name__ == "__main__":
    main(sys.argv[1:])
