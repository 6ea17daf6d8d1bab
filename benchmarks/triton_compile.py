"""Compile every fused GPU codec kernel ahead of time for a CUDA target, without a GPU.

``python -m qfl.benchmarks.triton_compile [--arch 90] [--json]``

The kernels of :mod:`qfl.compression.triton_kernels` are tested for bytes on
CPU under Triton's interpreter, which does not run Triton's compiler. This
check does: it records the launches the public functions make on small
inputs (under ``TRITON_INTERPRET=1``, in a child process), then compiles each
distinct launch (kernel, argument types, constexprs, options) for
``GPUTarget("cuda", arch, 32)`` with the PTX assembler bundled in the triton
wheel, to a cubin. It reports per launch the PTX size, the global loads
(and how many are 64/128-bit vector loads) and stores, and the fused
multiply-adds (``fma``): the qsgd decoder is compiled with
``enable_fp_fusion=False`` because its bytes equal the CPU codec's only when
k·Δ − m rounds twice, so its PTX must hold none.

What it cannot tell: speed. Throughput needs a GPU (``qfl bench codecs
--device cuda``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
from typing import Any

RECORD_FLAG = "--record"


def record_launches() -> list[dict[str, Any]]:
    """Run the fused codecs on small CPU tensors under the interpreter and return each distinct launch:
    kernel name, argument types (Triton's names: ``*fp32``, ``i32``, ``u64`` ...), the arguments the JIT
    would mark 16-byte aligned, constexprs, options."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("record_launches runs under TRITON_INTERPRET=1 (see main)")
    import torch
    from triton._C.libtriton import native_specialize_impl  # the JIT's own rule (a private API of triton 3.x)
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    from qfl.compression import triton_kernels as tt

    launches: dict[str, dict[str, Any]] = {}
    original = InterpretedFunction.run

    def recording(self: Any, *args: Any, grid: Any, warmup: Any, **kwargs: Any) -> Any:
        params = list(inspect.signature(self.fn).parameters)
        constexprs = {name: kwargs[name] for name in params if name in kwargs}
        options = {name: value for name, value in kwargs.items() if name not in params}
        # as the JIT specialises: an int 1 becomes a constexpr; a pointer or int divisible by 16 gets
        # tt.divisibility = 16 ("D"), which is what lets the compiler emit vector loads
        types, aligned = {}, []
        for name, arg in zip(params, args):
            kind, attr = native_specialize_impl(BaseBackend, arg, False, True, True)
            if kind == "constexpr":
                constexprs[name] = attr
                continue
            types[name] = kind
            if attr == "D":
                aligned.append(name)
        launch = {"kernel": self.fn.__name__, "types": types, "aligned": aligned, "constexprs": constexprs,
                  "options": options}
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        gen = torch.Generator().manual_seed(0)
        keys = (7, 2**40 + 3, 2**64 - 5)  # the key argument specialises as i32, i64 and u64
        # 2^14 values: sizes divisible by 16, as a large model tensor's (the JIT then lets masked loads
        # vectorise); 5,000: a ragged size, another specialisation
        for x in (torch.randn(2**14, generator=gen), torch.randn(5000, generator=gen)):
            tt.decode_sign(tt.encode_sign(x), x.numel())
            for key in keys:
                for bits in (1, 2, 3, 4, 8):
                    tt.decode_qsgd(tt.encode_qsgd(x, bits, 512, key), x.numel())
                tt.decode_ternary(tt.encode_ternary(x, key), x.numel())
            for values in ("fp16", "fp32"):
                tt.decode_topk(tt.encode_topk(x, 0.01, values), x.numel(), values)
            tt.decode_stc(tt.encode_stc(x, 0.01), x.numel())
    finally:
        InterpretedFunction.run = original
    return list(launches.values())


def compile_launch(launch: dict[str, Any], arch: int) -> dict[str, Any]:
    """Compile one recorded launch for ``cuda:sm_<arch>``; PTX figures of the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qfl.compression import triton_kernels as tt

    kernel = getattr(tt, launch["kernel"])
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {name: launch["types"].get(name, "constexpr") for name in params}
    constexprs = {(params.index(name),): value for name, value in launch["constexprs"].items()}
    attrs = {(params.index(name),): [["tt.divisibility", 16]] for name in launch.get("aligned", [])}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"])
    ptx = compiled.asm["ptx"]
    instructions = [line.strip() for line in ptx.splitlines() if line.strip() and not line.strip().startswith(("//", "."))]
    return {
        **launch,
        "arch": arch,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "ptx_instructions": len(instructions),
        "global_loads": sum(1 for i in instructions if re.match(r"(@%p\d+ )?ld\.global", i)),
        "global_stores": sum(1 for i in instructions if re.match(r"(@%p\d+ )?st\.global", i)),
        # 64- and 128-bit accesses: what a kernel needs to come near the memory's bandwidth
        "vector_loads": sum(1 for i in instructions if re.match(r"(@%p\d+ )?ld\.global(\.\w+)*\.v[24]", i)),
        "fma": sum(1 for i in instructions if re.search(r"\bfma\.", i)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qfl.benchmarks.triton_compile", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (90: H100/H200)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(RECORD_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record:
        print(json.dumps(record_launches()))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: compiling needs Triton's compiler, not its interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-m", "qfl.benchmarks.triton_compile", RECORD_FLAG],
                           env=env, capture_output=True, text=True, check=False)
    if child.returncode:
        raise SystemExit(f"recording the launches failed:\n{child.stderr[-4000:]}")
    results = [compile_launch(launch, args.arch) for launch in json.loads(child.stdout.splitlines()[-1])]
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"| kernel (sm_{args.arch}) | argument types | constexprs | PTX instr | ld.global (vector) | st.global "
          "| fma | cubin B |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        types = ", ".join(r["types"].values())
        consts = ", ".join(f"{k}={v}" for k, v in {**r["constexprs"], **r["options"]}.items())
        print(f"| {r['kernel']} | {types} | {consts} | {r['ptx_instructions']} | {r['global_loads']} ({r['vector_loads']}) "
              f"| {r['global_stores']} | {r['fma']} | {r['cubin_bytes']:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
