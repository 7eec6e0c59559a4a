//! Tiled JPEG TIFF levels read straight from the file: the raw tile, the directory's shared
//! JPEG tables, and libjpeg-turbo's decoder (the same library, with the same settings, that
//! libtiff uses when OpenSlide reads such a level). ADR 0009.
//!
//! OpenSlide 3.4.1 decodes every tile of a generic TIFF or Aperio level through libtiff into
//! ARGB and then paints it into the caller's buffer with cairo's SATURATE operator, which
//! pixman runs one pixel at a time; on a large slide that painting is a third of the worker's
//! CPU time. For the layouts this module understands (8-bit, 3-sample, chunky, JPEG-compressed
//! tiles whose streams name the colour space the TIFF says), the pixels are the same bytes
//! without the painting. [`crate::slide::Slide`] uses a level this way only after decoding a
//! sample of it both ways and finding them equal; everything else goes through OpenSlide.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// One tiled JPEG image of a TIFF file, in the order of the file's main directory chain.
#[derive(Debug)]
pub struct TiledJpeg {
    file: Arc<File>,
    pub directory: usize,
    pub width: u64,
    pub height: u64,
    pub tile_width: u64,
    pub tile_height: u64,
    across: u64,
    offsets: Vec<u64>,
    counts: Vec<u64>,
    /// The JPEGTables stream without its start- and end-of-image markers, or empty.
    tables: Vec<u8>,
    /// 2 (RGB) or 6 (YCbCr).
    photometric: u64,
}

const MAX_DIRECTORIES: usize = 4096;
const MAX_ENTRIES: u64 = 1 << 28;

struct Reader {
    file: Arc<File>,
    len: u64,
    little: bool,
    big: bool,
}

impl Reader {
    /// The file's reader and the offset of its first directory, or `None` for a file that is
    /// not a TIFF (or BigTIFF).
    fn open(path: &Path) -> std::io::Result<Option<(Self, u64)>> {
        let file = Arc::new(File::open(path)?);
        let len = file.metadata()?.len();
        let mut head = [0u8; 8];
        if len < 8 {
            return Ok(None);
        }
        file.read_exact_at(&mut head, 0)?;
        let little = match &head[..2] {
            b"II" => true,
            b"MM" => false,
            _ => return Ok(None),
        };
        let mut r = Reader {
            file,
            len,
            little,
            big: false,
        };
        let first = match r.uint(&head[2..4]) {
            42 => r.uint(&head[4..8]),
            43 => {
                r.big = true;
                r.uint(&r.bytes(8, 8)?)
            }
            _ => return Ok(None),
        };
        Ok(Some((r, first)))
    }

    fn bytes(&self, offset: u64, n: u64) -> std::io::Result<Vec<u8>> {
        if offset.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::other(format!(
                "{n} bytes at {offset} lie outside the file"
            )));
        }
        let mut buf = vec![0; n as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn uint(&self, b: &[u8]) -> u64 {
        let mut v = 0u64;
        if self.little {
            for (i, x) in b.iter().enumerate() {
                v |= (*x as u64) << (8 * i);
            }
        } else {
            for x in b {
                v = (v << 8) | *x as u64;
            }
        }
        v
    }

    /// Every entry of the directory at `offset`, as (tag, type, count, value-or-offset bytes),
    /// and the next directory's offset.
    #[allow(clippy::type_complexity)]
    fn directory(&self, offset: u64) -> std::io::Result<(Vec<(u16, u16, u64, Vec<u8>)>, u64)> {
        let (count_size, entry_size, word) = if self.big { (8, 20, 8) } else { (2, 12, 4) };
        let n = self.uint(&self.bytes(offset, count_size)?);
        if n > 65535 {
            return Err(std::io::Error::other(format!("a directory of {n} entries")));
        }
        let raw = self.bytes(offset + count_size, n * entry_size + word)?;
        let mut entries = Vec::with_capacity(n as usize);
        for e in raw[..(n * entry_size) as usize].chunks_exact(entry_size as usize) {
            let tag = self.uint(&e[0..2]) as u16;
            let kind = self.uint(&e[2..4]) as u16;
            let (count, value) = if self.big {
                (self.uint(&e[4..12]), e[12..20].to_vec())
            } else {
                (self.uint(&e[4..8]), e[8..12].to_vec())
            };
            entries.push((tag, kind, count, value));
        }
        let next = self.uint(&raw[(n * entry_size) as usize..]);
        Ok((entries, next))
    }

    /// An entry's values: integers for the integer types, else its bytes widened.
    fn values(&self, kind: u16, count: u64, value: &[u8]) -> std::io::Result<Vec<u64>> {
        let size: u64 = match kind {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 13 => 4,
            16..=18 => 8,
            _ => return Err(std::io::Error::other(format!("tag type {kind} is not an integer"))),
        };
        if count > MAX_ENTRIES {
            return Err(std::io::Error::other(format!("{count} values in one tag")));
        }
        let total = size * count;
        let data = if total <= value.len() as u64 {
            value[..total as usize].to_vec()
        } else {
            self.bytes(self.uint(value), total)?
        };
        Ok(data.chunks_exact(size as usize).map(|c| self.uint(c)).collect())
    }
}

