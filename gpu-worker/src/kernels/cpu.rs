//! The CPU implementation of every kernel in `gpu-worker/kernels/*.cu`, parallel with rayon.
//!
//! Each function here is the reference its CUDA twin is tested against, and the path a
//! machine without a GPU runs: the same inputs, the same lookup tables, the same integer
//! rounding. Where floating point differs between the two (`expf`, `atan2f`, `cbrtf`), the
//! equivalence tests state a tolerance.

use rayon::prelude::*;

/// Transmitted light intensity and the optical-density floor of Macenko's method, as in
/// torchstain's numpy normaliser (DESIGN §8).
pub const IO: f64 = 240.0;
pub const BETA: f64 = 0.15;
/// Bins of the angle histogram over [−π, π) and of the concentration histograms over
/// [`C_LO`, `C_HI`): fine enough that a percentile read from them is within 1e-4 of the
/// exact one.
pub const ANGLE_BINS: usize = 1 << 16;
pub const CONC_BINS: usize = 1 << 16;
pub const C_LO: f32 = -4.0;
pub const C_HI: f32 = 12.0;
/// Bins per radian and per unit of concentration: one f32 each, passed to the GPU as they
/// are, so both paths bin with the very same factor.
pub const ANGLE_SCALE: f32 = ANGLE_BINS as f32 / std::f32::consts::TAU;
pub const CONC_SCALE: f32 = CONC_BINS as f32 / (C_HI - C_LO);

/// Pixels per rayon task: large enough that scheduling costs nothing.
const CHUNK: usize = 1 << 14;

/// `OD = −ln((v + 1) / Io)` for every 8-bit value, computed once in f64 and shared with the
/// GPU as a table, so both paths see bit-identical optical densities.
pub fn od_table() -> [f32; 256] {
    std::array::from_fn(|v| (-((v as f64 + 1.0) / IO).ln()) as f32)
}

/// Premultiplied BGRA (OpenSlide's bytes) → RGB composited over white, and the 8-bit HSV
/// saturation `round(255 · (max − min) / max)` of each pixel (0 for black).
pub fn bgra_to_rgb_sat(bgra: &[u8], rgb: &mut [u8], sat: &mut [u8]) {
    assert_eq!(bgra.len() / 4, sat.len());
    assert_eq!(rgb.len(), sat.len() * 3);
    bgra.par_chunks(CHUNK * 4)
        .zip(rgb.par_chunks_mut(CHUNK * 3))
        .zip(sat.par_chunks_mut(CHUNK))
        .for_each(|((src, dst), s)| {
            for ((p, o), s) in src.chunks_exact(4).zip(dst.chunks_exact_mut(3)).zip(s.iter_mut()) {
                let bg = 255 - p[3];
                let (r, g, b) = (
                    p[2].saturating_add(bg),
                    p[1].saturating_add(bg),
                    p[0].saturating_add(bg),
                );
                o.copy_from_slice(&[r, g, b]);
                *s = saturation(r, g, b);
            }
        });
}

#[inline]
pub fn saturation(r: u8, g: u8, b: u8) -> u8 {
    let max = r.max(g).max(b) as u32;
    let min = r.min(g).min(b) as u32;
    (((max - min) * 255 + max / 2).checked_div(max)).unwrap_or(0) as u8
}

/// Saturation of RGB pixels (the mask's input when the pixels are already RGB).
pub fn rgb_saturation(rgb: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; rgb.len() / 3];
    rgb.par_chunks(CHUNK * 3)
        .zip(out.par_chunks_mut(CHUNK))
        .for_each(|(src, dst)| {
            for (p, s) in src.chunks_exact(3).zip(dst.iter_mut()) {
                *s = saturation(p[0], p[1], p[2]);
            }
        });
    out
}

