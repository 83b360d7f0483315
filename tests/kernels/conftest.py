"""Shared shape / tolerance tables for the kernel tests (parametrised via pytest_generate_tests).

Every shape is small enough for the Triton interpreter (N ≤ 40 rows, V ≤ 1031), so both
backends run the whole table. Inputs are built deterministically from a per-case seed.
"""

from __future__ import annotations

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

#: dtype → (atol, rtol) against the float64 reference; bf16 / fp16 are judged relative to
#: torch's own error in that dtype (see test_kernels_numerics.py).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
}

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
def tolerances():
    """dtype → (atol, rtol) against the float64 reference."""
    return TOLERANCES
