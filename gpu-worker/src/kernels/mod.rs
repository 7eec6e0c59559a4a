//! The worker's kernels and the choice of device (DESIGN §8).
//!
//! [`cpu`] holds the Rust implementation of every kernel, [`gpu`] the same kernels in CUDA.
//! [`Device`] is what the pipeline calls: one method per kernel, run on whichever path
//! [`choose`] picked from `MIRA_GPU=auto|off|require`. With `auto` the GPU is used only when
//! the driver and NVRTC load, the driver is new enough, and a start-up self-check of every
//! kernel against the CPU passes; otherwise the CPU path runs and the log says why.

pub mod cpu;
// The one module that must call C: cudarc's driver and NVRTC entry points are `unsafe fn`.
#[allow(unsafe_code)]
pub mod gpu;
pub mod reduce;

use std::sync::Arc;

pub use cpu::noise;
use cpu::OdSums;
use reduce::Reduce2;

/// `MIRA_GPU`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuMode {
    Auto,
    Off,
    Require,
}

impl std::str::FromStr for GpuMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "off" | "0" | "false" | "cpu" => Ok(Self::Off),
            "require" | "required" => Ok(Self::Require),
            other => anyhow::bail!("MIRA_GPU must be auto, off or require, not {other:?}"),
        }
    }
}

impl GpuMode {
    /// Reads `MIRA_GPU` (binaries call this at start; library code takes the mode as given).
    pub fn from_env() -> anyhow::Result<Self> {
        std::env::var("MIRA_GPU").unwrap_or_default().parse()
    }
}

/// Where kernels run.
#[derive(Clone, Debug)]
pub enum Device {
    Cpu,
    Gpu(Arc<gpu::Gpu>),
}

/// Picks the device for `mode`; the string says why (logged by the caller).
pub fn choose(mode: GpuMode) -> anyhow::Result<(Device, String)> {
    if mode == GpuMode::Off {
        return Ok((Device::Cpu, "MIRA_GPU=off".into()));
    }
    let opened = gpu::Gpu::open().map_err(anyhow::Error::from).and_then(|g| {
        let g = Arc::new(g);
        self_check(&g).map_err(|e| anyhow::anyhow!("the start-up self-check failed: {e}"))?;
        Ok(g)
    });
    match (opened, mode) {
        (Ok(g), _) => {
            let why = format!("{g:?} passed the self-check of every kernel");
            Ok((Device::Gpu(g), why))
        }
        (Err(e), GpuMode::Require) => Err(e.context("MIRA_GPU=require, but the GPU cannot be used")),
        (Err(e), _) => Ok((Device::Cpu, format!("running on the CPU: {e:#}"))),
    }
}

fn gpu_err(e: gpu::GpuError) -> anyhow::Error {
    anyhow::Error::from(e).context("a GPU kernel failed")
}