/// Checks a TIFF's directories before anything trusts them (ADR 0023): the main chain ends
/// without looping, and every image in it declares at most `max_pixels`, a tile or strip
/// table with one entry per tile or strip its size implies, and entries inside the file.
/// Files that are not TIFFs pass (OpenSlide reads other formats), as do Hamamatsu NDPI files,
/// whose offsets past 4 GiB wrap by design. Reads only the directories and their tables.
pub fn check_layout(path: &Path, max_pixels: u64) -> Result<(), String> {
    let io = |e: std::io::Error| format!("the file is truncated or damaged: its TIFF directories cannot be read ({e})");
    let Some((r, mut next)) = Reader::open(path).map_err(io)? else {
        return Ok(());
    };
    let mut seen = std::collections::HashSet::new();
    let mut images = Vec::new();
    while next != 0 {
        if !seen.insert(next) {
            return Err("its TIFF directories form a loop".into());
        }
        if seen.len() > MAX_DIRECTORIES {
            return Err(format!("it has more than {MAX_DIRECTORIES} TIFF directories"));
        }
        let (entries, after) = r.directory(next).map_err(io)?;
        images.push(entries);
        next = after;
    }
    // NDPI: offsets past 4 GiB keep only their low 32 bits.
    if images.iter().flatten().any(|e| e.0 == 65420) {
        return Ok(());
    }
    for (d, entries) in images.iter().enumerate() {
        check_image(&r, d, entries, max_pixels)?;
    }
    Ok(())
}

fn check_image(r: &Reader, d: usize, entries: &[(u16, u16, u64, Vec<u8>)], max_pixels: u64) -> Result<(), String> {
    let at = |what: String| format!("TIFF directory {d}: {what}");
    let get = |tag: u16| -> Result<Option<Vec<u64>>, String> {
        match entries.iter().find(|e| e.0 == tag) {
            Some((_, kind, count, value)) => r
                .values(*kind, *count, value)
                .map(Some)
                .map_err(|e| at(format!("tag {tag}: {e}"))),
            None => Ok(None),
        }
    };
    let one = |tag: u16| -> Result<Option<u64>, String> { Ok(get(tag)?.and_then(|v| v.first().copied())) };
    let (Some(width), Some(height)) = (one(256)?, one(257)?) else {
        return Ok(());
    };
    if width == 0 || height == 0 {
        return Err(at(format!("an image of {width} × {height} pixels")));
    }
    if width.saturating_mul(height) > max_pixels {
        return Err(at(format!(
            "it declares {width} × {height} pixels, more than Worker__MaxSlidePixels ({max_pixels})"
        )));
    }
    let planes = if one(284)? == Some(2) {
        one(277)?.unwrap_or(1).max(1)
    } else {
        1
    };
    let (pieces, offsets_tag, counts_tag, what) = match (one(322)?, one(323)?) {
        (Some(tw), Some(th)) => {
            if tw == 0 || th == 0 || tw > 65535 || th > 65535 {
                return Err(at(format!("tiles of {tw} × {th} pixels")));
            }
            (width.div_ceil(tw) * height.div_ceil(th) * planes, 324, 325, "tile")
        }
        _ => {
            let rows = one(278)?.unwrap_or(height).clamp(1, height);
            (height.div_ceil(rows) * planes, 273, 279, "strip")
        }
    };
    if pieces > MAX_ENTRIES {
        return Err(at(format!("{pieces} {what}s")));
    }
    let (Some(offsets), Some(counts)) = (get(offsets_tag)?, get(counts_tag)?) else {
        return Err(at(format!("no {what} table")));
    };
    if offsets.len() as u64 != pieces || counts.len() as u64 != pieces {
        return Err(at(format!(
            "{width} × {height} pixels need {pieces} {what}s, but it lists {} offsets and {} sizes",
            offsets.len(),
            counts.len()
        )));
    }
    if let Some((i, (o, c))) = offsets
        .iter()
        .zip(&counts)
        .enumerate()
        .find(|(_, (o, c))| o.checked_add(**c).is_none_or(|end| end > r.len))
    {
        return Err(at(format!(
            "{what} {i} ({c} bytes at {o}) lies outside the file of {} bytes",
            r.len
        )));
    }
    Ok(())
}

