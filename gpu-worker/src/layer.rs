//! A pyramid layer as one object: a tiled, pyramidal BigTIFF that OpenSlide 3.4.1 (Debian's)
//! and libvips read (issue 40, ADR 0036). This is the format's writer; storing results in it
//! (the pipeline's store stage, the multipart upload, the manifest's tile index, the DeepZoom
//! export) comes next.
//!
//! The layout:
//! * levels in the main IFD chain, level 0 (full resolution) first, then every DeepZoom level
//!   (halving, rounding up) down to 1×1, so DeepZoom level n is IFD count − 1 − n; reduced levels
//!   carry `NewSubfileType = 1` (OpenSlide 3.4.1 reads no SubIFDs);
//! * 256×256 tiles, no overlap, each a complete baseline JPEG (its own tables, a JFIF marker,
//!   components 1-2-3, no Adobe marker, 4:2:0) and no `JPEGTables` tag, so a tile can be served
//!   as stored; `Photometric = YCbCr`, `YCbCrSubSampling = 2,2`, `ReferenceBlackWhite`
//!   0,255,128,255,128,255; edge tiles padded by repeating the last column and row (OpenSlide
//!   3.4.1 refuses a smaller JPEG in a tile: "Dimensional mismatch");
//! * tile offsets and byte counts as LONG8; the resolution in `XResolution`/`YResolution` with
//!   `ResolutionUnit = centimeter` when the slide has an MPP, none otherwise;
//! * the tiles first, in level order, row by row, column by column, then every IFD at the end:
//!   only the header's first-IFD offset (bytes 8..16) is written last, so a writer that streams
//!   can hold the first part back and send it at the end. The bytes are the same on every run.

use std::io::{Seek, SeekFrom, Write};

/// The stored tile size.
pub const TILE: u32 = 256;

/// The sizes of a pyramid's levels, full resolution first, halving (rounding up) to 1×1.
pub fn level_sizes(width: u32, height: u32) -> Vec<(u32, u32)> {
    let mut out = vec![(width.max(1), height.max(1))];
    while out.last().is_some_and(|&(w, h)| w > 1 || h > 1) {
        let (w, h) = *out.last().expect("one at least");
        out.push((w.div_ceil(2), h.div_ceil(2)));
    }
    out
}

/// Tiles across and down a level.
pub fn grid(width: u32, height: u32) -> (u32, u32) {
    (width.div_ceil(TILE), height.div_ceil(TILE))
}

/// The 256×256 tile at (`col`, `row`) of a level's RGB pixels (`width`×`height`, 3 bytes a pixel),
/// padded past the level's edge by repeating its last column and row.
pub fn padded_tile(rgb: &[u8], width: u32, height: u32, col: u32, row: u32) -> Vec<u8> {
    let t = TILE as usize;
    let mut out = vec![0u8; t * t * 3];
    let (x0, y0) = ((col * TILE) as usize, (row * TILE) as usize);
    let (w, h) = (width as usize, height as usize);
    for y in 0..t {
        let sy = (y0 + y).min(h - 1);
        let line = &rgb[sy * w * 3..(sy + 1) * w * 3];
        for x in 0..t {
            let sx = (x0 + x).min(w - 1);
            out[(y * t + x) * 3..(y * t + x) * 3 + 3].copy_from_slice(&line[sx * 3..sx * 3 + 3]);
        }
    }
    out
}

/// A level half the size (rounding up): each pixel the mean of the 2×2 block it covers, the
/// block clipped at the edge.
pub fn halve(rgb: &[u8], width: u32, height: u32) -> (Vec<u8>, u32, u32) {
    let (w, h) = (width as usize, height as usize);
    let (hw, hh) = (w.div_ceil(2), h.div_ceil(2));
    let mut out = vec![0u8; hw * hh * 3];
    for y in 0..hh {
        for x in 0..hw {
            for c in 0..3 {
                let (mut sum, mut n) = (0u32, 0u32);
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let (sx, sy) = (2 * x + dx, 2 * y + dy);
                    if sx < w && sy < h {
                        sum += u32::from(rgb[(sy * w + sx) * 3 + c]);
                        n += 1;
                    }
                }
                out[(y * hw + x) * 3 + c] = ((sum + n / 2) / n) as u8;
            }
        }
    }
    (out, hw as u32, hh as u32)
}

