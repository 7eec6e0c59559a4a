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
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::deepzoom::{Builder, Geometry, TileSink};
use crate::kernels::Device;
use crate::slide::{Slide, SlideError};
use crate::stain::{Macenko, Normalizer, Reinhard, StainError};
use crate::tissue::{rgb_mean_std, Mask, Thumbnail, TileStats};

pub use mira_events::params::{Normalize, TileFormat};

#[derive(Debug, Clone)]
pub struct Options {
    pub tile_size: u32,
    pub overlap: u32,
    pub format: TileFormat,
    pub quality: u8,
    /// Build the tissue mask (`mask.png`) and give each tile its tissue fraction.
    pub tissue: bool,
    /// Also write a stain-normalised pyramid (`normalized.dzi`, `normalized_files/`).
    pub normalize: Normalize,
    pub device: Device,
    /// How the slide is read (`Worker__SlideReader`).
    pub reader: crate::slide::Reader,
    /// What the slide may declare (`Worker__MaxSlidePixels`).
    pub limits: crate::slide::Limits,
    /// `Worker__MemoryBudgetBytes`: a slide whose estimated need is larger is refused.
    pub memory_budget: u64,
    /// Where the pyramids go as layers (ADR 0036); `None` writes DeepZoom trees (the export's
    /// and the standalone command's form).
    pub layers: Option<LayerOutput>,
}

/// Where the pipeline's layers go: files in the output directory (`slide.tiff`), or the pipe to
/// the worker that uploads them as they are written.
#[derive(Clone)]
pub enum LayerOutput {
    Files,
    Pipe(crate::layerpipe::Pipe),
}

impl std::fmt::Debug for LayerOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Files => "Files",
            Self::Pipe(_) => "Pipe",
        })
    }
}

/// A layer's bytes on their way: a file, or the pipe.
enum LayerTarget {
    File(std::io::BufWriter<std::fs::File>),
    Pipe(crate::layerpipe::LayerOut),
}

impl std::io::Write for LayerTarget {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::File(f) => f.write(b),
            Self::Pipe(p) => p.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::File(f) => f.flush(),
            Self::Pipe(p) => p.flush(),
        }
    }
}

/// A finished layer's header written: in place in the file, or as the pipe's end frame.
fn close_layer(f: crate::layer::Finished<LayerTarget>) -> anyhow::Result<()> {
    use std::io::{Seek, Write};
    let (at, patch) = f.patch();
    match f.out {
        LayerTarget::File(w) => {
            let mut file = w.into_inner().map_err(|e| e.into_error())?;
            file.seek(std::io::SeekFrom::Start(at))?;
            file.write_all(&patch)?;
            file.sync_all()?;
        }
        LayerTarget::Pipe(p) => p.end(f.first_ifd)?,
    }
    Ok(())
}

impl Options {
    /// The job defaults of DESIGN §8 on the CPU.
    pub fn new(format: TileFormat) -> Self {
        Self {
            tile_size: 254,
            overlap: 1,
            format,
            quality: 80,
            tissue: true,
            normalize: Normalize::None,
            device: Device::Cpu,
            reader: crate::slide::Reader::Auto,
            limits: crate::slide::Limits::default(),
            memory_budget: 8 << 30,
            layers: None,
        }
    }
}

/// What the pipeline holds besides its bands: the program, its threads, the decoders' caches,
/// the thumbnail and the mask.
pub const BASE_MEMORY: u64 = 256 << 20;

/// Rows of the full-resolution level read at a time: about 32 MiB of BGRA, ending on the
/// slide's own tile rows (OpenSlide 3.4's tile cache is small, and a stored tile row split
/// between two bands is decoded twice), never more than the slide has.
pub fn band_rows(width: u64, height: u64, stored_tile_height: u64) -> u64 {
    let stored = stored_tile_height.max(1);
    (((32 << 20) / (width.max(1) * 4)).max(1).div_ceil(stored) * stored).min(height.max(1))
}

