"""The sources of an edge daemon's stream (``qfl edge run --data SOURCE``), ingested into its spool.

SOURCE is one of:

- ``generated`` (the default, for demos): the seeded synthetic stream of
  :mod:`qfl.clients.edge.stream`, this node's device (its partition), 1 s
  windows made in order. Position: windows made.
- a **folder** watched for new audio files (``.wav``, ``.flac``, ``.ogg``, read
  with ``soundfile``; channels averaged to mono, resampled to 16 kHz). Files
  are taken oldest first (modification time, then name), once unchanged for
  ``settle_s`` (write a file elsewhere and ``mv`` it in to be safe), each
  appended whole (its last part is not padded: the stream is continuous
  across files; a file is decoded whole in memory, so cut long recordings
  into files of minutes). Position: the current file and the samples of it appended
  (a file is appended in 10 s chunks, each committed with its offset); a done
  file is recorded by name and never read again. An unreadable file is
  recorded as ``unreadable`` and skipped, with a log line.
- a **named pipe** (``mkfifo``) or ``-`` (the daemon's stdin) carrying raw
  16 kHz mono **signed 16-bit little-endian** PCM (``s16le``; e.g.
  ``arecord -f S16_LE -r 16000 -c 1 -t raw`` or
  ``ffmpeg -i IN -f s16le -ac 1 -ar 16000 -``). Position: bytes read. Each
  read (at most 64 KiB, 2 s of audio) is committed at once; a pipe cannot be
  read twice, so a kill -9 between a read and its commit loses that read (at
  most 64 KiB; an odd byte is carried in the position). A named pipe is opened
  again when its writer closes it; stdin's end ends the stream.

Every source stops reading while the spool holds ``buffer_s`` seconds not yet
trained on (back-pressure on a pipe's writer; files wait in the folder).
"""

from __future__ import annotations

import logging
import os
import select
import sqlite3
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from qfl.errors import EdgeDataError, EdgeDataReason

from .frontend import SAMPLE_RATE, read_audio
from .spool import StreamSpool, to_pcm
from .stream import AUDIO_SUFFIXES, SyntheticStream

GENERATED = "generated"
STDIN = "-"
PIPE_READ = 1 << 16  # bytes per pipe read
FILE_CHUNK_S = 10.0  # seconds of a file per committed chunk
GENERATED_CHUNK = 8  # windows per committed chunk of the generated stream


class Source(Protocol):
    """One ingest step at a time; each step commits what it read with its position."""

    def step(self, spool: StreamSpool) -> bool:
        """Read and append what is there now; False if there was nothing to read."""

    @property
    def ended(self) -> bool:
        """True once the source can give nothing more (stdin closed)."""

    def close(self) -> None: ...


def describe(data: str) -> str:
    """The kind of ``--data`` (generated, folder, pipe, stdin); EdgeDataError if it names no usable source."""
    if data == GENERATED:
        return GENERATED
    if data == STDIN:
        return "stdin"
    path = Path(data)
    if not path.exists():
        raise EdgeDataError(f"--data {data}: no such file or folder; pass a folder of audio files, a named pipe "
                            f"(mkfifo) of 16 kHz s16le PCM, '-' for stdin, or '{GENERATED}'",
                            EdgeDataReason.NO_SUCH_SOURCE)
    if path.is_dir():
        return "folder"
    if stat.S_ISFIFO(path.stat().st_mode):
        return "pipe"
    raise EdgeDataError(f"--data {data} is a regular file; pass the folder it is in (watched for new files), a "
                        f"named pipe (mkfifo) of 16 kHz s16le PCM, '-' for stdin, or '{GENERATED}'",
                        EdgeDataReason.NOT_A_SOURCE)


def open_source(data: str, partition_id: int, num_partitions: int, seed: int = 0, settle_s: float = 1.0) -> Source:
    """The source ``--data`` names (see the module docstring)."""
    kind = describe(data)
    if kind == GENERATED:
        return GeneratedSource(SyntheticStream(seed=seed), partition_id, num_partitions)
    if kind == "folder":
        return FolderSource(Path(data), settle_s)
    return PipeSource(None if kind == "stdin" else Path(data))


@dataclass
class GeneratedSource:
    """The synthetic stream of device ``partition_id``, appended ``GENERATED_CHUNK`` windows at a time."""

    stream: SyntheticStream
    partition_id: int
    num_partitions: int
    ended: bool = False

    def step(self, spool: StreamSpool) -> bool:
        made = int(spool.position().get("windows", 0))
        waves, _ = self.stream.windows(self.partition_id, self.num_partitions, made, GENERATED_CHUNK)
        spool.append(to_pcm(waves.reshape(-1)), {"kind": GENERATED, "windows": made + GENERATED_CHUNK})
        return True

    def close(self) -> None:
        pass


