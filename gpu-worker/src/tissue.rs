//! The tissue mask (DESIGN §8 step 3) and per-tile statistics (step 6).
//!
//! The mask is built on a thumbnail of the slide, about [`MASK_MAX`] pixels on its long side,
//! area-averaged from the slide level just finer than it: saturation → Otsu's threshold →
//! morphology (closing then opening with a 5×5 square) → removal of tissue components and
//! holes smaller than [`MIN_COMPONENT`] of the mask's area.

use crate::kernels::Device;
use crate::slide::Slide;

/// The thumbnail's long side, in pixels.
pub const MASK_MAX: u64 = 2048;
/// Components (and holes) below this fraction of the mask's area are removed (filled).
pub const MIN_COMPONENT: f64 = 1e-4;
/// Half the side of the square structuring element.
pub const RADIUS: usize = 2;

/// A low-resolution RGB image of the whole slide.
#[derive(Debug, Clone)]
pub struct Thumbnail {
    pub width: usize,
    pub height: usize,
    /// Level-0 pixels per thumbnail pixel along each axis.
    pub downsample: u64,
    pub rgb: Vec<u8>,
}

impl Thumbnail {
    /// Reads the slide level just finer than the thumbnail's scale in bands and averages
    /// every thumbnail pixel's footprint.
    pub fn read(slide: &Slide) -> Result<Self, crate::slide::SlideError> {
        let (w, h) = slide.dimensions();
        let f = w.max(h).div_ceil(MASK_MAX).max(1);
        let (tw, th) = (w.div_ceil(f) as usize, h.div_ceil(f) as usize);
        let levels = slide.levels();
        let level = levels.iter().rposition(|l| l.2 <= f as f64 + 1e-9).unwrap_or(0);
        let (lw, lh, down) = levels[level];
        let mut sums = vec![0u64; tw * th * 3];
        let mut counts = vec![0u32; tw * th];
        let band = ((16u64 << 20) / (lw * 4)).max(1);
        let map = |v: u64, n: usize| (((v as f64 + 0.5) * down / f as f64) as usize).min(n - 1);
        let cols: Vec<usize> = (0..lw).map(|x| map(x, tw)).collect();
        let mut y = 0;
        while y < lh {
            let rows = band.min(lh - y);
            let rgb = slide.read_rgb_parallel(level as u32, 0, y, lw, rows)?;
            for (r, row) in rgb.chunks_exact(lw as usize * 3).enumerate() {
                let ty = map(y + r as u64, th);
                let base = ty * tw;
                for (x, p) in row.chunks_exact(3).enumerate() {
                    let i = base + cols[x];
                    sums[i * 3] += p[0] as u64;
                    sums[i * 3 + 1] += p[1] as u64;
                    sums[i * 3 + 2] += p[2] as u64;
                    counts[i] += 1;
                }
            }
            y += rows;
        }
        let rgb = sums
            .chunks_exact(3)
            .zip(&counts)
            .flat_map(|(s, &c)| {
                let c = c.max(1) as u64;
                [s[0], s[1], s[2]].map(|v| ((v + c / 2) / c) as u8)
            })
            .collect();
        Ok(Self {
            width: tw,
            height: th,
            downsample: f,
            rgb,
        })
    }
}

/// The tissue mask: one byte per thumbnail pixel, 1 for tissue.
#[derive(Debug, Clone)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub downsample: u64,
    pub threshold: u8,
    pub data: Vec<u8>,
}

impl Mask {
    pub fn build(device: &Device, thumb: &Thumbnail) -> anyhow::Result<Self> {
        let sat = device.rgb_saturation(&thumb.rgb)?;
        let hist = device.histogram256(&sat)?;
        let threshold = device.otsu(&hist)?;
        let raw: Vec<u8> = sat.iter().map(|&s| (s > threshold) as u8).collect();
        let (w, h) = (thumb.width, thumb.height);
        let closed = erode(&dilate(&raw, w, h, RADIUS), w, h, RADIUS);
        let opened = dilate(&erode(&closed, w, h, RADIUS), w, h, RADIUS);
        let min = ((w * h) as f64 * MIN_COMPONENT).ceil() as usize;
        let mut data = remove_small(&opened, w, h, 1, min);
        // Holes: background components not touching the border, below the same size.
        data = remove_small(&data, w, h, 0, min);
        Ok(Self {
            width: w,
            height: h,
            downsample: thumb.downsample,
            threshold,
            data,
        })
    }

    pub fn fraction(&self) -> f64 {
        self.data.iter().map(|&v| v as u64).sum::<u64>() as f64 / self.data.len().max(1) as f64
    }

    /// Fraction of tissue under a level-0 rectangle.
    pub fn fraction_in(&self, x: u64, y: u64, w: u64, h: u64) -> f64 {
        let f = self.downsample;
        let (x0, y0) = ((x / f) as usize, (y / f) as usize);
        let x1 = ((x + w).div_ceil(f) as usize).min(self.width).max(x0 + 1);
        let y1 = ((y + h).div_ceil(f) as usize).min(self.height).max(y0 + 1);
        let (mut n, mut t) = (0u64, 0u64);
        for yy in y0..y1.min(self.height) {
            for xx in x0..x1.min(self.width) {
                n += 1;
                t += self.data[yy * self.width + xx] as u64;
            }
        }
        t as f64 / n.max(1) as f64
    }