impl Device {
    pub fn name(&self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            Self::Gpu(g) => format!("gpu ({})", g.name),
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Self::Gpu(_))
    }

    pub fn bgra_to_rgb_sat(&self, bgra: &[u8]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        match self {
            Self::Cpu => {
                let n = bgra.len() / 4;
                let (mut rgb, mut sat) = (vec![0; n * 3], vec![0; n]);
                cpu::bgra_to_rgb_sat(bgra, &mut rgb, &mut sat);
                Ok((rgb, sat))
            }
            Self::Gpu(g) => g.bgra_to_rgb_sat(bgra).map_err(gpu_err),
        }
    }

    pub fn rgb_saturation(&self, rgb: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self {
            Self::Cpu => Ok(cpu::rgb_saturation(rgb)),
            Self::Gpu(g) => g.rgb_saturation(rgb).map_err(gpu_err),
        }
    }

    pub fn histogram256(&self, v: &[u8]) -> anyhow::Result<[u64; 256]> {
        match self {
            Self::Cpu => Ok(cpu::histogram256(v)),
            Self::Gpu(g) => g.histogram256(v).map_err(gpu_err),
        }
    }

    pub fn otsu(&self, h: &[u64; 256]) -> anyhow::Result<u8> {
        match self {
            Self::Cpu => Ok(cpu::otsu(h)),
            Self::Gpu(g) => g.otsu(h).map_err(gpu_err),
        }
    }

    pub fn reduce_rows(&self, r: &Reduce2, src: &[u8], width: usize) -> anyhow::Result<Vec<u8>> {
        match self {
            Self::Cpu => Ok(cpu::reduce_rows(r, src, width)),
            Self::Gpu(g) => g.reduce_rows(r, src, width).map_err(gpu_err),
        }
    }

    /// Output rows `first..end` of `r` along the columns; `src` holds input rows from
    /// `src_first`, each `stride` bytes.
    pub fn reduce_columns(
        &self,
        r: &Reduce2,
        first: usize,
        end: usize,
        src: &[u8],
        src_first: usize,
        stride: usize,
    ) -> anyhow::Result<Vec<u8>> {
        match self {
            Self::Cpu => {
                use rayon::prelude::*;
                let mut out = vec![0u8; (end - first) * stride];
                out.par_chunks_exact_mut(stride).enumerate().for_each(|(k, o)| {
                    let i = first + k;
                    let (a, b) = r.span(i);
                    let inputs: Vec<&[u8]> = src[(a - src_first) * stride..(b - src_first) * stride]
                        .chunks_exact(stride)
                        .collect();
                    r.column_into(i, &inputs, o);
                });
                Ok(out)
            }
            Self::Gpu(g) => g.reduce_columns(r, first, end, src, src_first, stride).map_err(gpu_err),
        }
    }

    pub fn od_sums(&self, rgb: &[u8]) -> anyhow::Result<OdSums> {
        match self {
            Self::Cpu => Ok(cpu::od_sums(rgb)),
            Self::Gpu(g) => g.od_sums(rgb).map_err(gpu_err),
        }
    }

    pub fn angle_histogram(&self, rgb: &[u8], e1: [f32; 3], e2: [f32; 3]) -> anyhow::Result<Vec<u64>> {
        match self {
            Self::Cpu => Ok(cpu::angle_histogram(rgb, e1, e2)),
            Self::Gpu(g) => g.angle_histogram(rgb, e1, e2).map_err(gpu_err),
        }
    }

    pub fn concentration_histogram(&self, rgb: &[u8], pinv: [[f32; 3]; 2]) -> anyhow::Result<Vec<u64>> {
        match self {
            Self::Cpu => Ok(cpu::concentration_histogram(rgb, pinv)),
            Self::Gpu(g) => g.concentration_histogram(rgb, pinv).map_err(gpu_err),
        }
    }

    pub fn macenko_apply(&self, rgb: &mut [u8], m: [[f32; 3]; 3]) -> anyhow::Result<()> {
        match self {
            Self::Cpu => {
                cpu::macenko_apply(rgb, m);
                Ok(())
            }
            Self::Gpu(g) => g.macenko_apply(rgb, m).map_err(gpu_err),
        }
    }

    pub fn reinhard_apply(&self, rgb: &mut [u8], k: [f32; 3], d: [f32; 3]) -> anyhow::Result<()> {
        match self {
            Self::Cpu => {
                cpu::reinhard_apply(rgb, k, d);
                Ok(())
            }
            Self::Gpu(g) => g.reinhard_apply(rgb, k, d).map_err(gpu_err),
        }
    }
}

/// One kernel's result on both paths: how far apart they are, against what is allowed.
#[derive(Debug, Clone)]
pub struct Agreement {
    pub kernel: &'static str,
    pub detail: String,
    pub ok: bool,
}

