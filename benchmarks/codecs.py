"""`qfl bench codecs`: encode/decode throughput of every codec, as ratios.

Each codec's time is divided by the time of ``numpy.copyto`` on the same
float32 array, measured in the same run (best of ``repeats``), so the ratios
hold on a noisy machine. Codecs run raw (no error feedback): the EF wrapper
adds one decode and one subtraction per encode, reported separately as
``sign+ef`` and ``topk+ef``. Each encode timing gets a new round seed, so
rand-k pays for drawing its support; its decode reuses the support the encode
just drew (as the server does for every client after the first).

Threads: the copy baseline runs on one thread. Every codec does too, except
qsgd's encoder, which splits large tensors over torch's intra-op threads
(``torch.get_num_threads()``; fp16's encoder calls torch on pieces small
enough that torch stays on the calling thread). Each row says how many
threads its codec had (``threads``); where that is more than one, the codec is
timed on one thread as well (``*_1thread`` fields, last two table columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from qfl.benchmarks.timing import best_of
from qfl.compression import EncodeContext, make_codec, quantizers

# (label, codec name, params); the matrix codecs see the array as 4096 × (N/4096).
BENCH_CODECS: list[tuple[str, str, dict[str, Any]]] = [
    ("fp32", "fp32", {}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("qsgd-4bit", "qsgd", {"bits": 4}),
    ("qsgd-1bit", "qsgd", {"bits": 1}),
    ("ternary", "ternary", {}),
    ("sign", "sign", {"feedback": False}),
    ("sign+ef", "sign", {}),
    ("topk-1%", "topk", {"ratio": 0.01, "feedback": False}),
    ("topk-1%+ef", "topk", {"ratio": 0.01}),
    ("randk-1%", "randk", {"ratio": 0.01}),
    ("powersgd-r4", "powersgd", {"rank": 4, "feedback": False}),
    ("fp32+zstd", "fp32", {"entropy": "zstd"}),
    ("topk-1%+zstd", "topk", {"ratio": 0.01, "feedback": False, "entropy": "zstd"}),
]


THREADED = {"qsgd"}  # codecs whose encoder may use more than the calling thread


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch intra-op threads (None: as configured)."""
    import torch

    saved = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _time_codec(name: str, params: dict[str, Any], x: np.ndarray, repeats: int, seed: int) -> tuple[float, float, bytes]:
    codec = make_codec(name, params)
    tensor = x.reshape(4096, -1) if name == "powersgd" else x
    state: dict[str, np.ndarray] = {}
    seeds = iter(range(seed, seed + repeats))  # a fresh round seed per timing: rand-k draws a new support
    enc_s, payload = best_of(lambda: codec.encode(tensor, EncodeContext(seed=next(seeds), state=state)), repeats)
    dec_s, _ = best_of(lambda: codec.decode(payload), repeats)
    return enc_s, dec_s, payload


def bench_codecs(
    size: int = 1 << 24, repeats: int = 3, seed: int = 0, only: list[str] | None = None, threads: int | None = None
) -> list[dict]:
    """One row per codec: bits_per_param, encode/decode ratios to copyto, GB/s, threads.

    ``threads``: torch intra-op threads for the run (None: as configured).
    """
    if size < 4096 or size % 4096:
        raise ValueError(f"--size must be a positive multiple of 4096, got {size}")
    x = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)
    dst = np.empty_like(x)
    copy_s, _ = best_of(lambda: np.copyto(dst, x), max(repeats, 5))
    rows = []
    for label, name, params in BENCH_CODECS:
        if only and label not in only and name not in only:
            continue
        with _torch_threads(threads):
            enc_s, dec_s, payload = _time_codec(name, params, x, repeats, seed)
            used = quantizers.encode_threads(size) if name in THREADED else 1
        row = {
            "codec": label,
            "bits_per_param": 8 * len(payload) / size,
            "encode_ratio": enc_s / copy_s,
            "decode_ratio": dec_s / copy_s,
            "encode_gbps": x.nbytes / enc_s / 1e9,
            "decode_gbps": x.nbytes / dec_s / 1e9,
            "encode_s": enc_s,
            "decode_s": dec_s,
            "copy_s": copy_s,
            "threads": used,
        }
        if used > 1:
            with _torch_threads(1):
                enc_1, dec_1, _ = _time_codec(name, params, x, repeats, seed)
            row["encode_ratio_1thread"] = enc_1 / copy_s
            row["decode_ratio_1thread"] = dec_1 / copy_s
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| codec | bits/param | threads | encode ÷ copy | decode ÷ copy | encode GB/s | decode GB/s "
        "| encode ÷ copy, 1 thread | decode ÷ copy, 1 thread |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        single = "= | ="  # the codec ran on one thread: the same figures
        if "encode_ratio_1thread" in r:
            single = f"{r['encode_ratio_1thread']:.1f} | {r['decode_ratio_1thread']:.1f}"
        lines.append(
            f"| {r['codec']} | {r['bits_per_param']:.3f} | {r.get('threads', 1)} | {r['encode_ratio']:.1f} "
            f"| {r['decode_ratio']:.1f} | {r['encode_gbps']:.2f} | {r['decode_gbps']:.2f} | {single} |"
        )
    lines.append("(copy baseline: numpy.copyto on one thread; threads: what the codec used, see `threads`)")
    return "\n".join(lines)


