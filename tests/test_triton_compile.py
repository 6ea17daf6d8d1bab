"""The fused GPU kernels compile for an H100/H200 (sm_90) without a GPU, and their PTX holds no FMA.

The byte-identity tests (tests/test_triton_kernels.py) run the kernels under Triton's interpreter, which
neither compiles them nor fuses a·b + c into one rounding. This runs Triton's compiler and the bundled
ptxas on every launch the public functions make (qfl.benchmarks.triton_compile), in subprocesses without
TRITON_INTERPRET."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# found, not imported: importing triton here, before tests/test_triton_kernels.py sets TRITON_INTERPRET in
# the same worker, would leave triton.language's own functions compiled-only and break those tests
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)


def _python(code_or_module: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, *code_or_module], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[-1]


def test_every_fused_kernel_compiles_for_sm90_without_fused_multiply_adds():
    results = json.loads(_python(["-m", "qfl.benchmarks.triton_compile", "--json"]))
    source = open(os.path.join(os.path.dirname(__file__), "..", "compression", "triton_kernels.py")).read()
    launched = {line.split("[")[0].strip() for line in source.splitlines() if "_kernel[(" in line}
    launched.discard("kernel")  # _decode_scaled's parameter: the sign and ternary decoders
    compiled = {r["kernel"] for r in results}
    assert launched <= compiled and {"_sign_decode_kernel", "_ternary_decode_kernel"} <= compiled
    assert all(r["cubin_bytes"] > 0 and r["arch"] == 90 for r in results)
    assert [r["kernel"] for r in results if r["fma"]] == []
    # the qsgd key specialises as i32, i64 and u64 (the SplitMix64 key); each compiles
    assert {r["types"]["key"] for r in results if r["kernel"] == "_qsgd_kernel"} == {"i32", "i64", "u64"}
    # at a size divisible by 16 (the JIT marks n aligned) the encoders read x with vector loads only
    for name in ("_sign_kernel", "_qsgd_tile_kernel", "_ternary_kernel", "_absmax_kernel"):
        aligned = [r for r in results if r["kernel"] == name and "n" in r["aligned"] and "x_ptr" in r["aligned"]]
        assert aligned and all(r["global_loads"] == r["vector_loads"] > 0 for r in aligned), name
    # not vacuous: with fusion left on, the qsgd decoder's k·Δ − m becomes an FMA
    decoder = next(r for r in results if r["kernel"] == "_qsgd_decode_kernel")
    launch = {k: decoder[k] for k in ("kernel", "types", "constexprs")} | {"options": {}}
    code = ("import json, sys; from qfl.benchmarks.triton_compile import compile_launch; "
            f"print(json.dumps(compile_launch(json.loads({json.dumps(json.dumps(launch))}), 90)))")
    assert json.loads(_python(["-c", code]))["fma"] > 0
