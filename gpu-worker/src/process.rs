//! `mira-worker process`: one local slide to a DeepZoom pyramid on disk, with its manifest.
//!
//! A reader thread pulls bands of full-resolution rows from OpenSlide while the builder
//! reduces and cuts the previous band and rayon encodes its tiles, so reading, computing and
//! encoding overlap. The manifest (`manifest.json`, every object's SHA-256 and size) is written
//! last: a directory without it is an unfinished attempt.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::deepzoom::{Builder, Geometry, TileSink};
use crate::slide::Slide;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jpeg,
    Png,
}

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Self::Jpeg => "jpeg",
            Self::Png => "png",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub tile_size: u32,
    pub overlap: u32,
    pub format: Format,
    pub quality: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct ManifestObject {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub width: u64,
    pub height: u64,
    pub megapixels: f64,
    pub seconds: f64,
    pub megapixels_per_second: f64,
    pub levels: usize,
    pub tiles: u64,
    pub device: &'static str,
    pub manifest_sha256: String,
}

/// Writes encoded tiles under `<out>/slide_files/<level>/<col>_<row>.<ext>`.
struct Writer {
    root: PathBuf,
    opts: Options,
    objects: Mutex<Vec<ManifestObject>>,
}

thread_local! {
    static JPEG: std::cell::RefCell<Option<turbojpeg::Compressor>> = const { std::cell::RefCell::new(None) };
}

pub fn encode(format: Format, quality: u8, w: u32, h: u32, rgb: &[u8]) -> anyhow::Result<Vec<u8>> {
    match format {
        Format::Png => {
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(png::Compression::Fast);
            enc.write_header()?.write_image_data(rgb)?;
            Ok(out)
        }
        Format::Jpeg => JPEG.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                let mut c = turbojpeg::Compressor::new()?;
                c.set_quality(quality as i32);
                c.set_subsamp(turbojpeg::Subsamp::Sub2x2);
                *slot = Some(c);
            }
            let c = slot.as_mut().expect("set above");
            let image = turbojpeg::Image {
                pixels: rgb,
                width: w as usize,
                pitch: w as usize * 3,
                height: h as usize,
                format: turbojpeg::PixelFormat::RGB,
            };
            Ok(c.compress_to_vec(image)?)
        }),
    }
}

impl Writer {
    fn write(&self, key: String, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.root.join(&key);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ManifestObject {
                key,
                bytes: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(bytes)),
            });
        Ok(())
    }
}

impl TileSink for Writer {
    fn tile(&self, level: usize, col: u64, row: u64, w: u32, h: u32, rgb: &[u8]) -> anyhow::Result<()> {
        let bytes = encode(self.opts.format, self.opts.quality, w, h, rgb)?;
        self.write(
            format!("slide_files/{level}/{col}_{row}.{}", self.opts.format.ext()),
            &bytes,
        )
    }
}

/// Runs the pipeline; `progress` gets (tiles done, tiles in all).
pub fn process(slide_path: &Path, out: &Path, opts: &Options, progress: impl Fn(u64, u64)) -> anyhow::Result<Summary> {
    process_until(slide_path, out, opts, progress, || false)
}

/// The run was stopped by `stop` (checked between bands).
#[derive(Debug, thiserror::Error)]
#[error("stopped before the pyramid was finished")]
pub struct Stopped;

/// As [`process`], checking `stop` between bands of tiles: a cancelled job stops at the next
/// band with [`Stopped`] and writes no manifest.
pub fn process_until(
    slide_path: &Path,
    out: &Path,
    opts: &Options,
    progress: impl Fn(u64, u64),
    stop: impl Fn() -> bool + Sync,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let slide = Slide::open(slide_path)?;
    let (w, h) = slide.dimensions();
    let geometry = Geometry::new(w, h, opts.tile_size, opts.overlap);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // A manifest from an earlier run no longer describes what is about to be written.
    let _ = std::fs::remove_file(out.join("manifest.json"));
    for l in 0..geometry.level_count() {
        std::fs::create_dir_all(out.join(format!("slide_files/{l}")))?;
    }
    let writer = Writer {
        root: out.to_path_buf(),
        opts: opts.clone(),
        objects: Mutex::new(Vec::new()),
    };
    let total = geometry.tile_count();
    // Bands of whole tile rows, about 32 MiB of BGRA each.
    let band_rows = ((32 << 20) / (w * 4)).max(1).div_ceil(opts.tile_size as u64) * opts.tile_size as u64;
    let mut builder = Builder::new(geometry.clone(), &writer);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<anyhow::Result<Vec<u8>>>(2);
        let slide = &slide;
        scope.spawn(move || {
            let mut y = 0;
            while y < h {
                let rows = band_rows.min(h - y);
                let band = slide.read_rgb_parallel(0, 0, y, w, rows).map_err(anyhow::Error::from);
                let failed = band.is_err();
                if tx.send(band).is_err() || failed {
                    return;
                }
                y += rows;
            }
        });
        let mut last = Instant::now();
        for band in rx {
            if stop() {
                return Err(Stopped.into());
            }
            builder.push(&band?)?;
            if last.elapsed().as_millis() >= 250 {
                progress(builder.tiles_done.load(std::sync::atomic::Ordering::Relaxed), total);
                last = Instant::now();
            }
        }
        Ok(())
    })?;
    builder.finish()?;
    progress(total, total);
    writer.write("slide.dzi".into(), geometry.dzi(opts.format.ext()).as_bytes())?;
    let mut objects = writer.objects.into_inner().unwrap_or_else(|p| p.into_inner());
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let seconds = started.elapsed().as_secs_f64();
    let megapixels = (w * h) as f64 / 1e6;
    let manifest = serde_json::json!({
        "format_version": 1,
        "slide": {"width": w, "height": h},
        "deepzoom": {"dzi": "slide.dzi", "tile_size": opts.tile_size, "overlap": opts.overlap,
                     "format": opts.format, "quality": opts.quality, "levels": geometry.level_count(), "tiles": total},
        "device": "cpu",
        "objects": objects,
    });
    let bytes = serde_json::to_vec_pretty(&manifest)?;
    std::fs::write(out.join("manifest.json"), &bytes)?;
    Ok(Summary {
        width: w,
        height: h,
        megapixels,
        seconds,
        megapixels_per_second: megapixels / seconds.max(1e-9),
        levels: geometry.level_count(),
        tiles: total,
        device: "cpu",
        manifest_sha256: hex::encode(Sha256::digest(&bytes)),
    })
}
