//! DeepZoom geometry and the streaming pyramid builder (CPU path).
//!
//! The geometry is OpenSlide's `DeepZoomGenerator` (limit_bounds off): level dimensions halve
//! with rounding up down to 1×1; tiles are `tile_size` plus `overlap` on each inner edge. The
//! full-resolution level is read from the slide in bands of tile rows; every other level is the
//! 2× Lanczos-3 reduction of the level above ([`Reduce2`]), computed once from the rows
//! already in memory: no pixel is read or reduced twice, and memory holds a few bands per
//! level, not the slide.

use crate::kernels::reduce::Reduce2;
use crate::kernels::Device;

/// The pyramid's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub tile_size: u32,
    pub overlap: u32,
    /// Level dimensions, index 0 = 1×1, last = full resolution.
    pub levels: Vec<(u64, u64)>,
}

impl Geometry {
    pub fn new(width: u64, height: u64, tile_size: u32, overlap: u32) -> Self {
        let mut dims = vec![(width.max(1), height.max(1))];
        let (mut w, mut h) = dims[0];
        while w > 1 || h > 1 {
            w = w.div_ceil(2).max(1);
            h = h.div_ceil(2).max(1);
            dims.push((w, h));
        }
        dims.reverse();
        Self {
            tile_size,
            overlap,
            levels: dims,
        }
    }

    pub fn level_count(&self) -> usize {
        self.levels.len()
    }

    /// Tile columns and rows of `level`.
    pub fn tiles(&self, level: usize) -> (u64, u64) {
        let (w, h) = self.levels[level];
        let t = self.tile_size as u64;
        (w.div_ceil(t), h.div_ceil(t))
    }

    /// One axis of a tile: start and length in the level's pixels, overlaps included.
    fn span(&self, index: u64, count: u64, limit: u64) -> (u64, u64) {
        let t = self.tile_size as u64;
        let ov = self.overlap as u64;
        let before = if index > 0 { ov } else { 0 };
        let after = if index + 1 < count { ov } else { 0 };
        let start = index * t - before;
        let len = (t.min(limit - index * t) + before + after).min(limit - start);
        (start, len)
    }

    /// The tile's rectangle (x, y, width, height) in its level's pixels.
    pub fn tile_rect(&self, level: usize, col: u64, row: u64) -> (u64, u64, u64, u64) {
        let (w, h) = self.levels[level];
        let (cols, rows) = self.tiles(level);
        let (x, tw) = self.span(col, cols, w);
        let (y, th) = self.span(row, rows, h);
        (x, y, tw, th)
    }

    pub fn tile_count(&self) -> u64 {
        (0..self.level_count())
            .map(|l| {
                let (c, r) = self.tiles(l);
                c * r
            })
            .sum()
    }

    /// The `.dzi` descriptor.
    pub fn dzi(&self, format: &str) -> String {
        let (w, h) = *self.levels.last().unwrap_or(&(1, 1));
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Image xmlns=\"http://schemas.microsoft.com/deepzoom/2008\" \
             Format=\"{format}\" Overlap=\"{}\" TileSize=\"{}\"><Size Height=\"{h}\" Width=\"{w}\"/></Image>\n",
            self.overlap, self.tile_size
        )
    }
}

/// Receives finished tiles: level, column, row, width, height and RGB pixels.
pub trait TileSink: Sync {
    fn tile(&self, level: usize, col: u64, row: u64, width: u32, height: u32, rgb: &[u8]) -> anyhow::Result<()>;
}

/// One level's rows in flight.
struct Level {
    index: usize,
    width: u64,
    height: u64,
    /// Level row number of the first buffered row.
    first_row: u64,
    /// RGB rows from `first_row` on.
    rows: Vec<u8>,
    /// The next tile row to emit.
    next_tile_row: u64,
    /// Rows pushed so far.
    received: u64,
    /// The reduction to the level below: horizontal and vertical weights, the horizontally
    /// reduced rows from `h_first` on, and the next row of the level below to make.
    reduce: Option<(Reduce2, Reduce2)>,
    h_rows: Vec<u8>,
    h_first: usize,
    next_down: usize,
}

impl Level {
    fn buffered(&self) -> u64 {
        (self.rows.len() / (self.width as usize * 3)) as u64
    }
}

/// `rows` after `buffer`.
fn append(buffer: &mut Vec<u8>, rows: Vec<u8>) {
    // Extending keeps the buffer's capacity from band to band; taking `rows` would not.
    buffer.extend_from_slice(&rows);
}

