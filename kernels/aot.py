"""Compile every Triton kernel specialisation for sm_80 and sm_90 ahead of time, without a GPU.

Usage (``TRITON_INTERPRET`` must be unset: ``@triton.jit`` reads it when the kernels are
defined, and the interpreter compiles nothing)::

    python -m rlhf_lightning.kernels.aot                    # JSON report on stdout
    python -m rlhf_lightning.kernels.aot --json report.json --workers 2
    python -m rlhf_lightning.kernels.aot --markdown          # the table of docs/kernels.md

Exit status 1 when a check fails (one line per failure on stderr), 2 for bad usage.
Steps 1–2 (recording and specialising) live in ``aot_record.py``; this module compiles,
checks and reports.

1. **Record.** The real launchers (``_fwd`` / ``_bwd`` through ``TritonTokenStats``, the
   layer the public API calls) run on tiny CPU tensors while both kernels are replaced by a
   recorder: ``kernel[grid](*args, **kwargs)`` keeps the arguments instead of launching. The
   inputs span what the API allows: every accepted logits dtype, no reference or a reference
   of any accepted dtype, labels or none, every subset of (log-prob, entropy, KL) receiving a
   gradient, gradients needed for logits / reference / both, contiguous and padded, misaligned
   rows, and vocabulary sizes at both ends of every (BLOCK_V, num_warps) class of
   ``_block_v`` / ``_launch_opts`` (found by sweeping V = 1 … 2^18; a class is cut at 4
   tiles), aligned and not.
2. **Specialise.** Each recorded launch goes through the JIT's own binder (triton 3.8:
   ``create_function_from_signature`` + ``JITFunction._pack_args``) for the target, giving the
   signature, constexprs, attributes and options that ``kernel[grid](...)`` would compile on a
   GPU. Launches are deduplicated by the JIT's cache key, so a new constexpr, dtype or launch
   option in a launcher appears here without editing this file.
3. **Compile** each specialisation with ``triton.compile`` (Triton's LLVM and bundled ptxas)
   for ``GPUTarget("cuda", 80 | 90, 32)`` in worker processes and a fresh cache directory;
   registers, stack frame and spill bytes come from the ``ptxas -v`` log of that compilation
   (``TRITON_DUMP_PTXAS_LOG``; ``n_spills`` = spill-store bytes / 4), shared memory from
   Triton's metadata (the dynamic shared memory a launch requests).

Checks per specialisation and target: it compiles; no ``ld.local`` / ``st.local`` in the PTX;
no spills; every conversion to a 16-bit float is ``cvt.rn``; ``ALIGNED`` variants issue vector
global loads; no runtime argument is value-specialised (which would make the set open).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from .aot_record import TARGETS, Specialiser, jit_kernels, record

_CVT_16BIT = re.compile(r"\bcvt((?:\.\w+)*?)\.(?:bf16|f16)(?:x2)?\.f(?:32|64)\b")
_ROUNDING = {"rn", "rz", "rm", "rp", "rna", "rs"}


def _ptxas_facts(log: str) -> dict:
    """Registers, stack frame and spills from ptxas ``-v`` (the log of this very compilation)."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log
    )
    if not (regs and frame):
        raise RuntimeError(f"no ptxas -v resource lines in the compile log: {log[-300:]!r}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return {
        "n_regs": int(regs.group(1)),
        "n_spills": stores // 4,
        "spill_store_bytes": stores,
        "spill_load_bytes": loads,
        "stack_bytes": stack,
    }


def _ptx_facts(ptx: str) -> dict:
    """What the checks need from the PTX: local-memory ops, 16-bit conversions, vector ops."""
    cvts = sorted({m.group(0) for m in _CVT_16BIT.finditer(ptx)})
    bad = [c for c in cvts if set(c.split(".")[1:-2]) & _ROUNDING != {"rn"}]
    return {
        "ptx_local_ops": len(re.findall(r"\b(?:ld|st)\.local\b", ptx)),
        "cvt_16bit": cvts,
        "cvt_16bit_not_rn": bad,
        "vector_global_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v\d", ptx)),
        "vector_global_stores": len(re.findall(r"\bst\.global(?:\.\w+)*\.v\d", ptx)),
    }


def _error_line(exc: Exception) -> str:
    """One line: ``CompilationError: at L:C (in the kernel) `source line`: message``."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    caret = next((i for i, ln in enumerate(lines) if ln.strip() == "^"), 0)
    if caret:
        text = f"{lines[0]} `{lines[caret - 1].strip()}`: {' '.join(lines[caret + 1 :])}"
    else:
        text = " | ".join(lines[-3:])
    return f"{type(exc).__name__}: {text}"[:600]


def _compile_one(job) -> dict:
    """Worker: compile one (kernel, target) specialisation; never raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, cap, signature, constexprs, attrs, options = job
    log = io.StringIO()
    try:
        src = ASTSource(jit_kernels()[name], signature, constexprs, attrs)
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
        facts = _ptxas_facts(log.getvalue())
    except Exception as exc:  # the report names the failing specialisation
        return {"ok": False, "error": _error_line(exc)}
    return {
        "ok": True,
        "error": None,
        **facts,
        "shared": compiled.metadata.shared,
        **_ptx_facts(compiled.asm["ptx"]),
    }


