"""The quickstart's evaluate.yaml parses into an `EvaluateConfig` that passes the checks, and
the quickstart's evaluate stage calls `rlhf evaluate` with its paths redirected under `--out`."""

from __future__ import annotations

import json

import pytest

from rlhf_lightning.evaluation import run
from rlhf_lightning.evaluation.config import BestOfNConfig, check_config
from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.tasks import quickstart

CONFIG = quickstart.REPO_ROOT / "configs" / "quickstart" / "evaluate.yaml"


def test_quickstart_config_parses_and_passes_the_checks():
    cfg = run.parse_config(["--config", str(CONFIG)])
    check_config(cfg)
    assert [p.name for p in cfg.policies] == ["sft", "ppo", "best_of_n"]
    assert isinstance(cfg.policies[0].model, ModelSpec)
    assert cfg.policies[2].best_of_n == BestOfNConfig(base="sft", n=[1, 2, 4, 8, 16])
    assert cfg.baseline == "sft" and cfg.reference is None
    assert cfg.gold.function == "rlhf_lightning.tasks.sentiment:gold_score"


def test_best_of_n_base_may_be_a_model_spec():
    policies = json.dumps([{"name": "bon", "best_of_n": {"base": {"name_or_path": "x"}, "n": [2]}}])
    cfg = run.parse_config(["--config", str(CONFIG), f"--policies={policies}", "--baseline=bon"])
    assert cfg.policies[0].best_of_n.base == ModelSpec(name_or_path="x")
    with pytest.raises(ValueError, match="the KL reference 'bon' is not a model policy"):
        check_config(cfg)  # the baseline doubles as reference, and must then be a model policy


def _fake_report(names):
    rows = [{"name": n, "n": None, "gold": 0.1 * i, "kl": float(i), "win_rate": 0.5, "distinct_2": 0.2}
            for i, n in enumerate(names)]  # fmt: skip
    rows += [
        {"name": "best_of_n", "n": n, "gold": 0.3, "kl": 0.5 * n, "win_rate": 0.6} for n in (1, 16)
    ]
    versus = {"policy": "ppo", "gold_minus_bon": None, "verdict": "outside"}
    return {"policies": rows, "comparisons": [versus]}


def test_quickstart_evaluate_stage_runs_rlhf_evaluate_on_its_exports(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(run, "main", lambda argv: seen.append(argv) or _fake_report(["sft", "ppo"]))
    ctx = quickstart.Context(
        out=tmp_path, configs=CONFIG.parent, seed=3, overrides=["evaluate:prompts.limit=8"]
    )
    result = quickstart.evaluate_stage(ctx)
    (argv,) = seen
    policies = json.loads(next(a for a in argv if a.startswith("--policies=")).split("=", 1)[1])
    assert policies[0]["model"]["name_or_path"] == str(tmp_path / "export" / "sft")
    assert policies[1]["model"]["name_or_path"] == str(tmp_path / "export" / "ppo")
    assert policies[2] == {"name": "best_of_n", "best_of_n": {"base": "sft", "n": [1, 2, 4, 8, 16]}}
    assert f"--prompts.path={tmp_path / 'data' / 'sft_val.jsonl'}" in argv
    assert f"--proxy.reward_model={tmp_path / 'export' / 'reward'}" in argv
    assert "--sampling.seed=3" in argv and argv[-1] == "--prompts.limit=8"
    assert result["gold_ppo"] == 0.1 and result["kl_ppo"] == 1.0
    assert result["best_of_n_max"] == 16 and result["kl_best_of_n"] == 8.0
    assert result["ppo_minus_best_of_n"] is None and result["ppo_vs_best_of_n"] == "outside"
    summary_keys = {
        stage_key for stage, stage_key in quickstart.SUMMARY_KEYS.values() if stage == "evaluate"
    }
    assert summary_keys <= set(result)


def test_policies_on_the_command_line_replace_the_config_files_list():
    """jsonargparse alone would merge item 2 with evaluate.yaml's best-of-N item 2."""
    policies = [{"name": n, "model": {"name_or_path": n}} for n in ("sft", "x", "y")]
    cfg = run.parse_config(["--config", str(CONFIG), "--policies", json.dumps(policies)])
    assert [(p.name, p.model.name_or_path, p.best_of_n) for p in cfg.policies] == [
        ("sft", "sft", None), ("x", "x", None), ("y", "y", None),
    ]  # fmt: skip
    check_config(cfg)
