"""The benchmark script runs end to end on the CPU and writes the rows docs/benchmarks.md is built from."""

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from helpers import benchmark_script

ROOT = Path(__file__).resolve().parents[2]


def test_bench_writes_every_variant_and_case(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--device", "cpu", "--preset", "tiny",
           "--warmup", "0", "--iters", "1", "--cases", "decode:64:2", "decode:64:1:tiled", "encode:64:1:tiled",
           "--variants", "klvae", "klvae-fast", "klvae-unfolded", "diffusers", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    rows = {(r["case"], r["library"]): r for r in report["rows"]}
    assert report["env"]["preset"] == "tiny" and len(rows) == 12
    exact = rows[("decode:64:2", "klvae")]  # strict JSON: an exact result's infinite PSNR is null
    assert exact["psnr_vs_fp32_untiled"] is None and exact["max_abs_vs_fp32_untiled"] == 0
    assert "Infinity" not in out.read_text() and "NaN" not in out.read_text()
    assert rows[("decode:64:2", "klvae-fast")]["max_abs_vs_fp32_untiled"] < 1e-4  # folded: rounding only
    for case in ("decode:64:1:tiled", "encode:64:1:tiled"):  # exact strips; diffusers' tiles leave seams
        assert rows[(case, "klvae")]["psnr_vs_fp32_untiled"] > 100
        assert rows[(case, "diffusers enable_tiling()")]["psnr_vs_fp32_untiled"] < 45
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 for r in rows.values())


def test_bench_keeps_the_cases_done_when_a_later_one_fails(tmp_path: Path) -> None:
    # gpu.sh's `short` stops steps at time limits: the JSON is rewritten after every case, not only at the end.
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--device", "cpu", "--preset", "tiny",
           "--warmup", "0", "--iters", "1", "--cases", "decode:64:1", "decode:64:0", "--variants", "klvae",
           "diffusers", "--json", str(out)]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode != 0  # a batch of 0 fails
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["library"]) for r in rows] == [("decode:64:1", "klvae"), ("decode:64:1", "diffusers")]
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left


def _traffic() -> ModuleType:
    return benchmark_script("traffic")


def test_tiling_traffic_and_peak_stay_as_documented() -> None:
    """docs/benchmarks.md's traffic table: within a 2 GiB budget a 1024² job keeps every map on the GPU (only
    its input goes up, once) and a 2048² decode moves at most 6.1 GiB up and 3.55 GiB down (201 GiB at 4096² in
    the first version); no map is read back for statistics; the GPU never holds more than the budget (counted:
    weights plus live tensors)."""
    traffic = _traffic()
    vae = traffic.meta_model("sd15")
    for op in ("decode", "encode"):
        st = traffic.count(vae, op, 1024, 2 * 2**30)
        x = traffic.meta_input(vae, op, 1024)
        assert st.up == x.numel() * x.element_size() and st.down == 0
        assert st.stat_passes == 0 and st.peak <= 2 * 2**30
    st = traffic.count(vae, "decode", 2048, 2 * 2**30)
    assert st.stat_passes == 0 and st.peak <= 2 * 2**30
    assert 5 * 2**30 < st.up <= 6.1 * 2**30 and 3 * 2**30 < st.down <= 3.55 * 2**30


def test_a_small_budget_bounds_the_peak_with_keys_and_values_in_host_memory() -> None:
    """At 288 MiB (weights 160 MiB) even the attention's K and V go to host memory and stream in key chunks."""
    traffic = _traffic()
    seen = []

    class Watching(traffic.CountingStreamer):
        def _attention_chunks(self, *args: object) -> tuple[int, int]:
            seen.append((args[5], *super()._attention_chunks(*args)))  # (K/V on device, query rows, keys)
            return seen[-1][1:]

    traffic.CountingStreamer = Watching
    st = traffic.count(traffic.meta_model("sd15"), "decode", 1024, 288 * 2**20)
    assert st.peak <= 288 * 2**20 and st.up > 0
    assert len(seen) == 1 and seen[0][0] is False and seen[0][2] < 128 * 128
