"""Audio front end: 16 kHz mono waveform → log-mel spectrogram, in torch (no torchaudio).

``LogMel`` computes ``log(mel · |STFT(x)|² + ε)`` with a Hann window of
``n_fft`` samples (25 ms at 16 kHz is 400; we zero-pad to ``n_fft = 512``), a
hop of 160 samples (10 ms) and a triangular mel filter bank between ``f_min``
and ``f_max`` on the HTK mel scale ``m(f) = 2595·log10(1 + f/700)``. A window of
``T`` samples gives ``1 + T // hop`` frames (centre padding), so 1 s of audio is
64 bins × 101 frames here: 6,464 floats, the server-centric payload before the codec.

``read_audio`` reads a WAV/FLAC file with ``soundfile``, averages channels to mono
and resamples to 16 kHz with a polyphase filter (``scipy.signal.resample_poly``).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16_000


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filter_bank(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """``[n_mels, n_fft//2 + 1]`` triangular filters, peaks equally spaced in mel, each peaking at 1."""
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2}, got {f_min}, {f_max}")
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32))


class LogMel(torch.nn.Module):
    """Waveform ``[..., T]`` → log-mel ``[..., n_mels, 1 + T // hop]`` (natural log of power + 1e-6)."""

    window: torch.Tensor
    filters: torch.Tensor

    def __init__(
        self, n_mels: int = 64, n_fft: int = 512, win_length: int = 400, hop: int = 160,
        f_min: float = 80.0, f_max: float = 8000.0, sample_rate: int = SAMPLE_RATE,
    ) -> None:
        super().__init__()
        self.n_fft, self.win_length, self.hop = n_fft, win_length, hop
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer("filters", mel_filter_bank(n_mels, n_fft, sample_rate, f_min, f_max), persistent=False)

    def frames(self, samples: int) -> int:
        return 1 + samples // self.hop

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        lead = wave.shape[:-1]
        spec = torch.stft(
            wave.reshape(-1, wave.shape[-1]), n_fft=self.n_fft, hop_length=self.hop, win_length=self.win_length,
            window=self.window, center=True, return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.filters, power)
        return torch.log(mel + 1e-6).reshape(*lead, mel.shape[-2], mel.shape[-1])


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A WAV/FLAC/OGG file as float32 mono at ``sample_rate`` (channels averaged, polyphase resampling)."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != sample_rate:
        from scipy.signal import resample_poly

        ratio = Fraction(sample_rate, int(rate)).limit_denominator(1000)
        mono = resample_poly(mono, ratio.numerator, ratio.denominator).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)
