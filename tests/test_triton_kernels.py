"""The fused Triton encoders write the CPU codecs' exact bytes.

Without a CUDA device the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set before the module is imported), on CPU torch; on a
GPU machine the same tests launch the compiled kernels on CUDA."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at import
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
if not torch.cuda.is_available():
    triton.knobs.runtime.interpret = True  # in case triton was imported (and read the variable) before

from qfl.compression import torch_kernels as tk  # noqa: E402
from qfl.compression import triton_kernels as tt  # noqa: E402
from qfl.compression.quantizers import QsgdCodec, SignCodec, TernaryCodec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter evaluates (s/2)/m in numpy: an all-zero bucket divides by zero there, as the CPU codec does
# (3e38 below: k·Δ overflows to inf in the CPU decoder and, identically, in the fused one)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def _x(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    x[: min(n, 4)] = [0.0, -0.0, 30.0, -7.5][: min(n, 4)]
    return x


def _payload(name: str, x: np.ndarray, body: torch.Tensor) -> bytes:
    return tk.to_payload(name, torch.from_numpy(x), body)


@pytest.mark.parametrize("n", [1, 13, 1000, 2051])
def test_sign_bits_are_byte_identical_and_the_scale_close(n):
    x = _x(n)
    payload = _payload("sign", x, tt.encode_sign(torch.from_numpy(x).to(DEVICE)))
    reference = SignCodec().encode(x)
    assert len(payload) == len(reference) and payload[-((n + 7) // 8):] == reference[-((n + 7) // 8):]
    assert np.isclose(SignCodec().decode(payload)[0], SignCodec().decode(reference)[0], rtol=1e-6)


@pytest.mark.parametrize("bits, bucket, n", [(4, 512, 1300), (1, 64, 700), (2, 4, 61), (3, 8, 120), (8, 7, 100),
                                             (5, 16, 64), (2, 256, 1000), (8, 1024, 3000), (1, 4096, 9000),
                                             (4, 128, 128)])
def test_qsgd_payload_is_the_cpu_codecs_byte_for_byte(bits, bucket, n):
    # power-of-two buckets of 64..4096 and bits in {1, 2, 4, 8} take the one-read tile kernel, the rest the chunked one
    x = _x(n, seed=bits)
    x[40:40 + bucket] = 0.0  # an all-zero bucket (scale 0)
    seed = 11 + bits
    body = tt.encode_qsgd(torch.from_numpy(x).to(DEVICE), bits, bucket, tt.first_key(seed))
    assert _payload("qsgd", x, body) == QsgdCodec(bits, bucket, seed=seed).encode(x)


@pytest.mark.parametrize("bits, bucket", [(4, 256), (3, 8)])  # the tile kernel and the chunked one
def test_qsgd_zero_buckets_and_a_ragged_tail_are_the_cpu_codecs(bits, bucket):
    x = np.zeros(3 * bucket + 5, np.float32)
    x[bucket : 2 * bucket] = _x(bucket, seed=1)
    x[2 * bucket : 3 * bucket] = -0.0  # scale −min x = +0.0 as numpy's max(max x, −min x)
    x[-5:] = [1e-3, -2e-3, 0.0, 5e-4, -0.0]
    body = tt.encode_qsgd(torch.from_numpy(x).to(DEVICE), bits, bucket, tt.first_key(3))
    assert _payload("qsgd", x, body) == QsgdCodec(bits, bucket, seed=3).encode(x)


def test_qsgd_refuses_buckets_that_do_not_own_whole_bytes():
    with pytest.raises(ValueError):
        tt.encode_qsgd(torch.zeros(10), 3, 100, 0)
    with pytest.raises(ValueError):
        tt.encode_qsgd(torch.zeros(10), 4, 512, -1)


@pytest.mark.parametrize("n", [1, 6, 999])
def test_ternary_payload_is_the_cpu_codecs_byte_for_byte(n):
    x = _x(n, seed=n)
    body = tt.encode_ternary(torch.from_numpy(x).to(DEVICE), tt.first_key(4))
    reference = TernaryCodec(seed=4).encode(x)
    assert body.cpu().numpy().tobytes() == reference[len(reference) - body.numel():]


def test_ternary_payload_with_a_subnormal_scale_is_the_cpu_codecs():
    # 1/s overflows: the CPU codec divides by s instead (an earlier kernel kept every nonzero coordinate)
    x = np.array([1e-39, -5e-40, 2e-39, 0.0, 1.5e-39, -2e-39, 3e-40, 1e-40] * 16, np.float32)
    body = tt.encode_ternary(torch.from_numpy(x).to(DEVICE), tt.first_key(4))
    reference = TernaryCodec(seed=4).encode(x)
    assert body.cpu().numpy().tobytes() == reference[len(reference) - body.numel():]


def test_ternary_of_zeros_sends_code_one_everywhere():
    x = np.zeros(7, np.float32)
    body = tt.encode_ternary(torch.from_numpy(x).to(DEVICE), 5).cpu().numpy().tobytes()
    reference = TernaryCodec(seed=1).encode(x)
    assert body == reference[-len(body):]


def test_the_torch_ternary_decoder_reads_the_fused_payload():
    x = _x(37, seed=2)
    body = tt.encode_ternary(torch.from_numpy(x).to(DEVICE), tt.first_key(4))
    expected = TernaryCodec(seed=4).decode(TernaryCodec(seed=4).encode(x))
    assert np.array_equal(tk.decode_ternary(body, x.size).cpu().numpy(), expected)


def test_the_cuda_bench_adds_the_fused_rows_only_where_they_can_run():
    from qfl.benchmarks.codecs import _triton_encoders

    assert (_triton_encoders() is not None) == torch.cuda.is_available()


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit (so −0.0 ≠ +0.0 and NaN patterns count)."""
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("n", [1, 13, 1000, 2051])
def test_fused_sign_decoder_is_the_cpu_codecs_bit_for_bit(n):
    x = _x(n, seed=n)
    payload = SignCodec().encode(x)
    body = torch.frombuffer(bytearray(payload[len(payload) - 4 - (n + 7) // 8 :]), dtype=torch.uint8).to(DEVICE)
    assert _same_floats(tt.decode_sign(body, n).cpu().numpy(), SignCodec().decode(payload))


@pytest.mark.parametrize("bits, bucket, n", [(4, 512, 1300), (1, 64, 700), (2, 4, 61), (3, 8, 120), (8, 7, 100),
                                             (5, 16, 64), (7, 3, 50), (6, 1000, 2051), (2, 256, 1000),
                                             (8, 1024, 3000), (1, 4096, 9000)])
def test_fused_qsgd_decoder_is_the_cpu_codecs_bit_for_bit(bits, bucket, n):
    x = _x(n, seed=bits)
    x[40:40 + bucket] = 0.0  # an all-zero bucket (scale 0)
    x[-1] = 3e38  # a bucket whose step 2m/s overflows float32 (bits = 1) or is close to it
    codec = QsgdCodec(bits, bucket, seed=bits)
    payload = codec.encode(x)
    size = 5 + 4 * -(-n // bucket) + (n * bits + 7) // 8
    body = torch.frombuffer(bytearray(payload[len(payload) - size :]), dtype=torch.uint8).to(DEVICE)
    assert _same_floats(tt.decode_qsgd(body, n).cpu().numpy(), codec.decode(payload))


@pytest.mark.parametrize("bits, bucket", [(1, 4), (2, 4), (4, 4), (8, 4), (4, 64), (1, 64)])
def test_fused_qsgd_decoder_handles_huge_scales_as_the_cpu_codec(bits, bucket):
    x = np.array([3e38, -3e38, 1e38, np.finfo(np.float32).max, 2e38, -1e38, 0.0, 9e37] * 32, np.float32)
    x[64:128] *= 1e-30  # ordinary buckets beside the huge ones, and subnormal ones
    x[128:192] = np.linspace(-1e-39, 2e-39, 64, dtype=np.float32)
    codec = QsgdCodec(bits, bucket, seed=bits)
    payload = codec.encode(x)
    size = 5 + 4 * -(-x.size // bucket) + (x.size * bits + 7) // 8
    body = torch.frombuffer(bytearray(payload[len(payload) - size :]), dtype=torch.uint8).to(DEVICE)
    decoded = tt.decode_qsgd(body, x.size).cpu().numpy()
    assert np.all(np.isfinite(decoded)) and _same_floats(decoded, codec.decode(payload))


def test_fused_qsgd_decoder_handles_subnormal_scales_as_the_cpu_codec():
    x = np.array([1e-39, -5e-40, 0.0, 2e-39] * 8, np.float32)  # subnormal bucket maxima
    codec = QsgdCodec(4, 8, seed=3)
    payload = codec.encode(x)
    size = 5 + 4 * 4 + 16
    body = torch.frombuffer(bytearray(payload[len(payload) - size :]), dtype=torch.uint8).to(DEVICE)
    assert _same_floats(tt.decode_qsgd(body, x.size).cpu().numpy(), codec.decode(payload))


@pytest.mark.parametrize("n", [1, 6, 999])
def test_fused_ternary_decoder_is_the_cpu_codecs_bit_for_bit_and_marks_code_3(n):
    x = _x(n, seed=n)
    codec = TernaryCodec(seed=4)
    payload = codec.encode(x)
    body = torch.frombuffer(bytearray(payload[len(payload) - 4 - (n + 3) // 4 :]), dtype=torch.uint8).to(DEVICE)
    assert _same_floats(tt.decode_ternary(body, n).cpu().numpy(), codec.decode(payload))
    corrupt = body.clone()
    corrupt[4] |= 0b11  # coordinate 0 gets the invalid code 3
    assert np.isnan(tt.decode_ternary(corrupt, n).cpu().numpy()[0])


@pytest.mark.parametrize("decode, size", [(tt.decode_sign, 4 + 2), (tt.decode_ternary, 4 + 3)])
def test_fused_decoders_refuse_a_body_of_the_wrong_length(decode, size):
    with pytest.raises(ValueError, match="truncated or foreign"):
        decode(torch.zeros(size - 1, dtype=torch.uint8, device=DEVICE), 10)
    with pytest.raises(ValueError, match="bits=9"):
        tt.decode_qsgd(torch.tensor([9, 8, 0, 0, 0], dtype=torch.uint8, device=DEVICE), 10)


def _sparse_x(n: int, seed: int) -> np.ndarray:
    """Normal values with ties at several magnitudes (so the threshold often falls on a tie) and signed zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.integers(0, n, n // 5)] = rng.choice(np.float32([0.5, -0.5, 1.25, -2.0, 0.0, -0.0]), n // 5)
    return x


@pytest.mark.parametrize("n, k", [(1, 1), (10, 3), (1000, 1), (1000, 30), (3000, 90), (2051, 2050), (5000, 1000),
                                  (4096, 4096)])
def test_gpu_threshold_selection_keeps_the_cpu_codecs_positions(n, k):
    from qfl.compression.sparsify import top_k_positions

    x = _sparse_x(n, seed=n + k)
    got = tt.top_k_support(torch.from_numpy(x).to(DEVICE), k).cpu().numpy()
    assert np.array_equal(got, top_k_positions(x, k))


def test_gpu_threshold_selection_takes_the_lowest_positions_of_a_tie():
    x = np.float32([1, 3, 3, 3, 2, 3, 3])
    assert tt.top_k_support(torch.from_numpy(x).to(DEVICE), 3).cpu().tolist() == [1, 2, 3]
    assert tt.top_k_support(torch.from_numpy(np.zeros(9, np.float32)).to(DEVICE), 4).cpu().tolist() == [0, 1, 2, 3]


def test_gpu_threshold_selection_ranks_nan_and_inf_first():
    x = np.float32([1.0, np.inf, 2.0, np.nan, -np.inf, 5.0])
    assert tt.top_k_support(torch.from_numpy(x).to(DEVICE), 3).cpu().tolist() == [1, 3, 4]


@pytest.mark.parametrize("ratio, n, values", [(0.03, 3000, "fp16"), (0.01, 5000, "fp32"), (0.5, 77, "fp16"),
                                              (1.0, 9, "fp32"), (0.001, 20000, "fp16")])
def test_gpu_topk_payload_is_the_cpu_codecs_byte_for_byte(ratio, n, values):
    from qfl.compression.sparsify import TopKCodec

    x = _sparse_x(n, seed=3)
    x[7] = 1e6  # clipped to fp16's largest finite value
    body = tt.encode_topk(torch.from_numpy(x).to(DEVICE), ratio, values).cpu().numpy().tobytes()
    reference = TopKCodec(ratio, values).encode(x)
    assert body == reference[len(reference) - len(body):]
    decoded = tt.decode_topk(torch.frombuffer(bytearray(body), dtype=torch.uint8).to(DEVICE), n, values)
    assert _same_floats(decoded.cpu().numpy(), TopKCodec(ratio, values).decode(reference))


@pytest.mark.parametrize("ratio, n", [(0.03, 3000), (0.01, 20000), (0.3, 101), (1.0, 16)])
def test_gpu_stc_payload_is_the_cpu_codecs_byte_for_byte(ratio, n):
    from qfl.compression.sparsify import STCCodec

    x = _sparse_x(n, seed=5)
    body = tt.encode_stc(torch.from_numpy(x).to(DEVICE), ratio).cpu().numpy().tobytes()
    reference = STCCodec(ratio).encode(x)
    assert body == reference[len(reference) - len(body):]
    decoded = tt.decode_stc(torch.frombuffer(bytearray(body), dtype=torch.uint8).to(DEVICE), n)
    assert _same_floats(decoded.cpu().numpy(), STCCodec(ratio).decode(reference))


def test_gpu_sparse_decoders_refuse_corrupt_rice_streams():
    x = _sparse_x(500, seed=1)
    body = tt.encode_stc(torch.from_numpy(x).to(DEVICE), 0.05)
    with pytest.raises(ValueError, match="Rice"):
        tt.decode_stc(torch.cat([body[:9], body[9:].new_zeros(body.numel() - 9)]), 500)  # no terminators
    with pytest.raises(ValueError, match="run past the end"):
        tt.decode_stc(body, 100)  # positions beyond a shorter tensor


def test_the_benchs_fused_sparse_rows_send_the_cpu_codecs_payloads():
    from qfl.compression.sparsify import STCCodec, TopKCodec

    x = _sparse_x(4000, seed=9)
    t = torch.from_numpy(x).to(DEVICE)
    assert tk.to_payload("topk", t, tt.encode_topk(t, 0.01)) == TopKCodec(0.01).encode(x)
    assert tk.to_payload("stc", t, tt.encode_stc(t, 0.01)) == STCCodec(0.01).encode(x)
