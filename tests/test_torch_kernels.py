"""The torch (GPU-path) kernels write the numpy codecs' exact wire format.

Run here on CPU torch; on a GPU machine the same functions run on CUDA."""

import numpy as np
import pytest
import torch

from qfl.compression import make_codec
from qfl.compression import torch_kernels as tk
from qfl.compression.bitpack import pack_bits
from qfl.compression.quantizers import QsgdCodec


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_matches_numpy(bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=1001, dtype=np.uint8)
    packed = tk.pack_bits(torch.from_numpy(values), bits)
    assert packed.numpy().tobytes() == pack_bits(values, bits)
    assert np.array_equal(tk.unpack_bits(packed, bits, 1001).numpy(), values)


def _x(n=5000, seed=0):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    x[:4] = [0.0, -0.0, 1e5, -7e4]
    return x


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_float_casts_are_byte_identical(name):
    x = _x()
    fn = tk.encode_fp16 if name == "fp16" else tk.encode_bf16
    payload = tk.to_payload(name, torch.from_numpy(x), fn(torch.from_numpy(x)))
    assert payload == make_codec(name).encode(x)


def test_sign_bits_identical_and_scale_close():
    x = _x().reshape(50, 100)
    t = torch.from_numpy(x)
    payload = tk.to_payload("sign", t, tk.encode_sign(t))
    reference = make_codec("sign", {"feedback": False}).encode(x)
    assert len(payload) == len(reference) and payload[-(5000 // 8):] == reference[-(5000 // 8):]
    decoded = make_codec("sign", {"feedback": False}).decode(payload)
    assert np.allclose(decoded, np.abs(x).mean() * np.where(x >= 0, 1, -1), rtol=1e-6)
    assert torch.allclose(tk.decode_sign(tk.encode_sign(t), x.size), torch.from_numpy(decoded.reshape(-1)))


@pytest.mark.parametrize("bits, bucket", [(1, 64), (4, 512), (3, 100), (8, 7)])
def test_qsgd_payload_decodes_with_numpy_and_is_unbiased(bits, bucket):
    x = np.random.default_rng(bits).standard_normal(2000).astype(np.float32)
    t = torch.from_numpy(x)
    gen = torch.Generator().manual_seed(0)
    codec = make_codec("qsgd", {"bits": bits, "bucket": bucket}, seed=0)
    trials = [codec.decode(tk.to_payload("qsgd", t, tk.encode_qsgd(t, bits, bucket, gen))) for _ in range(300)]
    assert len(tk.to_payload("qsgd", t, tk.encode_qsgd(t, bits, bucket, gen))) == len(codec.encode(x))
    numpy_trials = [codec.decode(codec.encode(x)) for _ in range(300)]
    # as unbiased as the numpy codec: the averaged error shrinks like 1/sqrt(trials) for both
    torch_err = np.abs(np.mean(trials, axis=0) - x).mean()
    numpy_err = np.abs(np.mean(numpy_trials, axis=0) - x).mean()
    assert torch_err < 1.5 * numpy_err + 1e-4
    assert abs(float(np.mean(np.mean(trials, axis=0) - x))) < 3 * numpy_err / np.sqrt(x.size) + 1e-4
    body = tk.encode_qsgd(t, bits, bucket, gen)
    reference = codec.decode(tk.to_payload("qsgd", t, body))
    assert np.allclose(tk.decode_qsgd(body, x.size).numpy(), reference, rtol=0, atol=1e-6 * np.abs(x).max())


def test_torch_bench_runs_on_cpu_torch():
    from qfl.benchmarks.codecs import TORCH_CODECS, bench_codecs_torch

    rows = bench_codecs_torch("cpu", size=1 << 14, repeats=1)
    assert [r["codec"] for r in rows] == [label for label, _, _ in TORCH_CODECS]
    assert all(r["encode_gbps"] > 0 and r["encode_to_host_gbps"] > 0 for r in rows)
    sign = next(r for r in rows if r["codec"] == "sign")
    assert 1.0 <= sign["bits_per_param"] < 1.1


def test_the_gpu_bench_imports_and_runs_with_torch_and_numpy_alone():
    """../shared/gpu/bench_codecs_gpu.sh runs on CUDA machines without flwr or zstandard installed."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "for name in ('flwr', 'zstandard'): sys.modules[name] = None  # as if not installed\n"
        "from qfl.benchmarks.codecs import bench_codecs_torch\n"
        "rows = bench_codecs_torch('cpu', size=1 << 12, repeats=1)\n"
        "print(len(rows))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 5


def test_torch_qsgd_decoder_matches_the_cpu_codec_on_extreme_scales():
    # buckets of 4: huge (k·Δ would overflow), ordinary, zero and subnormal maxima
    x = np.array([3e38, -3e38, 1e38, 2e37, 1.0, -0.5, 0.25, 0.0, 0, 0, 0, 0, 1e-39, -5e-40, 0.0, 2e-39], np.float32)
    for bits in (1, 3, 4, 8):
        codec = QsgdCodec(bits, 4, seed=bits)
        payload = codec.encode(x)
        size = 5 + 4 * 4 + (x.size * bits + 7) // 8
        body = torch.frombuffer(bytearray(payload[len(payload) - size :]), dtype=torch.uint8)
        decoded = tk.decode_qsgd(body, x.size).numpy()
        assert np.all(np.isfinite(decoded))
        assert np.array_equal(decoded.view(np.uint32), codec.decode(payload).view(np.uint32)), bits
