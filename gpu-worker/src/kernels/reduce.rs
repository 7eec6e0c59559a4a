//! The 2× Lanczos-3 reduction that builds each DeepZoom level from the one above: the CPU
//! reference ([`Reduce2`]) of the downsample kernel in [`super::gpu`], and its fixed-point
//! weights. Kept with the kernels so that the pyramid builder (`deepzoom`) uses the kernels
//! and nothing here uses the builder.

/// The 2× reduction of one axis: Lanczos-3 weights in fixed point, computed the way Pillow
/// computes them for `resize(..., LANCZOS)` (support 3 × scale, taps that fall outside the
/// image dropped and the rest renormalised, 22 fractional bits, rounding), so our lower levels
/// stay within a few levels of OpenSlide's own DeepZoom tiles. This is the CPU reference of
/// the downsample kernel.
#[derive(Debug, Clone)]
pub struct Reduce2 {
    /// For each output index: the first input index and its weights.
    taps: Vec<(usize, Vec<i32>)>,
    /// Outputs `a..b` share the weights of output `a` and start two inputs apart.
    uniform: (usize, usize),
}

/// `out[i] = Σ_j w[j] · src[lo + 2i + j]` per channel, 12 taps. Each channel is split into
/// its even and odd samples first, so the sum becomes six multiply-adds of contiguous slices,
/// which the compiler vectorises: `Σ_t w[2t] · even[i + t] + w[2t + 1] · odd[i + t]`. Integer
/// sums in another order are the same sums.
fn fir12(src: &[u8], lo: usize, w: &[i32; 12], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above), all `fir12_avx2` asks of its caller.
        #[allow(unsafe_code)]
        unsafe {
            return fir12_avx2(src, lo, w, out);
        }
    }
    fir12_body(src, lo, w, out)
}

/// The reductions' multiply-adds are 32-bit: baseline x86-64 (SSE2) has no 32-bit vector
/// multiply, AVX2 does. The same source, compiled for AVX2 and chosen at run time: the same
/// integer sums, so the same pixels.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
unsafe fn fir12_avx2(src: &[u8], lo: usize, w: &[i32; 12], out: &mut [u8]) {
    fir12_body(src, lo, w, out)
}

/// As [`fir12_avx2`], for [`Reduce2::column`]'s accumulation.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
unsafe fn column_avx2(w: &[i32], rows: &[&[u8]], out: &mut [u8]) {
    column_body(w, rows, out)
}

