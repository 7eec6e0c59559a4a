//! `mira-gpu-worker` owns `mira-worker`: the slide pipeline (DESIGN §8).
//!
//! * [`slide`]: OpenSlide reads, checked (levels, regions, buffer lengths), composited over
//!   white; the metadata `SlideVerified` records.
//! * [`deepzoom`]: OpenSlide `DeepZoomGenerator` geometry and the streaming pyramid builder
//!   (2×2 box reduction, each pixel reduced once).
//! * [`process`]: `mira-worker process SLIDE --out DIR`, the pipeline on one local slide.
//! * [`run`]: `mira-worker run`, the consumer of the `gpu-jobs` queue: slide verification and
//!   jobs, with leases, heartbeats, fencing and results stored under a per-attempt prefix.
//!
//! This is the CPU path; the CUDA kernels, the tissue mask, stain normalisation and per-tile
//! statistics come next.

pub mod deepzoom;
pub mod kernels;
pub mod process;
pub mod run;
pub mod slide;
pub mod stain;
pub mod tissue;