def _describe(kernel, per_target) -> dict:
    """JSON-able identity of one specialisation (names instead of argument positions)."""
    options, signature, constexprs, attrs = per_target[TARGETS[-1]]
    names = kernel.arg_names
    declared = {p.name for p in kernel.params if p.is_constexpr}
    consts = {names[path[0]]: value for path, value in constexprs.items()}
    return {
        "kernel": kernel.__name__,
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "constexprs": {k: v for k, v in consts.items() if k in declared},
        "num_warps": options.num_warps,
        "value_specialised": sorted(
            {names[p[0]] for p, v in attrs.items() if v} | (consts.keys() - declared)
        ),
    }


def compile_all(spec: Specialiser, workers: int) -> list[dict]:
    """Compile every recorded specialisation for every target; one dict per specialisation."""
    entries, jobs = [], []
    for kernel, per_target in spec.specs.values():
        entries.append(_describe(kernel, per_target))
        for cap, (options, signature, constexprs, attrs) in per_target.items():
            jobs.append((kernel.__name__, cap, signature, constexprs, attrs, options.__dict__))
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        results = list(pool.map(_compile_one, jobs, chunksize=4))
    for i, entry in enumerate(entries):
        entry["targets"] = {
            f"sm_{TARGETS[j]}": results[i * len(TARGETS) + j] for j in range(len(TARGETS))
        }
    return entries


def violations(entries: list[dict]) -> list[str]:
    """One line per failed check: ``<kernel> <constexprs> <dtypes> sm_XX: what``."""
    out = []
    for e in entries:
        where = f"{e['kernel']} {e['constexprs']} num_warps={e['num_warps']} z={e['signature']['z_ptr']}"
        if e["value_specialised"]:
            out.append(f"{where}: runtime argument(s) {e['value_specialised']} value-specialised")
        for target, r in e["targets"].items():
            if not r["ok"]:
                out.append(f"{where} {target}: does not compile: {r['error']}")
                continue
            if r["ptx_local_ops"] or r["spill_store_bytes"] or r["stack_bytes"]:
                out.append(
                    f"{where} {target}: local memory: {r['ptx_local_ops']} ld/st.local in the PTX, "
                    f"{r['spill_store_bytes']} B spill stores, {r['stack_bytes']} B stack frame"
                )
            if r["cvt_16bit_not_rn"]:
                out.append(f"{where} {target}: not round-to-nearest: {r['cvt_16bit_not_rn']}")
            if e["constexprs"].get("ALIGNED") and not r["vector_global_loads"]:
                out.append(f"{where} {target}: ALIGNED variant issues no vector global loads")
    return out


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def markdown(report: dict) -> str:
    """The resource table: one row per kernel × dtype × tile × ALIGNED, flag variants grouped."""
    groups: dict = {}
    for e in report["specialisations"]:
        c = e["constexprs"]
        key = (e["kernel"], e["signature"]["z_ptr"][1:], c.get("BLOCK_V"), e["num_warps"])
        groups.setdefault((*key, bool(c.get("ALIGNED"))), []).append(e)
    head = "| kernel | dtype | BLOCK_V / warps | ALIGNED | variants |"
    head += "".join(f" {t} regs | {t} shared B | {t} spills |" for t in report["targets"])
    lines = [head, "|" + "---|" * (5 + 3 * len(report["targets"]))]
    for (kernel, dtype, block, warps, aligned), es in sorted(groups.items()):
        row = f"| `{kernel}` | {dtype} | {block} / {warps} | {'yes' if aligned else 'no'} | {len(es)} |"
        for t in report["targets"]:
            rs = [e["targets"][t] for e in es if e["targets"][t]["ok"]]
            if len(rs) < len(es):
                row += " fails | fails | fails |"
                continue
            row += f" {_span([r['n_regs'] for r in rs])} | {_span([r['shared'] for r in rs])} |"
            row += f" {_span([r['n_spills'] for r in rs])} |"
        lines.append(row)
    n = len(report["specialisations"])
    lines.append(
        f"\n{n} specialisations × {len(report['targets'])} targets = "
        f"{n * len(report['targets'])} compilations (from {report['launches_recorded']} recorded "
        f"launches; triton {report['triton']})."
    )
    return "\n".join(lines)


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables for the duration of the block, then restore them."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(workers: int) -> dict:
    """Record, compile (in a fresh Triton cache, so ptxas really runs) and check: the report."""
    import triton

    from .dispatch import interpreter_on

    if interpreter_on():
        raise SystemExit(
            "rlhf_lightning.kernels.aot: TRITON_INTERPRET is set; unset it (the interpreter "
            "compiles nothing)"
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlhf-aot-cache-") as fresh:
        with _environ(TRITON_CACHE_DIR=fresh, TRITON_DUMP_PTXAS_LOG="1"):  # for the workers
            spec = record()
            recorded = time.perf_counter()
            entries = compile_all(spec, workers)
    return {
        "triton": triton.__version__,
        "targets": [f"sm_{c}" for c in TARGETS],
        "launches_recorded": spec.launches,
        "distinct_launches": len(spec.specs),
        "specialisations": entries,
        "violations": violations(entries),
        "seconds": {
            "record": round(recorded - start, 1),
            "compile": round(time.perf_counter() - recorded, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_lightning.kernels.aot", description=__doc__
    )
    parser.add_argument("--json", metavar="PATH", help="write the report here (default: stdout)")
    parser.add_argument("--markdown", action="store_true", help="print the docs table instead")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    report = run(args.workers)
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.markdown:
        print(markdown(report))
    elif not args.json:
        print(text)
    for line in report["violations"]:
        print(f"aot: {line}", file=sys.stderr)
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
