"""TRL 1.12 `PPOTrainer` on the fixed PPO workload of issue #5 (the baseline of `bench_ppo_step`).

Run it with the separate TRL interpreter (TRL 1.13 removed PPO, so it never enters the project
venv; see benchmarks/TRL.md):

    HF_HUB_OFFLINE=1 .venv-trl/bin/python benchmarks/trl_ppo_baseline.py --iterations 3

The first half of this file defines the workload and needs only torch, transformers and
tokenizers, so `bench_ppo_step.py` imports it to build the identical setup for PPOModule:

- policy, reference, reward and value models: SmolLM2-135M-shaped Llama (hidden 576, 30 layers,
  9 heads / 3 KV heads, MLP 1536, vocabulary 49152, tied embeddings), random init, float32;
- a word-level tokenizer with exactly 49152 entries (no download);
- batch 8, prompts of 64–128 random tokens left-padded to 128, exactly 32 sampled tokens
  (no stop token), 1 PPO epoch over 2 minibatches of 4, temperature 1, k1 KL with β = 0.05.

TRL's own timing is read from a trainer callback (one `on_step_end` per PPO iteration); the
rollout / score / log-prob split comes from timing wrappers around the module-level helpers that
`PPOTrainer.train` calls (`batch_generation`, `get_reward`, `forward`). The result is written as
JSON (default `benchmarks/results/trl_ppo.json`). References: TRL 1.12
`trl/experimental/ppo/ppo_trainer.py`; Huang et al. 2024, "The N+ Implementation Details of
RLHF with PPO".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 49152
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass
class Workload:
    """The fixed PPO workload (issue #5 item 9); `layers`/`hidden` shrink it for smoke tests."""

    batch_size: int = 8
    prompt_width: int = 128
    min_prompt_tokens: int = 64
    new_tokens: int = 32
    ppo_epochs: int = 1
    num_minibatches: int = 2
    iterations: int = 3
    threads: int = 2
    seed: int = 0
    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    lr: float = 3e-6
    kl_coef: float = 0.05
    temperature: float = 1.0

    @classmethod
    def from_cli(cls, iterations: int, threads: int, layers: int, hidden: int) -> Workload:
        """The workload of the command-line flags; a non-default width shrinks the MLP and heads."""
        work = cls(iterations=iterations, threads=threads, layers=layers, hidden=hidden)
        if hidden != 576:
            work.intermediate, work.heads, work.kv_heads = 2 * hidden, 4, 2
        return work


def model_config(work: Workload) -> dict:
    """Llama config dict (`model_type` key, as `ModelSpec(config=...)` takes it)."""
    return {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": work.hidden,
        "intermediate_size": work.intermediate,
        "num_hidden_layers": work.layers,
        "num_attention_heads": work.heads,
        "num_key_value_heads": work.kv_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }


def llama_config(work: Workload, **extra):
    """The workload's `transformers.LlamaConfig` (`extra`, e.g. num_labels=1, passed through)."""
    from transformers import LlamaConfig

    cfg = model_config(work)
    cfg.pop("model_type")
    return LlamaConfig(**cfg, **extra)


def build_tokenizer():
    """Word-level fast tokenizer with exactly `VOCAB` entries; left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), VOCAB)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    assert len(tok) == VOCAB, len(tok)
    return tok


def build_prompts(work: Workload, n: int) -> list[list[int]]:
    """`n` prompts of random length in [min_prompt_tokens, prompt_width], ids ≥ 4 (no specials)."""
    gen = torch.Generator().manual_seed(work.seed)
    lengths = torch.randint(work.min_prompt_tokens, work.prompt_width + 1, (n,), generator=gen)
    lengths[0] = work.prompt_width  # the first batch is exactly prompt_width wide
    return [torch.randint(len(SPECIALS), VOCAB, (int(k),), generator=gen).tolist() for k in lengths]


def left_pad(prompts: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to `width`: (input_ids Long[B, width], attention_mask Long[B, width])."""
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)  # [B, W]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, W]
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the machine type where that is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def warn_if_loaded(what: str) -> float:
    """The 1-minute load average; prints a warning first when it is above 1 (2-core machine)."""
    load = os.getloadavg()[0]
    if load > 1.0:
        print(
            f"warning: load average {load:.2f} before the run — {what} are load-sensitive on a "
            "2-core machine; quote numbers from an idle machine",
            flush=True,
        )
    return load


def machine_info() -> dict:
    """CPU model, core count, torch threads and library versions."""
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0],
    }


OS_KEYS = ("iteration_sys_s", "minor_faults")
"""Per-iteration kernel-side costs: system CPU seconds and minor page faults (`os_counters`)."""