/// Every kernel on `rgb` (and on BGRA made from it) on both paths, compared with the stated
/// tolerance: integer kernels must be identical; histograms may move a few samples across a
/// bin edge (atan2f/float rounding); sums agree to 1e-9 relative; normalised pixels within
/// one level on ≥ 99.9 % of pixels and never more than 2 apart.
pub fn compare(g: &Arc<gpu::Gpu>, rgb: &[u8], width: usize) -> Vec<Agreement> {
    let gpu = Device::Gpu(g.clone());
    let cpu_ = Device::Cpu;
    let mut out = Vec::new();
    let mut push = |kernel: &'static str, r: anyhow::Result<(bool, String)>| {
        let (ok, detail) = r.unwrap_or_else(|e| (false, format!("{e:#}")));
        out.push(Agreement { kernel, detail, ok });
    };
    let n = rgb.len() / 3;
    let bgra: Vec<u8> = rgb
        .chunks_exact(3)
        .zip(noise(n, 7))
        .flat_map(|(p, a)| {
            // Premultiplied: every channel ≤ alpha.
            let a = a | 0x80;
            [p[2].min(a), p[1].min(a), p[0].min(a), a]
        })
        .collect();
    push(
        "bgra_to_rgb_sat",
        (|| {
            let (a, b) = (cpu_.bgra_to_rgb_sat(&bgra)?, gpu.bgra_to_rgb_sat(&bgra)?);
            Ok((a == b, format!("identical: {}", a == b)))
        })(),
    );
    push(
        "rgb_saturation",
        (|| {
            let (a, b) = (cpu_.rgb_saturation(rgb)?, gpu.rgb_saturation(rgb)?);
            Ok((a == b, format!("identical: {}", a == b)))
        })(),
    );
    let sat = cpu::rgb_saturation(rgb);
    push(
        "histogram256",
        (|| {
            let (a, b) = (cpu_.histogram256(&sat)?, gpu.histogram256(&sat)?);
            Ok((a == b, format!("identical: {}", a == b)))
        })(),
    );
    push(
        "otsu256",
        (|| {
            let h = cpu::histogram256(&sat);
            let (a, b) = (cpu_.otsu(&h)?, gpu.otsu(&h)?);
            Ok((a == b, format!("cpu {a}, gpu {b}")))
        })(),
    );
    let height = n / width;
    let rx = Reduce2::tiled(width, 254, 1);
    push(
        "reduce_rows",
        (|| {
            let (a, b) = (cpu_.reduce_rows(&rx, rgb, width)?, gpu.reduce_rows(&rx, rgb, width)?);
            Ok((a == b, format!("identical: {}", a == b)))
        })(),
    );
    let ry = Reduce2::tiled(height, 254, 1);
    push(
        "reduce_columns",
        (|| {
            let stride = width * 3;
            let end = ry.output_len();
            let (a, b) = (
                cpu_.reduce_columns(&ry, 0, end, rgb, 0, stride)?,
                gpu.reduce_columns(&ry, 0, end, rgb, 0, stride)?,
            );
            Ok((a == b, format!("identical: {}", a == b)))
        })(),
    );
    push(
        "reduce_columns (a window of rows, as the streaming builder passes them)",
        (|| {
            let stride = width * 3;
            let (first, end) = (ry.output_len() / 3, ry.output_len() * 2 / 3);
            let (a, b) = (ry.span(first).0, ry.span(end - 1).1);
            let window = &rgb[a * stride..b * stride];
            let (x, y) = (
                cpu_.reduce_columns(&ry, first, end, window, a, stride)?,
                gpu.reduce_columns(&ry, first, end, window, a, stride)?,
            );
            Ok((x == y, format!("identical: {}", x == y)))
        })(),
    );
    push(
        "od_sums",
        (|| {
            let (a, b) = (cpu_.od_sums(rgb)?, gpu.od_sums(rgb)?);
            let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-12);
            let worst = a
                .sum
                .iter()
                .zip(b.sum.iter())
                .chain(a.prod.iter().zip(b.prod.iter()))
                .map(|(x, y)| rel(*x, *y))
                .fold(0.0, f64::max);
            Ok((
                a.n == b.n && worst < 1e-9,
                format!("n {} vs {}, worst relative difference {worst:.2e}", a.n, b.n),
            ))
        })(),
    );
    let e1 = [0.6f32, -0.7, 0.3];
    let e2 = [0.5f32, 0.6, 0.62];
    push(
        "angle_histogram",
        (|| {
            let (a, b) = (cpu_.angle_histogram(rgb, e1, e2)?, gpu.angle_histogram(rgb, e1, e2)?);
            Ok(histograms_agree(&a, &b, 1))
        })(),
    );
    let pinv = [[1.2f32, 0.4, -0.6], [-0.9f32, 1.1, 0.8]];
    push(
        "concentration_histogram",
        (|| {
            let (a, b) = (
                cpu_.concentration_histogram(rgb, pinv)?,
                gpu.concentration_histogram(rgb, pinv)?,
            );
            Ok(histograms_agree(&a, &b, 1))
        })(),
    );
    let m = [[0.9f32, 0.2, -0.1], [0.1, 1.1, 0.05], [-0.05, 0.3, 0.8]];
    push(
        "macenko_apply",
        (|| {
            let (mut a, mut b) = (rgb.to_vec(), rgb.to_vec());
            cpu_.macenko_apply(&mut a, m)?;
            gpu.macenko_apply(&mut b, m)?;
            Ok(pixels_agree(&a, &b))
        })(),
    );
    push(
        "reinhard_apply",
        (|| {
            let (mut a, mut b) = (rgb.to_vec(), rgb.to_vec());
            let (k, d) = ([1.1f32, 0.9, 1.2], [-3.0f32, 2.0, -1.5]);
            cpu_.reinhard_apply(&mut a, k, d)?;
            gpu.reinhard_apply(&mut b, k, d)?;
            Ok(pixels_agree(&a, &b))
        })(),
    );
    out
}