/// The memory an attempt needs, from the geometry alone (ADR 0023): up to four bands of RGB
/// (two queued behind the reader, one being read, one being cut; BGRA too where OpenSlide
/// reads it), and every level's rows waiting for their next tile row (at most twice the full
/// level's, as the levels halve), for each pyramid written; and a row of the thumbnail's
/// level.
pub fn memory_need(width: u64, band_rows: u64, tile_size: u64, overlap: u64, normalize: bool) -> u64 {
    let row = width.saturating_mul(3);
    let bands = band_rows.saturating_mul(row).saturating_mul(4 + 2);
    let levels = (tile_size + 2 * overlap).saturating_mul(row).saturating_mul(4);
    let pyramids = if normalize { 2 } else { 1 };
    // The thumbnail reads at least a row of its level (as wide as level 0 at most) with a
    // column map of 8 bytes a pixel.
    let thumbnail = width.saturating_mul(4 + 3 + 8);
    BASE_MEMORY
        .saturating_add(thumbnail)
        .saturating_add(bands.saturating_add(levels).saturating_mul(pyramids))
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn the_estimate_follows_the_width_and_the_band() {
        // The CMU region: 2220 wide, read whole (2967 rows), about 380 MiB with the base.
        let cmu = memory_need(2220, band_rows(2220, 2967, 240), 254, 1, false);
        assert!((350 << 20..420 << 20).contains(&cmu), "{cmu}");
        // A normalised pyramid doubles what the bands take, not the base.
        let both = memory_need(2220, band_rows(2220, 2967, 240), 254, 1, true);
        assert!(both > cmu && both < 2 * cmu, "{both}");
        // A slide a million pixels wide reads a stored tile row at a time and needs gigabytes.
        assert_eq!(band_rows(1_000_000, 40_000, 256), 256);
        let wide = memory_need(1_000_000, 256, 254, 1, false);
        assert!(wide > 6 << 30, "{wide}");
        // 2^31 pixels wide: more than any budget, without overflowing.
        assert!(memory_need(2_147_483_136, 16, 254, 1, true) > 100 << 30);
    }
}

/// The attempt's estimated need is over `Worker__MemoryBudgetBytes`. Not worth a retry.
#[derive(Debug, thiserror::Error)]
#[error("the slide needs about {need} of memory to process ({width} pixels wide, {band_rows} rows at a time), more than Worker__MemoryBudgetBytes ({budget})")]
pub struct OverBudget {
    pub need: String,
    pub budget: String,
    pub width: u64,
    pub band_rows: u64,
}

/// Why the pipeline failed, and whether a retry can help ([`ProcessError::retryable`]).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The slide cannot be read as one (corrupt, hostile, past the limits).
    #[error(transparent)]
    Slide(#[from] SlideError),
    /// The slide's stains could not be fitted.
    #[error("{method} normalisation: {source}")]
    Stain {
        method: &'static str,
        #[source]
        source: StainError,
    },
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    #[error(transparent)]
    Stopped(#[from] Stopped),
    /// A job this build cannot run ([`mira_events::JobSpec::Unknown`]).
    #[error("this worker cannot run a {0:?} job with these parameters (another version of Mira submitted it)")]
    UnknownKind(String),
    /// Anything else: the device, the disk, an encoder.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl ProcessError {
    /// Whether another attempt could end differently: not for what the slide, its stains or
    /// the job's kind decide, which a retry reads the same.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Slide(_) | Self::OverBudget(_) | Self::UnknownKind(_) => false,
            Self::Stain { source, .. } => source.retryable(),
            Self::Stopped(_) | Self::Other(_) => true,
        }
    }
}

impl From<std::io::Error> for ProcessError {
    fn from(e: std::io::Error) -> Self {
        Self::Other(e.into())
    }
}

/// One stored object of an attempt's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestObject {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`, written last: every object of the results with its size and SHA-256, and
/// `results`, what they are (for a pyramid, [`Pyramid`]; its fields sit beside `objects`). The
/// worker reads any kind's as `Manifest<Listed>` to store the objects; its hash is the job's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest<R> {
    /// 1: the pyramids are DeepZoom trees among the objects; 2: they are `layers`.
    pub format_version: u32,
    pub device: String,
    /// The results' other objects (the mask, the statistics; for version 1 the trees).
    pub objects: Vec<ManifestObject>,
    /// The pyramids as layers, by name (`slide`, `normalized`): each one object, streamed to
    /// the store as it was written (ADR 0036).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub layers: std::collections::BTreeMap<String, mira_blobs::layers::LayerEntry>,
    #[serde(flatten)]
    pub results: R,
}