/// A whole layer from the full-resolution RGB pixels of a slide held in memory: each level
/// halved from the one before, each tile JPEG at `quality`. (The worker's pipeline writes its
/// own levels as it makes them; this is the reference, and what tests and benchmarks use.)
pub fn write_rgb<W: Write + Seek>(
    out: W,
    rgb: &[u8],
    width: u32,
    height: u32,
    quality: u8,
    mpp: Option<(f64, f64)>,
) -> anyhow::Result<(W, Vec<LevelIndex>)> {
    let mut writer = LayerWriter::new(out, width, height, mpp)?;
    let mut level = (rgb.to_vec(), width, height);
    for i in 0..writer.sizes().len() {
        if i > 0 {
            level = halve(&level.0, level.1, level.2);
        }
        let (px, w, h) = (&level.0, level.1, level.2);
        let (cols, rows) = grid(w, h);
        for row in 0..rows {
            for col in 0..cols {
                let tile = padded_tile(px, w, h, col, row);
                let jpeg = crate::process::encode(crate::process::TileFormat::Jpeg, quality, TILE, TILE, &tile)?;
                writer.tile(&jpeg)?;
            }
        }
    }
    Ok(writer.finish()?)
}

/// Where one level's tiles lie in the object: what serving a tile needs without parsing the TIFF.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LevelIndex {
    pub width: u32,
    pub height: u32,
    pub columns: u32,
    pub rows: u32,
    /// Each tile's offset and byte count, row by row.
    pub offsets: Vec<u64>,
    pub byte_counts: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("writing the layer failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("layer: {0}")]
    Order(String),
}

/// Writes a layer: [`LayerWriter::tile`] for every tile of every level in order (level 0 first,
/// row by row), then [`LayerWriter::finish`].
pub struct LayerWriter<W: Write + Seek> {
    out: W,
    pos: u64,
    sizes: Vec<(u32, u32)>,
    /// Pixels per centimetre (x, y), from the slide's MPP.
    resolution: Option<(f64, f64)>,
    levels: Vec<LevelIndex>,
}

const HEADER: u64 = 16;

