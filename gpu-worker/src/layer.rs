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

pub use mira_blobs::layers::LevelPlace;

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
                let jpeg = crate::encode::encode(mira_events::params::TileFormat::Jpeg, quality, TILE, TILE, &tile)?;
                writer.tile(&jpeg)?;
            }
        }
    }
    Ok(writer.finish_in_place()?)
}

/// Takes the pipeline's tiles ([`crate::deepzoom::Builder`] on a 256-pixel grid without
/// overlap, so its DeepZoom level n is the layer's level count − 1 − n) and writes them into a
/// layer: each tile padded to 256×256 and encoded on the calling thread, then each tile row of a
/// level written once all its tiles are there, column by column, so the bytes are the same on
/// every run whatever order the threads finish in.
pub struct LayerSink<W: Write + Send> {
    quality: u8,
    state: std::sync::Mutex<SinkState<W>>,
}

struct SinkState<W: Write> {
    writer: LayerWriter<W>,
    /// Per layer level: the tile row being gathered and its tiles so far.
    rows: Vec<(u64, Vec<Option<Vec<u8>>>)>,
}

impl<W: Write + Send> LayerSink<W> {
    pub fn new(writer: LayerWriter<W>, quality: u8) -> Self {
        let rows = writer
            .levels
            .iter()
            .map(|l| (0, vec![None; l.columns as usize]))
            .collect();
        Self {
            quality,
            state: std::sync::Mutex::new(SinkState { writer, rows }),
        }
    }

    /// Every tile was given: the layer's directories are written ([`LayerWriter::finish`]).
    pub fn finish(self) -> Result<Finished<W>, LayerError> {
        let state = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        state.writer.finish()
    }
}