/// What a manifest says besides its objects, left unread: what storing needs.
pub type Listed = serde_json::Map<String, serde_json::Value>;

/// What a `wsi.preprocess` job's results are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pyramid {
    pub slide: SlideSize,
    pub deepzoom: DeepZoomInfo,
    pub tissue: Option<TissueInfo>,
    pub normalized: Option<NormalizedInfo>,
    pub stats: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideSize {
    pub width: u64,
    pub height: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeepZoomInfo {
    /// The stored `.dzi` of a tree (version 1); none for layers, whose DeepZoom form the
    /// export makes with these parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dzi: Option<String>,
    pub tile_size: u32,
    pub overlap: u32,
    pub format: TileFormat,
    pub quality: u8,
    pub levels: usize,
    pub tiles: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TissueInfo {
    pub mask: String,
    pub width: usize,
    pub height: usize,
    pub downsample: u64,
    pub otsu_threshold: u8,
    pub fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormalizedInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dzi: Option<String>,
    pub stains: serde_json::Value,
}

/// The manifest's name in an attempt's output directory and among its results.
pub const MANIFEST: &str = "manifest.json";

impl<R: Serialize + serde::de::DeserializeOwned> Manifest<R> {
    /// The manifest's bytes: pretty JSON with every object's keys sorted, as results have
    /// always been written.
    pub fn to_bytes(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(&serde_json::to_value(self)?)
    }

    /// Writes `manifest.json` under `out`; returns its bytes.
    pub fn write(&self, out: &Path) -> Result<Vec<u8>, ProcessError> {
        let bytes = self.to_bytes().map_err(anyhow::Error::from)?;
        std::fs::write(out.join(MANIFEST), &bytes)?;
        Ok(bytes)
    }

    /// Reads a manifest's bytes back.
    pub fn parse(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }
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
    pub tissue_fraction: Option<f64>,
    pub normalize: Normalize,
    pub device: String,
    /// How full-resolution pixels were read: `tiff-jpeg` or `openslide`.
    pub reader: &'static str,
    pub manifest_sha256: String,
}

/// Writes a pyramid's tiles, and keeps the statistics of the full-resolution tiles when `stats`
/// is on.
struct Writer<'a> {
    opts: Options,
    objects: &'a Mutex<Vec<ManifestObject>>,
    stats: Option<StatsOf>,
    out: Out,
}

/// Where a pyramid's tiles go.
enum Out {
    /// A DeepZoom tree, `<root>/<name>_files/<level>/<col>_<row>.<ext>`. Encoded tiles go to one
    /// thread that creates the files: creating files in a directory serialises on its lock
    /// anyway, and from every worker thread the waiting spins.
    Tree {
        root: PathBuf,
        name: &'static str,
        files: std::sync::mpsc::SyncSender<(PathBuf, Vec<u8>)>,
    },
    /// A layer (ADR 0036).
    Layer(crate::layer::LayerSink<LayerTarget>),
}

/// The file thread: writes until the senders are gone, or stops at the first error (the
/// senders then fail, and this error says why).
fn write_files(rx: std::sync::mpsc::Receiver<(PathBuf, Vec<u8>)>) -> anyhow::Result<()> {
    for (path, bytes) in rx {
        std::fs::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The level whose tiles get statistics, and the statistics so far (tissue fractions are
/// filled in once the mask is there).
type StatsOf = (usize, Mutex<Vec<TileStats>>);

pub use crate::encode::encode;

fn write_object(root: &Path, objects: &Mutex<Vec<ManifestObject>>, key: String, bytes: &[u8]) -> anyhow::Result<()> {
    let path = root.join(&key);
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    objects.lock().unwrap_or_else(|p| p.into_inner()).push(ManifestObject {
        key,
        bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    });
    Ok(())
}

impl TileSink for Writer<'_> {
    fn tile(&self, level: usize, col: u64, row: u64, w: u32, h: u32, rgb: &[u8]) -> anyhow::Result<()> {
        if let Some((top, stats)) = &self.stats {
            if level == *top {
                // From the pixels already in hand: no tile is read or decoded twice.
                let (mean, std) = rgb_mean_std(rgb);
                stats.lock().unwrap_or_else(|p| p.into_inner()).push(TileStats {
                    col,
                    row,
                    tissue: f64::NAN,
                    mean,
                    std,
                });
            }
        }
        let (root, name, files) = match &self.out {
            Out::Layer(sink) => return sink.tile(level, col, row, w, h, rgb),
            Out::Tree { root, name, files } => (root, name, files),
        };
        let bytes = encode(self.opts.format, self.opts.quality, w, h, rgb)?;
        let key = format!("{name}_files/{level}/{col}_{row}.{}", self.opts.format.ext());
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ManifestObject {
                key: key.clone(),
                bytes: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(&bytes)),
            });
        files
            .send((root.join(key), bytes))
            .map_err(|_| anyhow::anyhow!("the file writer stopped"))
    }
}

/// Runs the pipeline; `progress` gets (tiles done, tiles in all).
pub fn process(
    slide_path: &Path,
    out: &Path,
    opts: &Options,
    progress: impl Fn(u64, u64) + Sync,
) -> Result<Summary, ProcessError> {
    process_staged(slide_path, out, opts, &Watch::quiet(&progress))
}

/// Sets its flag when dropped, however the scope it guards ends.
struct Raise<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Raise<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The run was stopped by `stop` (checked between bands).
#[derive(Debug, thiserror::Error)]
#[error("stopped before the pyramid was finished")]
pub struct Stopped;

/// The pipeline's stages, as [`process_staged`] names them to whoever watches it (a stalled
/// attempt is reported with the stage it stalled in).
pub mod stage {
    pub const OPENING: &str = "opening the slide";
    pub const STAINS: &str = "fitting the stain normalisation";
    pub const PYRAMID: &str = "building the pyramid";
    pub const MASK: &str = "finishing the tissue mask";
    pub const WRITING: &str = "writing the statistics and the manifest";

    /// The stage's name in `/metrics` (`mira_job_stage_seconds{stage}`); `other` for a line
    /// this build does not know.
    pub fn label(stage: &str) -> &'static str {
        match stage {
            OPENING => "open",
            STAINS => "stains",
            PYRAMID => "pyramid",
            MASK => "mask",
            WRITING => "write",
            _ => "other",
        }
    }
}

