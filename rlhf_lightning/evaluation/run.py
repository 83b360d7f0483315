"""`rlhf evaluate --config X.yaml`: sample every policy on the same held-out prompts, score them
with a proxy scorer and a gold judge, and write the report.

Flow: check the config (`config.check_config`), read the prompts through the shared
`RLHFDataModule`, load the two judges and the reference policy, then for every policy in turn
sample (a progress bar over prompts), score and measure the sequence KL to the reference on its
own samples (`sampling`); best-of-N policies draw samples_per_prompt × max(N) candidates from their
base, keep the proxy's best for each N (`best_of_n`) and score only the kept ones with the gold
judge. `metrics` turns the scores into win rates with bootstrap intervals, `report` writes
report.md, report.json, TensorBoard and the gold-vs-KL plot. On CPU, the float32 linear layers
run on oneDNN where `RLHF_CPU_MATMUL` says so, as in training (`kernels.onednn_linear`).

Errors while the config is checked and anything is loaded (prompts, judges, models — also a
policy loaded later) are config errors (`rlhf: error: ... (key)`, exit 2); `run_state.stepping` is
True only while sampling and scoring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlhf_lightning.evaluation import best_of_n, report
from rlhf_lightning.evaluation.config import EvaluateConfig, PolicyConfig, check_config
from rlhf_lightning.evaluation.sampling import SampleBatch, generate_batch, sequence_logratio
from rlhf_lightning.evaluation.scoring import Judge, load_judge
from rlhf_lightning.kernels import onednn_linear
from rlhf_lightning.models.loading import ModelSpec


@dataclass
class PolicySamples:
    """Everything measured on one policy's samples. P prompts × S samples, prompt-major."""

    name: str
    """Policy name; best-of-N rows are `<name>` with `n` set."""
    proxy: list[float] = field(default_factory=list)
    """P·S proxy scores."""
    gold: list[float] = field(default_factory=list)
    """P·S gold scores."""
    logratio: list[float] = field(default_factory=list)
    """P·S Σ_t log π(y_t) − log π_ref(y_t) (best-of-N: of the base policy)."""
    texts: list[str] = field(default_factory=list)
    """P·S responses."""
    lengths: list[int] = field(default_factory=list)
    """P·S response lengths in tokens (EOS included)."""
    ends: list[bool] = field(default_factory=list)
    """P·S EOS flags."""
    n: int | None = None
    """N of a best-of-N row (None for a model policy)."""
    base: str | None = None
    """Base policy of a best-of-N row."""

    def add(self, samples: SampleBatch, proxy, gold, logratio) -> None:
        self.proxy += [float(x) for x in proxy]
        self.gold += [float(x) for x in gold]
        self.logratio += [float(x) for x in logratio]
        self.texts += samples.texts
        self.lengths += samples.lengths
        self.ends += samples.ends


@dataclass
class Session:
    """What every policy's evaluation shares once the config is checked and loaded."""

    cfg: EvaluateConfig
    """The checked config."""
    tokenizer: object
    """The tokenizer every policy shares."""
    batches: list[dict]
    """Left-padded prompt batches (`collate_prompts` layout), in evaluation order."""
    prompts: list
    """The prompts' chat messages, in the same order."""
    proxy: Judge
    """The proxy scorer (selects best-of-N samples)."""
    gold: Judge
    """The gold judge."""
    reference_spec: ModelSpec
    """Where the reference policy came from (a policy with the same spec reuses the model)."""
    reference: torch.nn.Module
    """The KL reference policy (eval mode)."""
    run_state: object = None
    """The `rlhf` CLI's `RunState` (None when called from Python)."""


@contextlib.contextmanager
def _loading(run_state):
    """Errors inside are config errors (`stepping` False), whenever the loading happens."""
    if run_state is None:
        yield
        return
    before, run_state.stepping = run_state.stepping, False
    yield
    run_state.stepping = before


def _tokenizer_source(cfg: EvaluateConfig, reference: ModelSpec) -> tuple[str, str | None]:
    """(tokenizer folder / hub id, GGUF file in it): `tokenizer`, else the reference policy's."""
    if cfg.tokenizer:
        return cfg.tokenizer, cfg.tokenizer_gguf_file
    if reference.name_or_path:
        return reference.name_or_path, cfg.tokenizer_gguf_file or reference.gguf_file
    if reference.gguf_file:  # a local .gguf path alone
        return str(Path(reference.gguf_file).parent), Path(reference.gguf_file).name
    raise ValueError("tokenizer: required when the reference policy has no name_or_path")