/// Counts of each 8-bit value.
pub fn histogram256(values: &[u8]) -> [u64; 256] {
    values
        .par_chunks(CHUNK * 4)
        .map(|c| {
            let mut h = [0u64; 256];
            for &v in c {
                h[v as usize] += 1;
            }
            h
        })
        .reduce(
            || [0u64; 256],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}

/// Otsu's threshold of an 8-bit histogram, with `skimage.filters.threshold_otsu`'s
/// semantics: the histogram spans the values present (min to max), the threshold is the
/// first value that maximises the between-class variance, and values `> t` are foreground.
/// An image of one value returns that value.
pub fn otsu(hist: &[u64; 256]) -> u8 {
    let Some(lo) = hist.iter().position(|&c| c > 0) else {
        return 0;
    };
    let hi = hist.iter().rposition(|&c| c > 0).expect("lo exists");
    if lo == hi {
        return lo as u8;
    }
    let h: Vec<f64> = hist[lo..=hi].iter().map(|&c| c as f64).collect();
    let centers: Vec<f64> = (lo..=hi).map(|v| v as f64).collect();
    let n = h.len();
    // The same cumulative sums, in the same order, as skimage.
    let mut w1 = vec![0.0; n];
    let mut m1 = vec![0.0; n];
    let (mut cw, mut cm) = (0.0, 0.0);
    for i in 0..n {
        cw += h[i];
        cm += h[i] * centers[i];
        w1[i] = cw;
        m1[i] = cm / cw;
    }
    let mut w2 = vec![0.0; n];
    let mut m2 = vec![0.0; n];
    let (mut cw, mut cm) = (0.0, 0.0);
    for i in (0..n).rev() {
        cw += h[i];
        cm += h[i] * centers[i];
        w2[i] = cw;
        m2[i] = cm / cw;
    }
    let mut best = (f64::NEG_INFINITY, 0);
    for i in 0..n - 1 {
        let v = w1[i] * w2[i + 1] * (m1[i] - m2[i + 1]).powi(2);
        if v > best.0 {
            best = (v, i);
        }
    }
    (lo + best.1) as u8
}

/// Sums over the pixels whose optical density is at least [`BETA`] in every channel
/// (torchstain's `ODhat`): their count, the sum of OD, and the sum of OD·ODᵀ (xx, xy, xz,
/// yy, yz, zz). The covariance follows on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OdSums {
    pub n: u64,
    pub sum: [f64; 3],
    pub prod: [f64; 6],
}

impl OdSums {
    pub fn merge(mut self, o: Self) -> Self {
        self.n += o.n;
        for i in 0..3 {
            self.sum[i] += o.sum[i];
        }
        for i in 0..6 {
            self.prod[i] += o.prod[i];
        }
        self
    }

    /// `np.cov(ODhat.T)`: the unbiased covariance, row-major 3×3.
    pub fn covariance(&self) -> [[f64; 3]; 3] {
        let n = self.n as f64;
        let idx = [[0, 1, 2], [1, 3, 4], [2, 4, 5]];
        std::array::from_fn(|i| {
            std::array::from_fn(|j| (self.prod[idx[i][j]] - self.sum[i] * self.sum[j] / n) / (n - 1.0))
        })
    }
}

#[inline]
fn od_of(t: &[f32; 256], p: &[u8]) -> [f32; 3] {
    [t[p[0] as usize], t[p[1] as usize], t[p[2] as usize]]
}

#[inline]
fn transparent(od: &[f32; 3]) -> bool {
    od.iter().any(|&v| (v as f64) < BETA)
}

pub fn od_sums(rgb: &[u8]) -> OdSums {
    let t = od_table();
    rgb.par_chunks(CHUNK * 3)
        .map(|c| {
            let mut s = OdSums::default();
            for p in c.chunks_exact(3) {
                let od = od_of(&t, p);
                if transparent(&od) {
                    continue;
                }
                let [x, y, z] = od.map(f64::from);
                s.n += 1;
                s.sum[0] += x;
                s.sum[1] += y;
                s.sum[2] += z;
                s.prod[0] += x * x;
                s.prod[1] += x * y;
                s.prod[2] += x * z;
                s.prod[3] += y * y;
                s.prod[4] += y * z;
                s.prod[5] += z * z;
            }
            s
        })
        .reduce(OdSums::default, OdSums::merge)
}

