//! Reading slides with OpenSlide (Debian's 3.4.1 through `openslide-rs`).
//!
//! Levels of generic TIFF and Aperio slides stored as tiled JPEG are read straight from the
//! file ([`crate::tiff`]) once a sample of each has decoded to exactly OpenSlide's pixels;
//! `Worker__SlideReader=OpenSlide` turns that off.
//!
//! OpenSlide hands back premultiplied ARGB as native-endian `u32`s, so the bytes are B, G, R,
//! A; pixels are composited over white as OpenSlide's own DeepZoom does. A read at a level that
//! does not exist, or outside the slide, can come back `Ok` with a short buffer: every level
//! and region is checked here first, and every buffer's length after.

use std::path::Path;

use mira_events::{SlideLevel, SlideMetadata};
use openslide_rs::{Address, OpenSlide, Region, Size};

use crate::tiff::TiledJpeg;

/// Why a slide cannot be used. Never worth retrying: the file will not change.
#[derive(Debug, thiserror::Error)]
pub enum SlideError {
    #[error("not a slide OpenSlide can read: {0}")]
    Unreadable(String),
    #[error("the slide is inconsistent: {0}")]
    Inconsistent(String),
    #[error("reading the slide failed: {0}")]
    Read(String),
    #[error("the uploaded bytes are not the slide that was registered: SHA-256 {actual}, declared {declared}")]
    Checksum { declared: String, actual: String },
    #[error("reading the uploaded file failed: {0}")]
    Io(String),
    /// The file declares a size it cannot hold, or more than Mira takes (ADR 0023).
    #[error("the slide is refused: {0}")]
    Implausible(String),
}

/// At most this many full-resolution pixels per byte of file. Real slides are JPEG tiles
/// compressed 10 to 50 times (a few pixels per byte); a level of blank glass compresses to
/// about 90 pixels per byte. A file declaring over 1,000 is not a slide's honest size: its
/// tiles are shared between positions, or missing.
pub const MAX_PIXELS_PER_BYTE: u64 = 1000;

/// What a slide may declare before any pixel of it is decoded (`Worker__MaxSlidePixels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pixels: 40_000_000_000,
        }
    }
}

fn gigapixels(p: u64) -> String {
    format!("{:.1} gigapixels", p as f64 / 1e9)
}

/// Bytes as people read them.
pub fn readable_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

/// The declared geometry against the limits and the file's size: nothing is decoded.
pub fn check_geometry(width: u64, height: u64, file_bytes: u64, limits: &Limits) -> Result<(), SlideError> {
    let pixels = width.saturating_mul(height);
    if pixels > limits.max_pixels {
        return Err(SlideError::Implausible(format!(
            "it declares {width} × {height} pixels ({}), more than Worker__MaxSlidePixels ({})",
            gigapixels(pixels),
            gigapixels(limits.max_pixels)
        )));
    }
    let per_byte = pixels / file_bytes.max(1);
    if per_byte > MAX_PIXELS_PER_BYTE {
        return Err(SlideError::Implausible(format!(
            "it declares {width} × {height} pixels in a file of {}: {per_byte} pixels per byte, where a real \
             slide holds at most {MAX_PIXELS_PER_BYTE} (its tiles must be shared or missing)",
            readable_bytes(file_bytes)
        )));
    }
    Ok(())
}

/// The SHA-256 of a file, as lowercase hex, read in 1 MiB blocks.
pub fn sha256_of(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub struct Slide {
    osr: OpenSlide,
    levels: Vec<(u64, u64, f64)>,
    path: std::path::PathBuf,
    reader: Reader,
    /// Per level, the TIFF image it is read from directly, where it can be: worked out at the
    /// first pixel read, so opening a slide only to verify it pays nothing for it.
    direct: std::sync::OnceLock<Vec<Option<TiledJpeg>>>,
}

impl std::fmt::Debug for Slide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slide")
            .field("levels", &self.levels)
            // Without deciding them: formatting reads no file.
            .field(
                "read_directly",
                &self
                    .direct
                    .get()
                    .map(|d| d.iter().map(Option::is_some).collect::<Vec<_>>()),
            )
            .finish()
    }
}

