//! `mira-gpu-worker` will own `mira-worker`: the slide pipeline (OpenSlide reads, tissue mask,
//! DeepZoom pyramid, stain normalisation, statistics) with CUDA kernels compiled by NVRTC and
//! a rayon CPU path, and the queue consumer that runs it (DESIGN §8).
//!
//! Its work arrives with the GPU-worker issue; until then it holds only this charter and the
//! binary's argument parsing.
