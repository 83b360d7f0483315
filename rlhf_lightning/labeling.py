"""`rlhf label`: collect ranked comparisons from a policy (InstructGPT's data-collection step).

For every prompt of a data source, sample K responses from a policy export (batched,
seeded generation), score each (prompt, response) with a *labeler* — any Python callable
named by import path `"package.module:function"` (`rlhf_lightning.scorers`, the convention PPO's
reward and gold functions use too) — and write one JSONL row per prompt:
`{"prompt", "responses" (best → worst), "scores" (same order)}`, the ranking layout the
datamodule reads as K-wise preference records (Ouyang et al. 2022, §3.4: labelers rank
K = 4..9 outputs per prompt).

Labelers score `(prompt: str, response: str) -> float` (higher = better), or take lists
`(prompts, responses) -> list[float]`; `prompt` is the last user message for single-turn
prompts, else the plain-template transcript. A class is instantiated with `labeler_args`
(a function gets them bound); an object with a `score_batch(prompts, responses)` method is
called once per batch. Built in: `RewardModelLabeler` (an RM export), `LookupLabeler`
(scores typed by people into a JSONL file) and `length_score` (a toy rule for tests).

Empty and duplicate responses and responses whose score ties an earlier one are dropped (a
ranking cannot express ties), and prompts left with fewer than 2 responses are skipped; both are
counted in the printed summary (`responses_dropped`, `all_tied`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_lightning.data.records import Messages, RecordError
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.data.templates import render_plain, render_prompt, response_separator
from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.models.masks import response_mask, response_texts
from rlhf_lightning.models.reward_export import load_reward_model, score_texts
from rlhf_lightning.scorers import BatchScorer, load_scorer, split_import_path


@dataclass
class LabelConfig:
    """Settings of `rlhf label` (each one is a key of the YAML config).

    Args:
        policy: The policy to sample from, usually the SFT export (`name_or_path`).
        prompts: Prompt source; any record layout works (its prompt part is used). All of its
            prompts are labelled (train split, then a `val_path`/`val_split` split if set).
        out: Rankings JSONL to write (parent folders are created).
        labeler: Import path `"module:attr"` of the scorer `(prompt, response) -> float`
            (or `(prompts, responses) -> list[float]`, or a class; see `rlhf_lightning.scorers`).
        labeler_args: Keyword arguments: a class is instantiated with them, a function gets
            them bound.
        tokenizer: Tokenizer of the policy; None = `policy.name_or_path`.
        tokenizer_gguf_file: GGUF file inside `tokenizer` to read the tokenizer from.
        num_responses: K, the responses sampled per prompt (≥ 2).
        max_new_tokens: Cap on generated tokens per response.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling mass (1.0 = off).
        top_k: Top-k sampling (0 = off).
        batch_size: Prompts per generation batch (each yields K sequences).
        max_prompt_length: Prompts longer than this are left-truncated (tokens).
        seed: Seed of the sampling; the same seed and config give the same file.
        limit: Label at most this many prompts (None = all).
        device: Torch device for generation ("cpu", "cuda", ...).
    """

    policy: ModelSpec
    prompts: DataSource
    out: str
    labeler: str
    labeler_args: dict | None = None
    tokenizer: str | None = None
    tokenizer_gguf_file: str | None = None
    num_responses: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8
    max_prompt_length: int = 256
    seed: int = 0
    limit: int | None = None
    device: str = "cpu"

    def __post_init__(self):
        if self.num_responses < 2:
            raise ValueError(f"num_responses: must be >= 2 to rank, got {self.num_responses}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        split_import_path(self.labeler, "labeler")

    def sampling(self) -> SamplingConfig:
        """The sampling settings of `sample_responses` (the keys of the same names)."""
        names = [f.name for f in dataclasses.fields(SamplingConfig)]
        return SamplingConfig(**{name: getattr(self, name) for name in names})


@dataclass
class SamplingConfig:
    """How `sample_responses` samples K responses per prompt (plain `generate` sampling)."""

    num_responses: int
    """K: responses sampled per prompt."""
    max_new_tokens: int
    """Cap on generated tokens per response."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    device: str = "cpu"
    """Torch device of the model and the batches."""


# ---------------------------------------------------------------------- labelers
def length_score(prompt: str, response: str) -> float:
    """Toy rule: the number of words of the response (longer = better)."""
    return float(len(response.split()))