#[inline]
pub fn angle_bin(phi: f32) -> usize {
    let b = ((phi + std::f32::consts::PI) * ANGLE_SCALE) as i64;
    b.clamp(0, ANGLE_BINS as i64 - 1) as usize
}

/// Histogram of `atan2(OD·e2, OD·e1)` over the non-transparent pixels, where `e1`, `e2` span
/// the plane of the two largest eigenvectors (torchstain's `phi`).
pub fn angle_histogram(rgb: &[u8], e1: [f32; 3], e2: [f32; 3]) -> Vec<u64> {
    let t = od_table();
    rgb.par_chunks(CHUNK * 3)
        .map(|c| {
            let mut h = vec![0u64; ANGLE_BINS];
            for p in c.chunks_exact(3) {
                let od = od_of(&t, p);
                if transparent(&od) {
                    continue;
                }
                let x = od[0] * e1[0] + od[1] * e1[1] + od[2] * e1[2];
                let y = od[0] * e2[0] + od[1] * e2[1] + od[2] * e2[2];
                h[angle_bin(y.atan2(x))] += 1;
            }
            h
        })
        .reduce(|| vec![0u64; ANGLE_BINS], add_hist)
}

fn add_hist(mut a: Vec<u64>, b: Vec<u64>) -> Vec<u64> {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

#[inline]
pub fn conc_bin(c: f32) -> usize {
    let b = ((c - C_LO) * CONC_SCALE).floor();
    if b.is_nan() {
        0
    } else {
        (b as i64).clamp(0, CONC_BINS as i64 - 1) as usize
    }
}

/// Histograms of both stain concentrations `C = pinv(HE) · OD` over every pixel (torchstain
/// takes the 99th percentile of C over all pixels, transparent ones included). Returns the
/// hematoxylin bins followed by the eosin bins.
pub fn concentration_histogram(rgb: &[u8], pinv: [[f32; 3]; 2]) -> Vec<u64> {
    let t = od_table();
    rgb.par_chunks(CHUNK * 3)
        .map(|c| {
            let mut h = vec![0u64; 2 * CONC_BINS];
            for p in c.chunks_exact(3) {
                let od = od_of(&t, p);
                for (s, row) in pinv.iter().enumerate() {
                    let v = row[0] * od[0] + row[1] * od[1] + row[2] * od[2];
                    h[s * CONC_BINS + conc_bin(v)] += 1;
                }
            }
            h
        })
        .reduce(|| vec![0u64; 2 * CONC_BINS], add_hist)
}

/// Macenko normalisation of RGB pixels in place: `OD' = M · OD` with
/// `M = HE_ref · diag(1 / scale) · pinv(HE)`, then `min(255, Io · exp(−OD'))` truncated to 8
/// bits, as torchstain does.
pub fn macenko_apply(rgb: &mut [u8], m: [[f32; 3]; 3]) {
    let t = od_table();
    rgb.par_chunks_mut(CHUNK * 3).for_each(|c| {
        for p in c.chunks_exact_mut(3) {
            let od = od_of(&t, p);
            for ch in 0..3 {
                let v = m[ch][0] * od[0] + m[ch][1] * od[1] + m[ch][2] * od[2];
                p[ch] = to_u8(IO as f32 * (-v).exp());
            }
        }
    });
}

#[inline]
fn to_u8(v: f32) -> u8 {
    // `astype(uint8)` after clipping above 255: truncation; NaN and negatives to 0.
    if v >= 255.0 {
        255
    } else if v > 0.0 {
        v as u8
    } else {
        0
    }
}

/// sRGB → CIE XYZ as torchstain's `rgb2lab` has it.
pub const RGB2XYZ: [[f32; 3]; 3] = [
    [0.412453, 0.357580, 0.180423],
    [0.212671, 0.715160, 0.072169],
    [0.019334, 0.119193, 0.950227],
];
pub const WHITE: [f32; 3] = [0.95047, 1.0, 1.08883];

/// CIELAB (L in 0..100, a and b around 0) of 8-bit sRGB, as torchstain's `rgb2lab`.
#[inline]
pub fn rgb_to_lab(p: &[u8]) -> [f32; 3] {
    let lin = |v: u8| {
        let c = v as f32 / 255.0;
        if c > 0.04045 {
            ((c + 0.055) / 1.055).powf(2.4)
        } else {
            c / 12.92
        }
    };
    let c = [lin(p[0]), lin(p[1]), lin(p[2])];
    let f = |i: usize| {
        let v = (RGB2XYZ[i][0] * c[0] + RGB2XYZ[i][1] * c[1] + RGB2XYZ[i][2] * c[2]) / WHITE[i];
        if v > 0.008856 {
            v.cbrt()
        } else {
            7.787 * v + 16.0 / 116.0
        }
    };
    let (x, y, z) = (f(0), f(1), f(2));
    [116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)]
}

