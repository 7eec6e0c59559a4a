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
use serde_json::Value;

use crate::process::{process_staged, Options, ProcessError, Watch};
use crate::slide::{Limits, Reader};

/// What the host gives every attempt, whatever its kind: the device, how slides are read, and
/// the limits a hostile slide meets (`Worker__MaxSlidePixels`, `Worker__MemoryBudgetBytes`).
#[derive(Debug, Clone)]
pub struct Host {
    pub device: Device,
    pub reader: Reader,
    pub limits: Limits,
    pub memory_budget: u64,
    /// Where the pyramids go as layers; `None` for DeepZoom trees.
    pub layers: Option<crate::process::LayerOutput>,
}

/// Runs `spec` on the slide at `slide`, writing its results and their manifest under `out`.
/// Returns the run's summary for the log (for a pyramid, [`crate::process::Summary`]).
pub fn run(spec: &JobSpec, slide: &Path, out: &Path, host: &Host, watch: &Watch) -> Result<Value, ProcessError> {
    match spec {
        JobSpec::Preprocess(p) => summary(process_staged(slide, out, &preprocess(p, host), watch)?),
        JobSpec::Unknown { kind, .. } => Err(ProcessError::UnknownKind(kind.clone())),
    }
}

fn summary(s: impl serde::Serialize) -> Result<Value, ProcessError> {
    Ok(serde_json::to_value(s).map_err(anyhow::Error::from)?)
}

/// A `wsi.preprocess` job's options on this host.
pub fn preprocess(p: &PreprocessParams, host: &Host) -> Options {
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
        layers: host.layers.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            device: Device::Cpu,
            reader: Reader::Auto,
            limits: Limits::default(),
            memory_budget: 1 << 30,
            layers: None,
        }
    }

    /// A job another version submitted fails for good, without the slide being opened.
    #[test]
    fn a_kind_this_build_cannot_run_fails_for_good() {
        let spec = JobSpec::from_stored("wsi.later", &serde_json::json!({"x": 1}));
        let never = |_, _| panic!("no progress is made");
        let e = run(
            &spec,
            Path::new("/nonexistent/slide.svs"),
            Path::new("/nonexistent/out"),
            &host(),
            &Watch::quiet(&never),
        )
        .unwrap_err();
        assert!(matches!(&e, ProcessError::UnknownKind(k) if k == "wsi.later"), "{e}");
        assert!(!e.retryable());
        assert!(e.to_string().contains("\"wsi.later\""), "{e}");
    }
}