/// Every tiled, JPEG-compressed, 8-bit RGB/YCbCr image of the file's main directory chain
/// whose tile table is complete and inside the file. Anything else is skipped, not an error:
/// OpenSlide reads it.
pub fn tiled_jpeg_images(path: &Path) -> std::io::Result<Vec<TiledJpeg>> {
    let Some((r, mut next)) = Reader::open(path)? else {
        return Ok(Vec::new());
    };
    let mut seen = std::collections::HashSet::new();
    let mut images = Vec::new();
    let mut directory = 0;
    while next != 0 && seen.insert(next) && directory < MAX_DIRECTORIES {
        let (entries, after) = r.directory(next)?;
        if let Some(img) = image(&r, directory, &entries)? {
            images.push(img);
        }
        next = after;
        directory += 1;
    }
    Ok(images)
}

fn image(r: &Reader, directory: usize, entries: &[(u16, u16, u64, Vec<u8>)]) -> std::io::Result<Option<TiledJpeg>> {
    let get = |tag: u16| -> std::io::Result<Option<Vec<u64>>> {
        match entries.iter().find(|e| e.0 == tag) {
            Some((_, kind, count, value)) => r.values(*kind, *count, value).map(Some),
            None => Ok(None),
        }
    };
    let one = |tag: u16, default: Option<u64>| -> std::io::Result<Option<u64>> {
        Ok(get(tag)?.and_then(|v| v.first().copied()).or(default))
    };
    let (Some(width), Some(height), Some(tw), Some(th)) =
        (one(256, None)?, one(257, None)?, one(322, None)?, one(323, None)?)
    else {
        return Ok(None);
    };
    let compression = one(259, Some(1))?;
    let photometric = one(262, None)?;
    let samples = one(277, Some(1))?;
    let planar = one(284, Some(1))?;
    let bits = get(258)?.unwrap_or_else(|| vec![1]);
    if compression != Some(7)
        || !matches!(photometric, Some(2 | 6))
        || samples != Some(3)
        || planar != Some(1)
        || bits.iter().any(|b| *b != 8)
        || width == 0
        || height == 0
        || tw == 0
        || th == 0
        || tw > 65535
        || th > 65535
    {
        return Ok(None);
    }
    let (across, down) = (width.div_ceil(tw), height.div_ceil(th));
    let (Some(offsets), Some(counts)) = (get(324)?, get(325)?) else {
        return Ok(None);
    };
    let tiles = across * down;
    if offsets.len() as u64 != tiles
        || counts.len() as u64 != tiles
        || offsets
            .iter()
            .zip(&counts)
            .any(|(o, c)| *c < 4 || o.checked_add(*c).is_none_or(|end| end > r.len))
    {
        return Ok(None);
    }
    let tables = match entries.iter().find(|e| e.0 == 347) {
        Some((_, kind, count, value)) => {
            let t: Vec<u8> = r.values(*kind, *count, value)?.into_iter().map(|b| b as u8).collect();
            if t.len() < 4 || t[..2] != [0xFF, 0xD8] || t[t.len() - 2..] != [0xFF, 0xD9] {
                return Ok(None);
            }
            t[2..t.len() - 2].to_vec()
        }
        None => Vec::new(),
    };
    Ok(Some(TiledJpeg {
        file: r.file.clone(),
        directory,
        width,
        height,
        tile_width: tw,
        tile_height: th,
        across,
        offsets,
        counts,
        tables,
        photometric: photometric.unwrap_or(0),
    }))
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
}