    /// Tissue pixels of `thumb` (the pixels stain statistics are estimated on).
    pub fn select(&self, thumb: &Thumbnail) -> Vec<u8> {
        thumb
            .rgb
            .chunks_exact(3)
            .zip(&self.data)
            .filter(|(_, m)| **m == 1)
            .flat_map(|(p, _)| [p[0], p[1], p[2]])
            .collect()
    }

    /// 8-bit greyscale PNG, 255 for tissue.
    pub fn png(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let px: Vec<u8> = self.data.iter().map(|&v| v * 255).collect();
        enc.write_header()?.write_image_data(&px)?;
        Ok(out)
    }
}

/// Separable max (dilate) or min (erode) over a (2r+1)² square; outside the image counts as
/// background for dilation and as tissue for erosion, so borders do not eat the mask.
fn filter(m: &[u8], w: usize, h: usize, r: usize, max: bool) -> Vec<u8> {
    if max {
        filter_with(m, w, h, r, u8::max)
    } else {
        filter_with(m, w, h, r, u8::min)
    }
}

/// [`filter`] as whole-row operations on shifted slices (the compiler vectorises them): the
/// window is clipped at the borders.
fn filter_with(m: &[u8], w: usize, h: usize, r: usize, pick: impl Fn(u8, u8) -> u8 + Copy) -> Vec<u8> {
    let combine = |dst: &mut [u8], src: &[u8]| {
        for (a, b) in dst.iter_mut().zip(src) {
            *a = pick(*a, *b);
        }
    };
    let mut tmp = m.to_vec();
    for (t, row) in tmp.chunks_exact_mut(w).zip(m.chunks_exact(w)) {
        for d in 1..=r.min(w - 1) {
            combine(&mut t[..w - d], &row[d..]);
            combine(&mut t[d..], &row[..w - d]);
        }
    }
    let mut out = tmp.clone();
    for (y, o) in out.chunks_exact_mut(w).enumerate() {
        for d in 1..=r {
            if let Some(a) = y.checked_sub(d) {
                combine(o, &tmp[a * w..(a + 1) * w]);
            }
            if y + d < h {
                combine(o, &tmp[(y + d) * w..(y + d + 1) * w]);
            }
        }
    }
    out
}

fn dilate(m: &[u8], w: usize, h: usize, r: usize) -> Vec<u8> {
    filter(m, w, h, r, true)
}

fn erode(m: &[u8], w: usize, h: usize, r: usize) -> Vec<u8> {
    filter(m, w, h, r, false)
}