impl<W: Write + Seek> LayerWriter<W> {
    /// A layer of a `width`×`height` slide; `mpp` its microns per pixel (x, y), when known.
    pub fn new(mut out: W, width: u32, height: u32, mpp: Option<(f64, f64)>) -> Result<Self, LayerError> {
        // "II", 43 (BigTIFF), 8-byte offsets, 0, and the first IFD's offset: written by `finish`.
        out.write_all(&[b'I', b'I', 43, 0, 8, 0, 0, 0])?;
        out.write_all(&0u64.to_le_bytes())?;
        let resolution = mpp
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0 && *y > 0.0)
            .map(|(x, y)| (1e4 / x, 1e4 / y));
        Ok(Self {
            out,
            pos: HEADER,
            sizes: level_sizes(width, height),
            resolution,
            levels: Vec::new(),
        })
    }

    /// The levels' sizes, full resolution first.
    pub fn sizes(&self) -> &[(u32, u32)] {
        &self.sizes
    }

    /// The next tile's JPEG (a complete 256×256 baseline stream).
    pub fn tile(&mut self, jpeg: &[u8]) -> Result<(), LayerError> {
        let full = |l: &LevelIndex| l.offsets.len() == (l.columns * l.rows) as usize;
        if self.levels.last().is_none_or(full) {
            let Some(&(width, height)) = self.sizes.get(self.levels.len()) else {
                return Err(LayerError::Order("more tiles than the pyramid has".into()));
            };
            let (columns, rows) = grid(width, height);
            self.levels.push(LevelIndex {
                width,
                height,
                columns,
                rows,
                offsets: Vec::new(),
                byte_counts: Vec::new(),
            });
        }
        let level = self.levels.last_mut().expect("pushed above");
        self.out.write_all(jpeg)?;
        level.offsets.push(self.pos);
        level.byte_counts.push(jpeg.len() as u64);
        self.pos += jpeg.len() as u64;
        Ok(())
    }

    /// Writes the directories and the header's first-IFD offset; returns the writer and each
    /// level's tile index.
    pub fn finish(mut self) -> Result<(W, Vec<LevelIndex>), LayerError> {
        let complete = self.levels.len() == self.sizes.len()
            && self
                .levels
                .iter()
                .all(|l| l.offsets.len() == (l.columns * l.rows) as usize);
        if !complete {
            return Err(LayerError::Order(format!(
                "{} of {} levels written",
                self.levels.len(),
                self.sizes.len()
            )));
        }
        // Word-align the directories (TIFF asks for even offsets).
        if self.pos % 2 == 1 {
            self.out.write_all(&[0])?;
            self.pos += 1;
        }
        let first = self.pos;
        let count = self.levels.len();
        for (i, level) in self.levels.iter().enumerate() {
            let ifd = Ifd::of(level, i > 0, self.resolution);
            let bytes = ifd.bytes(self.pos, i + 1 < count);
            self.out.write_all(&bytes)?;
            self.pos += bytes.len() as u64;
        }
        self.out.seek(SeekFrom::Start(8))?;
        self.out.write_all(&first.to_le_bytes())?;
        self.out.seek(SeekFrom::Start(self.pos))?;
        self.out.flush()?;
        Ok((self.out, self.levels))
    }
}

/// A TIFF field's type.
#[derive(Clone, Copy)]
enum Type {
    Short = 3,
    Long = 4,
    Rational = 5,
    Long8 = 16,
}

impl Type {
    fn size(self) -> usize {
        match self {
            Type::Short => 2,
            Type::Long => 4,
            Type::Rational | Type::Long8 => 8,
        }
    }
}

struct Entry {
    tag: u16,
    ty: Type,
    count: u64,
    /// The values' bytes, little-endian.
    data: Vec<u8>,
}