class RewardModelLabeler:
    """Scores with a reward-model export (`RewardModule`'s export folder)."""

    def __init__(
        self, export_dir: str, batch_size: int = 16, max_length: int = 1024, device: str = "cpu"
    ):
        self.model, self.tokenizer, _ = load_reward_model(export_dir, device=device)
        self.batch_size, self.max_length = batch_size, max_length

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        tok = self.tokenizer
        sep, eos = response_separator(tok), tok.eos_token or ""
        texts = [
            render_prompt(tok, [{"role": "user", "content": p}]) + sep + r + eos
            for p, r in zip(prompts, responses)
        ]
        return score_texts(
            self.model, tok, texts, batch_size=self.batch_size, max_length=self.max_length
        )

    def __call__(self, prompt: str, response: str) -> float:
        return self.score_batch([prompt], [response])[0]


class LookupLabeler:
    """Scores typed in by people: a JSONL file of `{"prompt", "response", "score"}` rows.

    Pairs without a score are written to `<path>.todo.jsonl` (score null) for people to fill
    in and merge into `path`; labelling then stops with a one-line error (`RecordError`).
    """

    def __init__(self, path: str):
        self.path = Path(path)
        self.table: dict[tuple[str, str], float] = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                if line.strip():
                    self._add(json_row(line, f"{self.path}:{n}"), f"{self.path}:{n}")

    def _add(self, row: dict, where: str) -> None:
        for key in ("prompt", "response", "score"):
            if row.get(key) is None:
                raise RecordError(f"{where}: field '{key}' is missing")
        score = row["score"]
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise RecordError(f"{where}: field 'score' must be a number (got {score!r})")
        self.table[(row["prompt"], row["response"])] = float(score)

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        missing = [(p, r) for p, r in zip(prompts, responses) if (p, r) not in self.table]
        if missing:
            todo = self.path.with_name(self.path.name + ".todo.jsonl")
            with todo.open("a") as fh:
                for p, r in missing:
                    fh.write(json.dumps({"prompt": p, "response": r, "score": None}) + "\n")
            raise RecordError(
                f"{self.path}: {len(missing)} responses have no score; listed in {todo}"
            )
        return [self.table[(p, r)] for p, r in zip(prompts, responses)]


def json_row(line: str, where: str) -> dict:
    """One JSONL line as a dict, or a one-line `RecordError` naming `where`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object (got {type(row).__name__})")
    return row


# ---------------------------------------------------------------------- sampling
def prompt_for_labeler(messages: Messages) -> str:
    """Single-turn prompts: the user's text; multi-turn: the plain-template transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return render_plain(messages)


@torch.no_grad()
def sample_responses(
    model, tokenizer, batch: dict, cfg: SamplingConfig, seed: int
) -> list[list[str]]:
    """K sampled responses for each prompt of a left-padded prompt batch (texts without EOS)."""
    torch.manual_seed(seed)
    ids = batch["input_ids"].to(cfg.device)  # [B, P]
    mask = batch["attention_mask"].to(cfg.device)  # [B, P]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.num_responses,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # [B*K, P + L]
    generated = out[:, ids.shape[1] :]  # [B*K, L]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    texts = response_texts(tokenizer, generated, response_mask(generated, eos), eos)
    k = cfg.num_responses
    return [texts[i * k : (i + 1) * k] for i in range(ids.shape[0])]


def rank_row(messages: Messages, responses: list[str], scores: list[float]) -> dict | None:
    """JSONL row with responses best → worst; None when fewer than 2 distinct scores remain.

    Empty responses are dropped (records need text); duplicate texts keep their first score;
    responses tying with an earlier response's score are dropped (a ranking cannot express
    ties, an arbitrary order would be noise).
    """
    by_text: dict[str, float] = {}
    for response, score in zip(responses, scores):
        if response.strip():
            by_text.setdefault(response, float(score))
    by_score: dict[float, str] = {}
    for response, score in by_text.items():
        by_score.setdefault(score, response)
    order = sorted(((r, s) for s, r in by_score.items()), key=lambda rs: -rs[1])
    if len(order) < 2:
        return None
    prompt = (
        messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages
    )
    return {"prompt": prompt, "responses": [r for r, _ in order], "scores": [s for _, s in order]}


@dataclass
class _Session:
    """Everything `label` needs once the config is checked: tokenizer, model, scorer, batches."""

    tokenizer: object
    model: torch.nn.Module
    scorer: BatchScorer
    loaders: list
    total: int


