"""`benchmarks/bench_onednn_linear.py` on a 2-layer, 64-wide model: every weight class and GEMM
timed on both libraries, errors recorded, the whole-model pairs timed, JSON written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is not installed

from benchmarks import bench_onednn_linear  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch was built without oneDNN"
)


def test_small_model(tmp_path):
    out = tmp_path / "onednn_linear.json"
    argv = ["--layers", "2", "--hidden", "64", "--rows", "20", "8", "--repeats", "1"]
    result = bench_onednn_linear.main([*argv, "--pairs", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    weights = {c["weight"] for c in result["classes"]}
    assert weights == {"q/o_proj", "k/v_proj", "gate/up_proj", "down_proj", "lm_head"}
    assert len(result["classes"]) == 3 * (4 * 2 + 1)  # y, dx, dW × (4 classes × 2 rows + head)
    for c in result["classes"]:
        assert c["torch_gflops"] > 0 and c["onednn_gflops"] > 0, c
        # float32 GEMMs of K ≤ 128: both well inside float32's error model
        assert 0 < c["torch_rel_rms"] < 1e-5 and 0 < c["onednn_rel_rms"] < 1e-5, c
    model = result["model"]
    assert all(model[k] > 0 for k in ("train_torch_s", "train_onednn_s", "nograd_torch_s"))
    assert result["cpu"] and result["threads"] == 1