/// How pixels are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// Tiled JPEG TIFF levels straight from the file where a sample proves them equal to
    /// OpenSlide; OpenSlide for the rest.
    Auto,
    /// OpenSlide for everything.
    OpenSlide,
}

impl Reader {
    /// The `Worker__SlideReader` value that names it.
    pub fn setting(self) -> &'static str {
        match self {
            Self::Auto => "Auto",
            Self::OpenSlide => "OpenSlide",
        }
    }
}

impl From<mira_config::SlideReader> for Reader {
    /// `Worker__SlideReader`, read with the other settings.
    fn from(r: mira_config::SlideReader) -> Self {
        match r {
            mira_config::SlideReader::Auto => Self::Auto,
            mira_config::SlideReader::OpenSlide => Self::OpenSlide,
        }
    }
}

/// Property names whose values can name files or people; they are sealed before storage.
fn sensitive(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "filename", "user", "barcode", "patient", "name", "label", "operator", "scanner",
    ]
    .iter()
    .any(|s| n.contains(s))
}

impl Slide {
    /// Opens with the default reader ([`Reader::Auto`]); [`Slide::open_with`] takes the one
    /// the settings name.
    pub fn open(path: &Path) -> Result<Self, SlideError> {
        Self::open_with(path, Reader::Auto)
    }

    /// Opens with the default [`Limits`].
    pub fn open_with(path: &Path, reader: Reader) -> Result<Self, SlideError> {
        Self::open_limited(path, reader, &Limits::default())
    }

    /// Opens a slide, refusing one whose declared geometry is out of `limits` or out of
    /// proportion to the file (ADR 0023), or whose TIFF tile tables point outside the file,
    /// before any pixel is decoded.
    pub fn open_limited(path: &Path, reader: Reader, limits: &Limits) -> Result<Self, SlideError> {
        let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if file_bytes == 0 {
            return Err(SlideError::Unreadable("the file is empty or missing".into()));
        }
        // The TIFF's own tables first: OpenSlide trusts them.
        crate::tiff::check_layout(path, limits.max_pixels).map_err(SlideError::Implausible)?;
        let osr = OpenSlide::new(path).map_err(|e| SlideError::Unreadable(e.to_string()))?;
        let count = osr.level_count();
        if count == 0 {
            return Err(SlideError::Inconsistent("no levels".into()));
        }
        let mut levels = Vec::with_capacity(count as usize);
        for l in 0..count {
            let Size { w, h } = osr
                .level_dimensions(l)
                .map_err(|e| SlideError::Inconsistent(format!("level {l}: {e}")))?;
            let d = osr
                .level_downsample(l)
                .map_err(|e| SlideError::Inconsistent(format!("level {l}: {e}")))?;
            levels.push((w as u64, h as u64, d));
        }
        for (l, pair) in levels.windows(2).enumerate() {
            let ((w0, h0, d0), (w1, h1, d1)) = (pair[0], pair[1]);
            if w1 == 0 || h1 == 0 || w1 > w0 || h1 > h0 || !(d1.is_finite() && d1 >= d0) {
                return Err(SlideError::Inconsistent(format!(
                    "level {} ({w1}×{h1}, downsample {d1}) does not shrink from level {l} ({w0}×{h0}, downsample {d0})",
                    l + 1
                )));
            }
        }
        if levels[0].0 == 0 || levels[0].1 == 0 {
            return Err(SlideError::Inconsistent("level 0 is empty".into()));
        }
        check_geometry(levels[0].0, levels[0].1, file_bytes, limits)?;
        let slide = Self {
            osr,
            levels,
            path: path.to_path_buf(),
            reader,
            direct: std::sync::OnceLock::new(),
        };
        // Touch the first and last pixel of every level, so a truncated file, or a level whose
        // header promises more than its data holds, fails here and not half way through a job.
        for (l, &(w, h, d)) in slide.levels.iter().enumerate() {
            for (x, y) in [(0, 0), (w - 1, h - 1)] {
                slide.read_bgra(l as u32, x, y, 1, 1).map_err(|e| {
                    SlideError::Inconsistent(format!("level {l} ({w}×{h}, downsample {d:.3}) cannot be read: {e}"))
                })?;
            }
        }
        Ok(slide)
    }