impl<W: Write + Send> crate::deepzoom::TileSink for LayerSink<W> {
    fn tile(&self, level: usize, col: u64, row: u64, width: u32, height: u32, rgb: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(
            width <= TILE && height <= TILE,
            "a layer's tiles are at most {TILE} pixels a side"
        );
        let padded;
        let px = if (width, height) == (TILE, TILE) {
            rgb
        } else {
            padded = padded_tile(rgb, width, height, 0, 0);
            &padded
        };
        let jpeg = crate::encode::encode(mira_events::params::TileFormat::Jpeg, self.quality, TILE, TILE, px)?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let count = state.rows.len();
        anyhow::ensure!(level < count, "DeepZoom level {level} is not in a {count}-level layer");
        let ifd = count - 1 - level;
        let (at, tiles) = &mut state.rows[ifd];
        anyhow::ensure!(
            *at == row && (col as usize) < tiles.len() && tiles[col as usize].is_none(),
            "tile {col},{row} of DeepZoom level {level} came out of order (row {at} is being gathered)"
        );
        tiles[col as usize] = Some(jpeg);
        if tiles.iter().all(Option::is_some) {
            let done: Vec<Vec<u8>> = tiles.iter_mut().map(|t| t.take().expect("all there")).collect();
            *at += 1;
            for t in done {
                state.writer.tile_of(ifd, &t)?;
            }
        }
        Ok(())
    }
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

/// A layer written: the writer, each level's tiles (full resolution first), where their index
/// lies in the object, the object's size, and the header's first-directory offset, which a
/// writer that cannot seek back writes at bytes 8..16 itself ([`Finished::patch`]).
pub struct Finished<W> {
    pub out: W,
    pub levels: Vec<LevelIndex>,
    pub places: Vec<LevelPlace>,
    pub bytes: u64,
    pub first_ifd: u64,
}

impl<W> Finished<W> {
    /// The header's bytes written last: the offset and its value.
    pub fn patch(&self) -> (u64, [u8; 8]) {
        (8, self.first_ifd.to_le_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("writing the layer failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("layer: {0}")]
    Order(String),
}

/// Writes a layer: [`LayerWriter::tile`] for every tile of every level in order (level 0 first,
/// row by row), or [`LayerWriter::tile_of`] for levels made side by side (each level's tiles
/// still row by row); then [`LayerWriter::finish`].
pub struct LayerWriter<W: Write> {
    out: W,
    pos: u64,
    sizes: Vec<(u32, u32)>,
    /// Pixels per centimetre (x, y), from the slide's MPP.
    resolution: Option<(f64, f64)>,
    levels: Vec<LevelIndex>,
}

const HEADER: u64 = 16;

impl<W: Write> LayerWriter<W> {
    /// A layer of a `width`×`height` slide; `mpp` its microns per pixel (x, y), when known.
    pub fn new(mut out: W, width: u32, height: u32, mpp: Option<(f64, f64)>) -> Result<Self, LayerError> {
        // "II", 43 (BigTIFF), 8-byte offsets, 0, and the first IFD's offset: written by `finish`.
        out.write_all(&[b'I', b'I', 43, 0, 8, 0, 0, 0])?;
        out.write_all(&0u64.to_le_bytes())?;
        let resolution = mpp
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0 && *y > 0.0)
            .map(|(x, y)| (1e4 / x, 1e4 / y));
        let sizes = level_sizes(width, height);
        let levels = sizes
            .iter()
            .map(|&(width, height)| {
                let (columns, rows) = grid(width, height);
                LevelIndex {
                    width,
                    height,
                    columns,
                    rows,
                    offsets: Vec::new(),
                    byte_counts: Vec::new(),
                }
            })
            .collect();
        Ok(Self {
            out,
            pos: HEADER,
            sizes,
            resolution,
            levels,
        })
    }

    /// The levels' sizes, full resolution first.
    pub fn sizes(&self) -> &[(u32, u32)] {
        &self.sizes
    }

    /// The next tile's JPEG (a complete 256×256 baseline stream), in the layer's own order:
    /// the first level not yet full.
    pub fn tile(&mut self, jpeg: &[u8]) -> Result<(), LayerError> {
        let full = |l: &LevelIndex| l.offsets.len() == (l.columns * l.rows) as usize;
        let Some(level) = self.levels.iter().position(|l| !full(l)) else {
            return Err(LayerError::Order("more tiles than the pyramid has".into()));
        };
        self.tile_of(level, jpeg)
    }

    /// The next tile of `level` (0 is full resolution), row by row.
    pub fn tile_of(&mut self, level: usize, jpeg: &[u8]) -> Result<(), LayerError> {
        let Some(l) = self.levels.get_mut(level) else {
            return Err(LayerError::Order(format!("the pyramid has no level {level}")));
        };
        if l.offsets.len() == (l.columns * l.rows) as usize {
            return Err(LayerError::Order(format!("more tiles than level {level} has")));
        }
        self.out.write_all(jpeg)?;
        l.offsets.push(self.pos);
        l.byte_counts.push(jpeg.len() as u64);
        self.pos += jpeg.len() as u64;
        Ok(())
    }

    /// Writes the directories; the header's first-directory offset is the caller's to write
    /// ([`Finished::patch`]; [`LayerWriter::finish_in_place`] when the writer can seek).
    pub fn finish(mut self) -> Result<Finished<W>, LayerError> {
        let short: Vec<String> = self
            .levels
            .iter()
            .enumerate()
            .filter(|(_, l)| l.offsets.len() != (l.columns * l.rows) as usize)
            .map(|(i, l)| format!("level {i} has {} of {} tiles", l.offsets.len(), l.columns * l.rows))
            .collect();
        if !short.is_empty() {
            return Err(LayerError::Order(short.join("; ")));
        }
        // Word-align the directories (TIFF asks for even offsets).
        if self.pos % 2 == 1 {
            self.out.write_all(&[0])?;
            self.pos += 1;
        }
        let first = self.pos;
        let count = self.levels.len();
        let mut places = Vec::with_capacity(count);
        for (i, level) in self.levels.iter().enumerate() {
            let ifd = Ifd::of(level, i > 0, self.resolution);
            let (bytes, at) = ifd.bytes(self.pos, i + 1 < count);
            places.push(LevelPlace {
                width: level.width,
                height: level.height,
                columns: level.columns,
                rows: level.rows,
                offsets_at: at(324),
                byte_counts_at: at(325),
            });
            self.out.write_all(&bytes)?;
            self.pos += bytes.len() as u64;
        }
        self.out.flush()?;
        Ok(Finished {
            out: self.out,
            levels: self.levels,
            places,
            bytes: self.pos,
            first_ifd: first,
        })
    }
}

impl<W: Write + Seek> LayerWriter<W> {
    /// [`LayerWriter::finish`], writing the header's first-directory offset in place.
    pub fn finish_in_place(self) -> Result<(W, Vec<LevelIndex>), LayerError> {
        let mut f = self.finish()?;
        let (at, bytes) = f.patch();
        f.out.seek(SeekFrom::Start(at))?;
        f.out.write_all(&bytes)?;
        f.out.seek(SeekFrom::Start(f.bytes))?;
        f.out.flush()?;
        Ok((f.out, f.levels))
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
    /// Also returns where each tag's values lie in the object (in its entry when they fit).
    fn bytes(&self, at: u64, next: bool) -> (Vec<u8>, impl Fn(u16) -> u64) {
        let head = 8 + self.0.len() as u64 * 20 + 8;
        let mut values: Vec<u8> = Vec::new();
        let mut out = Vec::with_capacity(head as usize);
        let mut placed = Vec::with_capacity(self.0.len());
        out.extend((self.0.len() as u64).to_le_bytes());
        for (i, e) in self.0.iter().enumerate() {
            out.extend(e.tag.to_le_bytes());
            out.extend((e.ty as u16).to_le_bytes());
            out.extend(e.count.to_le_bytes());
            debug_assert_eq!(e.data.len(), e.ty.size() * e.count as usize);
            if e.data.len() <= 8 {
                placed.push((e.tag, at + 8 + i as u64 * 20 + 12));
                let mut inline = [0u8; 8];
                inline[..e.data.len()].copy_from_slice(&e.data);
                out.extend(inline);
            } else {
                if values.len() % 2 == 1 {
                    values.push(0);
                }
                placed.push((e.tag, at + head + values.len() as u64));
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
        let at = move |tag: u16| placed.iter().find(|p| p.0 == tag).map(|p| p.1).unwrap_or(0);
        (out, at)
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

    /// Levels made side by side (as the pipeline makes them) are written as they come, and the
    /// places the manifest records hold each level's offsets and byte counts, inline ones (a
    /// one-tile level) included.
    #[test]
    fn levels_written_side_by_side_are_indexed_where_the_manifest_says() {
        // 600×300: levels 600×300 (3×2 tiles), 300×150 (2×1), then one tile each.
        let mut w = LayerWriter::new(Vec::new(), 600, 300, Some((0.5, 0.5))).unwrap();
        let n = w.sizes().len();
        let mut order = vec![(0, 0), (0, 1), (0, 2), (1, 0), (0, 3)];
        order.extend([(0, 4), (0, 5), (1, 1)]);
        order.extend((2..n).map(|l| (l, 0)));
        for (level, k) in order {
            w.tile_of(level, format!("L{level}T{k}").as_bytes()).unwrap();
        }
        let f = w.finish().unwrap();
        let mut bytes = f.out.clone();
        let (at, patch) = f.patch();
        bytes[at as usize..at as usize + 8].copy_from_slice(&patch);
        assert_eq!(f.bytes, bytes.len() as u64);
        let long8s = |at: u64, n: usize| -> Vec<u64> {
            (0..n)
                .map(|i| {
                    let p = at as usize + i * 8;
                    u64::from_le_bytes(bytes[p..p + 8].try_into().unwrap())
                })
                .collect()
        };
        for (level, (index, place)) in f.levels.iter().zip(&f.places).enumerate() {
            let count = (place.columns * place.rows) as usize;
            assert_eq!(long8s(place.offsets_at, count), index.offsets, "level {level}");
            assert_eq!(long8s(place.byte_counts_at, count), index.byte_counts, "level {level}");
            for (k, (&o, &c)) in index.offsets.iter().zip(&index.byte_counts).enumerate() {
                assert_eq!(&bytes[o as usize..(o + c) as usize], format!("L{level}T{k}").as_bytes());
            }
        }
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), f.first_ifd);
        // A level given more tiles than it has is refused.
        let mut w = LayerWriter::new(Vec::new(), 2, 2, None).unwrap();
        w.tile_of(1, b"a").unwrap();
        assert!(w.tile_of(1, b"b").is_err());
        assert!(w.tile_of(2, b"c").is_err(), "no such level");
    }
}
