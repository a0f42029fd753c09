"""What a GPU would run, measured without one: compile every Triton kernel variant in every autotune config for
sm_80 (A100) and sm_90a (H100) on this machine and read registers, spills and shared memory from ``ptxas``.

    python -m accel.kernels.build_report --out DIR [--arch 80 89 90] [--only VARIANT ...] [--configs LABEL ...]
                                         [--jobs N]

writes ``DIR/<variant>.<config>.sm_<arch>.ptx`` and ``DIR/report.json``: one row per build with the kernel,
variant, config, arch, registers, spill store/load bytes, shared memory (Triton's allocation), the int8
tensor-core instructions in the PTX counted apart (``wgmma.mma_async ... .s8``, Hopper's, and ``mma.sync ...
.s8``, what sm_80/sm_89 run and what sm_90a falls back to when a config does not meet wgmma's conditions), the
``cp.async`` copies (a pipelined K loop), and Triton's diagnostics that mean a slow dot (a remark that MMA v3 was
not applied; a warning that an operand is transposed in registers before shared memory, which also turns off
its pipelined load). The configs are the autotuner's for each arch (:func:`.triton_kernels.tile_configs`).
It prints one line per arch and exits with 1 when a build spills, a GEMM/conv build has no int8 tensor-core
instruction, an sm_90a GEMM/conv build has no wgmma or a transposed operand, or a build needs more shared
memory than its arch has per block.
Triton compiles for an explicit ``GPUTarget`` with no driver, and its wheel ships ``ptxas``. The variants are the
specialisations the quantized UNet launches (pointer alignment and ``stride == 1`` as Triton specialises them
at launch). Compilation needs Triton out of its interpreter, so the report runs in a child process with
``TRITON_INTERPRET=0`` when this one has it on.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (80, 90)  # the default; 89 (Ada: L4, L40, RTX 40) on request
ARCH_CHOICES = (80, 86, 89, 90)
# the most dynamic shared memory one block may have (bytes): A100 163 KB, sm_86/sm_89 99 KB, H100/H200 227 KB
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_WGMMA = re.compile(r"^\s*wgmma\.mma_async\S*\.s8\b", re.M)
_MMA_SYNC = re.compile(r"^\s*mma\.sync\S*\.s8\b", re.M)
_CP_ASYNC = re.compile(r"^\s*cp\.async\.(?:ca|cg)\b", re.M)
# Triton's diagnostics (MLIR_ENABLE_DIAGNOSTICS) that mean the dot did not get the fast path
_NO_MMA_V3 = "MMA version 3 acceleration not applied"
_TRANSPOSED = "Forcing a different order"

# ---------------------------------------------------------------------------------------------- variants
# name -> (kernel, pointer dtypes, ints divisible by 16, constexprs (besides the config's))
_GEMM_PTRS = dict(a_ptr="*i8", w_ptr="*i8", c_ptr="*fp32", sa_ptr="*fp32", qt_ptr="*fp32", step_ptr="*i32",
                  ws_ptr="*fp32", wz_ptr="*i8", wsum_ptr="*fp32", b_ptr="*fp32")
_GEMM_DIV = ("N", "K", "stride_am", "stride_wn", "stride_cm")
_GEMM_FLAGS = dict(A_MODE=0, PER_ROW_A=False, HAS_STEP=False, HAS_WZ=True, HAS_AZ=False, HAS_SHIFT=False,
                   HAS_BIAS=True, EVEN_K=True, OFFS_64=False)
_CONV_PTRS = dict(x_ptr="*i8", w_ptr="*i8", y_ptr="*fp32", r_ptr="*fp16", xs_ptr="*fp32", qt_ptr="*fp32",
                  step_ptr="*i32", ws_ptr="*fp32", wz_ptr="*i8", wsum_ptr="*fp32", wtap_ptr="*fp32", b_ptr="*fp32")
_CONV_DIV = ("C", "O", "sxn", "sxc", "sxh", "sxw", "swo", "swh", "sww", "syn", "syh", "syw")
_CONV_FLAGS = dict(A_MODE=0, HAS_STEP=False, HAS_WZ=True, HAS_SHIFT=False, HAS_BIAS=True, HAS_RES=False,
                   EVEN_C=True, OFFS_64=False, KH=3, KW=3, STRIDE=1, PAD=1, sxc=1, syo=1)


def _static(dtype):  # a static quantized layer in the model's float dtype: one kernel
    return dict(a_ptr=f"*{dtype}", c_ptr=f"*{dtype}", b_ptr=f"*{dtype}"), dict(A_MODE=1, HAS_STEP=True, HAS_SHIFT=True)


VARIANTS = {
    "gemm.int8": ("gemm", {}, {}),
    "gemm.static.fp16": ("gemm",) + _static("fp16"),
    "gemm.static.bf16": ("gemm",) + _static("bf16"),
    "gemm.static.fp16.oddk": ("gemm", _static("fp16")[0], dict(_static("fp16")[1], EVEN_K=False)),
    "gemm.dynamic.fp16": ("gemm", dict(a_ptr="*fp16", c_ptr="*fp16", b_ptr="*fp16"), dict(A_MODE=2, PER_ROW_A=True)),
    "conv.int8.3x3": ("conv", {}, {}),
    "conv.static.fp16.3x3": ("conv", dict(x_ptr="*fp16", y_ptr="*fp16", b_ptr="*fp16"),
                             dict(A_MODE=1, HAS_STEP=True, HAS_SHIFT=True)),
    "conv.static.bf16.3x3": ("conv", dict(x_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16"),
                             dict(A_MODE=1, HAS_STEP=True, HAS_SHIFT=True)),
    "conv.static.fp16.3x3s2": ("conv", dict(x_ptr="*fp16", y_ptr="*fp16", b_ptr="*fp16"),
                               dict(A_MODE=1, HAS_STEP=True, HAS_SHIFT=True, STRIDE=2)),
    "conv.static.fp16.3x3.split": ("conv", dict(x_ptr="*fp16", y_ptr="*fp16", r_ptr="*fp16"),
                                   dict(A_MODE=1, HAS_STEP=True, HAS_SHIFT=True, HAS_BIAS=False, HAS_RES=True)),
    "conv.static.fp16.1x1": ("conv", dict(x_ptr="*fp16", y_ptr="*fp16", b_ptr="*fp16"),
                             dict(A_MODE=1, HAS_STEP=True, HAS_SHIFT=True, KH=1, KW=1, PAD=0)),
    "conv.static.fp16.3x3.c4": ("conv", dict(x_ptr="*fp16", y_ptr="*fp16", b_ptr="*fp16"),  # conv_in: 4 channels,
                                dict(A_MODE=1, HAS_STEP=True, HAS_SHIFT=True, EVEN_C=False,  # NCHW latents
                                     sxc=None, sxw=1)),
    "quant.per_token": ("quant_per_token", {}, {}),
    "quant.static": ("quant_static", {}, {}),
    "quant.table": ("quant_table", {}, {}),  # the strided walk (a split shortcut's half)
    "quant.table.dense": ("quant_table", {}, dict(DENSE=True)),
}


def _codes(kname, dtype, **flags):  # what a static layer runs now: int8 codes from quant.table, the static epilogue
    if kname == "gemm":
        return ("gemm", dict(c_ptr=f"*{dtype}", b_ptr=f"*{dtype}"), dict(A_MODE=3, HAS_STEP=True, HAS_SHIFT=True, **flags))
    ptrs = dict(y_ptr=f"*{dtype}", b_ptr=f"*{dtype}", r_ptr=f"*{dtype}")
    return ("conv", ptrs, dict(A_MODE=3, HAS_STEP=True, HAS_SHIFT=True, **flags))


VARIANTS.update({
    "gemm.rows.fp16": ("gemm", dict(c_ptr="*fp16", b_ptr="*fp16"), dict(PER_ROW_A=True)),  # a dynamic layer now
    "gemm.codes.fp16": _codes("gemm", "fp16"),
    "gemm.codes.bf16": _codes("gemm", "bf16"),
    "gemm.codes.fp16.oddk": _codes("gemm", "fp16", EVEN_K=False),
    "conv.codes.fp16.3x3": _codes("conv", "fp16"),
    "conv.codes.bf16.3x3": _codes("conv", "bf16"),
    "conv.codes.fp16.3x3s2": _codes("conv", "fp16", STRIDE=2),
    "conv.codes.fp16.3x3.split": _codes("conv", "fp16", HAS_BIAS=False, HAS_RES=True),
    "conv.codes.fp16.1x1": _codes("conv", "fp16", KH=1, KW=1, PAD=0),
    "conv.codes.fp16.3x3.c4": _codes("conv", "fp16", EVEN_C=False, sxc=None, sxw=1),
})
TENSOR_CORE_KERNELS = ("gemm", "conv")


def _kernels():
    from . import triton_kernels as tk

    return {"gemm": (tk._gemm_kernel, _GEMM_PTRS, _GEMM_DIV, _GEMM_FLAGS),
            "conv": (tk._conv_kernel, _CONV_PTRS, _CONV_DIV, _CONV_FLAGS),
            "quant_per_token": (tk._quant_per_token_kernel, dict(x_ptr="*fp16", q_ptr="*i8", s_ptr="*fp32"),
                                ("K", "stride_xm", "stride_qm"), {}),
            "quant_static": (tk._quant_static_kernel, dict(x_ptr="*fp16", q_ptr="*i8", qp_ptr="*fp32"), (), {}),
            "quant_table": (tk._quant_table_kernel, dict(x_ptr="*fp16", q_ptr="*i8", qt_ptr="*fp32", step_ptr="*i32"),
                            ("D1", "D2", "D3", "S0", "S1", "S2"), dict(HAS_STEP=True, DENSE=False, OFFS_64=False, S3=1))}


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _configs(kname, kernel, arch: int, channels: int | None = None):
    """``[(label, constexprs, num_warps, num_stages)]``: the autotuner's configs on ``arch`` (for a conv, those
    it keeps for ``channels`` input channels), or the one plain launch."""
    import triton

    from .triton_kernels import conv_configs, tile_configs

    if isinstance(kernel, triton.runtime.Autotuner):
        configs = tile_configs(kname, arch)
        out = []
        for c in (conv_configs(configs, channels) if channels is not None else configs):
            kw = c.kwargs
            label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}w{c.num_warps}s{c.num_stages}"
            out.append((label, dict(kw), c.num_warps, c.num_stages))
        return out
    return [("block1024w4", {"BLOCK": 1024} if "BLOCK" in _jit_fn(kernel).arg_names else {"BLOCK_K": 1024}, 4, 3)]


def builds(only: list[str] | None = None, archs=ARCHS, configs: list[str] | None = None) -> list[tuple]:
    kernels = _kernels()
    out = []
    for name, (kname, ptrs, flags) in VARIANTS.items():
        if only and not any(name == o or name.startswith(o + ".") for o in only):
            continue
        channels = 4 if name.endswith(".c4") else 320  # what the conv's autotuner keeps for this variant
        for arch in archs:
            for label, cfg, warps, stages in _configs(kname, kernels[kname][0], arch,
                                                      channels if kname == "conv" else None):
                if configs and not any(label.startswith(c) for c in configs):
                    continue
                out.append((name, kname, ptrs, flags, label, cfg, warps, stages, arch))
    return out


def _ptxas():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


UNIT_STRIDES = ("sxc", "sxw", "syo")  # what a launch on channels_last tensors makes constant


def compile_one(job, out_dir: str, generic: bool = False) -> dict:
    """Compile one (variant, config, arch) to PTX, run ``ptxas -v``, return the report row. ``generic``: no
    launch specialisation (no 16-divisibility, no unit strides): the worst case for registers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kname, ptrs, flags, label, cfg, warps, stages, arch = job
    kernel, base_ptrs, divisible, base_flags = _kernels()[kname]
    fn = _jit_fn(kernel)
    constexprs = {k: v for k, v in {**base_flags, **flags, **cfg}.items() if k in fn.arg_names
                  and v is not None and not (generic and k in UNIT_STRIDES)}  # None: a runtime argument
    all_ptrs = {**base_ptrs, **ptrs}
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in all_ptrs:
            signature[arg] = all_ptrs[arg]
            if not generic:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if arg in divisible and not generic:
                attrs[(i,)] = [["tt.divisibility", 16]]
    gpu = arch_name(arch)
    t0 = time.time()
    compiled, diagnostics = _with_diagnostics(
        lambda: triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=warps, num_stages=stages)))
    ptx = compiled.asm["ptx"]
    path = Path(out_dir) / f"{name}.{label}.{gpu}{'.generic' if generic else ''}.ptx"
    path.write_text(ptx)
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", str(path), "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed on {path.name}: {res.stderr.strip()[:500]}")
    log = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", log)
    return dict(kernel=kname, variant=name, config=label, arch=gpu, specialised=not generic, num_warps=warps, num_stages=stages,
                registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log)),
                spill_load_bytes=sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log)),
                shared_bytes=int(compiled.metadata.shared), shared_limit_bytes=SMEM_LIMIT.get(arch),
                wgmma=len(_WGMMA.findall(ptx)), mma_sync=len(_MMA_SYNC.findall(ptx)),
                int8_mma=len(_WGMMA.findall(ptx)) + len(_MMA_SYNC.findall(ptx)), cp_async=len(_CP_ASYNC.findall(ptx)),
                mma_v3_not_applied=_NO_MMA_V3 in diagnostics, operand_transposed=_TRANSPOSED in diagnostics,
                ptx=path.name, compile_s=round(time.time() - t0, 2))


