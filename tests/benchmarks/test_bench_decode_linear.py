"""`benchmarks/bench_decode_linear.py` on a 2-layer, 64-wide model: every weight class timed on
both sides, results equal to the float64 reference within torch's own error, JSON written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is not installed

from benchmarks import bench_decode_linear  # noqa: E402
from tests.conftest import FLOAT32_ULPS  # noqa: E402


def test_small_model(tmp_path):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH: the CPU decode kernel cannot be built here")
    out = tmp_path / "decode_linear.json"
    argv = ["--layers", "2", "--hidden", "64", "--rows", "4", "--repeats", "1", "--steps", "2"]
    result = bench_decode_linear.main([*argv, "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    names = [c["weight"] for c in result["classes"]]
    assert names == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ]
    for c in result["classes"]:
        assert c["torch_us"] > 0 and c["kernel_us"] > 0
        # the rule of tests/conftest.py: ≤ 2 × torch's own max error + a few float32 ulps
        slack = FLOAT32_ULPS * torch.finfo(torch.float32).eps * c["max_abs_exact"]
        assert c["max_err"] <= 2 * c["torch_max_err"] + slack, c
    assert result["decode_step"]["torch_ms"] > 0 and result["decode_step"]["kernel_ms"] > 0
    assert result["cpu"] and result["rows"] == 4