class FolderSource:
    """A folder watched for new audio files (see the module docstring)."""

    def __init__(self, folder: Path, settle_s: float = 1.0) -> None:
        self.folder, self.settle_s = folder, settle_s
        self.ended = False
        self._audio: tuple[str, np.ndarray] | None = None  # the current file, decoded (a restart decodes it again)
        self.log = logging.getLogger("qfl.edge.ingest")

    def _next_file(self, spool: StreamSpool) -> Path | None:
        done = spool.done_files()
        now = time.time()
        candidates = []
        for path in self.folder.iterdir():
            if path.suffix.lower() not in AUDIO_SUFFIXES or path.name in done or not path.is_file():
                continue
            st = path.stat()
            if now - st.st_mtime >= self.settle_s:
                candidates.append((st.st_mtime_ns, path.name, path))
        return min(candidates)[2] if candidates else None

    def step(self, spool: StreamSpool) -> bool:
        position = spool.position()
        current = position.get("file")
        if current and not position.get("done") and (self.folder / current).is_file():
            path, offset = self.folder / current, int(position.get("offset", 0))
        else:
            found = self._next_file(spool)
            if found is None:
                return False
            path, offset = found, 0
        st = path.stat()
        try:
            if self._audio is None or self._audio[0] != path.name:
                self._audio = (path.name, read_audio(path))
        except Exception as err:  # noqa: BLE001 -- a bad file must not stop the stream; recorded and skipped
            self.log.warning("skipping unreadable audio file %s: %s", path, err)
            spool.append(b"", {"kind": "folder", "file": path.name, "offset": 0, "done": True},
                         file={"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "samples": 0,
                               "status": "unreadable"})
            return True
        audio = self._audio[1]
        end = min(len(audio), offset + int(FILE_CHUNK_S * SAMPLE_RATE))
        done = end >= len(audio)
        file = {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "samples": len(audio),
                "status": "done"} if done else None
        spool.append(to_pcm(audio[offset:end]), {"kind": "folder", "file": path.name, "offset": end, "done": done},
                     file=file)
        if done:
            self._audio = None
        return True

    def close(self) -> None:
        self._audio = None


class PipeSource:
    """Raw s16le PCM from a named pipe (reopened when its writer closes it) or stdin (``path`` None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.ended = False
        self._fd: int | None = None
        self._pending = b""  # read, not yet committed

    def _open(self) -> int | None:
        if self._fd is None:
            if self.path is None:
                self._fd = sys.stdin.fileno()
            else:  # non-blocking: opening a FIFO for reading would otherwise wait for a writer
                self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        return self._fd

    def step(self, spool: StreamSpool) -> bool:
        if not self._pending:  # a read whose commit failed is committed first, never read over
            fd = self._open()
            if fd is None or not select.select([fd], [], [], 0.2)[0]:
                return False
            try:
                self._pending = os.read(fd, PIPE_READ)
            except BlockingIOError:
                return False
            if not self._pending:  # every writer closed the pipe
                if self.path is None:
                    self.ended = True
                else:
                    os.close(fd)
                    self._fd = None
                    time.sleep(0.2)  # with no writer a FIFO reads as end-of-file at once; poll gently
                return False
        position = spool.position()
        carried = bytes.fromhex(position.get("carry", ""))
        data = carried + self._pending
        whole = len(data) - len(data) % 2
        read = int(position.get("bytes", 0)) + len(self._pending)
        spool.append(data[:whole], {"kind": "pipe" if self.path else "stdin", "bytes": read, "carry": data[whole:].hex()})
        self._pending = b""
        return True

    def close(self) -> None:
        if self._fd is not None and self.path is not None:
            os.close(self._fd)
        self._fd = None


class Ingest:
    """The daemon's ingest thread: steps ``source`` into ``spool`` (which it owns and closes) until stopped,
    pausing while ``buffer_s`` seconds wait to be trained on."""

    def __init__(self, spool: StreamSpool, source: Source, buffer_s: float, log: logging.Logger) -> None:
        self.spool, self.source, self.buffer_s, self.log = spool, source, buffer_s, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-ingest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self.source.ended:
                try:
                    if self.spool.buffered() >= self.buffer_s * SAMPLE_RATE:
                        self._stop.wait(0.5)
                    elif not self.source.step(self.spool):
                        self._stop.wait(0.5)
                except sqlite3.OperationalError as err:  # the file busy past its timeout: nothing committed, retry
                    self.log.warning("ingest retrying", extra={"fields": {"error": str(err)}})
                    self._stop.wait(1.0)
            if self.source.ended:
                self.log.info("stream ended", extra={"fields": self.spool.summary()["source"]})
        except Exception as err:  # noqa: BLE001 -- logged; the daemon keeps training on what is buffered
            self.log.error("ingest stopped", extra={"fields": {"error": f"{type(err).__name__}: {err}"}})
        finally:
            self.source.close()
            self.spool.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)