/// Flips 8-connected components of `value` smaller than `min` pixels. Background components
/// (value 0) that touch the border are never filled: they are the slide's surroundings.
fn remove_small(m: &[u8], w: usize, h: usize, value: u8, min: usize) -> Vec<u8> {
    let mut out = m.to_vec();
    let mut seen = vec![false; m.len()];
    let mut stack = Vec::new();
    let mut comp = Vec::new();
    for start in 0..m.len() {
        if seen[start] || m[start] != value {
            continue;
        }
        comp.clear();
        stack.push(start);
        seen[start] = true;
        let mut border = false;
        while let Some(i) = stack.pop() {
            comp.push(i);
            let (x, y) = (i % w, i / w);
            border |= x == 0 || y == 0 || x == w - 1 || y == h - 1;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if !seen[j] && m[j] == value {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        let keep = comp.len() >= min || (value == 0 && border);
        if !keep {
            for &i in &comp {
                out[i] = 1 - value;
            }
        }
    }
    out
}

/// Statistics of one full-resolution tile.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TileStats {
    pub col: u64,
    pub row: u64,
    pub tissue: f64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

/// Mean and population standard deviation of each RGB channel.
pub fn rgb_mean_std(rgb: &[u8]) -> ([f64; 3], [f64; 3]) {
    // 16 pixels at a time in 48 u32 lanes (lane i holds channel i % 3), flushed to u64 before
    // a lane's sum of squares could overflow: the compiler vectorises the inner loop.
    const LANES: usize = 48;
    const FLUSH: usize = (u32::MAX / (255 * 255)) as usize;
    let (mut s, mut q) = ([0u64; 3], [0u64; 3]);
    let chunks = rgb.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut flush = |ls: &mut [u32; LANES], lq: &mut [u32; LANES]| {
        for i in 0..LANES {
            s[i % 3] += ls[i] as u64;
            q[i % 3] += lq[i] as u64;
        }
        *ls = [0; LANES];
        *lq = [0; LANES];
    };
    let (mut ls, mut lq) = ([0u32; LANES], [0u32; LANES]);
    for (k, c) in chunks.enumerate() {
        for i in 0..LANES {
            let v = c[i] as u32;
            ls[i] += v;
            lq[i] += v * v;
        }
        if (k + 1) % FLUSH == 0 {
            flush(&mut ls, &mut lq);
        }
    }
    flush(&mut ls, &mut lq);
    for p in rest.chunks_exact(3) {
        for c in 0..3 {
            s[c] += p[c] as u64;
            q[c] += (p[c] as u64) * (p[c] as u64);
        }
    }
    let n = (rgb.len() / 3).max(1) as f64;
    let mean = s.map(|v| v as f64 / n);
    let std = std::array::from_fn(|c| (q[c] as f64 / n - mean[c] * mean[c]).max(0.0).sqrt());
    (mean, std)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window clipped at the borders, one pixel at a time.
    fn filter_naive(m: &[u8], w: usize, h: usize, r: usize, max: bool) -> Vec<u8> {
        let mut out = vec![0u8; m.len()];
        for y in 0..h {
            for x in 0..w {
                let mut v = m[y * w + x];
                for yy in y.saturating_sub(r)..=(y + r).min(h - 1) {
                    for xx in x.saturating_sub(r)..=(x + r).min(w - 1) {
                        let p = m[yy * w + xx];
                        v = if max { v.max(p) } else { v.min(p) };
                    }
                }
                out[y * w + x] = v;
            }
        }
        out
    }

    #[test]
    fn the_row_filter_equals_the_window_at_every_pixel() {
        let mut seed = 7u32;
        for (w, h) in [(1, 1), (2, 9), (3, 3), (37, 23), (64, 5)] {
            let m: Vec<u8> = (0..w * h)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    ((seed >> 16) % 3 == 0) as u8
                })
                .collect();
            for max in [true, false] {
                for r in [1, 2, 4] {
                    assert_eq!(
                        filter(&m, w, h, r, max),
                        filter_naive(&m, w, h, r, max),
                        "{w}×{h} r {r} max {max}"
                    );
                }
            }
        }
    }

    #[test]
    fn mean_and_deviation_match_the_direct_sums_past_a_flush() {
        // More pixels than one flush period, and a remainder that is not whole lanes.
        let n: usize = 16 * 66_051 + 5;
        let rgb: Vec<u8> = (0..n * 3).map(|i| ((i * 7919) % 256) as u8).collect();
        let (mean, std) = rgb_mean_std(&rgb);
        for c in 0..3 {
            let v: Vec<f64> = rgb.iter().skip(c).step_by(3).map(|&b| b as f64).collect();
            let m = v.iter().sum::<f64>() / n as f64;
            let sd = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64).sqrt();
            assert!((mean[c] - m).abs() < 1e-9, "{c}: {} vs {m}", mean[c]);
            assert!((std[c] - sd).abs() < 1e-6, "{c}: {} vs {sd}", std[c]);
        }
    }

    #[test]
    fn specks_go_and_holes_fill_but_the_background_stays() {
        let (w, h) = (40, 30);
        let mut m = vec![0u8; w * h];
        // A 20×14 block with a 1-pixel hole, and a lone speck far away.
        for y in 5..19 {
            for x in 5..25 {
                m[y * w + x] = 1;
            }
        }
        m[10 * w + 12] = 0;
        m[27 * w + 37] = 1;
        let out = remove_small(&remove_small(&m, w, h, 1, 4), w, h, 0, 4);
        assert_eq!(out[10 * w + 12], 1, "the hole is filled");
        assert_eq!(out[27 * w + 37], 0, "the speck is gone");
        assert_eq!(out[0], 0, "the surroundings stay background");
        assert_eq!(out.iter().filter(|v| **v == 1).count(), 20 * 14);
    }

    #[test]
    fn closing_then_opening_keeps_a_block_and_drops_thin_lines() {
        let (w, h) = (30, 30);
        let mut m = vec![0u8; w * h];
        for y in 8..20 {
            for x in 8..20 {
                m[y * w + x] = 1;
            }
        }
        for x in 0..w {
            m[25 * w + x] = 1;
        }
        let closed = erode(&dilate(&m, w, h, 2), w, h, 2);
        let opened = dilate(&erode(&closed, w, h, 2), w, h, 2);
        assert_eq!(opened[14 * w + 14], 1);
        assert_eq!(opened[8 * w + 8], 1, "corners of a big block survive");
        assert!(
            opened[25 * w..26 * w].iter().all(|v| *v == 0),
            "a 1-pixel line is removed"
        );
    }

    #[test]
    fn fractions_cover_partial_tiles() {
        let mask = Mask {
            width: 4,
            height: 2,
            downsample: 10,
            threshold: 0,
            data: vec![1, 1, 0, 0, 1, 1, 0, 0],
        };
        assert_eq!(mask.fraction(), 0.5);
        assert_eq!(mask.fraction_in(0, 0, 20, 20), 1.0);
        assert_eq!(mask.fraction_in(15, 0, 10, 20), 0.5);
        assert_eq!(mask.fraction_in(35, 15, 100, 100), 0.0);
    }
}