#[inline(always)]
fn column_body(w: &[i32], rows: &[&[u8]], out: &mut [u8]) {
    // Row by row over the whole width: the inner loop runs along memory.
    let mut acc = vec![1i32 << (PRECISION_BITS - 1); out.len()];
    for (k, r) in w.iter().zip(rows) {
        let k = *k;
        for (a, v) in acc.iter_mut().zip(r.iter()) {
            *a += *v as i32 * k;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = Reduce2::clip(a);
    }
}

#[inline(always)]
fn fir12_body(src: &[u8], lo: usize, w: &[i32; 12], out: &mut [u8]) {
    let n = out.len() / 3;
    // Output i reads inputs lo + 2i .. lo + 2i + 11: even and odd samples 0 .. n + 5.
    let m = n + 5;
    let span = &src[lo * 3..(lo + 2 * m) * 3];
    let mut even = vec![0i32; m];
    let mut odd = vec![0i32; m];
    let mut acc = vec![0i32; n];
    for ch in 0..3 {
        for (k, pair) in span.chunks_exact(6).enumerate() {
            even[k] = pair[ch] as i32;
            odd[k] = pair[3 + ch] as i32;
        }
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for t in 0..6 {
            let (we, wo) = (w[2 * t], w[2 * t + 1]);
            for ((a, e), o) in acc.iter_mut().zip(&even[t..t + n]).zip(&odd[t..t + n]) {
                *a += e * we + o * wo;
            }
        }
        for (o, a) in out.chunks_exact_mut(3).zip(&acc) {
            o[ch] = Reduce2::clip(*a);
        }
    }
}

const PRECISION_BITS: u32 = 22;

fn lanczos3(x: f64) -> f64 {
    let x = x.abs();
    if x < 1e-12 {
        1.0
    } else if x < 3.0 {
        let px = std::f64::consts::PI * x;
        3.0 * px.sin() * (px / 3.0).sin() / (px * px)
    } else {
        0.0
    }
}

impl Reduce2 {
    /// Weights for reducing `input` samples to `ceil(input / 2)`, uniformly.
    pub fn new(input: usize) -> Self {
        Self::tiled(input, usize::MAX, 0)
    }

    /// As [`Reduce2::new`], for a level cut into `tile`-sized tiles with `overlap`. When
    /// `input` is odd the last tile of the output covers fewer than twice its pixels;
    /// OpenSlide's DeepZoom resizes that tile from exactly the pixels it covers, so its
    /// samples are spaced `covered / size` apart instead of 2. The last tile is reduced the
    /// same way here; everything else at scale 2.
    pub fn tiled(input: usize, tile: usize, overlap: usize) -> Self {
        let output = input.div_ceil(2).max(1);
        let tiles = output.div_ceil(tile.max(1));
        let z0 = if tiles > 1 { (tiles - 1) * tile - overlap } else { 0 };
        let l0 = 2 * z0;
        let z_size = output - z0;
        let last_scale = ((2 * z_size).min(input - l0)) as f64 / z_size as f64;
        let taps = (0..output)
            .map(|i| {
                let (origin, first, scale) = if i >= z0 && tile != usize::MAX {
                    (l0 as f64, z0, last_scale)
                } else {
                    (0.0, 0, 2.0)
                };
                let floor = origin as i64;
                let support = 3.0 * scale;
                let center = origin + ((i - first) as f64 + 0.5) * scale;
                let lo = ((center - support + 0.5) as i64).max(floor) as usize;
                let hi = ((center + support + 0.5) as i64).min(input as i64).max(lo as i64 + 1) as usize;
                let w: Vec<f64> = (lo..hi).map(|x| lanczos3((x as f64 - center + 0.5) / scale)).collect();
                let sum: f64 = w.iter().sum();
                let fixed = w
                    .iter()
                    .map(|k| {
                        let v = k / sum * (1u64 << PRECISION_BITS) as f64;
                        if v < 0.0 {
                            (v - 0.5) as i32
                        } else {
                            (v + 0.5) as i32
                        }
                    })
                    .collect();
                (lo, fixed)
            })
            .collect::<Vec<(usize, Vec<i32>)>>();
        // The longest run of outputs with equal weights, each two inputs after the last.
        let mut uniform = (0, 0);
        let mut start = 0;
        for i in 1..=taps.len() {
            let same = i < taps.len() && taps[i].1 == taps[start].1 && taps[i].0 == taps[i - 1].0 + 2;
            if !same {
                if i - start > uniform.1 - uniform.0 {
                    uniform = (start, i);
                }
                start = i;
            }
        }
        Self { taps, uniform }
    }

    pub fn output_len(&self) -> usize {
        self.taps.len()
    }

    /// The taps as flat arrays for the GPU: first input index, offset of the first weight,
    /// weight count, and every weight.
    pub fn flat(&self) -> (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>) {
        let (mut lo, mut start, mut count, mut w) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (l, k) in &self.taps {
            lo.push(*l as i32);
            start.push(w.len() as i32);
            count.push(k.len() as i32);
            w.extend_from_slice(k);
        }
        (lo, start, count, w)
    }

    /// The input range output `i` reads.
    pub fn span(&self, i: usize) -> (usize, usize) {
        let (lo, w) = &self.taps[i];
        (*lo, lo + w.len())
    }

    // 22-bit weights summing to 2^22, whose magnitudes sum to under 1.2 · 2^22 (Lanczos-3's
    // negative lobes), times 255, stay below 2^31: i32 accumulates exactly, as in Pillow, and
    // twice as many lanes fit a vector register as with i64.
    fn clip(acc: i32) -> u8 {
        (acc >> PRECISION_BITS).clamp(0, 255) as u8
    }

    /// One RGB row of `input` pixels to `output` pixels, appended to `out`.
    pub fn row(&self, src: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.taps.len() * 3, 0);
        self.row_into(src, &mut out[start..]);
    }

    /// As [`Reduce2::row`], into `out` (exactly `output_len() * 3` bytes).
    pub fn row_into(&self, src: &[u8], out: &mut [u8]) {
        // Inside a level, at scale 2, every output has the same 12 weights two pixels further
        // on: that run is a fixed-length filter the compiler unrolls. The edges and the last
        // tile's spacing take the general loop.
        let (a, b) = self.uniform;
        if b > a {
            if let Ok(w) = <&[i32; 12]>::try_from(self.taps[a].1.as_slice()) {
                fir12(src, self.taps[a].0, w, &mut out[a * 3..b * 3]);
                self.general(src, 0..a, &mut out[..a * 3]);
                self.general(src, b..self.taps.len(), &mut out[b * 3..]);
                return;
            }
        }
        self.general(src, 0..self.taps.len(), out);
    }

    fn general(&self, src: &[u8], range: std::ops::Range<usize>, out: &mut [u8]) {
        for ((lo, w), o) in self.taps[range].iter().zip(out.chunks_exact_mut(3)) {
            let (mut r, mut g, mut b) = (
                1i32 << (PRECISION_BITS - 1),
                1i32 << (PRECISION_BITS - 1),
                1i32 << (PRECISION_BITS - 1),
            );
            let px = &src[lo * 3..(lo + w.len()) * 3];
            for (k, p) in w.iter().zip(px.chunks_exact(3)) {
                r += p[0] as i32 * k;
                g += p[1] as i32 * k;
                b += p[2] as i32 * k;
            }
            o.copy_from_slice(&[Self::clip(r), Self::clip(g), Self::clip(b)]);
        }
    }

    /// Output row `i` from the input rows it spans (`rows[j]` is input row `span(i).0 + j`),
    /// appended to `out`.
    pub fn column(&self, i: usize, rows: &[&[u8]], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + rows[0].len(), 0);
        self.column_into(i, rows, &mut out[start..]);
    }

    /// As [`Reduce2::column`], into `out` (one row's bytes).
    pub fn column_into(&self, i: usize, rows: &[&[u8]], out: &mut [u8]) {
        let (_, w) = &self.taps[i];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            #[allow(unsafe_code)]
            unsafe {
                return column_avx2(w, rows, out);
            }
        }
        column_body(w, rows, out)
    }
}

