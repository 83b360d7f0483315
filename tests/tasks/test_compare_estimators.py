"""The estimator-comparison runner: child resource capture, argument handling, fit arguments,
model inventory, training summary, table writing and the stage flow (training and evaluation
faked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhf_lightning.tasks import compare_estimators as ce
from rlhf_lightning.tasks import quickstart

CONFIGS = quickstart.REPO_ROOT / "configs" / "quickstart"


def _ctx(tmp_path: Path, overrides: list[str] | None = None) -> quickstart.Context:
    return quickstart.Context(out=tmp_path, configs=CONFIGS, seed=3, overrides=overrides or [])


_TOUCH = "b = bytearray({mib} * 2**20); b[::4096] = b'x' * len(b[::4096]); "
_REPORT = (
    "from rlhf_lightning.tasks.compare_estimators import own_peak_rss_mb; print(own_peak_rss_mb())"
)


def _child_peak(tmp_path: Path, mib: int, name: str) -> tuple[ce.ChildRun, float | None]:
    log = tmp_path / f"{name}.log"
    run = ce.run_child([sys.executable, "-c", _TOUCH.format(mib=mib) + _REPORT], log)
    assert run.returncode == 0, log.read_text()
    own = log.read_text().strip().splitlines()[-1]
    return run, None if own == "None" else float(own)


def test_child_peak_rss_is_the_childs_own(tmp_path):
    """A child that touches 96 MiB reports an own peak RSS ≥ 96 MiB, one that touches 1 MiB
    at least 64 MiB less (the parent's RSS is not in it); wait4's ru_maxrss bounds both."""
    big_run, big = _child_peak(tmp_path, 96, "big")
    small_run, small = _child_peak(tmp_path, 1, "small")
    assert big_run.wall_s >= 0.0
    if big is None:
        pytest.skip("no /proc/self/status VmHWM on this platform")
    assert big >= 96 and small < big - 64
    if big_run.rusage_maxrss_mb is not None:
        assert big_run.rusage_maxrss_mb >= big - 1 and small_run.rusage_maxrss_mb >= small - 1


def test_failing_child_keeps_its_exit_code(tmp_path):
    run = ce.run_child([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "x.log")
    assert run.returncode == 3


def test_parse_methods():
    assert ce.parse_methods(None) == list(ce.METHODS)
    assert ce.parse_methods("grpo, ppo") == ["grpo", "ppo"]
    with pytest.raises(ValueError, match="--methods: unknown method.*dpo.*choose from"):
        ce.parse_methods("ppo,dpo")


def test_main_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        ce.main(["--out", str(tmp_path), "--methods", "nope"])
    assert info.value.code == 2 and "unknown method(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        ce.main(["--out", str(tmp_path), "--child", "ppo"])
    assert info.value.code == 2 and "--child needs --result" in capsys.readouterr().err


def test_fit_argv_base_then_overlay_and_scoped_overrides(tmp_path):
    ctx = _ctx(
        tmp_path,
        ["trainer.max_steps=5", "compare:a=1", "compare_grpo:b=2", "compare_rloo:c=3", "ppo:d=4"],
    )
    argv = ce.fit_argv(ctx, "grpo")
    configs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--config"]
    assert configs == [str(CONFIGS / "ppo.yaml"), str(CONFIGS / "grpo.yaml")]
    assert "--trainer.logger.init_args.version=compare_grpo" in argv
    assert f"--model.init_args.export_dir={tmp_path / 'compare' / 'export' / 'grpo'}" in argv
    assert f"--model.init_args.reward.model={tmp_path / 'export' / 'reward'}" in argv
    assert "--seed_everything=3" in argv
    assert argv[-3:] == ["--trainer.max_steps=5", "--a=1", "--b=2"]  # after the defaults
    assert ce.fit_argv(ctx, "ppo").count("--config") == 1


def test_child_command_round_trips_through_main(tmp_path, monkeypatch):
    """The parent's child command line parses back into the same context and method."""
    ctx = _ctx(tmp_path, ["compare:x=1"])
    command = ce.child_command(ctx, "rloo", tmp_path / "r.json", threads=2)
    assert command[:3] == [sys.executable, "-m", "rlhf_lightning.tasks.compare_estimators"]
    seen = {}
    monkeypatch.setattr(ce, "child_main", lambda c, m, r: seen.update(ctx=c, method=m, result=r))
    threads = torch.get_num_threads()
    try:
        assert ce.main(command[3:]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen["method"] == "rloo" and seen["result"] == tmp_path / "r.json"
    assert (seen["ctx"].out, seen["ctx"].seed, seen["ctx"].overrides) == (
        tmp_path,
        3,
        ["compare:x=1"],
    )


def _fake_module(critic: bool):
    policy = nn.Linear(4, 3)  # 15 parameters
    shared = nn.Linear(2, 2)  # 6 parameters
    reward = nn.Sequential(shared, nn.Linear(2, 1))  # 6 + 3
    history = [
        {"ppo/objective/kl": 1.0, "ppo/perf/iteration_s": 0.5},
        {
            "ppo/objective/kl": 2.5,
            "ppo/objective/reward_raw": 4.0,
            "ppo/objective/gold": 0.7,
            "ppo/perf/iteration_s": 0.25,
        },
    ]
    return SimpleNamespace(
        policy=policy,
        reference=nn.Linear(4, 3),
        critic=nn.Sequential(shared, nn.Linear(2, 1)) if critic else None,  # shares `shared`
        value_head=None,
        reward_model=reward,
        history=history,
        trainer=SimpleNamespace(datamodule=SimpleNamespace(batch_size=8)),
        generation_cfg=SimpleNamespace(samples_per_prompt=4),
        update_cfg=SimpleNamespace(advantage="grpo"),
        kl_cfg=SimpleNamespace(estimator="k3", mode="loss"),
    )


def test_model_inventory_counts_shared_parameters_once():
    with_critic = ce.model_inventory(_fake_module(critic=True))
    assert with_critic["models"] == ["policy", "reference", "critic", "reward_model"]
    assert with_critic["params"] == {"policy": 15, "reference": 15, "critic": 9, "reward_model": 3}
    assert with_critic["params_total"] == 42
    without = ce.model_inventory(_fake_module(critic=False))
    assert without["model_count"] == 3 and "critic" not in without["params"]
    assert without["params"]["reward_model"] == 9


def test_training_summary_reads_the_last_iteration():
    summary = ce.training_summary(_fake_module(critic=False))
    assert summary["train_kl"] == 2.5 and summary["train_reward_raw"] == 4.0
    assert summary["train_gold"] == 0.7
    assert summary["iterations"] == 2 and summary["responses_per_iteration"] == 32
    assert summary["train_s"] == pytest.approx(0.75)
    assert (summary["advantage"], summary["kl_estimator"]) == ("grpo", "k3")
    json.dumps(summary)  # JSON-ready


def _report(names):
    rows = [
        {"name": n, "n": None, "gold": 0.1 * i, "proxy": float(i), "win_rate": 0.5, "kl": 0.5 * i}
        for i, n in enumerate(names)
    ]
    rows.append({"name": "bon", "n": 4, "gold": 9.0, "proxy": 9.0, "win_rate": 1.0, "kl": 1.0})
    return {"policies": rows}


def test_table_rows_and_files(tmp_path):
    trained = {
        "ppo": {"train_kl": 1.5, "kl_estimator": "k1", "wall_s": 12.34, "peak_rss_mb": 500.4,
                "models": ["policy", "reference", "critic", "reward_model"],
                "params_total": 1234567, "iterations": 32, "responses_per_iteration": 32},
        "grpo": {"train_kl": 0.25, "kl_estimator": "k3", "models": ["policy"]},
    }  # fmt: skip
    rows = ce.table_rows(trained, _report(["sft", "ppo", "grpo"]))
    assert [r["method"] for r in rows] == ["sft", "ppo", "grpo"]
    assert rows[2]["gold"] == pytest.approx(0.2) and rows[1]["wall_s"] == 12.34
    md, js = ce.write_table(rows, tmp_path / "compare", {"cpu": "test cpu", "torch_threads": 1})
    text = md.read_text()
    assert "- cpu: test cpu" in text and "- torch_threads: 1" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3
    assert len({line.count("|") for line in table}) == 1  # every row has every column
    ppo = table[3]
    for cell in ("1.50 (k1)", "12.3", "500", "4: policy, reference, critic, reward_model"):
        assert f"| {cell} |" in ppo
    assert "1,234,567" in ppo and "32 × 32" in ppo
    assert "| — |" in table[2]  # the SFT row has no training columns
    assert "0.25 (k3)" in table[4]
    assert json.loads(js.read_text())["rows"] == json.loads(json.dumps(rows))


def test_compare_flow_with_faked_training_and_evaluation(tmp_path, monkeypatch):
    """`compare` trains the asked methods, evaluates them with SFT, writes the table and returns
    the held-out gold per policy; the quickstart knows the stage."""
    calls = []

    def fake_train(ctx, methods, threads):
        calls.append(("train", list(methods), threads))
        return {m: {"train_kl": 1.0, "kl_estimator": "k1"} for m in methods}

    def fake_evaluate(ctx, methods):
        calls.append(("evaluate", list(methods)))
        return _report(["sft", *methods])

    monkeypatch.setattr(ce, "train_methods", fake_train)
    monkeypatch.setattr(ce, "evaluate_held_out", fake_evaluate)
    result = ce.compare(_ctx(tmp_path), ["rloo", "ppo"])
    assert calls == [
        ("train", ["rloo", "ppo"], torch.get_num_threads()),
        ("evaluate", ["rloo", "ppo"]),
    ]
    assert result == pytest.approx({"gold_sft": 0.0, "gold_rloo": 0.1, "gold_ppo": 0.2})
    assert (tmp_path / "compare" / "estimators.md").is_file()
    assert "compare" in {s.name for s in quickstart.EXTRA_STAGES}


def test_failed_method_names_itself_and_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(
        ce, "child_command", lambda *a: [sys.executable, "-c", "print('boom'); raise SystemExit(1)"]
    )
    with pytest.raises(RuntimeError, match=r"method 'grpo' failed \(exit 1\); log: .*grpo\.log"):
        ce.train_methods(_ctx(tmp_path), ["grpo"], threads=1)