/// Samples may cross to a neighbouring bin (float rounding at an edge), nothing else: the
/// totals are equal and every difference is made up within `reach` bins.
pub fn histograms_agree(a: &[u64], b: &[u64], reach: usize) -> (bool, String) {
    let total = |h: &[u64]| h.iter().sum::<u64>();
    let moved: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).sum::<u64>() / 2;
    // Cumulative counts differ only where samples crossed an edge: bounded by the moved count
    // and zero again within `reach` bins.
    let (mut ca, mut cb, mut run, mut worst_run) = (0i64, 0i64, 0usize, 0usize);
    for (x, y) in a.iter().zip(b) {
        ca += *x as i64;
        cb += *y as i64;
        run = if ca != cb { run + 1 } else { 0 };
        worst_run = worst_run.max(run);
    }
    let ok = total(a) == total(b) && worst_run <= reach && (moved as f64) <= 1e-4 * total(a) as f64 + 4.0;
    (
        ok,
        format!(
            "totals {} vs {}, {moved} samples in a neighbouring bin, longest run of differing cumulative counts {worst_run}",
            total(a),
            total(b)
        ),
    )
}

pub fn pixels_agree(a: &[u8], b: &[u8]) -> (bool, String) {
    let diffs: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let off = diffs.iter().filter(|d| **d > 1).count();
    let ok = max <= 2 && (off as f64) <= 1e-3 * diffs.len() as f64;
    (
        ok,
        format!(
            "max difference {max}, {off} of {} values more than 1 apart",
            diffs.len()
        ),
    )
}

/// The start-up self-check: every kernel on a small synthetic image.
pub fn self_check(g: &Arc<gpu::Gpu>) -> Result<(), String> {
    // Wider and taller than a tile, so the reductions cross tile edges.
    let (w, h) = (601, 523);
    let rgb = noise(w * h * 3, 42);
    let failed: Vec<String> = compare(g, &rgb, w)
        .into_iter()
        .filter(|a| !a.ok)
        .map(|a| format!("{}: {}", a.kernel, a.detail))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Each kernel's bandwidth on the device, against its device-to-device copy bandwidth:
/// (kernel, GB/s, copy GB/s).
pub fn bench(g: &Arc<gpu::Gpu>) -> anyhow::Result<Vec<(&'static str, f64, f64)>> {
    let copy = g.copy_bandwidth(1 << 28, 20)?;
    Ok(g.bench(1 << 26, 20)?.into_iter().map(|(k, v)| (k, v, copy)).collect())
}