def _prompt_batches(
    cfg: EvaluateConfig, tokenizer_name: str, gguf_file: str | None
) -> tuple[object, list[dict]]:
    """(tokenizer, prompt batches) of the `split` of `prompts`, in file order."""
    from rlhf_lightning.data.datamodule import RLHFDataModule

    source = cfg.prompts
    if cfg.split == "all" and not (source.val_path or source.val_split):
        source = dataclasses.replace(source, val_fraction=0.0)
    dm = RLHFDataModule(
        tokenizer=tokenizer_name,
        tokenizer_gguf_file=gguf_file,
        prompts=source,
        max_prompt_length=cfg.max_prompt_length,
        max_length=cfg.max_prompt_length + cfg.sampling.max_new_tokens,
        batch_size=cfg.sampling.batch_size,
        seed=cfg.sampling.seed,
    )
    splits = ["train", "val"] if cfg.split == "all" else [cfg.split]
    batches = [
        batch
        for split in splits
        if split == cfg.split or dm.records("prompt", split)
        for batch in dm.dataloader("prompt", split, shuffle=False)
    ]
    return dm.tokenizer, batches


def _policy_spec(cfg: EvaluateConfig, name_or_spec) -> ModelSpec:
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    return next(p.model for p in cfg.policies if p.name == name_or_spec)