/// The inverse of [`RGB2XYZ`], computed once in f64.
pub fn xyz2rgb() -> [[f32; 3]; 3] {
    let a: [[f64; 3]; 3] = RGB2XYZ.map(|r| r.map(f64::from));
    let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
    let c = |i: usize, j: usize| {
        let (r0, r1) = ((j + 1) % 3, (j + 2) % 3);
        let (c0, c1) = ((i + 1) % 3, (i + 2) % 3);
        a[r0][c0] * a[r1][c1] - a[r0][c1] * a[r1][c0]
    };
    std::array::from_fn(|i| std::array::from_fn(|j| (c(i, j) / det) as f32))
}

/// 8-bit sRGB of a CIELAB colour, clipped, as torchstain's `lab2rgb` then `(· 255).astype(uint8)`.
#[inline]
pub fn lab_to_rgb(lab: [f32; 3], inv: &[[f32; 3]; 3]) -> [u8; 3] {
    let y = (lab[0] + 16.0) / 116.0;
    let x = lab[1] / 500.0 + y;
    let z = y - lab[2] / 200.0;
    let g = |v: f32| {
        if v > 0.2068966 {
            v * v * v
        } else {
            (v - 16.0 / 116.0) / 7.787
        }
    };
    let xyz = [g(x) * WHITE[0], g(y) * WHITE[1], g(z) * WHITE[2]];
    std::array::from_fn(|i| {
        let l = inv[i][0] * xyz[0] + inv[i][1] * xyz[1] + inv[i][2] * xyz[2];
        let s = if l > 0.0031308 {
            1.055 * l.powf(1.0 / 2.4) - 0.055
        } else {
            l * 12.92
        };
        to_u8(s.clamp(0.0, 1.0) * 255.0)
    })
}

/// Reinhard normalisation in place: each LAB channel standardised with the slide's mean and
/// standard deviation and given the target's, `(x − μ) / σ · σ_t + μ_t`, as torchstain's
/// numpy Reinhard normaliser. `k[c] = σ_t / σ`, `d[c] = μ_t − μ · k`.
pub fn reinhard_apply(rgb: &mut [u8], k: [f32; 3], d: [f32; 3]) {
    let inv = xyz2rgb();
    rgb.par_chunks_mut(CHUNK * 3).for_each(|c| {
        for p in c.chunks_exact_mut(3) {
            let lab = rgb_to_lab(p);
            let out = lab_to_rgb(std::array::from_fn(|i| lab[i] * k[i] + d[i]), &inv);
            p.copy_from_slice(&out);
        }
    });
}