/// Builds every level's tiles from the full-resolution rows, pushed in order.
pub struct Builder<'a, S: TileSink> {
    geometry: Geometry,
    levels: Vec<Level>,
    sink: &'a S,
    device: Device,
    /// Tiles made so far, shared so that progress can be read while the builder works.
    pub tiles_done: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<'a, S: TileSink> Builder<'a, S> {
    pub fn new(geometry: Geometry, sink: &'a S) -> Self {
        Self::on(geometry, sink, Device::Cpu)
    }

    /// As [`Builder::new`], running the reductions on `device`.
    pub fn on(geometry: Geometry, sink: &'a S, device: Device) -> Self {
        let levels = geometry
            .levels
            .iter()
            .enumerate()
            .map(|(i, &(w, h))| Level {
                index: i,
                width: w,
                height: h,
                first_row: 0,
                rows: Vec::new(),
                next_tile_row: 0,
                received: 0,
                reduce: (i > 0).then(|| {
                    let (t, ov) = (geometry.tile_size as usize, geometry.overlap as usize);
                    (Reduce2::tiled(w as usize, t, ov), Reduce2::tiled(h as usize, t, ov))
                }),
                h_rows: Vec::new(),
                h_first: 0,
                next_down: 0,
            })
            .collect();
        Self {
            geometry,
            levels,
            sink,
            device,
            tiles_done: Default::default(),
        }
    }

    /// Pushes the next rows of the full-resolution level (RGB, full width).
    pub fn push(&mut self, rgb: &[u8]) -> anyhow::Result<()> {
        self.push_owned(rgb.to_vec())
    }

    /// As [`Builder::push`], taking the rows without a copy.
    pub fn push_owned(&mut self, rgb: Vec<u8>) -> anyhow::Result<()> {
        let top = self.levels.len() - 1;
        self.push_level(top, rgb)
    }

    fn push_level(&mut self, li: usize, rgb: Vec<u8>) -> anyhow::Result<()> {
        let stride = self.levels[li].width as usize * 3;
        anyhow::ensure!(rgb.len() % stride == 0, "rows must be whole");
        {
            let level = &mut self.levels[li];
            level.received += (rgb.len() / stride) as u64;
            if let Some((rx, _)) = &level.reduce {
                let reduced = self.device.reduce_rows(rx, &rgb, level.width as usize)?;
                append(&mut level.h_rows, reduced);
            }
            append(&mut level.rows, rgb);
        }
        self.emit_ready(li)?;
        let down = self.reduce_ready(li)?;
        if !down.is_empty() {
            self.push_level(li - 1, down)?;
        }
        Ok(())
    }

    /// The rows of the level below `li` whose inputs have all arrived.
    fn reduce_ready(&mut self, li: usize) -> anyhow::Result<Vec<u8>> {
        let level = &mut self.levels[li];
        let Some((rx, ry)) = &level.reduce else {
            return Ok(Vec::new());
        };
        let hstride = rx.output_len() * 3;
        let first = level.next_down;
        let mut end = first;
        while end < ry.output_len() && ry.span(end).1 as u64 <= level.received {
            end += 1;
        }
        if end == first {
            return Ok(Vec::new());
        }
        let rows = self
            .device
            .reduce_columns(ry, first, end, &level.h_rows, level.h_first, hstride)?;
        level.next_down = end;
        // Rows before the next output's first input are no longer needed.
        let keep = if end < ry.output_len() {
            ry.span(end).0
        } else {
            ry.span(end - 1).1
        };
        if keep > level.h_first {
            level.h_rows.drain(..(keep - level.h_first) * hstride);
            level.h_first = keep;
        }
        Ok(rows)
    }

    /// Emits every tile row of level `li` whose pixels are all buffered, then drops the rows
    /// no later tile row needs (once, so the rows kept move once per push).
    fn emit_ready(&mut self, li: usize) -> anyhow::Result<()> {
        let g = &self.geometry;
        let (cols, tile_rows) = g.tiles(li);
        loop {
            let level = &self.levels[li];
            let r = level.next_tile_row;
            let ready = r < tile_rows && {
                let (_, y, _, th) = g.tile_rect(li, 0, r);
                level.first_row + level.buffered() >= y + th
            };
            if !ready {
                // Keep only what the next tile row needs (it starts `overlap` rows early).
                let keep_from = if r < tile_rows {
                    g.tile_rect(li, 0, r).1
                } else {
                    level.height
                };
                let level = &mut self.levels[li];
                let stride = level.width as usize * 3;
                let drop_rows = keep_from.saturating_sub(level.first_row).min(level.buffered());
                level.rows.drain(..drop_rows as usize * stride);
                level.first_row += drop_rows;
                return Ok(());
            }
            let (_, y, _, th) = g.tile_rect(li, 0, r);
            let stride = level.width as usize * 3;
            let band_start = ((y - level.first_row) as usize) * stride;
            let band = &level.rows[band_start..band_start + th as usize * stride];
            let index = level.index;
            let sink = self.sink;
            let tiles: anyhow::Result<Vec<()>> = {
                use rayon::prelude::*;
                (0..cols)
                    .into_par_iter()
                    .map(|c| {
                        let (x, _, tw, _) = g.tile_rect(index, c, r);
                        let mut px = Vec::with_capacity(tw as usize * th as usize * 3);
                        for row in band.chunks_exact(stride) {
                            px.extend_from_slice(&row[x as usize * 3..(x + tw) as usize * 3]);
                        }
                        sink.tile(index, c, r, tw as u32, th as u32, &px)
                    })
                    .collect()
            };
            tiles?;
            self.tiles_done.fetch_add(cols, std::sync::atomic::Ordering::Relaxed);
            self.levels[li].next_tile_row += 1;
        }
    }

    /// All full-resolution rows were pushed: checks that every level made all its tiles.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        for li in (0..self.levels.len()).rev() {
            let level = &self.levels[li];
            anyhow::ensure!(
                level.received == level.height && level.next_tile_row == self.geometry.tiles(li).1,
                "level {li} ended with {} of {} rows and {} of {} tile rows",
                level.received,
                level.height,
                level.next_tile_row,
                self.geometry.tiles(li).1
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reduce::reduce_image;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[test]
    fn geometry_matches_openslides_deepzoom_generator() {
        // DeepZoomGenerator(tile_size=254, overlap=1)'s rules worked by hand for a 2220×2967
        // slide (CMU-1-Small-Region); the integration test compares with the real thing.
        let g = Geometry::new(2220, 2967, 254, 1);
        assert_eq!(g.level_count(), 13);
        assert_eq!(g.levels[12], (2220, 2967));
        assert_eq!(g.levels[11], (1110, 1484));
        assert_eq!(g.levels[0], (1, 1));
        assert_eq!(g.tiles(12), (9, 12));
        assert_eq!(g.tile_rect(12, 0, 0), (0, 0, 255, 255));
        assert_eq!(g.tile_rect(12, 1, 1), (253, 253, 256, 256));
        assert_eq!(g.tile_rect(12, 8, 11), (2031, 2793, 189, 174));
        assert_eq!(g.tile_rect(0, 0, 0), (0, 0, 1, 1));
    }

    type Tiles = BTreeMap<(usize, u64, u64), (u32, u32, Vec<u8>)>;
    struct Collect(Mutex<Tiles>);
    impl TileSink for Collect {
        fn tile(&self, l: usize, c: u64, r: u64, w: u32, h: u32, px: &[u8]) -> anyhow::Result<()> {
            assert_eq!(px.len(), w as usize * h as usize * 3);
            let old = self.0.lock().unwrap().insert((l, c, r), (w, h, px.to_vec()));
            assert!(old.is_none(), "tile {l}/{c}_{r} emitted twice");
            Ok(())
        }
    }

    /// The whole level, naively: the reference the streaming builder must equal.
    fn naive_levels(w: usize, h: usize, px: &[u8], levels: usize, t: u32, ov: u32) -> Vec<(usize, usize, Vec<u8>)> {
        let mut out = vec![(w, h, px.to_vec())];
        for _ in 1..levels {
            let (w, h, img) = out.last().unwrap().clone();
            out.push(reduce_image(w, h, &img, t as usize, ov as usize));
        }
        out.reverse();
        out
    }

    #[test]
    fn streaming_tiles_equal_the_naive_pyramid_for_odd_sizes_and_band_splits() {
        for (w, h, t, ov, band) in [
            (37usize, 23usize, 8u32, 1u32, 5usize),
            (64, 64, 16, 0, 16),
            (50, 9, 7, 2, 1),
            (1, 1, 4, 1, 1),
        ] {
            let px: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
            let g = Geometry::new(w as u64, h as u64, t, ov);
            let sink = Collect(Mutex::new(BTreeMap::new()));
            let mut b = Builder::new(g.clone(), &sink);
            for rows in px.chunks(band * w * 3) {
                b.push(rows).unwrap();
            }
            b.finish().unwrap();
            let tiles = sink.0.into_inner().unwrap();
            assert_eq!(tiles.len() as u64, g.tile_count());
            let naive = naive_levels(w, h, &px, g.level_count(), t, ov);
            for ((l, c, r), (tw, th, got)) in tiles {
                let (x, y, ew, eh) = g.tile_rect(l, c, r);
                assert_eq!((tw as u64, th as u64), (ew, eh));
                let (lw, _, img) = &naive[l];
                let mut want = Vec::new();
                for yy in y..y + eh {
                    let s = (yy as usize * lw + x as usize) * 3;
                    want.extend_from_slice(&img[s..s + ew as usize * 3]);
                }
                assert_eq!(got, want, "tile {l}/{c}_{r} of {w}x{h} t{t} ov{ov} band{band}");
            }
        }
    }
}
