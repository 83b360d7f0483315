"""`OneDNNLinearCallback`: a Trainer run on CPU computes its float32 linear layers on oneDNN.

Every stage module adds it (`StageModule.configure_callbacks`). On a CPU run whose
`RLHF_CPU_MATMUL` resolves to "onednn" (`auto`: AMD CPUs with AVX-512), it opens
`rlhf_lightning.kernels.onednn_linear.onednn_linears` in `setup` and closes it in `teardown` or
`on_exception`, so the swap of `torch.nn.functional.linear` lasts exactly as long as the run
(fit, validate, test, predict) and is announced once on rank 0. Elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.kernels.onednn_linear import ENV_VAR, backend, onednn_linears

__all__ = ["OneDNNLinearCallback"]


class OneDNNLinearCallback(Callback):
    """Opens `onednn_linears()` for the duration of a CPU Trainer run (see the module docstring)."""

    def __init__(self) -> None:
        self._open: contextlib.ExitStack | None = None

    @property
    def active(self) -> bool:
        """Whether the swap is open now."""
        return self._open is not None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._open is not None or trainer.strategy.root_device.type != "cpu":
            return
        if backend() != "onednn":
            return
        self._open = contextlib.ExitStack()
        self._open.enter_context(onednn_linears())
        rank_zero_info(f"float32 CPU linear layers run on oneDNN ({ENV_VAR}=torch: torch's MKL)")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None