    /// For each level, the file's tiled JPEG image that holds it, when OpenSlide reads this
    /// vendor's TIFF levels as plain tile grids and a sample of tiles decodes to exactly
    /// OpenSlide's pixels.
    fn direct_levels(&self) -> Vec<Option<TiledJpeg>> {
        if self.reader == Reader::OpenSlide {
            return Vec::new();
        }
        let vendor = self.property("openslide.vendor").unwrap_or_default();
        if !matches!(vendor.as_str(), "generic-tiff" | "aperio") {
            return Vec::new();
        }
        let mut images = match crate::tiff::tiled_jpeg_images(&self.path) {
            Ok(images) => images,
            Err(e) => {
                tracing::info!(error = %e, "the TIFF directories could not be listed; OpenSlide reads every level");
                return Vec::new();
            }
        };
        let mut direct = Vec::with_capacity(self.levels.len());
        for (l, &(w, h, down)) in self.levels.iter().enumerate() {
            let tile = self.tile_size(l as u32);
            let found = images
                .iter()
                .position(|i| (i.width, i.height) == (w, h) && Some((i.tile_width, i.tile_height)) == tile)
                .map(|k| images.remove(k));
            direct.push(found.filter(|img| match self.same_as_openslide(l as u32, img, down) {
                Ok(()) => true,
                Err(why) => {
                    tracing::info!(level = l, %why, "OpenSlide reads this level");
                    false
                }
            }));
        }
        direct
    }

    /// Decodes the first, a middle and the last tile of `img` both ways and compares them.
    /// Only tiles OpenSlide reads at whole pixels of the level are compared (it resamples at
    /// a fractional offset, which the direct read never needs); the first always is.
    fn same_as_openslide(&self, level: u32, img: &TiledJpeg, down: f64) -> Result<(), String> {
        let (tw, th) = (img.tile_width, img.tile_height);
        let (across, rows) = (img.width.div_ceil(tw), img.height.div_ceil(th));
        let whole = |v: u64| ((v as f64 * down).round() / down) == v as f64;
        for (c, r) in [(0, 0), (across / 2, rows / 2), (across - 1, rows - 1)] {
            let (x, y) = (c * tw, r * th);
            if !whole(x) || !whole(y) {
                continue;
            }
            let (w, h) = (tw.min(img.width - x), th.min(img.height - y));
            let ours = img.read_rgb(x, y, w, h)?;
            let theirs = self.read_rgb_openslide(level, x, y, w, h).map_err(|e| e.to_string())?;
            if ours != theirs {
                let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
                return Err(format!(
                    "tile {c},{r}: {differ} of {} samples differ from OpenSlide's",
                    ours.len()
                ));
            }
        }
        Ok(())
    }