def arch_name(arch: int) -> str:
    return "sm_90a" if arch == 90 else f"sm_{arch}"  # 90a: the wgmma instructions


def _with_diagnostics(compile_fn):
    """``(compile_fn(), what MLIR printed)``: Triton's warnings and remarks are switched on and this process's
    stderr (fd 2, where the C++ passes write) goes to a file for the call; a failed compile prints it."""
    saved_env = os.environ.get("MLIR_ENABLE_DIAGNOSTICS")
    os.environ["MLIR_ENABLE_DIAGNOSTICS"] = "warnings,remarks"
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        failed = True
        try:
            result = compile_fn()
            failed = False
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            if saved_env is None:
                os.environ.pop("MLIR_ENABLE_DIAGNOSTICS", None)
            else:
                os.environ["MLIR_ENABLE_DIAGNOSTICS"] = saved_env
            log.seek(0)
            text = log.read().decode(errors="replace")
            if failed:
                sys.stderr.write(text[-20000:])
        return result, text


def _compile_star(args):
    return compile_one(*args)


def run(out_dir, only=None, archs=ARCHS, jobs: int = 1, configs=None, generic: bool = False) -> list[dict]:
    """Build everything (in this process: Triton must not be in interpreter mode) and write ``report.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = builds(only, archs, configs)
    if not todo:
        raise SystemExit(f"no kernel variant matches {only}; variants: {', '.join(VARIANTS)}")
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_compile_star, [(j, str(out), generic) for j in todo]))
    else:
        rows = [compile_one(j, str(out), generic) for j in todo]
    report = {"triton": _triton_version(), "builds": rows, "summary": summary(rows)}
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "report.json")
    return rows


def _triton_version():
    import triton

    return triton.__version__


def _name(r):
    return f"{r['variant']} {r['config']} {r['arch']}"


def summary(rows: list[dict]) -> dict:
    """Totals and the builds that fail a check, overall and per arch (``per_arch``); ``problems`` counts every
    failing build once per check (0: clean)."""
    tc = [r for r in rows if r["kernel"] in TENSOR_CORE_KERNELS]
    spilling = [_name(r) for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    no_mma = [_name(r) for r in tc if r["int8_mma"] == 0]
    hopper = [r for r in tc if r["arch"] == "sm_90a"]
    no_wgmma = [_name(r) for r in hopper if r.get("wgmma", 0) == 0]
    transposed = [_name(r) for r in tc if r.get("operand_transposed")]
    over_smem = [_name(r) for r in rows if r.get("shared_limit_bytes") and r["shared_bytes"] > r["shared_limit_bytes"]]
    per_arch = {}
    for arch in sorted({r["arch"] for r in rows}):
        mine = [r for r in rows if r["arch"] == arch]
        mine_tc = [r for r in mine if r["kernel"] in TENSOR_CORE_KERNELS]
        per_arch[arch] = {
            "builds": len(mine), "tensor_core_builds": len(mine_tc),
            "wgmma_builds": sum(1 for r in mine_tc if r.get("wgmma", 0) > 0),
            "mma_sync_builds": sum(1 for r in mine_tc if r.get("mma_sync", 0) > 0),
            "max_registers": max((r["registers"] or 0) for r in mine),
            "spilling": sum(1 for r in mine if r["spill_store_bytes"] or r["spill_load_bytes"]),
            "max_shared_bytes": max(r["shared_bytes"] for r in mine)}
    return {"builds": len(rows), "spilling": spilling, "tensor_core_kernels_without_int8_mma": no_mma,
            "sm_90a_tensor_core_kernels_without_wgmma": no_wgmma, "operand_transposed": transposed,
            "over_shared_memory": over_smem,
            "max_registers": max((r["registers"] or 0) for r in rows) if rows else 0, "per_arch": per_arch,
            "problems": len(spilling) + len(no_mma) + len(no_wgmma) + len(transposed) + len(over_smem)}


def summary_lines(s: dict) -> list[str]:
    """One line per arch, e.g. ``sm_90a: 93/93 GEMM/conv builds use wgmma (0 mma.sync), 97 builds, max 255
    registers, max 147456 B shared, 0 spills``, then the failing builds by check and a total."""
    lines = []
    for arch, a in s["per_arch"].items():
        if arch == "sm_90a":
            mma = (f"{a['wgmma_builds']}/{a['tensor_core_builds']} GEMM/conv builds use wgmma "
                   f"({a['mma_sync_builds']} mma.sync)")
        else:
            mma = f"{a['mma_sync_builds']}/{a['tensor_core_builds']} GEMM/conv builds use mma.sync"
        lines.append(f"{arch}: {mma}, {a['builds']} builds, max {a['max_registers']} registers, max "
                     f"{a['max_shared_bytes']} B shared, {a['spilling']} spills")
    checks = [("spilling", "spill"), ("tensor_core_kernels_without_int8_mma", "GEMM/conv without int8 tensor cores"),
              ("sm_90a_tensor_core_kernels_without_wgmma", "sm_90a GEMM/conv without wgmma"),
              ("operand_transposed", "operand transposed in registers (no pipelined load)"),
              ("over_shared_memory", "more shared memory than the arch has per block")]
    for key, what in checks:
        if s[key]:
            more = " ..." if len(s[key]) > 10 else ""
            lines.append(f"FAIL {what}: {len(s[key])}: " + "; ".join(s[key][:10]) + more)
    lines.append(f"{s['builds']} builds, max {s['max_registers']} registers: "
                 + ("all checks pass" if not s["problems"] else f"{s['problems']} failing checks"))
    return lines


def table(rows: list[dict]) -> str:
    lines = ["| variant | config | arch | regs | spill st/ld B | smem B | wgmma | mma.sync | cp.async |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['config']} | {r['arch']} | {r['registers']} | {r['spill_store_bytes']}/"
                     f"{r['spill_load_bytes']} | {r['shared_bytes']} | {r['wgmma']} | {r['mma_sync']} | "
                     f"{r['cp_async']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m accel.kernels.build_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the PTX files and report.json (created)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCH_CHOICES)
    p.add_argument("--only", nargs="+", help=f"variant names or prefixes (of: {', '.join(VARIANTS)})")
    p.add_argument("--configs", nargs="+", help="tile configs whose label starts with these (e.g. 128x128)")
    p.add_argument("--jobs", type=int, default=1, help="parallel compilations")
    p.add_argument("--generic", action="store_true", help="compile without launch specialisation (16-byte "
                                                          "alignment, unit strides): the worst case")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call([sys.executable, "-m", "accel.kernels.build_report"] + list(argv or sys.argv[1:]),
                               env=env)
    rows = run(args.out, args.only, tuple(args.arch), args.jobs, args.configs, args.generic)
    print(table(rows))
    s = summary(rows)
    print()
    print("\n".join(summary_lines(s)))
    print(f"wrote {Path(args.out) / 'report.json'}")
    return 1 if s["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