impl TiledJpeg {
    /// The complete JPEG stream of tile (`col`, `row`): a start-of-image marker, an Adobe
    /// segment naming the colour space the TIFF gives, the directory's tables, then the tile's
    /// own stream after its start-of-image marker.
    ///
    /// libtiff tells libjpeg the colour space from the photometric tag (YCbCr: convert to
    /// RGB; RGB: leave the samples alone); a JPEG decoder left to itself guesses from the
    /// stream's markers and component ids, and guesses YCbCr for Aperio's RGB tiles. The Adobe
    /// segment's transform flag (0: RGB, 1: YCbCr) is the marker libjpeg takes that from.
    fn stream(&self, col: u64, row: u64) -> Result<Vec<u8>, String> {
        let i = (row * self.across + col) as usize;
        let (offset, count) = (self.offsets[i], self.counts[i]);
        let transform = u8::from(self.photometric == 6);
        let adobe = [
            0xFF, 0xD8, 0xFF, 0xEE, 0, 14, b'A', b'd', b'o', b'b', b'e', 0, 100, 0, 0, 0, 0, transform,
        ];
        let mut buf = Vec::with_capacity(adobe.len() + self.tables.len() + count as usize);
        buf.extend_from_slice(&adobe);
        buf.extend_from_slice(&self.tables);
        let start = buf.len();
        buf.resize(start + count as usize, 0);
        self.file
            .read_exact_at(&mut buf[start..], offset)
            .map_err(|e| format!("tile {col},{row} of directory {}: {e}", self.directory))?;
        if buf[start..start + 2] != [0xFF, 0xD8] {
            return Err(format!(
                "tile {col},{row} of directory {} is not a JPEG stream",
                self.directory
            ));
        }
        buf.drain(start..start + 2);
        Ok(buf)
    }