/// Mean and population standard deviation of each LAB channel (torchstain's `get_mean_std`).
pub fn lab_mean_std(rgb: &[u8]) -> ([f64; 3], [f64; 3]) {
    let (n, s, q) = rgb
        .par_chunks(CHUNK * 3)
        .map(|c| {
            let (mut s, mut q) = ([0f64; 3], [0f64; 3]);
            for p in c.chunks_exact(3) {
                let lab = rgb_to_lab(p);
                for i in 0..3 {
                    s[i] += lab[i] as f64;
                    q[i] += (lab[i] as f64).powi(2);
                }
            }
            ((c.len() / 3) as f64, s, q)
        })
        .reduce(
            || (0.0, [0.0; 3], [0.0; 3]),
            |a, b| {
                (
                    a.0 + b.0,
                    std::array::from_fn(|i| a.1[i] + b.1[i]),
                    std::array::from_fn(|i| a.2[i] + b.2[i]),
                )
            },
        );
    let mean = s.map(|v| v / n.max(1.0));
    let std = std::array::from_fn(|i| (q[i] / n.max(1.0) - mean[i] * mean[i]).max(0.0).sqrt());
    (mean, std)
}

/// The 2× pyramid reduction along rows: `out[y][i] = Σ_k w[i][k] · src[y][lo_i + k]`, in
/// 22-bit fixed point with rounding, per channel. The weights are [`super::reduce::Reduce2`]'s.
pub fn reduce_rows(r: &super::reduce::Reduce2, src: &[u8], width: usize) -> Vec<u8> {
    let out_w = r.output_len();
    let mut out = vec![0u8; src.len() / (width * 3) * out_w * 3];
    src.par_chunks_exact(width * 3)
        .zip(out.par_chunks_exact_mut(out_w * 3))
        .for_each(|(row, o)| r.row_into(row, o));
    out
}

/// A deterministic pseudo-random buffer (xorshift), so the check needs no test data.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otsu_splits_two_populations_between_them() {
        let mut h = [0u64; 256];
        h[20] = 500;
        h[21] = 300;
        h[200] = 400;
        h[210] = 100;
        let t = otsu(&h);
        assert!((21..200).contains(&t), "{t}");
        // Exactly the first maximiser: everything ≤ 21 is one class.
        assert_eq!(t, 21);
        let mut one = [0u64; 256];
        one[7] = 10;
        assert_eq!(otsu(&one), 7);
    }

    #[test]
    fn saturation_is_zero_for_greys_and_full_for_pure_colours() {
        assert_eq!(saturation(200, 200, 200), 0);
        assert_eq!(saturation(0, 0, 0), 0);
        assert_eq!(saturation(255, 0, 0), 255);
        assert_eq!(saturation(200, 100, 100), 128);
    }

    #[test]
    fn covariance_of_sums_matches_the_direct_formula() {
        let px: Vec<u8> = (0..3000u32).map(|i| (i * 37 % 200) as u8).collect();
        let s = od_sums(&px);
        let t = od_table();
        let ods: Vec<[f64; 3]> = px
            .chunks_exact(3)
            .map(|p| od_of(&t, p).map(f64::from))
            .filter(|o| o.iter().all(|&v| v >= BETA))
            .collect();
        assert_eq!(s.n as usize, ods.len());
        let n = ods.len() as f64;
        let mean: [f64; 3] = std::array::from_fn(|i| ods.iter().map(|o| o[i]).sum::<f64>() / n);
        let c = s.covariance();
        for i in 0..3 {
            for j in 0..3 {
                let direct = ods.iter().map(|o| (o[i] - mean[i]) * (o[j] - mean[j])).sum::<f64>() / (n - 1.0);
                assert!((c[i][j] - direct).abs() < 1e-9, "{i}{j}: {} vs {direct}", c[i][j]);
            }
        }
    }

    #[test]
    fn lab_round_trip_is_within_one_level() {
        let inv = xyz2rgb();
        for v in (0..=255u8).step_by(5) {
            for p in [[v, 128, 30], [12, v, 240], [v, v, v]] {
                let back = lab_to_rgb(rgb_to_lab(&p), &inv);
                for i in 0..3 {
                    assert!((back[i] as i32 - p[i] as i32).abs() <= 1, "{p:?} → {back:?}");
                }
            }
        }
    }
}
