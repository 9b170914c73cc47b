"""Compile the fused-norm kernels for an H100 (sm_90) with Triton's own compiler: no GPU needed.

Run as a script with TRITON_INTERPRET unset (test_fused_norm.py does), so that a kernel that would fail to
compile on a GPU fails in CI. Prints one line per kernel and specialisation; with --registers also what ptxas
(bundled with Triton) reports for each: registers per thread and spills.

    env -u TRITON_INTERPRET python tests/triton_aot.py --registers
"""

import glob
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from klvae.inference import fused_norm as f
from klvae.inference import fused_norm_kernels as k

# Constants as the wrapper passes them for sd-class widths (C = 128 .. 512 in 32 groups), per kernel.
CONSTS = {
    "stats_kernel": lambda c: {"G": 32, "CPG": c // 32, "G_P": 32, "CPG_P": c // 32, "BLOCK_HW": f._TILE // c},
    "finalize_kernel": lambda c: {"G": 32, "CPG": c // 32, "G_P": 32, "CPG_P": c // 32, "BLOCK_P": f._TILE // 32 // 2},
    "apply_kernel": lambda c: {"C": c, "SILU": True, "C_P": c, "BLOCK_HW": f._TILE // c},
}
# Warps per program as the wrapper launches them (Triton's default of 4 for the one-per-image finalize kernel).
WARPS = {"stats_kernel": f._WARPS, "finalize_kernel": 4, "apply_kernel": f._WARPS}
# Triton turns an int argument equal to 1 into a constant unless told not to: the unit channel stride of NHWC.
ONES = {"s_c"}
# Triton marks an argument divisible by 16 when it is (a pointer's address; a specialised int), which lets it
# vectorise loads. torch's allocations are aligned, and an NHWC map of C = 128 .. 512 has 16-divisible image and
# position strides; sizes are not specialised.
ALIGNED_INTS = {"s_n", "s_hw"}


def signature(fn: triton.JITFunction, c: int, dtype: str, nhwc: bool) -> tuple[dict, dict, dict]:
    """Argument types, constant values and divisibility attributes for one specialisation of `fn`."""
    consts = CONSTS[fn.__name__](c)
    sig, values, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], values[(i,)] = "constexpr", consts[name]
        elif nhwc and name in ONES:
            sig[name], values[(i,)] = "constexpr", 1
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("part_ptr", "mean_ptr", "scale_ptr") else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
            if nhwc and name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, values, attrs


def global_loads(ptx: str) -> str:
    """The kernel's global loads and stores by width (ld.global.v4.b32 moves 16 bytes; .b16 two)."""
    return " ".join(f"{n}x {op}" for op, n in sorted(Counter(re.findall(r"(?:ld|st)\.global[\w.]*", ptx)).items()))


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
        for c, dtype, nhwc in cases:
            sig, values, attrs = signature(fn, c, dtype, nhwc)
            out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=values, attrs=attrs), target=target,
                                 options={"num_warps": WARPS[fn.__name__], "enable_fp_fusion": True})
            extra = f"{ptxas_report(out.asm['ptx'])}; {global_loads(out.asm['ptx'])}" if registers else ""
            print(f"triton {triton.__version__}", fn.__name__, c, dtype, "nhwc" if nhwc else "", len(out.asm["cubin"]),
                  "bytes of cubin", extra)
    sys.stdout.flush()


if __name__ == "__main__":
    main("--registers" in sys.argv[1:])