    /// Tile (`col`, `row`) as `tile_width × tile_height` RGB.
    pub fn decode_tile(&self, col: u64, row: u64) -> Result<Vec<u8>, String> {
        let jpeg = self.stream(col, row)?;
        let (tw, th) = (self.tile_width as usize, self.tile_height as usize);
        let mut out = vec![0u8; tw * th * 3];
        DECOMPRESSOR.with(|d| -> Result<(), String> {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(turbojpeg::Decompressor::new().map_err(|e| e.to_string())?);
            }
            let d = d.as_mut().expect("set above");
            let why = |e: turbojpeg::Error| format!("tile {col},{row} of directory {}: {e}", self.directory);
            let header = d.read_header(&jpeg).map_err(why)?;
            // A JFIF marker in the tile outranks the Adobe segment (libjpeg then assumes
            // YCbCr): the colour space must still be the one libtiff would use.
            let colours_agree = match self.photometric {
                6 => header.colorspace == turbojpeg::Colorspace::YCbCr,
                _ => header.colorspace == turbojpeg::Colorspace::RGB,
            };
            if (header.width, header.height) != (tw, th) || !colours_agree {
                return Err(format!(
                    "tile {col},{row} of directory {} holds a {}×{} {:?} JPEG, the directory says {tw}×{th} photometric {}",
                    self.directory, header.width, header.height, header.colorspace, self.photometric
                ));
            }
            d.decompress(
                &jpeg,
                turbojpeg::Image {
                    pixels: &mut out[..],
                    width: tw,
                    pitch: tw * 3,
                    height: th,
                    format: turbojpeg::PixelFormat::RGB,
                },
            )
            .map_err(why)
        })?;
        Ok(out)
    }

    /// RGB pixels of the rectangle `x, y, w, h` (inside the image), its tiles decoded in
    /// parallel, each once.
    pub fn read_rgb(&self, x: u64, y: u64, w: u64, h: u64) -> Result<Vec<u8>, String> {
        use rayon::prelude::*;
        if w == 0 || h == 0 || x + w > self.width || y + h > self.height {
            return Err(format!(
                "region {x},{y} {w}×{h} is outside the {}×{} image",
                self.width, self.height
            ));
        }
        let (tw, th) = (self.tile_width, self.tile_height);
        let (c0, c1, r0, r1) = (x / tw, (x + w - 1) / tw, y / th, (y + h - 1) / th);
        let cols = c1 - c0 + 1;
        let tiles: Vec<Vec<u8>> = (0..cols * (r1 - r0 + 1))
            .into_par_iter()
            .map(|i| self.decode_tile(c0 + i % cols, r0 + i / cols))
            .collect::<Result<_, _>>()?;
        let stride = (w * 3) as usize;
        let mut out = vec![0u8; stride * h as usize];
        out.par_chunks_mut(stride).enumerate().for_each(|(i, line)| {
            let ly = y + i as u64;
            let (r, ty) = (ly / th, (ly % th) as usize);
            for c in c0..=c1 {
                let tile = &tiles[((r - r0) * cols + (c - c0)) as usize];
                let (from, to) = ((c * tw).max(x), ((c + 1) * tw).min(x + w));
                let src = (ty * tw as usize + (from - c * tw) as usize) * 3;
                let dst = ((from - x) * 3) as usize;
                let n = ((to - from) * 3) as usize;
                line[dst..dst + n].copy_from_slice(&tile[src..src + n]);
            }
        });
        Ok(out)
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use proptest::prelude::*;

    /// A little-endian TIFF of one tiled image: `width` × `height` in 16 × 16 tiles, each
    /// tile `size` bytes at `offset` (one table entry per tile), then `tail` zero bytes.
    fn tiff(width: u32, height: u32, offset: u32, size: u32, tail: usize) -> Vec<u8> {
        let tiles = width.div_ceil(16) * height.div_ceil(16);
        let entries: [(u16, u16, u32, u32); 6] = [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (322, 3, 1, 16),
            (323, 3, 1, 16),
            (324, 4, tiles, 0),
            (325, 4, tiles, 0),
        ];
        let table = 8 + 2 + 12 * entries.len() as u32 + 4;
        let mut b = b"II*\x00\x08\x00\x00\x00".to_vec();
        b.extend((entries.len() as u16).to_le_bytes());
        for (i, (tag, kind, count, value)) in entries.into_iter().enumerate() {
            let value = match (i, tiles) {
                (4, 1) => offset,
                (5, 1) => size,
                (4, _) => table,
                (5, _) => table + 4 * tiles,
                _ => value,
            };
            for v in [tag.to_le_bytes().to_vec(), kind.to_le_bytes().to_vec()] {
                b.extend(v);
            }
            b.extend(count.to_le_bytes());
            b.extend(value.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes());
        if tiles > 1 {
            for _ in 0..tiles {
                b.extend(offset.to_le_bytes());
            }
            for _ in 0..tiles {
                b.extend(size.to_le_bytes());
            }
        }
        b.extend(vec![0; tail]);
        b
    }

    fn check(bytes: &[u8], max_pixels: u64) -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("mira-tiff-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.tif");
        std::fs::write(&path, bytes).unwrap();
        let r = check_layout(&path, max_pixels);
        let _ = tiled_jpeg_images(&path);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn tiles_outside_the_file_and_too_many_pixels_are_refused() {
        let ok = tiff(32, 32, 100, 50, 200);
        assert_eq!(check(&ok, 1 << 20), Ok(()));
        let err = check(&tiff(32, 32, 100, 5000, 200), 1 << 20).unwrap_err();
        assert!(
            err.contains("tile 0 (5000 bytes at 100) lies outside the file"),
            "{err}"
        );
        let err = check(&ok, 1000).unwrap_err();
        assert!(
            err.contains("32 × 32 pixels, more than Worker__MaxSlidePixels"),
            "{err}"
        );
        // A table shorter than the size needs.
        let mut short = tiff(32, 32, 100, 50, 200);
        short[8 + 2 + 12 * 4 + 4..8 + 2 + 12 * 4 + 8].copy_from_slice(&3u32.to_le_bytes());
        let err = check(&short, 1 << 20).unwrap_err();
        assert!(err.contains("need 4 tiles, but it lists 3 offsets"), "{err}");
        // A directory chain that comes back to itself.
        let mut looped = ok.clone();
        let next = 8 + 2 + 12 * 6;
        looped[next..next + 4].copy_from_slice(&8u32.to_le_bytes());
        assert_eq!(check(&looped, 1 << 20).unwrap_err(), "its TIFF directories form a loop");
        // Not a TIFF: left to OpenSlide.
        assert_eq!(check(b"not a tiff at all, just words", 1), Ok(()));
    }

    proptest! {
        // 3,000 cases in CI; longer by hand: PROPTEST_CASES=1000000.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000),
            ..ProptestConfig::default()
        })]

        /// The directory readers take any bytes without panicking or allocating past the file.
        #[test]
        fn any_bytes_are_read_or_refused(tail in proptest::collection::vec(any::<u8>(), 0..2048), big in any::<bool>()) {
            let mut b = if big { b"II+\x00\x08\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00".to_vec() } else { b"II*\x00\x08\x00\x00\x00".to_vec() };
            b.extend(tail);
            let _ = check(&b, 1 << 30);
        }

        /// Mutations of a valid TIFF: each byte of the directory and its tables changed.
        #[test]
        fn a_valid_tiff_mutated_is_read_or_refused(at in 0usize..200, to in any::<u8>(), w in 1u32..200, h in 1u32..200) {
            let mut b = tiff(w, h, 8, 4, 64);
            let at = at % b.len();
            b[at] = to;
            let _ = check(&b, 1 << 30);
        }
    }
}