def _prepare(cfg: LabelConfig) -> _Session:
    """Load prompts, tokenizer, policy and labeler (errors here are config errors)."""
    from rlhf_lightning.data.datamodule import RLHFDataModule
    from rlhf_lightning.models.loading import load_causal_lm

    source = cfg.prompts
    if not (source.val_path or source.val_split):
        source = dataclasses.replace(source, val_fraction=0.0)
    tok_name = cfg.tokenizer or cfg.policy.name_or_path
    if tok_name is None:
        raise ValueError("tokenizer: required when policy.name_or_path is unset")
    gguf = cfg.tokenizer_gguf_file or (cfg.policy.gguf_file if cfg.tokenizer is None else None)
    dm = RLHFDataModule(
        tokenizer=tok_name,
        tokenizer_gguf_file=gguf,
        prompts=source,
        max_prompt_length=cfg.max_prompt_length,
        max_length=cfg.max_prompt_length + cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    tokenizer = dm.tokenizer
    model = load_causal_lm(
        cfg.policy, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
    )
    scorer = load_scorer(cfg.labeler, "labeler", cfg.labeler_args)
    loaders = [dm.dataloader("prompt", "train", shuffle=False)]
    if dm.records("prompt", "val"):
        loaders.append(dm.dataloader("prompt", "val", shuffle=False))
    total = sum(len(loader.dataset) for loader in loaders)
    if cfg.limit is not None:
        total = min(total, cfg.limit)
    return _Session(tokenizer, model.to(cfg.device).eval(), scorer, loaders, total)


def _write_batch(fh, session: _Session, cfg: LabelConfig, batch: dict, summary: dict) -> int:
    """Sample, score and write one prompt batch (at most the prompts still wanted)."""
    room = session.total - summary["prompts"]
    seed = cfg.seed + summary["prompts"]
    responses = sample_responses(session.model, session.tokenizer, batch, cfg.sampling(), seed)
    messages = batch["prompt_messages"][:room]
    flat_p = [prompt_for_labeler(m) for m, rs in zip(messages, responses) for _ in rs]
    flat_r = [r for rs in responses[: len(messages)] for r in rs]
    scores = session.scorer(flat_p, flat_r)
    k = cfg.num_responses
    for i, msgs in enumerate(messages):
        rs, ss = responses[i], scores[i * k : (i + 1) * k]
        row = rank_row(msgs, rs, ss)
        if row is None:
            summary["all_tied"] += 1
        else:
            summary["responses_dropped"] += len(rs) - len(row["responses"])
            fh.write(json.dumps(row) + "\n")
            summary["written"] += 1
    summary["prompts"] += len(messages)
    return len(messages)


def label(cfg: LabelConfig, run_state=None) -> dict:
    """Run the collection; returns a summary dict (also printed by `main`).

    `run_state` (from the `rlhf` CLI) gets `stepping = True` once loading is done and
    sampling starts: errors before that are reported as config errors.
    """
    from tqdm.auto import tqdm

    session = _prepare(cfg)
    if run_state is not None:
        run_state.stepping = True
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"prompts": 0, "written": 0, "all_tied": 0, "responses_dropped": 0, "out": str(out)}
    with out.open("w") as fh, tqdm(total=session.total, desc="label", unit="prompt") as bar:
        for batch in (b for loader in session.loaders for b in loader):
            if summary["prompts"] >= session.total:
                break
            bar.update(_write_batch(fh, session, cfg, batch, summary))
    return summary


def build_parser(exit_on_error: bool = True):
    """jsonargparse parser: `--config file.yaml` plus one flag per `LabelConfig` key.

    With `exit_on_error=False` parse errors raise `jsonargparse.ArgumentError` (the `rlhf` CLI
    reports them in one line) instead of printing the usage and exiting.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="rlhf label", description=__doc__.split("\n\n")[0], exit_on_error=exit_on_error
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the keys below")
    parser.add_class_arguments(LabelConfig)
    return parser


def main(argv: list[str] | None = None, run_state=None) -> dict:
    """Entry of `rlhf label ...`; `run_state` is the `rlhf` CLI's `RunState` (when run from it)."""
    parser = build_parser(exit_on_error=run_state is None or not run_state.one_line)
    cfg = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if run_state is not None:
        run_state.config = cfg
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in vars(init).items() if k != "config"}
    summary = label(LabelConfig(**kwargs), run_state)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