TORCH_CODECS = [("fp16", "fp16", {}), ("bf16", "bf16", {}), ("sign", "sign", {}),
                ("qsgd-4bit", "qsgd", {"bits": 4, "bucket": 512}), ("qsgd-1bit", "qsgd", {"bits": 1, "bucket": 512})]
# the fused Triton encoders and decoders (compression/triton_kernels.py), timed on CUDA devices with triton
TRITON_CODECS = [("sign (triton)", "sign", {}), ("qsgd-4bit (triton)", "qsgd", {"bits": 4, "bucket": 512}),
                 ("qsgd-1bit (triton)", "qsgd", {"bits": 1, "bucket": 512}), ("ternary (triton)", "ternary", {}),
                 ("topk-1% (triton)", "topk", {"ratio": 0.01}), ("stc-1% (triton)", "stc", {"ratio": 0.01})]


def _triton_encoders() -> Any:
    """``compression.triton_kernels`` when triton is installed and a CUDA device is there, else None."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from qfl.compression import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def bench_codecs_torch(device: str = "cuda", size: int = 1 << 24, repeats: int = 5, seed: int = 0) -> list[dict]:
    """The torch kernels (``compression/torch_kernels.py``) on ``device``, and on a CUDA device
    with triton installed the fused Triton encoders and decoders too (``compression/triton_kernels.py``,
    rows ``"… (triton)"``).

    ``encode_*``/``decode_*`` fields time the on-device kernels (payload body
    left on the device), as ratios to ``dst.copy_(x)`` on the same device;
    ``encode_to_host_gbps`` adds the copy of the body to host bytes.
    """
    import torch

    from qfl.compression import torch_kernels as tk

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(size, generator=gen, device=dev, dtype=torch.float32)
    dst = torch.empty_like(x)

    def timed(fn: Callable[[], Any], n: int) -> tuple[float, Any]:
        def run() -> Any:
            out = fn()
            sync()
            return out

        return best_of(run, n, warmup=True)  # warm-up: kernel compilation, allocator

    copy_s, _ = timed(lambda: dst.copy_(x), max(repeats, 5))
    encoders = {
        "fp16": lambda: tk.encode_fp16(x),
        "bf16": lambda: tk.encode_bf16(x),
        "sign": lambda: tk.encode_sign(x),
    }
    rows = []
    encode: Callable[..., Any]  # lambdas with bound defaults (p=params, h=half)
    decode: Callable[..., Any]
    tt: Any = _triton_encoders() if dev.type == "cuda" else None
    cases = TORCH_CODECS + (TRITON_CODECS if tt is not None else [])
    for label, name, params in cases:
        if "(triton)" in label:
            fused: dict[str, Callable[..., Any]] = {
                "sign": lambda: tt.encode_sign(x),
                "qsgd": lambda p=params: tt.encode_qsgd(x, p["bits"], p["bucket"], 0x5EED),
                "ternary": lambda: tt.encode_ternary(x, 0x5EED),
                "topk": lambda p=params: tt.encode_topk(x, p["ratio"]),
                "stc": lambda p=params: tt.encode_stc(x, p["ratio"]),
            }
            encode = fused[name]
            decode = {
                "sign": lambda body: tt.decode_sign(body, size),
                "qsgd": lambda body: tt.decode_qsgd(body, size),
                "ternary": lambda body: tt.decode_ternary(body, size),
                "topk": lambda body: tt.decode_topk(body, size),
                "stc": lambda body: tt.decode_stc(body, size),
            }[name]
        elif name == "qsgd":
            encode = lambda p=params: tk.encode_qsgd(x, p["bits"], p["bucket"], gen)  # noqa: E731
            decode = lambda body: tk.decode_qsgd(body, size)  # noqa: E731
        elif name == "sign":
            encode, decode = encoders[name], (lambda body: tk.decode_sign(body, size))
        else:
            half = torch.float16 if name == "fp16" else torch.bfloat16
            encode, decode = encoders[name], (lambda body, h=half: body.view(h).float())
        enc_s, body = timed(encode, repeats)
        dec_s, _ = timed(lambda: decode(body), repeats)
        host_s, payload = timed(lambda: tk.to_payload(name, x, encode()), repeats)
        rows.append(
            {
                "codec": label,
                "device": str(dev),
                "bits_per_param": 8 * len(payload) / size,
                "encode_ratio": enc_s / copy_s,
                "decode_ratio": dec_s / copy_s,
                "encode_gbps": 4 * size / enc_s / 1e9,
                "decode_gbps": 4 * size / dec_s / 1e9,
                "encode_to_host_gbps": 4 * size / host_s / 1e9,
                "copy_s": copy_s,
            }
        )
    return rows
