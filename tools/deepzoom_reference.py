#!/usr/bin/python3
"""OpenSlide's own DeepZoomGenerator, as the reference for mira-worker's pyramid.

Usage: deepzoom_reference.py SLIDE TILE_SIZE OVERLAP OUT_DIR LEVEL [LEVEL ...]

Prints the geometry as JSON ({"level_count", "level_dimensions", "level_tiles"}) and writes
every tile of each LEVEL as OUT_DIR/<level>/<col>_<row>.png. Needs Debian's python3-openslide.
"""
import json
import os
import sys

from openslide import OpenSlide
from openslide.deepzoom import DeepZoomGenerator


def main():
    slide, tile, overlap, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    levels = [int(a) for a in sys.argv[5:]]
    dz = DeepZoomGenerator(OpenSlide(slide), tile_size=tile, overlap=overlap, limit_bounds=False)
    for level in levels:
        os.makedirs(os.path.join(out, str(level)), exist_ok=True)
        cols, rows = dz.level_tiles[level]
        for c in range(cols):
            for r in range(rows):
                dz.get_tile(level, (c, r)).save(os.path.join(out, str(level), f"{c}_{r}.png"))
    print(json.dumps({
        "level_count": dz.level_count,
        "level_dimensions": [list(d) for d in dz.level_dimensions],
        "level_tiles": [list(t) for t in dz.level_tiles],
    }))


if __name__ == "__main__":
    main()
