"""Record every launch the Triton launchers can make, as per-target compile arguments.

The enumeration half of ``python -m rlhf_lightning.kernels.aot`` (steps 1 and 2 of that
module's docstring; ``aot.py`` compiles, checks and reports):

1. **Record.** The real launchers (``_fwd`` / ``_bwd`` through ``TritonTokenStats``) run on
   tiny CPU tensors while every ``@triton.jit`` kernel is replaced by a recorder that keeps the
   arguments of ``kernel[grid](*args, **kwargs)`` instead of launching. The inputs span what
   the API allows (dtypes, reference or none, labels or none, gradient subsets, padded rows,
   both ends of every ``_block_v`` / ``_launch_opts`` class of V = 1 … 2^18).
2. **Specialise.** Each recorded launch goes through the JIT's own binder (triton 3.8:
   ``create_function_from_signature`` + ``JITFunction._pack_args``) for each target;
   launches are deduplicated by the JIT's cache key.
"""

from __future__ import annotations

import itertools

TARGETS = (80, 90)
_SWEEP_MAX_V = 2**18
_MAX_TILES = 4
_ROWS = 2


def jit_kernels() -> dict:
    """Name → JITFunction for every ``@triton.jit`` function of the kernels module.

    All are replaced by recorders, so a new kernel is recorded too; ``@triton.jit`` helpers
    are only called inside kernels and record nothing.
    """
    from triton.runtime.jit import JITFunction

    from . import triton_token_stats as tts

    return {k: v for k, v in vars(tts).items() if isinstance(v, JITFunction)}


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records, launches nothing."""

    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink(self.kernel, args, kwargs)


class Specialiser:
    """The JIT's own binder per target: recorded launch → (cache key, compile arguments)."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.backends = {c: make_backend(GPUTarget("cuda", c, 32)) for c in TARGETS}
        self.binders = {
            (name, c): create_function_from_signature(k.signature, k.params, b)
            for name, k in jit_kernels().items()
            for c, b in self.backends.items()
        }
        self.key_caches = {key: {} for key in self.binders}  # as JITFunction keeps per device
        self.specs: dict = {}
        self.launches = 0

    def __call__(self, kernel, args, kwargs):
        """Mirror ``JITFunction.run`` up to compilation, for each target."""
        from triton import knobs
        from triton.runtime.jit import compute_cache_key

        self.launches += 1
        kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug)
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound = {}
        keys = [kernel.__name__]
        for cap in TARGETS:
            b = self.binders[kernel.__name__, cap]
            bound[cap] = b(*args, **kwargs)
            keys.append(compute_cache_key(self.key_caches[kernel.__name__, cap], *bound[cap][1:]))
        if tuple(keys) not in self.specs:
            self.specs[tuple(keys)] = (
                kernel,
                {c: kernel._pack_args(self.backends[c], kwargs, *bound[c]) for c in TARGETS},
            )


def _vocab_sizes() -> list[int]:
    """Both ends of every (BLOCK_V, launch options) class of V = 1 … 2^18, aligned and not.

    A class's upper end is cut at 4 tiles (the last class is open-ended): multi-tile rows are
    exercised without megabyte-sized inputs.
    """
    from . import _FLOATS
    from . import triton_token_stats as tts

    classes: dict = {}
    for v in range(1, _SWEEP_MAX_V + 1):
        block = tts._block_v(v)
        opts = tuple(tuple(sorted(tts._launch_opts(block, dt).items())) for dt in _FLOATS)
        classes.setdefault((block, opts), []).append(v)
    sizes = set()
    for (block, _), vs in classes.items():
        vs = [v for v in vs if v <= max(vs[0], _MAX_TILES * block)]
        aligned = [v for v in vs if v % tts.ALIGNMENT == 0]
        for group in (vs, aligned, [v for v in vs if v % tts.ALIGNMENT]):
            sizes.update(group[:1] + group[-1:])
    return sorted(sizes)


def _tile(dtype, vocab: int, padded: bool):
    """A ``[N, V]`` tensor (unit last stride): contiguous, or in padded rows one element in."""
    import torch

    if not padded:
        return torch.zeros(_ROWS, vocab, dtype=dtype)
    return torch.zeros(_ROWS, vocab + 3, dtype=dtype)[:, 1 : vocab + 1]


def _drive(z, zq, labels, rows, grads_for, need) -> None:
    """Forward through ``TritonTokenStats``, then backward into outputs ``grads_for``."""
    import torch

    from .triton_token_stats import TritonTokenStats

    z = z.detach().requires_grad_(need[0])
    zq = None if zq is None else zq.detach().requires_grad_(need[1])
    outs = TritonTokenStats.apply(z, zq, labels, rows, 1.25)
    chosen = [outs[i] for i in grads_for]
    if chosen and (z.requires_grad or (zq is not None and zq.requires_grad)):
        torch.autograd.backward(chosen, [torch.ones_like(o) for o in chosen])


def record() -> Specialiser:
    """Run the launchers over the input space with recorders in place of the kernels."""
    import torch

    from . import _FLOATS
    from . import triton_token_stats as tts

    spec = Specialiser()
    saved = {n: getattr(tts, n) for n in jit_kernels()}
    rows = torch.tensor([1])  # [Nv]: row 0 masked
    labels = torch.zeros(_ROWS, dtype=torch.int64)  # [N]
    subsets = [s for r in range(4) for s in itertools.combinations(range(3), r)]
    try:
        for name, kernel in saved.items():
            setattr(tts, name, _Recorder(kernel, spec))
        for vocab, padded, dt in itertools.product(_vocab_sizes(), (False, True), _FLOATS):
            z = _tile(dt, vocab, padded)
            for ref_dt, lab in itertools.product((None, *_FLOATS), (None, labels)):
                zq = None if ref_dt is None else _tile(ref_dt, vocab, padded)
                needs = (
                    [(True, False)] if zq is None else [(True, False), (False, True), (True, True)]
                )
                for grads_for, need in itertools.product(subsets, needs):
                    _drive(z, zq, lab, rows, grads_for, need)
    finally:
        for name, kernel in saved.items():
            setattr(tts, name, kernel)
    return spec