def os_counters() -> dict:
    """This process's system CPU seconds and minor page faults so far (getrusage): a fresh page
    costs a fault plus the kernel zeroing it, which is where the allocator settings show."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"iteration_sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt}


def os_delta(before: dict) -> dict:
    """`os_counters()` now minus `before`."""
    return {k: v - before[k] for k, v in os_counters().items()}


def summarise(per_iter: list[dict], work: Workload) -> dict:
    """Medians over the timed iterations (all but the first, the warm-up)."""
    timed = per_iter[1:] or per_iter
    keys = ("iteration_s", "iteration_cpu_s", "rollout_s", "score_s", "logprob_s", "update_s")
    keys += tuple(k for k in OS_KEYS if all(k in it for it in timed))
    out = {k: statistics.median(it[k] for it in timed) for k in keys}
    tokens = work.batch_size * work.new_tokens
    out["tokens_per_s"] = tokens / out["iteration_s"]
    out["gen_tokens_per_s"] = tokens / out["rollout_s"]
    out["timed_iterations"] = len(timed)
    return out


# ---------------------------------------------------------------- TRL side (needs trl==1.12)
class _PhaseTimer:
    """Accumulates seconds per phase by wrapping module-level functions of `ppo_trainer`."""

    def __init__(self, ppo_trainer_module, reward_model) -> None:
        self.acc = {"rollout_s": 0.0, "score_s": 0.0, "logprob_s": 0.0}
        mod = ppo_trainer_module
        gen, reward, fwd = mod.batch_generation, mod.get_reward, mod.forward

        def timed_generation(*args, **kwargs):
            return self._time("rollout_s", gen, *args, **kwargs)

        def timed_reward(model, *args, **kwargs):
            phase = "score_s" if model is reward_model else "logprob_s"  # else: value model
            return self._time(phase, reward, model, *args, **kwargs)

        def timed_forward(*args, **kwargs):
            if torch.is_grad_enabled():  # the update's forward: counted in update_s
                return fwd(*args, **kwargs)
            return self._time("logprob_s", fwd, *args, **kwargs)  # the reference forward

        mod.batch_generation, mod.get_reward, mod.forward = (
            timed_generation,
            timed_reward,
            timed_forward,
        )

    def _time(self, phase, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.acc[phase] += time.perf_counter() - t0

    def take(self) -> dict:
        out, self.acc = self.acc, dict.fromkeys(self.acc, 0.0)
        return out


def build_trl_models(work: Workload) -> dict:
    """Random-init policy, reference (a copy of the policy), value and reward models."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(work.seed)
    models = {}
    for name in ("policy", "ref", "value", "reward"):
        if name in ("policy", "ref"):
            models[name] = AutoModelForCausalLM.from_config(llama_config(work))
        else:
            models[name] = AutoModelForSequenceClassification.from_config(
                llama_config(work, num_labels=1)
            )
    models["ref"].load_state_dict(models["policy"].state_dict())
    return models


def ppo_config(work: Workload, out_dir: str):
    """TRL's `PPOConfig` for the workload: float32 on CPU, no logging, saving or sampling."""
    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=work.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=work.num_minibatches,
        num_ppo_epochs=work.ppo_epochs,
        local_rollout_forward_batch_size=work.batch_size,
        total_episodes=work.batch_size * work.iterations,
        response_length=work.new_tokens,
        stop_token=None,
        temperature=work.temperature,
        kl_coef=work.kl_coef,
        kl_estimator="k1",
        learning_rate=work.lr,
        num_sample_generations=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=work.seed,
        dataloader_num_workers=0,
    )


def step_clock_callback(phases: _PhaseTimer, per_iter: list[dict]):
    """A trainer callback appending each PPO iteration's wall/CPU time and phase split."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_args, **_kwargs):
            self.last, self.last_cpu = time.perf_counter(), time.process_time()
            self.last_os = os_counters()
            phases.take()

        def on_step_end(self, *_args, **_kwargs):
            now = time.perf_counter()
            split = phases.take()
            total = now - self.last
            split["update_s"] = total - sum(split.values())
            cpu = time.process_time()
            row = {"iteration_s": total, "iteration_cpu_s": cpu - self.last_cpu, **split}
            per_iter.append({**row, **os_delta(self.last_os)})
            print(f"[trl] iteration {len(per_iter)}: {per_iter[-1]}", flush=True)
            self.last, self.last_cpu, self.last_os = now, cpu, os_counters()

    return StepClock()


def run_trl(work: Workload) -> dict:
    """Train TRL's PPOTrainer for `work.iterations` iterations; per-iteration timings."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    tok = build_tokenizer()
    models = build_trl_models(work)
    prompts = build_prompts(work, work.batch_size * work.iterations)
    data = Dataset.from_dict({"input_ids": prompts})
    collator = DataCollatorWithPadding(tok, padding="max_length", max_length=work.prompt_width)
    out_dir = tempfile.mkdtemp(prefix="trl_ppo_")
    trainer = PPOTrainer(
        args=ppo_config(work, out_dir),
        processing_class=tok,
        model=models["policy"],
        ref_model=models["ref"],
        reward_model=models["reward"],
        value_model=models["value"],
        train_dataset=data,
        eval_dataset=data,
        data_collator=collator,
    )
    phases = _PhaseTimer(trl_ppo, trainer.reward_model)
    per_iter: list[dict] = []
    trainer.add_callback(step_clock_callback(phases, per_iter))
    trainer.train()
    return {"per_iteration": per_iter, **summarise(per_iter, work)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations (1st = warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--layers", type=int, default=30, help="smaller only for smoke tests")
    parser.add_argument("--hidden", type=int, default=576, help="smaller only for smoke tests")
    parser.add_argument("--out", type=Path, default=RESULTS / "trl_ppo.json", help="JSON output")
    ns = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Workload.from_cli(ns.iterations, ns.threads, ns.layers, ns.hidden)
    torch.set_num_threads(work.threads)
    import trl

    machine = machine_info()
    result = {"impl": "trl", "trl": trl.__version__, "workload": asdict(work), "machine": machine}
    result.update(run_trl(work))
    result["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_iteration"}, indent=2))
    return result


if __name__ == "__main__":
    main()