/// A whole RGB image reduced 2× on both axes, horizontal pass first (as Pillow does).
pub fn reduce_image(w: usize, h: usize, rgb: &[u8], tile: usize, overlap: usize) -> (usize, usize, Vec<u8>) {
    let (rx, ry) = (Reduce2::tiled(w, tile, overlap), Reduce2::tiled(h, tile, overlap));
    let mut horizontal = Vec::new();
    for row in rgb.chunks_exact(w * 3) {
        rx.row(row, &mut horizontal);
    }
    let nw = rx.output_len();
    let rows: Vec<&[u8]> = horizontal.chunks_exact(nw * 3).collect();
    let mut out = Vec::new();
    for i in 0..ry.output_len() {
        let (a, b) = ry.span(i);
        ry.column(i, &rows[a..b], &mut out);
    }
    (nw, ry.output_len(), out)
}

#[cfg(test)]
mod reduce_tests {
    use super::*;

    #[test]
    fn a_flat_image_stays_flat_and_weights_sum_to_one() {
        for n in [1usize, 2, 3, 7, 254, 255] {
            let r = Reduce2::new(n);
            assert_eq!(r.output_len(), n.div_ceil(2));
            for (_, w) in &r.taps {
                let s: i64 = w.iter().map(|k| *k as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= w.len() as i64, "{n}: {s}");
            }
        }
        let img = vec![200u8; 9 * 5 * 3];
        let (w, h, out) = reduce_image(9, 5, &img, 4, 1);
        assert_eq!((w, h), (5, 3));
        assert!(out.iter().all(|v| *v == 200));
    }

    #[test]
    fn the_unrolled_interior_equals_the_general_loop() {
        let mut x = 12345u32;
        for n in [30usize, 255, 509, 1000, 4097] {
            let src: Vec<u8> = (0..n * 3)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x >> 24) as u8
                })
                .collect();
            for (t, ov) in [(254, 1), (usize::MAX, 0)] {
                let r = Reduce2::tiled(n, t, ov);
                if n > 1000 {
                    // Long levels are mostly the unrolled run (an odd level's last tile is not).
                    assert!(r.uniform.1 - r.uniform.0 > n / 4, "{n}: {:?}", r.uniform);
                }
                let mut fast = vec![0; r.output_len() * 3];
                r.row_into(&src, &mut fast);
                let mut slow = vec![0; r.output_len() * 3];
                r.general(&src, 0..r.output_len(), &mut slow);
                assert_eq!(fast, slow, "{n} {t}");
                // The baseline build of the run-time-chosen loops gives the same bytes.
                let (a, b) = r.uniform;
                if let (true, Ok(w)) = (b > a, <&[i32; 12]>::try_from(r.taps[a].1.as_slice())) {
                    let mut base = vec![0; (b - a) * 3];
                    fir12_body(&src, r.taps[a].0, w, &mut base);
                    assert_eq!(base, fast[a * 3..b * 3], "{n} {t}");
                }
                let rows: Vec<&[u8]> = src.chunks_exact(3).take(r.taps[0].1.len()).collect();
                let (mut chosen, mut base) = (vec![0; 3], vec![0; 3]);
                r.column_into(0, &rows, &mut chosen);
                column_body(&r.taps[0].1, &rows, &mut base);
                assert_eq!(chosen, base, "{n} {t}");
            }
        }
    }

    #[test]
    fn the_worst_accumulator_fits_an_i32() {
        // Every size a tiled level can have up to 4096, with the common tile settings.
        let mut worst = 0i64;
        for n in 1..4096usize {
            for (t, ov) in [(254, 1), (256, 0), (510, 2), (usize::MAX, 0)] {
                for (_, w) in &Reduce2::tiled(n, t, ov).taps {
                    let acc = 255 * w.iter().map(|k| (*k as i64).abs()).sum::<i64>() + (1 << (PRECISION_BITS - 1));
                    worst = worst.max(acc);
                }
            }
        }
        assert!(worst < i32::MAX as i64, "{worst}");
    }
}
