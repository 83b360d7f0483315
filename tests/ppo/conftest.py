"""Shared by the PPO tests: one torch thread (tiny-model matmuls are ~30× slower with 2 threads on
a shared 2-core machine; the pure-function tests do not care)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