def _load_model(spec: ModelSpec, tokenizer, device: str):
    from rlhf_lightning.models.loading import load_causal_lm

    model = load_causal_lm(spec, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return model.to(device).eval()


def prepare(cfg: EvaluateConfig, run_state=None) -> Session:
    """Check the config, read the prompts, load the judges and the reference policy."""
    check_config(cfg)
    reference_spec = _policy_spec(cfg, cfg.reference or cfg.baseline)
    tokenizer, batches = _prompt_batches(cfg, *_tokenizer_source(cfg, reference_spec))
    proxy = load_judge(cfg.proxy, "proxy", cfg.device)
    gold = load_judge(cfg.gold, "gold", cfg.device)
    reference = _load_model(reference_spec, tokenizer, cfg.device)
    prompts = [m for batch in batches for m in batch["prompt_messages"]]
    return Session(
        cfg, tokenizer, batches, prompts, proxy, gold, reference_spec, reference, run_state
    )


def _model_for(session: Session, spec: ModelSpec):
    if spec == session.reference_spec:
        return session.reference
    with _loading(session.run_state):
        return _load_model(spec, session.tokenizer, session.cfg.device)


def _sample(session: Session, model, batch: dict, index: int, per_prompt: int) -> SampleBatch:
    s = session.cfg.sampling
    return generate_batch(
        model, session.tokenizer, batch, per_prompt=per_prompt, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, seed=s.seed + index, device=session.cfg.device,
    )  # fmt: skip


def _logratio(session: Session, model, samples: SampleBatch) -> torch.Tensor:
    s = session.cfg.sampling
    return sequence_logratio(
        model, session.reference, samples, temperature=s.temperature,
        micro_batch=s.batch_size * s.samples_per_prompt,
    )  # fmt: skip


def _progress(session: Session, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=len(session.prompts), desc=f"evaluate {desc}", unit="prompt", file=sys.stderr)


def evaluate_model(session: Session, policy: PolicyConfig) -> PolicySamples:
    """Sample, score and measure the KL of one model policy on every prompt."""
    model = _model_for(session, policy.model)
    found = PolicySamples(policy.name)
    with _progress(session, policy.name) as bar:
        for i, batch in enumerate(session.batches):
            samples = _sample(session, model, batch, i, session.cfg.sampling.samples_per_prompt)
            proxy = session.proxy(_messages(samples), samples.texts, samples.ends)
            gold = session.gold(_messages(samples), samples.texts, samples.ends)
            found.add(samples, proxy, gold, _logratio(session, model, samples).tolist())
            bar.update(len(batch["prompt_messages"]))
    return found


def _messages(samples: SampleBatch) -> list:
    """One prompt's messages per row."""
    return [samples.messages[i // samples.per_prompt] for i in range(len(samples.texts))]


def _best_of_n_batch(session, model, samples: SampleBatch, ns: list[int], rows: dict) -> None:
    """Keep the proxy's best candidate per (prompt, sample index) for every N of `ns`."""
    width = max(ns)
    per_prompt = session.cfg.sampling.samples_per_prompt
    proxy = np.asarray(session.proxy(_messages(samples), samples.texts, samples.ends))
    table = proxy.reshape(-1, per_prompt, width)  # [B, S, N_max]
    offsets = np.arange(table.shape[0] * per_prompt).reshape(-1, per_prompt) * width  # [B, S]
    chosen = {n: (offsets + best_of_n.select(table, n)).reshape(-1) for n in ns}  # n → [B·S]
    union = sorted({int(r) for picked in chosen.values() for r in picked})
    kept = samples.rows(torch.tensor(union, dtype=torch.long))
    gold = session.gold(kept.messages, kept.texts, kept.ends)
    logratio = _logratio(session, model, kept).tolist()
    where = {row: j for j, row in enumerate(union)}
    for n, picked in chosen.items():
        js = [where[int(r)] for r in picked]
        rows[n].add(kept.rows(torch.tensor(js, dtype=torch.long)), proxy[picked],
                    [gold[j] for j in js], [logratio[j] for j in js])  # fmt: skip


def evaluate_best_of_n(session: Session, policy: PolicyConfig) -> list[PolicySamples]:
    """Best-of-N rows (one per N) of a best-of-N policy."""
    bon = policy.best_of_n
    base_name = bon.base if isinstance(bon.base, str) else None
    model = _model_for(session, _policy_spec(session.cfg, bon.base))
    ns = sorted(set(bon.n))
    rows = {n: PolicySamples(policy.name, n=n, base=base_name) for n in ns}
    per_prompt = session.cfg.sampling.samples_per_prompt * max(ns)
    with _progress(session, policy.name) as bar:
        for i, batch in enumerate(session.batches):
            samples = _sample(session, model, batch, i, per_prompt)
            _best_of_n_batch(session, model, samples, ns, rows)
            bar.update(len(batch["prompt_messages"]))
    return [rows[n] for n in ns]


def evaluate(cfg: EvaluateConfig, run_state=None) -> dict:
    """Run the whole evaluation; returns the report dict (also written to `out_dir`)."""
    session = prepare(cfg, run_state)
    results: list[PolicySamples] = []
    timings = {}
    on_onednn = torch.device(cfg.device).type == "cpu" and onednn_linear.backend() == "onednn"
    with onednn_linear.onednn_linears(on_onednn):  # as a CPU Trainer run (`modules.cpu_linear`)
        for policy in cfg.policies:
            if run_state is not None:
                run_state.stepping = True
            start = time.perf_counter()
            if policy.model is not None:
                results.append(evaluate_model(session, policy))
            else:
                results.extend(evaluate_best_of_n(session, policy))
            timings[policy.name] = round(time.perf_counter() - start, 2)
    found = report.build(session, results)
    report.write(found, results, session)
    print(report.console_table(found))
    return {**found, "seconds": timings}


def build_parser(exit_on_error: bool = True):
    """jsonargparse parser: `--config file.yaml` plus one flag per `EvaluateConfig` key."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="rlhf evaluate", description=__doc__.split("\n\n")[0], exit_on_error=exit_on_error
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the keys below")
    parser.add_class_arguments(EvaluateConfig)
    return parser


def _policies_argument(argv: list[str]) -> str | None:
    """The value of the last `--policies VALUE` / `--policies=VALUE` of `argv` (None: none)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--policies" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--policies="):
            found = arg.split("=", 1)[1]
    return found


def _fresh_policies(value: str, exit_on_error: bool):
    """`--policies VALUE` parsed on its own: jsonargparse would merge a list of dataclasses given
    after a config file into the file's list item by item (keys of the file's item 2 leaking into
    the new item 2); on the command line the list replaces the file's list instead."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="rlhf evaluate", exit_on_error=exit_on_error)
    parser.add_argument("--policies", type=list[PolicyConfig], required=True)
    return parser.parse_args(["--policies", value]).policies


def parse_config(argv: list[str], run_state=None) -> EvaluateConfig:
    """Parse and instantiate `argv` into an `EvaluateConfig` (no checks beyond the types).

    A `--policies` list on the command line replaces the config file's list as a whole."""
    exit_on_error = run_state is None or not run_state.one_line
    parser = build_parser(exit_on_error=exit_on_error)
    namespace = parser.parse_args(argv)
    policies = _policies_argument(argv)
    if policies is not None:
        namespace.policies = _fresh_policies(policies, exit_on_error)
    if run_state is not None:
        run_state.config = namespace
    init = parser.instantiate_classes(namespace)
    return EvaluateConfig(**{k: v for k, v in vars(init).items() if k != "config"})


def main(argv: list[str] | None = None, run_state=None) -> dict:
    """Entry of `rlhf evaluate ...`; `run_state` is the `rlhf` CLI's `RunState` (when run from it)."""
    cfg = parse_config(sys.argv[1:] if argv is None else argv, run_state)
    result = evaluate(cfg, run_state)
    print(f"written: {Path(cfg.out_dir) / 'report.md'}")
    return result


if __name__ == "__main__":
    main()
