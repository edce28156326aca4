"""Compression codecs, each with a one-byte id stored in every chunk header."""

from __future__ import annotations

import lz4.block
import zstandard

from ..errors import CorruptData, InvalidArgument

CODEC_NONE = 0
CODEC_LZ4 = 1
CODEC_ZSTD = 2

NAMES = {CODEC_NONE: "none", CODEC_LZ4: "lz4", CODEC_ZSTD: "zstd"}
IDS = {v: k for k, v in NAMES.items()}

# Early abort: keep the compressed form only if it saves at least 1/8 of the
# block; below that the CPU spent on every later read is not worth it.
MIN_SAVING_FRACTION = 8


def codec_id(name: str) -> int:
    try:
        return IDS[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown compression {name!r}", "choose one of: " + ", ".join(IDS)
        ) from None


class Compressor:
    """Per-thread compressor state (zstd contexts are not thread-safe)."""

    def __init__(self, zstd_level: int = 3) -> None:
        self._zc = zstandard.ZstdCompressor(level=zstd_level, write_content_size=False)
        self._zd = zstandard.ZstdDecompressor()

    def compress(self, codec: int, data: bytes) -> tuple[int, bytes]:
        """Return (codec actually used, payload); falls back to CODEC_NONE."""
        if codec == CODEC_LZ4:
            out = lz4.block.compress(data, store_size=False)
        elif codec == CODEC_ZSTD:
            out = self._zc.compress(data)
        else:
            return CODEC_NONE, data
        if len(out) > len(data) - len(data) // MIN_SAVING_FRACTION:
            return CODEC_NONE, data
        return codec, out

    def decompress(self, codec: int, payload: bytes | memoryview, raw_len: int) -> bytes:
        try:
            if codec == CODEC_NONE:
                out = bytes(payload)
            elif codec == CODEC_LZ4:
                out = lz4.block.decompress(payload, uncompressed_size=raw_len)
            elif codec == CODEC_ZSTD:
                out = self._zd.decompress(payload, max_output_size=raw_len)
            else:
                raise CorruptData(f"unknown codec id {codec}")
        except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
            raise CorruptData(f"decompression failed: {e}") from e
        if len(out) != raw_len:
            raise CorruptData(f"decompressed {len(out)} bytes, expected {raw_len}")
        return out
