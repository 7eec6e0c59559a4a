//! What an attempt runs, by the job's kind: the one `match` on [`JobSpec`] that turns a job into
//! work. It runs in the attempt's own process (`mira-worker process --spec`, ADR 0022), on
//! the fetched slide, and leaves the results and their [`Manifest`](crate::process::Manifest)
//! in the output directory; the worker stores them.
//!
//! A new kind is an arm here (the compiler asks for it), next to its variant in
//! `mira_events::params`.

use std::path::Path;

use mira_events::params::PreprocessParams;
use mira_events::JobSpec;

use crate::kernels::Device;
use crate::process::{process_staged, Options, ProcessError, Summary, Watch};
use crate::slide::{Limits, Reader};

/// What the host gives every attempt, whatever its kind: the device, how slides are read, and
/// the limits a hostile slide meets (`Worker__MaxSlidePixels`, `Worker__MemoryBudgetBytes`).
#[derive(Debug, Clone)]
pub struct Host {
    pub device: Device,
    pub reader: Reader,
    pub limits: Limits,
    pub memory_budget: u64,
}

/// Runs `spec` on the slide at `slide`, writing its results under `out`.
pub fn run(spec: &JobSpec, slide: &Path, out: &Path, host: &Host, watch: &Watch) -> Result<Summary, ProcessError> {
    match spec {
        JobSpec::Preprocess(p) => process_staged(slide, out, &preprocess(p, host), watch),
        JobSpec::Unknown { kind, .. } => Err(ProcessError::UnknownKind(kind.clone())),
    }
}

/// A `wsi.preprocess` job's options on this host.
fn preprocess(p: &PreprocessParams, host: &Host) -> Options {
    Options {
        tile_size: p.tile_size,
        overlap: p.overlap,
        format: p.format,
        quality: p.quality,
        tissue: p.tissue,
        normalize: p.normalize,
        device: host.device.clone(),
        reader: host.reader,
        limits: host.limits,
        memory_budget: host.memory_budget,
    }
}
