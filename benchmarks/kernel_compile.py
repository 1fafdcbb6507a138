"""Compile Flat-LoRA's Triton noise kernel for a CUDA GPU without one: registers and spills per variant.

The CPU interpreter (``TRITON_INTERPRET=1``) checks what the kernel computes, not that it compiles for
a GPU. This script runs Triton's real compiler ahead of time (Triton IR → PTX → cubin with the
``ptxas`` that Triton bundles) for a given target, for each launch variant ``_noise_triton._launch``
uses (the fused row norms at ranks 8, 16 and 128, the stds given, ε alone, bf16/fp32), and reports
``ptxas -v``'s registers and spill bytes. It needs Triton, not a GPU or a CUDA driver.

    python benchmarks/kernel_compile.py --arch 90     # H100/H200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the interpreter replaces the kernel by a Python one
    sys.exit("benchmarks/kernel_compile.py compiles the real kernel: unset TRITON_INTERPRET")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from flatpeft import _noise_triton as K

VARIANTS = {  # name -> (NORM, HAS_W, dtype, LoRA rank)
    "norms+noise bf16 r=8": (True, True, "bf16", 8),
    "norms+noise bf16 r=16": (True, True, "bf16", 16),
    "norms+noise fp32 r=16": (True, True, "fp32", 16),
    "norms+noise bf16 r=128": (True, True, "bf16", 128),
    "noise, stds given, bf16": (False, True, "bf16", 0),
    "eps alone, fp32": (False, False, "fp32", 0),
}


def compile_variant(norm: bool, has_w: bool, dtype: str, rank: int, arch: int, n: int) -> dict:
    ptr = f"*{dtype}"
    signature = {
        "w_ptr": ptr, "std_ptr": "*fp32", "out_ptr": ptr, "a_ptr": "*fp32", "b_ptr": "*fp32",
        "sq_ptr": "*fp32", "seed": "i64", "m": "i32", "n": "i32", "stride_m": "i32", "stride_n": "i32",
        "r": "i32", "s": "fp32", "scale": "fp32",
    }  # fmt: skip
    constexprs = {
        "HAS_W": has_w,
        "NORM": norm,
        "BF16": dtype == "bf16",
        **K.launch_meta(n, rank if norm else None),
    }
    signature |= dict.fromkeys(constexprs, "constexpr")
    source = ASTSource(fn=K._noisy_rows_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})
    ptxas = get_ptxas(arch).path  # the ptxas Triton itself compiled the cubin with
    stats: dict = {"cubin_bytes": len(kernel.asm["cubin"])}
    if ptxas:
        with tempfile.TemporaryDirectory() as folder:
            ptx = Path(folder) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            log = subprocess.run(
                [ptxas, "-v", "--gpu-name", gpu, str(ptx), "-o", str(Path(folder) / "k.cubin")],
                capture_output=True, text=True, check=True,
            ).stderr  # fmt: skip
        if m := re.search(r"Used (\d+) registers", log):
            stats["registers"] = int(m.group(1))
        if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
            stats["spill_store_bytes"], stats["spill_load_bytes"] = int(m.group(1)), int(m.group(2))
    return stats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (90: H100/H200)")
    parser.add_argument("--n", type=int, default=4096, help="fan-in (sets the lanes per tile)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = {"arch": args.arch, "n": args.n, "triton": triton.__version__, "variants": {}}
    for name in args.variants:
        report["variants"][name] = compile_variant(*VARIANTS[name], args.arch, args.n)
        print(f"{name:<26} {report['variants'][name]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