    /// Which reader serves `level`: `tiff-jpeg` (straight from the file) or `openslide`.
    pub fn reader(&self, level: u32) -> &'static str {
        if self.reads_directly(level) {
            "tiff-jpeg"
        } else {
            "openslide"
        }
    }

    /// Whether `level`'s pixels come straight from the file (already RGB) rather than
    /// through OpenSlide.
    pub fn reads_directly(&self, level: u32) -> bool {
        self.direct(level).is_some()
    }

    /// The TIFF image `level` is read from directly, if it is.
    fn direct(&self, level: u32) -> Option<&TiledJpeg> {
        self.direct
            .get_or_init(|| self.direct_levels())
            .get(level as usize)?
            .as_ref()
    }

    /// Every level's width, height and downsample.
    pub fn levels(&self) -> &[(u64, u64, f64)] {
        &self.levels
    }

    /// The width and height of the tiles `level` is stored in, when OpenSlide says.
    pub fn tile_size(&self, level: u32) -> Option<(u64, u64)> {
        let get = |what: &str| {
            self.property(&format!("openslide.level[{level}].tile-{what}"))
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v > 0)
        };
        Some((get("width")?, get("height")?))
    }

    pub fn dimensions(&self) -> (u64, u64) {
        (self.levels[0].0, self.levels[0].1)
    }

    /// An OpenSlide property (`openslide.vendor`, `tiff.XResolution`), when set and not empty.
    pub fn property(&self, name: &str) -> Option<String> {
        self.osr.property_value(name).ok().filter(|v| !v.is_empty())
    }

    /// What `SlideVerified` records, and the properties to seal.
    pub fn metadata(&self) -> (SlideMetadata, serde_json::Value) {
        let num = |n: &str| {
            self.property(n)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
        };
        let mut private = serde_json::Map::new();
        if let Ok(names) = self.osr.property_names() {
            for n in names {
                if sensitive(&n) {
                    if let Some(v) = self.property(&n) {
                        private.insert(n, serde_json::Value::String(v));
                    }
                }
            }
        }
        let (w, h) = self.dimensions();
        (
            SlideMetadata {
                vendor: self.property("openslide.vendor"),
                width: w,
                height: h,
                levels: self
                    .levels
                    .iter()
                    .map(|&(width, height, downsample)| SlideLevel {
                        width,
                        height,
                        downsample,
                    })
                    .collect(),
                mpp_x: num("openslide.mpp-x"),
                mpp_y: num("openslide.mpp-y"),
                objective_power: num("openslide.objective-power"),
                sealed_properties: None,
            },
            serde_json::Value::Object(private),
        )
    }

    /// RGB pixels of a rectangle of `level`, composited over white. `x`, `y` are in the
    /// level's own pixels.
    pub fn read_rgb(&self, level: u32, x: u64, y: u64, w: u64, h: u64) -> Result<Vec<u8>, SlideError> {
        match self.direct(level) {
            Some(img) => img.read_rgb(x, y, w, h).map_err(SlideError::Read),
            None => self.read_rgb_openslide(level, x, y, w, h),
        }
    }

    /// [`Slide::read_rgb`] through OpenSlide, whatever the level.
    pub fn read_rgb_openslide(&self, level: u32, x: u64, y: u64, w: u64, h: u64) -> Result<Vec<u8>, SlideError> {
        Ok(bgra_to_rgb_over_white(&self.read_bgra(level, x, y, w, h)?))
    }

    /// OpenSlide's premultiplied BGRA bytes of a rectangle of `level`, checked.
    pub fn read_bgra(&self, level: u32, x: u64, y: u64, w: u64, h: u64) -> Result<Vec<u8>, SlideError> {
        let &(lw, lh, down) = self
            .levels
            .get(level as usize)
            .ok_or_else(|| SlideError::Read(format!("level {level} does not exist")))?;
        if w == 0 || h == 0 || x + w > lw || y + h > lh {
            return Err(SlideError::Read(format!(
                "region {x},{y} {w}×{h} is outside level {level} ({lw}×{lh})"
            )));
        }
        let l0 = |v: u64| (v as f64 * down).round() as u64;
        let (x0, y0) = (l0(x), l0(y));
        let too_big = |v: u64| u32::try_from(v).map_err(|_| SlideError::Read(format!("coordinate {v} is too large")));
        let region = Region {
            size: Size {
                w: too_big(w)?,
                h: too_big(h)?,
            },
            level,
            address: Address {
                x: too_big(x0)?,
                y: too_big(y0)?,
            },
        };
        let bgra = self
            .osr
            .read_region(&region)
            .map_err(|e| SlideError::Read(e.to_string()))?;
        let want = (w * h * 4) as usize;
        if bgra.len() != want {
            return Err(SlideError::Read(format!(
                "OpenSlide returned {} bytes for a {w}×{h} region, expected {want}",
                bgra.len()
            )));
        }
        Ok(bgra)
    }
}

