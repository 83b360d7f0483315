"""Shared shape / error-budget tables for the kernel tests (parametrised via pytest_generate_tests).

Every shape is small enough for the Triton interpreter (N ≤ 40 rows, V ≤ 1031), so both
backends run the whole table. Inputs are built deterministically from a per-case seed.
Every comparison is against a float64 reference with the rule of `within_torch_error`
(tests/conftest.py): at most 2 × torch's own error in the input dtype on the same input, plus
the per-dtype slack of `TOLERANCES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Case:
    """One input configuration for the token-statistics ops."""

    name: str
    lead: tuple[int, ...]
    vocab: int
    temperature: float = 1.0
    mask: bool = False
    ignore: bool = False
    neginf: bool = False
    huge: bool = False
    noncontig: bool = False
    scale: float = 2.0

    def make(self, dtype=torch.float32, seed: int = 0):
        """Return ``(logits, ref_logits, labels, mask)`` (mask None unless requested)."""
        g = torch.Generator().manual_seed(seed)
        n = 1
        for d in self.lead:
            n *= d
        v = self.vocab
        z = torch.randn(n, v, generator=g) * self.scale  # [N, V]
        zq = z + torch.randn(n, v, generator=g) * (self.scale / 2)  # [N, V] correlated ref
        labels = torch.randint(0, v, (n,), generator=g)  # [N]
        if self.huge:
            sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)  # [N, 1]
            z, zq = z + 1e4 * sign, zq + 1e4 * sign
        if self.neginf:
            dead = torch.rand(n, v, generator=g) < 0.3  # [N, V]
            dead[:, :8] = True  # a whole leading block is -inf in every row
            dead[torch.arange(n), labels] = False
            z = z.masked_fill(dead, float("-inf"))
            zq = zq.masked_fill(dead & (torch.rand(n, v, generator=g) < 0.5), float("-inf"))
        mask = None
        if self.ignore:
            labels[torch.rand(n, generator=g) < 0.3] = -100
        if self.mask:
            mask = torch.rand(n, generator=g) > 0.3  # [N]
            mask = mask.view(self.lead)
        z, zq = z.to(dtype), zq.to(dtype)
        if self.noncontig:  # same values, column-major storage: last-dim stride != 1
            z = z.T.contiguous().T
            zq = zq.T.contiguous().T
        return z.view(*self.lead, v), zq.view(*self.lead, v), labels.view(self.lead), mask


CASES = [
    Case("odd", (37,), 1031),
    Case("lead_dims_mask", (2, 3, 5), 97, temperature=0.7, mask=True),
    Case("ignore_index", (4, 9), 64, ignore=True),
    Case("temperature", (16,), 500, temperature=1.7, scale=4.0),
    Case("neginf", (8,), 300, neginf=True, mask=True),
    Case("huge", (6,), 129, huge=True),
    Case("noncontig", (12,), 256, noncontig=True, temperature=0.9),
    Case("single_row", (1,), 5),
]

#: dtype → slack beyond 2 × torch's own error in that dtype (keyword arguments of
#: `within_torch_error`). float32: 8 float32 ulps of the largest |reference| value, for inputs where
#: torch's own float32 rounding happens to be (nearly) exact; the largest need measured over this
#: table, both backends, AVX-512 / AVX2 / scalar ATen kernels and 1 / 2 threads was 4.0 ulps (the
#: interpreter's KL gradient on "odd" against the AVX2 reference). bf16 / fp16: an absolute 1e-6,
#: since torch's own 16-bit error is orders of magnitude larger except on tiny rows, where it can
#: be exactly 0.
TOLERANCES = {
    torch.float32: {"ulps": 8.0},
    torch.bfloat16: {"ulps": 0.0, "atol": 1e-6},
    torch.float16: {"ulps": 0.0, "atol": 1e-6},
}


def error_budget(dtype: torch.dtype, backend: str = "torch", stored: bool = False) -> dict:
    """Keyword arguments of `within_torch_error` for a result computed from ``dtype`` inputs.

    ``stored``: the kernel writes this result in ``dtype`` itself (the gradients). The Triton
    *interpreter* truncates float32 → bfloat16 in ``.to()`` (triton/runtime/interpreter.py
    ``cast_impl`` passes no rounding mode, so even ``fp_downcast_rounding="rtne"`` gives 2.0116
    → 2.0), whereas compiled GPU code rounds to nearest; such results get one more bfloat16 ulp
    of the largest value. float16 stores round to nearest in the interpreter too.
    """
    budget = dict(TOLERANCES[dtype])
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if stored and interpreted and dtype == torch.bfloat16:
        budget.update(ulps=1.0, ulp_dtype=torch.bfloat16)
    return budget


BACKENDS = ["torch", "triton"]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[c.name for c in CASES])
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture
def case_table():
    """The shared shape table as ``{name: Case}``."""
    return {c.name: c for c in CASES}


@pytest.fixture
def case_cls():
    """The :class:`Case` builder, for one-off shapes."""
    return Case


@pytest.fixture
def budget():
    """`error_budget(dtype, backend, stored)`: slack for `within_torch_error` per input dtype."""
    return error_budget
