"""Compile the fused-norm kernels for an H100 (sm_90) with Triton's own compiler: no GPU needed.

Run as a script with TRITON_INTERPRET unset (test_fused_norm.py does), so that a kernel that would fail to
compile on a GPU fails in CI. Prints one line per kernel and specialisation; with --registers also what ptxas
(bundled with Triton) reports for each: registers per thread and spills.

    env -u TRITON_INTERPRET python tests/triton_aot.py --registers
"""

import glob
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from klvae.inference import fused_norm_kernels as k

# Constants as the wrapper passes them for sd-class widths (C = 128 .. 512 in 32 groups), per kernel.
CONSTS = {
    "stats_kernel": lambda c: {"G": 32, "CPG": c // 32, "G_P": 32, "CPG_P": c // 32, "BLOCK_HW": 4096 // c},
    "finalize_kernel": lambda c: {"G": 32, "CPG": c // 32, "G_P": 32, "CPG_P": c // 32, "BLOCK_P": 64},
    "apply_kernel": lambda c: {"SILU": True, "C_P": c, "BLOCK_HW": 4096 // c},
}
# Triton turns an int argument equal to 1 into a constant unless told not to: the unit channel stride of NHWC.
ONES = {"s_c"}


def signature(fn: triton.JITFunction, c: int, dtype: str, ones: bool) -> tuple[dict, dict]:
    """Argument types and constant values for one specialisation of `fn`."""
    consts = CONSTS[fn.__name__](c)
    sig, values = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], values[(i,)] = "constexpr", consts[name]
        elif ones and name in ONES:
            sig[name], values[(i,)] = "constexpr", 1
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("part_ptr", "mean_ptr", "scale_ptr") else f"*{dtype}"
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
    return sig, values


def ptxas_report(ptx: str) -> str:
    """ptxas -v's register and spill lines for one kernel's PTX."""
    ptxas = glob.glob(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas*"))[0]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, check=True)
    return "; ".join(line.split("info    : ")[-1].strip() for line in r.stderr.splitlines()
                     if "registers" in line or "spill" in line)


def main(registers: bool) -> None:
    target = GPUTarget("cuda", 90, 32)
    for fn in (k.stats_kernel, k.finalize_kernel, k.apply_kernel):
        cases = ((128, "bf16", False), (512, "fp16", False), (256, "fp32", True))
        if registers:  # the model's widths in bf16 NHWC, as a GPU decode runs them
            cases = ((128, "bf16", True), (256, "bf16", True), (512, "bf16", True))
        for c, dtype, ones in cases:
            sig, values = signature(fn, c, dtype, ones)
            out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=values), target=target)
            extra = ptxas_report(out.asm["ptx"]) if registers else ""
            print(fn.__name__, c, dtype, "ones" if ones else "", len(out.asm["cubin"]), "bytes of cubin", extra)
    sys.stdout.flush()


if __name__ == "__main__":
    main("--registers" in sys.argv[1:])