/// Whoever watches a run: told each stage as it begins and the tiles made (done, in all), and
/// asked between bands whether to stop (a stopped run ends with [`Stopped`] and writes no
/// manifest).
pub struct Watch<'a> {
    pub begin: &'a (dyn Fn(&'static str) + Sync),
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
    pub stop: &'a (dyn Fn() -> bool + Sync),
}

impl<'a> Watch<'a> {
    /// Progress alone: no stages, never stopped.
    pub fn quiet(progress: &'a (dyn Fn(u64, u64) + Sync)) -> Self {
        fn no_stage(_: &'static str) {}
        fn never() -> bool {
            false
        }
        Self {
            begin: &no_stage,
            progress,
            stop: &never,
        }
    }
}

/// The slide opened and checked against the memory budget, and the output directory ready.
struct Prepared {
    slide: Slide,
    width: u64,
    height: u64,
    band_rows: u64,
    geometry: Geometry,
}

/// The grid the pyramids are cut on: a layer's 256 pixels without overlap, or the job's
/// DeepZoom tile size and overlap for a tree.
fn grid_of(opts: &Options) -> (u32, u32) {
    match opts.layers {
        Some(_) => (crate::layer::TILE, 0),
        None => (opts.tile_size, opts.overlap),
    }
}

fn prepare(slide_path: &Path, out: &Path, opts: &Options) -> Result<Prepared, ProcessError> {
    let slide = Slide::open_limited(slide_path, opts.reader, &opts.limits)?;
    let (w, h) = slide.dimensions();
    let stored = slide.tile_size(0).map(|t| t.1).unwrap_or(opts.tile_size as u64);
    let band_rows = band_rows(w, h, stored);
    let (tile_size, overlap) = grid_of(opts);
    let need = memory_need(
        w,
        band_rows,
        tile_size as u64,
        overlap as u64,
        opts.normalize != Normalize::None,
    );
    if need > opts.memory_budget {
        return Err(OverBudget {
            need: crate::slide::readable_bytes(need),
            budget: crate::slide::readable_bytes(opts.memory_budget),
            width: w,
            band_rows,
        }
        .into());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // A manifest from an earlier run no longer describes what is about to be written.
    let _ = std::fs::remove_file(out.join(MANIFEST));
    Ok(Prepared {
        slide,
        width: w,
        height: h,
        band_rows,
        geometry: Geometry::new(w, h, tile_size, overlap),
    })
}

/// The tissue mask and the stain normaliser the job asked for, from one low-resolution
/// thumbnail: stain normalisation needs them before the first band.
fn fit_stains(slide: &Slide, opts: &Options) -> Result<(Mask, Normalizer), ProcessError> {
    let thumb = Thumbnail::read(slide)?;
    let mask = Mask::build(&opts.device, &thumb)?;
    let stain = |method| move |source| ProcessError::Stain { method, source };
    let normalizer = match opts.normalize {
        Normalize::Macenko => {
            let fit = Macenko::fit(&opts.device, &mask.select(&thumb)).map_err(stain("Macenko"))?;
            Normalizer::Macenko {
                m: fit.matrix().map_err(stain("Macenko"))?,
                fit,
            }
        }
        Normalize::Reinhard => {
            let fit = Reinhard::fit(&mask.select(&thumb)).map_err(stain("Reinhard"))?;
            let (k, d) = fit.coefficients();
            Normalizer::Reinhard { k, d, fit }
        }
        Normalize::None => unreachable!("fit_stains is called for a normalisation"),
    };
    Ok((mask, normalizer))
}

/// Reads bands of `rows` full-resolution rows into `tx`, in order, until the slide ends, the
/// receiver is gone, or a read fails (the error is sent).
fn read_bands(
    slide: &Slide,
    device: &Device,
    (w, h): (u64, u64),
    rows: u64,
    tx: std::sync::mpsc::SyncSender<Result<Vec<u8>, ProcessError>>,
) {
    let mut y = 0;
    while y < h {
        let n = rows.min(h - y);
        let band = if device.is_gpu() && !slide.reads_directly(0) {
            slide
                .read_bgra_parallel(0, 0, y, w, n)
                .map_err(ProcessError::from)
                .and_then(|bgra| Ok(device.bgra_to_rgb_sat(&bgra).map(|(rgb, _)| rgb)?))
        } else {
            slide.read_rgb_parallel(0, 0, y, w, n).map_err(ProcessError::from)
        };
        let failed = band.is_err();
        if tx.send(band).is_err() || failed {
            return;
        }
        y += n;
    }
}

/// Tells `progress` the tiles the `counters` count, every 250 ms while it moves, until `ended`:
/// a band of a wide slide holds many tile rows, and whoever watches for stalls should hear of
/// each.
fn report_progress(
    counters: &[std::sync::Arc<std::sync::atomic::AtomicU64>],
    total: u64,
    ended: &std::sync::atomic::AtomicBool,
    progress: &(dyn Fn(u64, u64) + Sync),
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut said = 0;
    while !ended.load(Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let done: u64 = counters.iter().map(|c| c.load(Relaxed)).sum();
        if done != said {
            progress(done, total);
            said = done;
        }
    }
}

/// Builds the slide's pyramid into `slide_writer`, and the normalised one with `normalizer`
/// into `normalized_writer`, from bands read on a thread of their own; returns the statistics
/// of the full-resolution tiles (tissue fractions to be filled in) and the writers.
fn build_pyramids<'a>(
    p: &Prepared,
    opts: &Options,
    normalizer: Option<&Normalizer>,
    (slide_writer, normalized_writer): (Writer<'a>, Option<Writer<'a>>),
    watch: &Watch,
) -> Result<(Vec<TileStats>, Writer<'a>, Option<Writer<'a>>), ProcessError> {
    let (geometry, device) = (&p.geometry, &opts.device);
    let mut builder = Builder::on(geometry.clone(), &slide_writer, device.clone());
    let mut normalized = match (normalizer, normalized_writer.as_ref()) {
        (Some(_), Some(w)) => Some(Builder::on(geometry.clone(), w, device.clone())),
        _ => None,
    };
    let counters: Vec<_> = std::iter::once(&builder)
        .chain(normalized.as_ref())
        .map(|b| b.tiles_done.clone())
        .collect();
    let total = geometry.tile_count() * counters.len() as u64;
    let ended = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<(), ProcessError> {
        let _ended = Raise(&ended);
        scope.spawn(|| report_progress(&counters, total, &ended, watch.progress));
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        scope.spawn(|| read_bands(&p.slide, device, (p.width, p.height), p.band_rows, tx));
        for band in rx {
            if (watch.stop)() {
                return Err(Stopped.into());
            }
            let band = band?;
            if let (Some(n), Some(b)) = (normalizer, normalized.as_mut()) {
                let mut copy = band.clone();
                n.apply(device, &mut copy)?;
                b.push_owned(copy)?;
            }
            builder.push_owned(band)?;
        }
        Ok(())
    })?;
    builder.finish()?;
    if let Some(b) = normalized.as_mut() {
        b.finish()?;
    }
    drop((builder, normalized));
    let mut slide_writer = slide_writer;
    let stats = slide_writer
        .stats
        .take()
        .map(|(_, s)| s.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default();
    Ok((stats, slide_writer, normalized_writer))
}

/// `stats.json`: each full-resolution tile's tissue fraction, mean and standard deviation.
fn stats_document(top: usize, geometry: &Geometry, stats: &[TileStats]) -> serde_json::Value {
    let round = |v: [f64; 3]| v.map(|v| (v * 100.0).round() / 100.0);
    serde_json::json!({
        "level": top,
        "tile_size": geometry.tile_size,
        "overlap": geometry.overlap,
        "columns": ["col", "row", "tissue", "mean", "std"],
        "tiles": stats.iter().map(|t| serde_json::json!([t.col, t.row,
            if t.tissue.is_nan() { serde_json::Value::Null } else { serde_json::json!((t.tissue * 1e4).round() / 1e4) },
            round(t.mean), round(t.std)])).collect::<Vec<_>>(),
    })
}

/// The slide's microns per pixel (x, y), when it records them.
fn slide_mpp(slide: &Slide) -> Option<(f64, f64)> {
    let num = |n: &str| slide.property(n).and_then(|v| v.parse::<f64>().ok());
    num("openslide.mpp-x").zip(num("openslide.mpp-y"))
}

/// The pipeline on one local slide, telling `watch` each stage, the tiles made, and asking it
/// whether to stop (see [`Watch`]).
pub fn process_staged(slide_path: &Path, out: &Path, opts: &Options, watch: &Watch) -> Result<Summary, ProcessError> {
    let started = Instant::now();
    let device = &opts.device;
    (watch.begin)(stage::OPENING);
    let p = prepare(slide_path, out, opts)?;
    let geometry = &p.geometry;
    let objects = Mutex::new(Vec::new());

    // With stain normalisation the mask is fitted first; otherwise it is built beside the
    // pyramid (below), which needs it only for the statistics written at the end.
    let (early_mask, normalizer) = if opts.normalize != Normalize::None {
        (watch.begin)(stage::STAINS);
        let (mask, normalizer) = fit_stains(&p.slide, opts)?;
        (Some(mask).filter(|_| opts.tissue), Some(normalizer))
    } else {
        (None, None)
    };
    let names: &[&'static str] = if normalizer.is_some() {
        &["slide", "normalized"]
    } else {
        &["slide"]
    };
    if opts.layers.is_none() {
        for name in names {
            for l in 0..geometry.level_count() {
                std::fs::create_dir_all(out.join(format!("{name}_files/{l}")))?;
            }
        }
    }
    let top = geometry.level_count() - 1;
    let per_pyramid = geometry.tile_count();
    let total = per_pyramid * names.len() as u64;
    // A tree's encoded tiles go to one thread that creates the files.
    let (files, files_rx) = std::sync::mpsc::sync_channel(512);
    let file_thread = std::thread::spawn(move || write_files(files_rx));
    let (w, h) = (p.width, p.height);
    let mpp = slide_mpp(&p.slide);
    let writer = |n: u8, name: &'static str, stats: Option<StatsOf>| -> Result<Writer, ProcessError> {
        let out = match &opts.layers {
            None => Out::Tree {
                root: out.to_path_buf(),
                name,
                files: files.clone(),
            },
            Some(layers) => {
                let key = format!("{name}.tiff");
                let target = match layers {
                    LayerOutput::Files => {
                        let file = std::fs::File::create(out.join(&key))
                            .with_context(|| format!("cannot create {}", out.join(&key).display()))?;
                        LayerTarget::File(std::io::BufWriter::with_capacity(1 << 20, file))
                    }
                    LayerOutput::Pipe(pipe) => {
                        LayerTarget::Pipe(pipe.begin(n, &key).context("cannot write to the layers' pipe")?)
                    }
                };
                let (lw, lh) = (u32::try_from(w), u32::try_from(h));
                let (Ok(lw), Ok(lh)) = (lw, lh) else {
                    return Err(anyhow::anyhow!("a {w}×{h} slide is too large for a layer").into());
                };
                let layer = crate::layer::LayerWriter::new(target, lw, lh, mpp).map_err(anyhow::Error::from)?;
                Out::Layer(crate::layer::LayerSink::new(layer, opts.quality))
            }
        };
        Ok(Writer {
            opts: opts.clone(),
            objects: &objects,
            stats,
            out,
        })
    };
    let slide_writer = writer(0, "slide", Some((top, Mutex::new(Vec::new()))))?;
    let normalized_writer = match normalizer {
        Some(_) => Some(writer(1, "normalized", None)?),
        None => None,
    };
    drop(files);
    let build_mask = opts.tissue && early_mask.is_none();
    (watch.begin)(stage::PYRAMID);
    let (built, late_mask) = std::thread::scope(|scope| {
        let mask_job = build_mask.then(|| {
            scope.spawn(|| -> Result<Mask, ProcessError> {
                let thumb = Thumbnail::read(&p.slide)?;
                Ok(Mask::build(device, &thumb)?)
            })
        });
        let built = build_pyramids(&p, opts, normalizer.as_ref(), (slide_writer, normalized_writer), watch);
        if mask_job.is_some() {
            (watch.begin)(stage::MASK);
        }
        let late_mask = mask_job
            .map(|j| {
                j.join()
                    .map_err(|_| anyhow::anyhow!("building the tissue mask panicked"))?
            })
            .transpose();
        (built, late_mask)
    });
    let built = built.map(|(stats, slide, normalized)| {
        // The tree's senders go with its writers, so the file thread can end.
        let sinks: Vec<_> = std::iter::once(("slide", slide))
            .chain(normalized.map(|n| ("normalized", n)))
            .filter_map(|(name, w)| match w.out {
                Out::Layer(sink) => Some((name, sink)),
                Out::Tree { .. } => None,
            })
            .collect();
        (stats, sinks)
    });
    // The file thread's own error explains a failed send, so it comes first.
    file_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the file writer panicked"))??;
    let (mut stats, sinks) = built?;
    let mut layers = std::collections::BTreeMap::new();
    for (name, sink) in sinks {
        let f = sink.finish().map_err(anyhow::Error::from)?;
        layers.insert(
            name.to_owned(),
            mira_blobs::layers::LayerEntry {
                key: format!("{name}.tiff"),
                width: w as u32,
                height: h as u32,
                tile_size: crate::layer::TILE,
                quality: opts.quality,
                levels: f.places.clone(),
                bytes: f.bytes,
                parts: Vec::new(),
                sha256_of_parts: None,
            },
        );
        close_layer(f).with_context(|| format!("cannot finish the layer {name}"))?;
    }
    (watch.begin)(stage::WRITING);
    let mask = early_mask.or(late_mask?);
    if let Some(m) = &mask {
        write_object(out, &objects, "mask.png".into(), &m.png()?)?;
        for t in &mut stats {
            let (x, y, tw, th) = geometry.tile_rect(top, t.col, t.row);
            t.tissue = m.fraction_in(x, y, tw, th);
        }
    }
    (watch.progress)(total, total);
    let ext = opts.format.ext();
    let tree = opts.layers.is_none();
    if tree {
        write_object(out, &objects, "slide.dzi".into(), geometry.dzi(ext).as_bytes())?;
        if normalizer.is_some() {
            write_object(out, &objects, "normalized.dzi".into(), geometry.dzi(ext).as_bytes())?;
        }
    }
    stats.sort_by_key(|t| (t.row, t.col));
    let stats_doc = stats_document(top, geometry, &stats);
    write_object(
        out,
        &objects,
        "stats.json".into(),
        &serde_json::to_vec(&stats_doc).map_err(anyhow::Error::from)?,
    )?;
    let mut objects = objects.into_inner().unwrap_or_else(|p| p.into_inner());
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    // The DeepZoom form the job asked for: stored as such for a tree, made by the export for
    // layers.
    let deepzoom = Geometry::new(w, h, opts.tile_size, opts.overlap);
    let manifest = Manifest {
        format_version: if tree { 1 } else { 2 },
        device: device.name(),
        objects,
        layers,
        results: Pyramid {
            slide: SlideSize { width: w, height: h },
            deepzoom: DeepZoomInfo {
                dzi: tree.then(|| "slide.dzi".into()),
                tile_size: opts.tile_size,
                overlap: opts.overlap,
                format: opts.format,
                quality: opts.quality,
                levels: deepzoom.level_count(),
                tiles: deepzoom.tile_count(),
            },
            tissue: mask.as_ref().map(|m| TissueInfo {
                mask: "mask.png".into(),
                width: m.width,
                height: m.height,
                downsample: m.downsample,
                otsu_threshold: m.threshold,
                fraction: m.fraction(),
            }),
            normalized: normalizer.as_ref().map(|n| NormalizedInfo {
                dzi: tree.then(|| "normalized.dzi".into()),
                stains: n.describe(),
            }),
            stats: "stats.json".into(),
        },
    };
    let bytes = manifest.write(out)?;
    let seconds = started.elapsed().as_secs_f64();
    let megapixels = (w * h) as f64 / 1e6;
    Ok(Summary {
        width: w,
        height: h,
        megapixels,
        seconds,
        megapixels_per_second: megapixels / seconds.max(1e-9),
        levels: geometry.level_count(),
        tiles: total,
        tissue_fraction: mask.as_ref().map(|m| m.fraction()),
        normalize: opts.normalize,
        device: device.name(),
        reader: p.slide.reader(0),
        manifest_sha256: hex::encode(Sha256::digest(&bytes)),
    })
}

