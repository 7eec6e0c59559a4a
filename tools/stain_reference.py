"""The colour references for mira-worker, run on the same pixels as the Rust code.

Usage: stain_reference.py RGB SAT WIDTH HEIGHT OUT_DIR TARGET_MEAN TARGET_STD

RGB is WIDTH*HEIGHT*3 raw bytes, SAT the WIDTH*HEIGHT 8-bit saturation Mira computed from
them; TARGET_MEAN and TARGET_STD are Mira's Reinhard target, comma-separated. Prints JSON:
skimage's Otsu threshold of SAT and torchstain's Macenko HE matrix and maximum
concentrations; writes OUT_DIR/od.f64 (torchstain's optical density), OUT_DIR/macenko.u8
(torchstain's Macenko normalisation) and OUT_DIR/reinhard.u8 (torchstain's Reinhard
normalisation to Mira's target).
"""
import json
import os
import sys

import numpy as np
from skimage.filters import threshold_otsu
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer


def main():
    rgb_path, sat_path, w, h, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    target_mean = np.array([float(v) for v in sys.argv[6].split(",")])
    target_std = np.array([float(v) for v in sys.argv[7].split(",")])
    rgb = np.fromfile(rgb_path, dtype=np.uint8).reshape(h, w, 3)
    sat = np.fromfile(sat_path, dtype=np.uint8).reshape(h, w)

    macenko = NumpyMacenkoNormalizer()
    od, _ = macenko._NumpyMacenkoNormalizer__convert_rgb2od(rgb.reshape(-1, 3), Io=240, beta=0.15)
    he, _, max_c = macenko._NumpyMacenkoNormalizer__compute_matrices(rgb, 240, 1, 0.15)
    norm, _, _ = macenko.normalize(rgb, Io=240, alpha=1, beta=0.15, stains=False)
    od.astype(np.float64).tofile(os.path.join(out, "od.f64"))
    norm.astype(np.uint8).tofile(os.path.join(out, "macenko.u8"))

    reinhard = NumpyReinhardNormalizer()
    reinhard.target_means = target_mean
    reinhard.target_stds = target_std
    reinhard.normalize(rgb).astype(np.uint8).tofile(os.path.join(out, "reinhard.u8"))

    print(json.dumps({
        "otsu": int(threshold_otsu(sat)),
        "he": he.tolist(),
        "max_c": max_c.tolist(),
    }))


if __name__ == "__main__":
    main()
