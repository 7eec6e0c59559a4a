"""Writes the three hostile TIFFs of ADR 0023 into a directory: tiny files that declare huge
slides by pointing every tile position at the same JPEG tile.

    python tools/lying_tiffs.py OUT_DIR

wide_1m.tif declares 1,000,000 x 256 pixels in 256 x 256 tiles, area_100k.tif 100,000 x
100,000, and wide_2g.tif 2,147,483,136 x 16 in tiles of 32,768 x 16. Each is a little-endian
TIFF with one tiled, JPEG-compressed, RGB directory, as a generic-tiff slide is, and OpenSlide
opens each of them. Needs Pillow.
"""

import io
import os
import struct
import sys

from PIL import Image

TILE = 256


def jpeg_tile(tw: int, th: int) -> bytes:
    img = Image.new("RGB", (tw, th), (230, 170, 200))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def write(path: str, width: int, height: int, tw: int = TILE, th: int = TILE) -> None:
    """A TIFF of `width` x `height` whose tile table names one shared tile everywhere."""
    tile = jpeg_tile(tw, th)
    across, down = -(-width // tw), -(-height // th)
    n = across * down
    entries = 11
    ifd = 8
    ifd_size = 2 + entries * 12 + 4
    data = ifd + ifd_size
    bps = data
    tile_at = bps + 6
    table = tile_at + len(tile)
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd))

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)

    offsets_at, counts_at = table, table + 4 * n
    dir_entries = [
        entry(256, 4, 1, width),
        entry(257, 4, 1, height),
        entry(258, 3, 3, bps),
        entry(259, 3, 1, 7),
        entry(262, 3, 1, 2),
        entry(277, 3, 1, 3),
        entry(284, 3, 1, 1),
        entry(322, 3, 1, tw),
        entry(323, 3, 1, th),
        entry(324, 4, n, offsets_at),
        entry(325, 4, n, counts_at),
    ]
    out += struct.pack("<H", entries) + b"".join(dir_entries) + struct.pack("<I", 0)
    out += struct.pack("<HHH", 8, 8, 8)
    out += tile
    out += struct.pack(f"<{n}I", *([tile_at] * n))
    out += struct.pack(f"<{n}I", *([len(tile)] * n))
    with open(path, "wb") as f:
        f.write(out)


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    write(os.path.join(out, "wide_1m.tif"), 1_000_000, 256)
    write(os.path.join(out, "area_100k.tif"), 100_000, 100_000)
    write(os.path.join(out, "wide_2g.tif"), 2_147_483_136, 16, tw=32768, th=16)


if __name__ == "__main__":
    main()
