//! `mira-gpu-worker` owns `mira-worker`: the slide pipeline (DESIGN §8).
//!
//! * [`slide`]: OpenSlide reads, checked (levels, regions, buffer lengths), composited over
//!   white; the metadata `SlideVerified` records.
//! * [`deepzoom`]: OpenSlide `DeepZoomGenerator` geometry and the streaming pyramid builder
//!   (2×2 box reduction, each pixel reduced once).
//! * [`process`]: `mira-worker process SLIDE --out DIR`, the pipeline on one local slide.
//!
//! This is the CPU path; the CUDA kernels, the tissue mask, stain normalisation, per-tile
//! statistics and the queue consumer (`mira-worker run`) come next.

pub mod deepzoom;
pub mod process;
pub mod slide;
