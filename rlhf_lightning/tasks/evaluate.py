"""Gold evaluation of a policy export: sample responses to held-out prompts, score them.

The quickstart judges each stage's policy the same way: the same held-out prompts, the same
sampling settings and seed, the same gold labeler (`rlhf_lightning.tasks.sentiment:gold_score`,
the simulated human). Besides the mean gold score it reports the degenerate-output signals
(distinct-2 and repeated-bigram fraction), so a reward-hacked policy is visible in the
summary and not only in TensorBoard.

`python -m rlhf_lightning.tasks.evaluate --policy DIR --prompts FILE` prints the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.labeling import SamplingConfig, prompt_for_labeler, sample_responses
from rlhf_lightning.models.loading import ModelSpec, load_causal_lm
from rlhf_lightning.ppo.monitor import distinct_n
from rlhf_lightning.scorers import load_scorer


def evaluate_policy(
    policy_dir: str,
    prompts_path: str,
    *,
    labeler: str = "rlhf_lightning.tasks.sentiment:gold_score",
    num_prompts: int = 128,
    samples_per_prompt: int = 2,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    max_prompt_length: int = 48,
    batch_size: int = 64,
    seed: int = 1234,
) -> dict:
    """Mean gold score (and diversity signals) of `samples_per_prompt` samples per prompt.

    Prompts are the first `num_prompts` records of `prompts_path` (any record layout; its prompt
    part is used). Sampling is plain ancestral sampling at `temperature` with a fixed seed.
    """
    dm = RLHFDataModule(
        tokenizer=policy_dir,
        prompts=DataSource(path=prompts_path, val_fraction=0.0, limit=num_prompts),
        max_prompt_length=max_prompt_length,
        max_length=max_prompt_length + max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    tokenizer = dm.tokenizer
    model = load_causal_lm(ModelSpec(name_or_path=policy_dir)).eval()
    sampling = SamplingConfig(
        num_responses=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature
    )
    scorer = load_scorer(labeler, "labeler")
    prompts, responses = [], []
    for i, batch in enumerate(dm.dataloader("prompt", "train", shuffle=False)):
        groups = sample_responses(model, tokenizer, batch, sampling, seed + i)
        for messages, group in zip(batch["prompt_messages"], groups):
            prompts += [prompt_for_labeler(messages)] * len(group)
            responses += group
    scores = scorer(prompts, responses)
    words = [r.split() for r in responses]
    return {
        "gold": statistics.fmean(scores),
        "gold_std": statistics.pstdev(scores),
        "distinct_2": distinct_n(words, 2),
        "mean_words": statistics.fmean(len(w) for w in words),
        "samples": len(responses),
        "example": responses[0] if responses else "",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="save_pretrained folder of a policy")
    parser.add_argument("--prompts", required=True, help="held-out prompts (JSON/JSONL)")
    parser.add_argument("--labeler", default="rlhf_lightning.tasks.sentiment:gold_score")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = evaluate_policy(
        args.policy,
        args.prompts,
        labeler=args.labeler,
        num_prompts=args.num_prompts,
        seed=args.seed,
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
