"""`rlhf evaluate` end to end with tiny models through `rlhf_lightning.cli.main`: exit code,
report files, plot, TensorBoard, the same report from the same inputs, one-line config errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handler binds sys.stderr now, not capsys's)
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_lightning import cli
from rlhf_lightning.evaluation.best_of_n import analytic_kl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_evaluate_end_to_end_twice_gives_the_same_report(write_config, tmp_path, capsys):
    assert cli.main(["evaluate", "--config", write_config("one")]) == 0
    out = tmp_path / "one"
    for name in ("report.json", "report.md", "gold_vs_kl.png"):
        assert (out / name).is_file(), name
    assert (out / "gold_vs_kl.png").read_bytes()[:8] == PNG_MAGIC
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("evaluate/bon/gold")] == [1, 2, 4]
    assert "evaluate/a/win_rate" in events.Tags()["scalars"]
    report = json.loads((out / "report.json").read_text())
    rows = {(r["name"], r["n"]): r for r in report["policies"]}
    assert list(rows) == [("a", None), ("b", None), ("bon", 1), ("bon", 2), ("bon", 4)]
    assert report["settings"]["prompts"] == 5 and report["settings"]["reference"] == "a"
    baseline = rows[("a", None)]
    assert baseline["win_rate"] == 0.5 and baseline["win_rate_ci"] == [0.5, 0.5]
    assert baseline["kl"] == 0.0  # the reference against itself
    for n in (1, 2, 4):
        bon = rows[("bon", n)]
        assert bon["kl"] == analytic_kl(n) and bon["kl_measured"] == 0.0  # base a = reference
        low, high = bon["win_rate_ci"]
        assert 0.0 <= low <= bon["win_rate"] <= high <= 1.0
    # nested candidates: the kept proxy score never falls as N grows
    assert rows[("bon", 1)]["proxy"] <= rows[("bon", 2)]["proxy"] <= rows[("bon", 4)]["proxy"]
    (versus,) = report["comparisons"]  # b against the best-of-N curve (a is the reference)
    assert versus["policy"] == "b" and versus["curve"] == "bon"
    assert len(report["samples"]) == 3 and set(report["samples"][0]["responses"]) == {
        "a",
        "b",
        "bon (N=4)",
    }
    markdown = (out / "report.md").read_text()
    assert "| policy | proxy | gold | win rate [95% CI] |" in markdown and "bon (N=4)" in markdown
    assert "bon (N=4)" in capsys.readouterr().out

    assert cli.main(["evaluate", "--config", write_config("two")]) == 0
    assert (tmp_path / "two" / "report.json").read_text() == (out / "report.json").read_text()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"baseline": "nope"}, "unknown policy 'nope' (policies: a, b, bon) (baseline)"),
        (
            {
                "policies": [
                    {"name": "a", "model": {"name_or_path": "x"}},
                    {"name": "bon", "best_of_n": {"base": "a", "n": [0, 2]}},
                ]
            },
            "every N must be >= 1, got [0, 2] (policies[1].best_of_n.n)",
        ),
        ({"proxy": {}}, "set exactly one of 'reward_model' and 'function' (proxy)"),
        ({"reference": "bon"}, "the KL reference 'bon' is not a model policy (reference"),
        (
            {"proxy": {"reward_model": "/nonexistent/rm"}},
            "/nonexistent/rm: not a reward-model export",
        ),
    ],
    ids=["unknown-baseline", "n-below-1", "missing-scorer", "best-of-n-reference", "missing-rm"],
)
def test_bad_config_is_one_line_error(write_config, capsys, changes, message):
    assert cli.main(["evaluate", "--config", write_config("bad", **changes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf: error: ") and message in err[0], err


def test_missing_config_file_is_one_line_error(tmp_path, capsys):
    assert cli.main(["evaluate", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml" in err[0] and Path(tmp_path).name in err[0]


@pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch was built without oneDNN"
)
@pytest.mark.parametrize("setting", ["onednn", "torch"])
def test_evaluate_runs_its_policies_inside_the_cpu_linear_swap(write_config, monkeypatch, setting):
    """`RLHF_CPU_MATMUL` decides, as for a Trainer run, whether sampling and scoring run inside
    `onednn_linears` (the tiny models' layers are below its size threshold either way)."""
    import contextlib

    from rlhf_lightning.evaluation import run

    opened = []
    real = run.onednn_linear.onednn_linears

    @contextlib.contextmanager
    def recording(enabled=True):
        opened.append(enabled)
        with real(enabled):
            yield

    monkeypatch.setattr(run.onednn_linear, "onednn_linears", recording)
    monkeypatch.setenv("RLHF_CPU_MATMUL", setting)
    assert cli.main(["evaluate", "--config", write_config("one")]) == 0
    assert opened == [setting == "onednn"]