fn shorts(tag: u16, v: &[u16]) -> Entry {
    Entry {
        tag,
        ty: Type::Short,
        count: v.len() as u64,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn long(tag: u16, v: u32) -> Entry {
    Entry {
        tag,
        ty: Type::Long,
        count: 1,
        data: v.to_le_bytes().to_vec(),
    }
}

fn long8s(tag: u16, v: &[u64]) -> Entry {
    Entry {
        tag,
        ty: Type::Long8,
        count: v.len() as u64,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn rationals(tag: u16, v: &[(u32, u32)]) -> Entry {
    Entry {
        tag,
        ty: Type::Rational,
        count: v.len() as u64,
        data: v
            .iter()
            .flat_map(|(n, d)| n.to_le_bytes().into_iter().chain(d.to_le_bytes()))
            .collect(),
    }
}

/// A positive number as a TIFF rational with a denominator of 1000.
fn rational(x: f64) -> (u32, u32) {
    ((x * 1000.0).round().clamp(1.0, u32::MAX as f64) as u32, 1000)
}

struct Ifd(Vec<Entry>);

impl Ifd {
    fn of(level: &LevelIndex, reduced: bool, resolution: Option<(f64, f64)>) -> Self {
        let mut e = vec![
            long(254, u32::from(reduced)),
            long(256, level.width),
            long(257, level.height),
            shorts(258, &[8, 8, 8]),
            shorts(259, &[7]),
            shorts(262, &[6]),
            shorts(277, &[3]),
            shorts(284, &[1]),
            shorts(322, &[TILE as u16]),
            shorts(323, &[TILE as u16]),
            long8s(324, &level.offsets),
            long8s(325, &level.byte_counts),
            shorts(530, &[2, 2]),
            rationals(532, &[(0, 1), (255, 1), (128, 1), (255, 1), (128, 1), (255, 1)]),
        ];
        if let Some((x, y)) = resolution {
            e.push(rationals(282, &[rational(x)]));
            e.push(rationals(283, &[rational(y)]));
            e.push(shorts(296, &[3]));
        }
        e.sort_by_key(|e| e.tag);
        Self(e)
    }

    /// The directory written at `at`: its entries, the next directory's offset (right after this
    /// one's values, when `next`), then the values that do not fit in an entry.
    fn bytes(&self, at: u64, next: bool) -> Vec<u8> {
        let head = 8 + self.0.len() as u64 * 20 + 8;
        let mut values: Vec<u8> = Vec::new();
        let mut out = Vec::with_capacity(head as usize);
        out.extend((self.0.len() as u64).to_le_bytes());
        for e in &self.0 {
            out.extend(e.tag.to_le_bytes());
            out.extend((e.ty as u16).to_le_bytes());
            out.extend(e.count.to_le_bytes());
            debug_assert_eq!(e.data.len(), e.ty.size() * e.count as usize);
            if e.data.len() <= 8 {
                let mut inline = [0u8; 8];
                inline[..e.data.len()].copy_from_slice(&e.data);
                out.extend(inline);
            } else {
                if values.len() % 2 == 1 {
                    values.push(0);
                }
                out.extend((at + head + values.len() as u64).to_le_bytes());
                values.extend(&e.data);
            }
        }
        if values.len() % 2 == 1 {
            values.push(0);
        }
        let next_at = if next { at + head + values.len() as u64 } else { 0 };
        out.extend(next_at.to_le_bytes());
        out.extend(values);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_levels_halve_rounding_up_to_one_pixel() {
        assert_eq!(
            level_sizes(1000, 700),
            vec![
                (1000, 700),
                (500, 350),
                (250, 175),
                (125, 88),
                (63, 44),
                (32, 22),
                (16, 11),
                (8, 6),
                (4, 3),
                (2, 2),
                (1, 1)
            ]
        );
        assert_eq!(level_sizes(1, 1), vec![(1, 1)]);
        assert_eq!(grid(1000, 700), (4, 3));
    }

    #[test]
    fn an_edge_tile_repeats_the_last_column_and_row() {
        // A 3×2 image: pixel (x, y) = [x, y, 7].
        let rgb: Vec<u8> = (0..2u8).flat_map(|y| (0..3u8).flat_map(move |x| [x, y, 7])).collect();
        let t = padded_tile(&rgb, 3, 2, 0, 0);
        let px = |x: usize, y: usize| &t[(y * 256 + x) * 3..(y * 256 + x) * 3 + 3];
        assert_eq!(px(0, 0), [0, 0, 7]);
        assert_eq!(px(2, 1), [2, 1, 7]);
        assert_eq!(px(255, 0), [2, 0, 7], "the last column repeated");
        assert_eq!(px(1, 255), [1, 1, 7], "the last row repeated");
        assert_eq!(px(255, 255), [2, 1, 7]);
    }

    #[test]
    fn tiles_out_of_order_or_missing_are_refused() {
        let mut w = LayerWriter::new(std::io::Cursor::new(Vec::new()), 2, 2, None).unwrap();
        w.tile(b"x").unwrap();
        // Two levels (2×2, 1×1): one tile missing.
        assert!(matches!(w.finish(), Err(LayerError::Order(_))));
        let mut w = LayerWriter::new(std::io::Cursor::new(Vec::new()), 1, 1, None).unwrap();
        w.tile(b"x").unwrap();
        assert!(w.tile(b"y").is_err(), "more tiles than the pyramid has");
    }
}