#[cfg(test)]
mod manifest_tests {
    use super::*;

    /// A pyramid's manifest is written with the bytes it had while it was built as a JSON
    /// value (keys sorted, `null` where there is no mask), and any kind's manifest reads back
    /// as the objects to store.
    #[test]
    fn the_manifest_keeps_its_bytes_and_reads_back_as_its_objects() {
        let objects = vec![ManifestObject {
            key: "slide.dzi".into(),
            bytes: 3,
            sha256: "ab".into(),
        }];
        let typed = Manifest {
            format_version: 1,
            device: "cpu".into(),
            objects: objects.clone(),
            layers: Default::default(),
            results: Pyramid {
                slide: SlideSize { width: 10, height: 20 },
                deepzoom: DeepZoomInfo {
                    dzi: Some("slide.dzi".into()),
                    tile_size: 254,
                    overlap: 1,
                    format: TileFormat::Jpeg,
                    quality: 80,
                    levels: 5,
                    tiles: 5,
                },
                tissue: None,
                normalized: Some(NormalizedInfo {
                    dzi: Some("normalized.dzi".into()),
                    stains: serde_json::json!({"method": "reinhard"}),
                }),
                stats: "stats.json".into(),
            },
        };
        let before = serde_json::json!({
            "format_version": 1,
            "slide": {"width": 10, "height": 20},
            "deepzoom": {"dzi": "slide.dzi", "tile_size": 254, "overlap": 1,
                         "format": TileFormat::Jpeg, "quality": 80, "levels": 5, "tiles": 5},
            "tissue": serde_json::Value::Null,
            "normalized": {"dzi": "normalized.dzi", "stains": {"method": "reinhard"}},
            "stats": "stats.json",
            "device": "cpu",
            "objects": objects,
        });
        let bytes = typed.to_bytes().unwrap();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            serde_json::to_string_pretty(&before).unwrap()
        );
        assert_eq!(Manifest::<Pyramid>::parse(&bytes).unwrap(), typed);
        let listed = Manifest::<Listed>::parse(&bytes).unwrap();
        assert_eq!(listed.objects, objects);
        assert_eq!(listed.results["stats"], "stats.json");
    }
}
