"""`rlhf evaluate`: compare policies on held-out prompts, judged by a gold scorer.

Per policy (a model export / hub id / GGUF file, or best-of-N over a base policy selected by a
proxy scorer): mean proxy and gold score, win rate against a baseline judged by gold (ties ½,
paired bootstrap 95% interval), sequence KL to a reference on the policy's own samples (best-of-N:
the analytic bound log N − (N − 1)/N), response length, EOS rate and distinct-n; written as
report.md, report.json, TensorBoard and a plot of gold score against KL. Modules: `config`
(settings and checks), `sampling` (seeded generation, sequence KL), `scoring` (proxy and gold
judges), `best_of_n`, `metrics` (win rate, bootstrap), `report`, `run` (orchestration, `main`).
Docs: docs/evaluate.md.
"""

from rlhf_lightning.evaluation.config import EvaluateConfig

__all__ = ["EvaluateConfig", "evaluate", "main"]


def evaluate(cfg: EvaluateConfig, run_state=None) -> dict:
    """Run one evaluation (see `rlhf_lightning.evaluation.run.evaluate`)."""
    from rlhf_lightning.evaluation.run import evaluate as run_evaluate

    return run_evaluate(cfg, run_state)


def main(argv: list[str] | None = None, run_state=None) -> dict:
    """`rlhf evaluate ...` (see `rlhf_lightning.evaluation.run.main`)."""
    from rlhf_lightning.evaluation.run import main as run_main

    return run_main(argv, run_state)
