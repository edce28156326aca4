"""The reducer's CPU work: zero detection, fingerprints, compression.

For a large write the blocks are split between the engine thread and one
helper thread: hashlib and the LZ4/Zstd bindings release the GIL, so the
two halves run on two cores. Compression is done up front for every
non-zero block (the dedupe lookup that would make it unnecessary needs the
metadata store, which only the engine thread touches); the waste on
duplicates is paid on the otherwise idle core.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

from .codecs import Compressor
from .format import ZERO_BLOCK

PARALLEL_MIN_BLOCKS = 8  # below this the hand-off costs more than it saves

# (fingerprint, codec used, payload), or None for an all-zero block
Prepared = tuple[bytes, int, bytes] | None


class Reducer:
    def __init__(self) -> None:
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reducer")

    def compressor(self) -> Compressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = Compressor()
        return c

    def _prepare(self, blocks: list[bytes], codec: int) -> list[Prepared]:
        comp = self.compressor()
        out: list[Prepared] = []
        for b in blocks:
            if b == ZERO_BLOCK:
                out.append(None)
            else:
                used, payload = comp.compress(codec, b)
                out.append((hashlib.sha256(b).digest(), used, payload))
        return out

    def prepare(self, blocks: list[bytes], codec: int) -> list[Prepared]:
        """Fingerprint and compress many blocks, on two cores when it pays."""
        if len(blocks) < PARALLEL_MIN_BLOCKS:
            return self._prepare(blocks, codec)
        half = len(blocks) // 2
        later = self._pool.submit(self._prepare, blocks[half:], codec)
        first = self._prepare(blocks[:half], codec)
        return first + later.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
