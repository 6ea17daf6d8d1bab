"""Audio streams for edge clients: a seeded, labelled synthetic stream, and loaders for real audio.

Every source yields fixed-length windows of 16 kHz mono audio *in temporal
order* for one device, with a label per window. Labels are used only for
evaluation (the linear probe); training never reads them.

Synthetic stream (no download). Ten sound classes:

    0 low tone (harmonic, 150–400 Hz)     5 FM tone (carrier 0.8–1.6 kHz, rate 3–8 Hz)
    1 high tone (1.5–3 kHz)               6 impulse train (4–25 clicks/s, band-passed)
    2 up-chirp (0.3 → 3 kHz)              7 pink noise (1/f)
    3 down-chirp (3 → 0.3 kHz)            8 brown noise (1/f²)
    4 AM tone (carrier 0.5–1.2 kHz,       9 band noise (white noise, 2–5 kHz band)
      modulation 4–16 Hz)

Events last several windows: the class follows a Markov chain that keeps the
current class with probability ``stay`` (so consecutive windows are similar,
which the temporal Laplacian loss exploits), otherwise draws from the device's
class prior. With probability ``overlap`` a second event of another class is
mixed in at −4 to −12 dB over a random part of the window; the label stays the
dominant event. Each window has a random gain (±6 dB) and a background of pink
noise at about −25 dB. Classes drift: every frequency of device ``i`` of ``n``
is scaled by ``1 + drift·(i/(n−1) − ½)`` and, slowly along the stream, by
``1 + ½·drift·sin(2π·t/period)``; class priors are skewed per device by a
Dirichlet(``prior_alpha``) draw mixed half-and-half with uniform.

Real audio: :func:`audio_folder_items` reads a folder with one subfolder per
class (``root/<class>/*.wav|flac|ogg``); :func:`esc50_items` reads an ESC-50
style CSV (``filename``, ``target`` columns; audio in ``audio/`` beside it, or a
given folder). :class:`FileStream` cuts each file into whole windows (a shorter
file is zero-padded to one window) and deals files to devices by a seeded
permutation; a held-out share of each class's files is the probe set.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from qfl.errors import DatasetNotFound

from .frontend import SAMPLE_RATE, read_audio

CLASS_NAMES = (
    "low-tone", "high-tone", "up-chirp", "down-chirp", "am-tone",
    "fm-tone", "impulse-train", "pink-noise", "brown-noise", "band-noise",
)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
PROBE_DEVICE = -1  # the synthetic stream's held-out device (no drift offset), used for the linear probe


class AudioSource(Protocol):
    """Windows of audio for devices, in temporal order."""

    @property
    def num_classes(self) -> int: ...

    @property
    def window(self) -> int:
        """Samples per window."""

    def windows(self, device: int, num_devices: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` windows from position ``start`` of device ``device``'s stream: (waves [count, window], labels)."""

    def probe_set(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Held-out windows for the linear probe (never in any device's stream)."""


@dataclass(frozen=True)
class SyntheticStream:
    """The seeded synthetic stream described in the module docstring."""

    seed: int = 0
    num_classes: int = 10
    window_s: float = 1.0
    stay: float = 0.7
    overlap: float = 0.3
    drift: float = 0.2
    drift_period: int = 600  # windows per cycle of the slow in-stream drift
    prior_alpha: float = 1.0

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {self.num_classes}")

    @property
    def window(self) -> int:
        return int(round(self.window_s * SAMPLE_RATE))

    def _prior(self, device: int) -> np.ndarray:
        if device == PROBE_DEVICE:
            return np.full(self.num_classes, 1.0 / self.num_classes)
        skew = np.random.default_rng([self.seed, device + 1, 11]).dirichlet(np.full(self.num_classes, self.prior_alpha))
        return 0.5 * skew + 0.5 / self.num_classes

    def labels(self, device: int, count: int) -> np.ndarray:
        """The first ``count`` event classes of a device's Markov chain."""
        return _markov_labels(self.seed, device, count, self.stay, tuple(self._prior(device)))

    def _scale(self, device: int, num_devices: int, t: int) -> float:
        place = 0.0 if device == PROBE_DEVICE or num_devices < 2 else device / (num_devices - 1) - 0.5
        return (1.0 + self.drift * place) * (1.0 + 0.5 * self.drift * np.sin(2 * np.pi * t / self.drift_period))

    def windows(self, device: int, num_devices: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = self.labels(device, start + count)[start:]
        waves = np.empty((count, self.window), dtype=np.float32)
        for i, label in enumerate(labels):
            t = start + i
            rng = np.random.default_rng([self.seed, device + 1_000_003, t])
            waves[i] = self._window(int(label), self._scale(device, num_devices, t), rng)
        return waves, labels.astype(np.int64)

    def probe_set(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        return self.windows(PROBE_DEVICE, 1, 0, count)

    def _window(self, label: int, scale: float, rng: np.random.Generator) -> np.ndarray:
        n = self.window
        x = sound_event(label, n, scale, rng)
        if rng.random() < self.overlap:
            other = int(rng.choice([c for c in range(self.num_classes) if c != label]))
            begin = int(rng.integers(0, n // 2))
            length = int(rng.integers(n // 4, n - begin + 1))
            gain = 10 ** (-rng.uniform(4, 12) / 20)
            x[begin : begin + length] += gain * sound_event(other, length, scale, rng)
        x += 10 ** (-25 / 20) * coloured_noise(n, 1.0, rng)
        x *= 10 ** (rng.uniform(-6, 6) / 20) * 0.1
        return x.astype(np.float32)


@lru_cache(maxsize=64)
def _markov_labels(seed: int, device: int, count: int, stay: float, prior: tuple[float, ...]) -> np.ndarray:
    rng = np.random.default_rng([seed, device + 1, 7])  # device -1 (probe) -> 0
    p = np.asarray(prior)
    labels = np.empty(count, dtype=np.int64)
    current = int(rng.choice(len(p), p=p))
    for t in range(count):
        if t and rng.random() >= stay:
            current = int(rng.choice(len(p), p=p))
        labels[t] = current
    return labels


def coloured_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with power spectrum ∝ 1/f^exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    spectrum /= f ** (exponent / 2)
    x = np.fft.irfft(spectrum, n)
    return np.asarray(x / (np.sqrt(np.mean(x**2)) + 1e-12))


def _band(x: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    spectrum[(f < low_hz) | (f > high_hz)] = 0
    y = np.fft.irfft(spectrum, len(x))
    return y / (np.sqrt(np.mean(y**2)) + 1e-12)


def sound_event(label: int, n: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of one event of class ``label`` (unit-ish RMS), frequencies multiplied by ``scale``."""
    t = np.arange(n) / SAMPLE_RATE
    u = rng.uniform
    phase = u(0, 2 * np.pi)
    if label == 0:
        f0 = u(150, 400) * scale
        return np.sin(2 * np.pi * np.outer((1, 2, 3), f0 * t) + phase).T @ np.array([1, 1 / 2, 1 / 3]) / 1.2
    if label == 1:
        return np.sqrt(2) * np.sin(2 * np.pi * u(1500, 3000) * scale * t + phase)
    if label in (2, 3):
        lo, hi = 300 * scale * u(0.8, 1.2), 3000 * scale * u(0.8, 1.2)
        f_start, f_end = (lo, hi) if label == 2 else (hi, lo)
        duration = max(t[-1], 1e-3) if n > 1 else 1e-3
        k = (f_end / f_start) ** (1 / duration)  # exponential sweep over the event
        return np.sqrt(2) * np.sin(2 * np.pi * f_start * (k**t - 1) / np.log(k) + phase)
    if label == 4:
        carrier = np.sin(2 * np.pi * u(500, 1200) * scale * t + phase)
        return 1.6 * carrier * (0.5 + 0.5 * np.sin(2 * np.pi * u(4, 16) * t))
    if label == 5:
        fc, dev, rate = u(800, 1600) * scale, u(100, 300) * scale, u(3, 8)
        return np.sqrt(2) * np.sin(2 * np.pi * fc * t + dev / rate * np.sin(2 * np.pi * rate * t) + phase)
    if label == 6:
        x = np.zeros(n)
        period = max(1, int(SAMPLE_RATE / (u(4, 25) * scale)))
        x[int(rng.integers(0, period)) :: period] = 1.0
        decay = np.exp(-np.arange(min(n, 160)) / 20.0)
        x = np.convolve(x, decay)[:n] * rng.standard_normal(n) * 0.5 + np.convolve(x, decay)[:n]
        return _band(x, 500 * scale, 6000)
    if label == 7:
        return coloured_noise(n, 1.0, rng)
    if label == 8:
        return coloured_noise(n, 2.0, rng)
    if label == 9:
        return _band(rng.standard_normal(n), 2000 * scale, min(5000 * scale, SAMPLE_RATE / 2 - 1))
    raise ValueError(f"no sound class {label}")


# -- real audio --------------------------------------------------------------------------------------------


def audio_folder_items(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) pairs and class names of a folder whose subfolders are classes (sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"audio folder {root} does not exist; pass a folder with one subfolder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [
        (f, label) for label, name in enumerate(classes)
        for f in sorted((root / name).iterdir()) if f.suffix.lower() in AUDIO_SUFFIXES
    ]
    if len(classes) < 2 or not items:
        raise DatasetNotFound(
            f"{root} needs at least two class subfolders holding {'/'.join(AUDIO_SUFFIXES)} files; found "
            f"{len(classes)} subfolders and {len(items)} files"
        )
    return items, classes


def esc50_items(csv_path: str | Path, audio_dir: str | Path | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) pairs of an ESC-50 style CSV (``filename``, ``target``, optional ``category``)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetNotFound(f"CSV {csv_path} does not exist; pass an ESC-50 style meta CSV")
    folder = Path(audio_dir) if audio_dir else csv_path.parent / "audio"
    if not folder.is_dir():
        folder = csv_path.parent
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "filename" not in rows[0] or "target" not in rows[0]:
        raise DatasetNotFound(f"{csv_path} needs the columns filename and target (ESC-50 layout)")
    targets = sorted({int(r["target"]) for r in rows})
    index = {t: i for i, t in enumerate(targets)}
    names = {int(r["target"]): r.get("category") or str(r["target"]) for r in rows}
    items = [(folder / r["filename"], index[int(r["target"])]) for r in rows]
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        raise DatasetNotFound(f"{len(missing)} files named in {csv_path} are missing, e.g. {missing[0]}")
    return items, [names[t] for t in targets]


class FileStream:
    """Windows cut from real audio files; files dealt to devices by a seeded permutation."""

    def __init__(
        self, items: list[tuple[Path, int]], num_classes: int, window_s: float = 1.0, seed: int = 0,
        probe_fraction: float = 0.2,
    ) -> None:
        self.num_classes = num_classes
        self.window = int(round(window_s * SAMPLE_RATE))
        order = np.random.default_rng([seed, 5]).permutation(len(items))
        self._probe, self._train = [], []
        for label in range(num_classes):  # a share of every class's files is held out (one at least, if it has two)
            mine = [items[i] for i in order if items[i][1] == label]
            n_probe = min(max(1, int(round(len(mine) * probe_fraction))), len(mine) - 1)
            self._probe += mine[:n_probe]
            self._train += mine[n_probe:]
        self._cache: dict[Path, np.ndarray] = {}

    @property
    def train_files(self) -> int:
        return len(self._train)

    def _cut(self, path: Path) -> np.ndarray:
        if path not in self._cache:
            audio = read_audio(path)
            count = max(1, len(audio) // self.window)
            padded = np.zeros(count * self.window, dtype=np.float32)
            padded[: min(len(audio), len(padded))] = audio[: len(padded)]
            self._cache[path] = padded.reshape(count, self.window)
        return self._cache[path]

    def _concat(self, items: list[tuple[Path, int]], limit: int) -> tuple[np.ndarray, np.ndarray]:
        waves, labels, total = [], [], 0
        for path, label in items:
            if total >= limit:
                break
            cut = self._cut(path)
            waves.append(cut)
            labels.append(np.full(len(cut), label, dtype=np.int64))
            total += len(cut)
        if not waves:
            return np.zeros((0, self.window), np.float32), np.zeros(0, np.int64)
        return np.concatenate(waves)[:limit], np.concatenate(labels)[:limit]

    def windows(self, device: int, num_devices: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        mine = self._train[device::num_devices]
        if not mine:
            raise DatasetNotFound(f"device {device} of {num_devices} gets no audio file; use fewer clients")
        waves, labels = self._concat(mine, 10**9)
        idx = (start + np.arange(count)) % len(waves)  # a device's stream loops over its files
        return waves[idx], labels[idx]

    def probe_set(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        return self._concat(self._probe, count)