impl Slide {
    /// As [`Slide::read_rgb`], reading vertical strips in parallel (OpenSlide reads are
    /// thread-safe on one handle) and stitching them row by row.
    /// A level read straight from the file is already parallel, tile by tile.
    pub fn read_rgb_parallel(&self, level: u32, x: u64, y: u64, w: u64, h: u64) -> Result<Vec<u8>, SlideError> {
        if self.direct(level).is_some() {
            return self.read_rgb(level, x, y, w, h);
        }
        self.read_parallel(level, x, y, w, h, 3, |s, l, x, y, w, h| {
            s.read_rgb_openslide(l, x, y, w, h)
        })
    }

    /// As [`Slide::read_bgra`], in parallel strips (for the GPU path, which converts).
    pub fn read_bgra_parallel(&self, level: u32, x: u64, y: u64, w: u64, h: u64) -> Result<Vec<u8>, SlideError> {
        self.read_parallel(level, x, y, w, h, 4, |s, l, x, y, w, h| s.read_bgra(l, x, y, w, h))
    }

    #[allow(clippy::too_many_arguments)]
    fn read_parallel(
        &self,
        level: u32,
        x: u64,
        y: u64,
        w: u64,
        h: u64,
        bpp: usize,
        read: impl Fn(&Self, u32, u64, u64, u64, u64) -> Result<Vec<u8>, SlideError> + Sync,
    ) -> Result<Vec<u8>, SlideError> {
        use rayon::prelude::*;
        let strips = (rayon::current_num_threads() as u64 * 2).clamp(1, w.div_ceil(512).max(1));
        if strips <= 1 {
            return read(self, level, x, y, w, h);
        }
        // Strips end on the slide's own tile edges, so no tile is decoded by two strips.
        let tw = self.tile_size(level).map(|t| t.0).unwrap_or(1);
        let step = w.div_ceil(strips).div_ceil(tw) * tw;
        let step = if x % tw == 0 { step } else { w.div_ceil(strips) };
        let parts: Vec<(u64, Vec<u8>)> = (0..strips)
            .into_par_iter()
            .filter(|k| k * step < w)
            .map(|k| {
                let sx = k * step;
                let sw = step.min(w - sx);
                read(self, level, x + sx, y, sw, h).map(|px| (sw, px))
            })
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity((w * h) as usize * bpp);
        for row in 0..h as usize {
            for (sw, px) in &parts {
                let n = *sw as usize * bpp;
                out.extend_from_slice(&px[row * n..(row + 1) * n]);
            }
        }
        Ok(out)
    }
}

/// Premultiplied BGRA → RGB over white: `c + (255 − a)`. The CPU reference of the BGRA
/// kernel.
pub fn bgra_to_rgb_over_white(bgra: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; bgra.len() / 4 * 3];
    for (p, o) in bgra.chunks_exact(4).zip(out.chunks_exact_mut(3)) {
        let bg = 255 - p[3];
        o[0] = p[2].saturating_add(bg);
        o[1] = p[1].saturating_add(bg);
        o[2] = p[0].saturating_add(bg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premultiplied_bgra_composites_over_white() {
        // Opaque red, transparent, half-transparent premultiplied blue.
        let px = [0, 0, 255, 255, 0, 0, 0, 0, 128, 0, 0, 128];
        assert_eq!(bgra_to_rgb_over_white(&px), [255, 0, 0, 255, 255, 255, 127, 127, 255]);
    }

    #[test]
    fn files_that_are_not_slides_are_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("mira-slide-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("notes.svs");
        std::fs::write(&text, "this is not a slide").unwrap();
        assert!(matches!(Slide::open(&text), Err(SlideError::Unreadable(_))));
        let empty = dir.join("empty.svs");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(Slide::open(&empty), Err(SlideError::Unreadable(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
