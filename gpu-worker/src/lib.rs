//! `mira-gpu-worker` owns `mira-worker`: the slide pipeline (DESIGN §8).
//!
//! * [`slide`]: OpenSlide reads, checked (levels, regions, buffer lengths), composited over
//!   white; the metadata `SlideVerified` records.
//! * [`tiff`]: tiled JPEG TIFF levels decoded straight from the file, where a sample proves
//!   them equal to OpenSlide's pixels.
//! * [`deepzoom`]: OpenSlide `DeepZoomGenerator` geometry and the streaming pyramid builder
//!   (Lanczos-3 2× reductions, each pixel reduced once).
//! * [`kernels`]: every CUDA kernel (`gpu-worker/kernels/*.cu`, NVRTC through cudarc) and its
//!   CPU twin with rayon; `MIRA_GPU=auto|off|require` picks the device.
//! * [`tissue`]: the tissue mask and per-tile statistics; [`stain`]: Macenko and Reinhard.
//! * [`pipeline`]: what an attempt runs, by the job's kind (the one `match` on its spec).
//! * [`process`]: `mira-worker process SLIDE --out DIR`, the pyramid pipeline on one local
//!   slide, its [`process::Manifest`] and its [`process::ProcessError`].
//! * [`run`]: `mira-worker run`, the consumer of the `gpu-jobs` queue: slide verification and
//!   jobs, with leases, heartbeats, fencing and results stored under a per-attempt prefix.

pub mod attempt;
pub mod deepzoom;
pub mod encode;
pub mod kernels;
pub mod layer;
pub mod layerpipe;
pub mod pipeline;
pub mod process;
pub mod run;
pub mod slide;
pub mod stain;
pub mod tiff;
pub mod tissue;
