//! The CUDA boundary: loading the driver and NVRTC at run time, compiling
//! `gpu-worker/kernels/*.cu`, and one safe method per kernel, each the twin of a function in
//! [`super::cpu`].
//!
//! Both libraries are opened with `dlopen` (cudarc's `dynamic-loading`), so `mira-worker`
//! starts on machines without CUDA; cudarc panics when a library is missing, which is why
//! presence is probed first with its `is_culib_present`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::cpu::{self, OdSums};
use super::reduce::Reduce2;

/// The kernel sources, compiled at start.
pub const SOURCES: [(&str, &str); 3] = [
    ("pixels.cu", include_str!("../../kernels/pixels.cu")),
    ("reduce.cu", include_str!("../../kernels/reduce.cu")),
    ("stain.cu", include_str!("../../kernels/stain.cu")),
];

/// Every kernel, with the source that defines it.
pub const KERNELS: [(&str, &str); 10] = [
    ("pixels.cu", "bgra_to_rgb_sat"),
    ("pixels.cu", "rgb_saturation"),
    ("pixels.cu", "histogram256"),
    ("pixels.cu", "otsu256"),
    ("reduce.cu", "reduce_rows"),
    ("reduce.cu", "reduce_columns"),
    ("stain.cu", "od_sums"),
    ("stain.cu", "angle_histogram"),
    ("stain.cu", "concentration_histogram"),
    ("stain.cu", "macenko_apply"),
];
/// Kernels beyond the ten above (kept apart so the array above stays the self-check list).
pub const MORE_KERNELS: [(&str, &str); 1] = [("stain.cu", "reinhard_apply")];

/// The CUDA version Mira builds for (cudarc's `cuda-13000`): the driver must be at least this.
pub const CUDA_VERSION: i32 = 13000;

/// NVRTC's options: `--fmad=false` so float and double arithmetic round as the CPU's does.
const OPTIONS: [&str; 2] = ["--fmad=false", "--std=c++17"];

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("the CUDA driver library (libcuda) is not installed")]
    NoDriver,
    #[error("NVRTC (libnvrtc) is not installed or not on LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("the CUDA driver supports CUDA {0}.{1}; Mira needs 13.0 or later")]
    OldDriver(i32, i32),
    #[error("NVRTC could not compile {file}: {log}")]
    Compile { file: String, log: String },
    #[error("CUDA: {0}")]
    Driver(String),
}

fn drv(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Driver(format!("{e:?}"))
}

/// Whether NVRTC can be loaded (no driver needed: CI compiles kernels without a GPU).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen candidate names; cudarc's loaders panic, this does not.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

pub fn driver_present() -> bool {
    // SAFETY: as above, for libcuda.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// NVRTC's version, (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the pointers are valid for writes.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(drv)?;
    Ok((major, minor))
}

/// The compute capabilities NVRTC can emit CUBIN for, e.g. 75, 80, 90.
pub fn nvrtc_archs() -> Result<Vec<i32>, GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let mut n = 0;
    // SAFETY: present; `n` then a buffer of `n` ints, as NVRTC documents.
    unsafe { cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(drv)?;
    let mut archs = vec![0; n.max(0) as usize];
    unsafe { cudarc::nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(drv)?;
    Ok(archs)
}

/// What NVRTC made of a source.
#[derive(Debug)]
pub enum Image {
    Cubin(Vec<u8>),
    Ptx(String),
}

/// Compiles one source: CUBIN for `sm_<arch>` when `cubin`, else PTX for `compute_<arch>`.
pub fn compile(file: &str, src: &str, arch: i32, cubin: bool) -> Result<Image, GpuError> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let c_src = std::ffi::CString::new(src).expect("sources hold no NUL");
    let c_name = std::ffi::CString::new(file).expect("names hold no NUL");
    let prog = result::create_program(&c_src, Some(&c_name)).map_err(drv)?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(if cubin {
        format!("--gpu-architecture=sm_{arch}")
    } else {
        format!("--gpu-architecture=compute_{arch}")
    });
    // SAFETY: `prog` was just created and is destroyed once, below, on every path.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let out = match compiled {
            Err(_) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log = std::ffi::CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
                Err(GpuError::Compile { file: file.into(), log })
            }
            Ok(()) if cubin => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(drv)?;
                let mut buf = vec![0u8; size];
                sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
                    .result()
                    .map_err(drv)?;
                Ok(Image::Cubin(buf))
            }
            Ok(()) => {
                let ptx = result::get_ptx(prog).map_err(drv)?;
                let s = std::ffi::CStr::from_ptr(ptx.as_ptr()).to_string_lossy().into_owned();
                Ok(Image::Ptx(s))
            }
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
}

/// The driver's CUDA version as (major, minor).
pub fn driver_version() -> Result<(i32, i32), GpuError> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    let mut v = 0;
    // SAFETY: the library is present; `v` is valid for writes.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(drv)?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// One GPU with every kernel loaded. Methods take and return host memory; calls are
/// serialised (the pipeline issues them from one thread at a time anyway).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    od: CudaSlice<f32>,
    lock: Mutex<()>,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// How the kernels were loaded: "cubin sm_90" or "ptx compute_90".
    pub image: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Gpu({}, sm_{}{}, {})",
            self.name, self.compute_capability.0, self.compute_capability.1, self.image
        )
    }
}

/// Threads per block for every kernel; `od_sums` in stain.cu is written for exactly this.
const BLOCK: u32 = 256;

fn grid(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as u64).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// Opens device 0 and loads every kernel, after checking the driver's version.
    pub fn open() -> Result<Self, GpuError> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        if !nvrtc_present() {
            return Err(GpuError::NoNvrtc);
        }
        let (major, minor) = driver_version()?;
        if major * 1000 + minor * 10 < CUDA_VERSION {
            return Err(GpuError::OldDriver(major, minor));
        }
        let ctx = CudaContext::new(0).map_err(drv)?;
        let cc = ctx.compute_capability().map_err(drv)?;
        let name = ctx.name().map_err(drv)?;
        let arch = cc.0 * 10 + cc.1;
        // CUBIN for the device when this NVRTC knows it; otherwise PTX for the newest
        // architecture NVRTC knows, which the driver compiles for the device.
        let archs = nvrtc_archs()?;
        let (arch, cubin) = if archs.contains(&arch) {
            (arch, true)
        } else {
            (
                archs.iter().copied().filter(|a| *a <= arch).max().unwrap_or(arch),
                false,
            )
        };
        let image = if cubin {
            format!("cubin sm_{arch}")
        } else {
            format!("ptx compute_{arch}")
        };
        let stream = ctx.default_stream();
        let mut functions = HashMap::new();
        let dir = std::env::temp_dir().join(format!("mira-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(drv)?;
        for (file, src) in SOURCES {
            let ptx = match compile(file, src, arch, cubin)? {
                Image::Ptx(s) => Ptx::from_src(s),
                Image::Cubin(bytes) => {
                    // cuModuleLoad takes a CUBIN file as readily as PTX.
                    let path: PathBuf = dir.join(format!("{file}.cubin"));
                    std::fs::write(&path, bytes).map_err(drv)?;
                    Ptx::from_file(path)
                }
            };
            let module = ctx.load_module(ptx).map_err(drv)?;
            for (f, name) in KERNELS.iter().chain(MORE_KERNELS.iter()) {
                if *f == file {
                    functions.insert(*name, module.load_function(name).map_err(drv)?);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let od = stream.memcpy_stod(&cpu::od_table()).map_err(drv)?;
        Ok(Self {
            ctx,
            stream,
            functions,
            od,
            lock: Mutex::new(()),
            name,
            compute_capability: cc,
            image,
        })
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.ctx.synchronize().map_err(drv)
    }

    pub fn bgra_to_rgb_sat(&self, bgra: &[u8]) -> Result<(Vec<u8>, Vec<u8>), GpuError> {
        // The driver refuses empty allocations; an empty input has an empty answer.
        if bgra.len() < 4 {
            return Ok((Vec::new(), Vec::new()));
        }
        let _g = self.guard();
        let n = (bgra.len() / 4) as u64;
        let s = &self.stream;
        let src = s.memcpy_stod(bgra).map_err(drv)?;
        let mut rgb = s.alloc_zeros::<u8>(n as usize * 3).map_err(drv)?;
        let mut sat = s.alloc_zeros::<u8>(n as usize).map_err(drv)?;
        let mut b = s.launch_builder(self.f("bgra_to_rgb_sat"));
        b.arg(&src).arg(&mut rgb).arg(&mut sat).arg(&n);
        // SAFETY: the signature matches pixels.cu; buffers hold n pixels.
        unsafe { b.launch(grid(n)) }.map_err(drv)?;
        Ok((s.memcpy_dtov(&rgb).map_err(drv)?, s.memcpy_dtov(&sat).map_err(drv)?))
    }

    pub fn rgb_saturation(&self, rgb: &[u8]) -> Result<Vec<u8>, GpuError> {
        if rgb.len() < 3 {
            return Ok(Vec::new());
        }
        let _g = self.guard();
        let n = (rgb.len() / 3) as u64;
        let s = &self.stream;
        let src = s.memcpy_stod(rgb).map_err(drv)?;
        let mut sat = s.alloc_zeros::<u8>(n as usize).map_err(drv)?;
        let mut b = s.launch_builder(self.f("rgb_saturation"));
        b.arg(&src).arg(&mut sat).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(grid(n)) }.map_err(drv)?;
        s.memcpy_dtov(&sat).map_err(drv)
    }

    pub fn histogram256(&self, values: &[u8]) -> Result<[u64; 256], GpuError> {
        if values.is_empty() {
            return Ok([0; 256]);
        }
        let _g = self.guard();
        let n = values.len() as u64;
        let s = &self.stream;
        let src = s.memcpy_stod(values).map_err(drv)?;
        let mut hist = s.alloc_zeros::<u64>(256).map_err(drv)?;
        let mut b = s.launch_builder(self.f("histogram256"));
        b.arg(&src).arg(&n).arg(&mut hist);
        // SAFETY: as above; the histogram has 256 bins.
        unsafe { b.launch(grid(n.min(1 << 22))) }.map_err(drv)?;
        let v = s.memcpy_dtov(&hist).map_err(drv)?;
        Ok(v.try_into().expect("256 bins"))
    }

    pub fn otsu(&self, hist: &[u64; 256]) -> Result<u8, GpuError> {
        let _g = self.guard();
        let s = &self.stream;
        let h = s.memcpy_stod(hist).map_err(drv)?;
        let mut out = s.alloc_zeros::<i32>(1).map_err(drv)?;
        let mut b = s.launch_builder(self.f("otsu256"));
        b.arg(&h).arg(&mut out);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one thread reads 256 bins and writes one int.
        unsafe { b.launch(one) }.map_err(drv)?;
        Ok(s.memcpy_dtov(&out).map_err(drv)?[0] as u8)
    }

    fn taps(&self, r: &Reduce2) -> Result<[CudaSlice<i32>; 4], GpuError> {
        let (lo, start, count, w) = r.flat();
        let s = &self.stream;
        Ok([
            s.memcpy_stod(&lo).map_err(drv)?,
            s.memcpy_stod(&start).map_err(drv)?,
            s.memcpy_stod(&count).map_err(drv)?,
            s.memcpy_stod(&w).map_err(drv)?,
        ])
    }

    /// Every RGB row of `src` (`width` pixels) reduced along the row.
    pub fn reduce_rows(&self, r: &Reduce2, src: &[u8], width: usize) -> Result<Vec<u8>, GpuError> {
        let rows = src.len() / (width * 3);
        if rows == 0 {
            return Ok(Vec::new());
        }
        // The kernel trusts the taps; the CPU would panic on a bad span, so check here.
        assert!(r.span(r.output_len() - 1).1 <= width, "taps reach past the row");
        let _g = self.guard();
        let out_w = r.output_len();
        let s = &self.stream;
        let [lo, start, count, w] = self.taps(r)?;
        let d_src = s.memcpy_stod(src).map_err(drv)?;
        let mut out = s.alloc_zeros::<u8>(rows * out_w * 3).map_err(drv)?;
        let (in_w, rows_i, out_w_i) = (width as i32, rows as i32, out_w as i32);
        let mut b = s.launch_builder(self.f("reduce_rows"));
        b.arg(&d_src)
            .arg(&in_w)
            .arg(&rows_i)
            .arg(&lo)
            .arg(&start)
            .arg(&count)
            .arg(&w)
            .arg(&mut out)
            .arg(&out_w_i);
        // SAFETY: the taps index inside each row (Reduce2 guarantees it); sizes as allocated.
        unsafe { b.launch(grid((rows * out_w) as u64)) }.map_err(drv)?;
        s.memcpy_dtov(&out).map_err(drv)
    }

    /// Output rows `first..end` along the columns, from rows of `stride` bytes starting at
    /// input row `src_first`.
    pub fn reduce_columns(
        &self,
        r: &Reduce2,
        first: usize,
        end: usize,
        src: &[u8],
        src_first: usize,
        stride: usize,
    ) -> Result<Vec<u8>, GpuError> {
        if end <= first {
            return Ok(Vec::new());
        }
        assert!(
            (first..end).all(|i| r.span(i).0 >= src_first && r.span(i).1 - src_first <= src.len() / stride),
            "the input rows do not cover outputs {first}..{end}"
        );
        let _g = self.guard();
        let s = &self.stream;
        let [lo, start, count, w] = self.taps(r)?;
        let d_src = s.memcpy_stod(src).map_err(drv)?;
        let n_out = end - first;
        let mut out = s.alloc_zeros::<u8>(n_out * stride).map_err(drv)?;
        let (stride_i, src_first_i, first_i, n_out_i) = (stride as i32, src_first as i32, first as i32, n_out as i32);
        let mut b = s.launch_builder(self.f("reduce_columns"));
        b.arg(&d_src)
            .arg(&stride_i)
            .arg(&src_first_i)
            .arg(&first_i)
            .arg(&n_out_i)
            .arg(&lo)
            .arg(&start)
            .arg(&count)
            .arg(&w)
            .arg(&mut out);
        // SAFETY: the caller passes every input row the outputs span.
        unsafe { b.launch(grid((n_out * stride) as u64)) }.map_err(drv)?;
        s.memcpy_dtov(&out).map_err(drv)
    }

    pub fn od_sums(&self, rgb: &[u8]) -> Result<OdSums, GpuError> {
        if rgb.len() < 3 {
            return Ok(OdSums::default());
        }
        let _g = self.guard();
        let n = (rgb.len() / 3) as u64;
        let s = &self.stream;
        let src = s.memcpy_stod(rgb).map_err(drv)?;
        let mut out = s.alloc_zeros::<f64>(10).map_err(drv)?;
        let beta = cpu::BETA;
        let mut b = s.launch_builder(self.f("od_sums"));
        b.arg(&src).arg(&n).arg(&self.od).arg(&beta).arg(&mut out);
        // SAFETY: block size is the kernel's BLOCK (256); 10 outputs.
        unsafe { b.launch(grid(n.min(1 << 20))) }.map_err(drv)?;
        let v = s.memcpy_dtov(&out).map_err(drv)?;
        Ok(OdSums {
            n: v[0] as u64,
            sum: [v[1], v[2], v[3]],
            prod: [v[4], v[5], v[6], v[7], v[8], v[9]],
        })
    }

    pub fn angle_histogram(&self, rgb: &[u8], e1: [f32; 3], e2: [f32; 3]) -> Result<Vec<u64>, GpuError> {
        if rgb.len() < 3 {
            return Ok(vec![0; cpu::ANGLE_BINS]);
        }
        let _g = self.guard();
        let n = (rgb.len() / 3) as u64;
        let s = &self.stream;
        let src = s.memcpy_stod(rgb).map_err(drv)?;
        let e = s
            .memcpy_stod(&[e1[0], e1[1], e1[2], e2[0], e2[1], e2[2]])
            .map_err(drv)?;
        let mut hist = s.alloc_zeros::<u64>(cpu::ANGLE_BINS).map_err(drv)?;
        let (beta, pi, scale, bins) = (
            cpu::BETA,
            std::f32::consts::PI,
            cpu::ANGLE_SCALE,
            cpu::ANGLE_BINS as i32,
        );
        let mut b = s.launch_builder(self.f("angle_histogram"));
        b.arg(&src)
            .arg(&n)
            .arg(&self.od)
            .arg(&beta)
            .arg(&e)
            .arg(&pi)
            .arg(&scale)
            .arg(&mut hist)
            .arg(&bins);
        // SAFETY: bins clamped inside the kernel.
        unsafe { b.launch(grid(n)) }.map_err(drv)?;
        s.memcpy_dtov(&hist).map_err(drv)
    }

    pub fn concentration_histogram(&self, rgb: &[u8], pinv: [[f32; 3]; 2]) -> Result<Vec<u64>, GpuError> {
        if rgb.len() < 3 {
            return Ok(vec![0; 2 * cpu::CONC_BINS]);
        }
        let _g = self.guard();
        let n = (rgb.len() / 3) as u64;
        let s = &self.stream;
        let src = s.memcpy_stod(rgb).map_err(drv)?;
        let p = s.memcpy_stod(pinv.as_flattened()).map_err(drv)?;
        let mut hist = s.alloc_zeros::<u64>(2 * cpu::CONC_BINS).map_err(drv)?;
        let (lo, scale, bins) = (cpu::C_LO, cpu::CONC_SCALE, cpu::CONC_BINS as i32);
        let mut b = s.launch_builder(self.f("concentration_histogram"));
        b.arg(&src)
            .arg(&n)
            .arg(&self.od)
            .arg(&p)
            .arg(&lo)
            .arg(&scale)
            .arg(&mut hist)
            .arg(&bins);
        // SAFETY: bins clamped inside the kernel.
        unsafe { b.launch(grid(n)) }.map_err(drv)?;
        s.memcpy_dtov(&hist).map_err(drv)
    }

    pub fn macenko_apply(&self, rgb: &mut [u8], m: [[f32; 3]; 3]) -> Result<(), GpuError> {
        if rgb.len() < 3 {
            return Ok(());
        }
        let _g = self.guard();
        let n = (rgb.len() / 3) as u64;
        let s = &self.stream;
        let mut px = s.memcpy_stod(rgb).map_err(drv)?;
        let dm = s.memcpy_stod(m.as_flattened()).map_err(drv)?;
        let io = cpu::IO as f32;
        let mut b = s.launch_builder(self.f("macenko_apply"));
        b.arg(&mut px).arg(&n).arg(&self.od).arg(&dm).arg(&io);
        // SAFETY: in place over n pixels.
        unsafe { b.launch(grid(n)) }.map_err(drv)?;
        s.memcpy_dtoh(&px, rgb).map_err(drv)
    }

    pub fn reinhard_apply(&self, rgb: &mut [u8], k: [f32; 3], d: [f32; 3]) -> Result<(), GpuError> {
        if rgb.len() < 3 {
            return Ok(());
        }
        let _g = self.guard();
        let n = (rgb.len() / 3) as u64;
        let s = &self.stream;
        let mut params = Vec::with_capacity(27);
        params.extend_from_slice(cpu::RGB2XYZ.as_flattened());
        params.extend_from_slice(cpu::xyz2rgb().as_flattened());
        params.extend_from_slice(&cpu::WHITE);
        params.extend_from_slice(&k);
        params.extend_from_slice(&d);
        let mut px = s.memcpy_stod(rgb).map_err(drv)?;
        let p = s.memcpy_stod(&params).map_err(drv)?;
        let mut b = s.launch_builder(self.f("reinhard_apply"));
        b.arg(&mut px).arg(&n).arg(&p);
        // SAFETY: in place over n pixels; 27 parameters.
        unsafe { b.launch(grid(n)) }.map_err(drv)?;
        s.memcpy_dtoh(&px, rgb).map_err(drv)
    }

    /// Each kernel's achieved bandwidth on device-resident data of `pixels` pixels: bytes it
    /// must read and write over the median time of `repeats` launches, in GB/s.
    pub fn bench(&self, pixels: usize, repeats: usize) -> Result<Vec<(&'static str, f64)>, GpuError> {
        let (pixels, repeats) = (pixels.max(1 << 16), repeats.max(1));
        let _g = self.guard();
        let s = &self.stream;
        let n = pixels as u64;
        let host = cpu::noise(pixels * 4, 9);
        let bgra = s.memcpy_stod(&host).map_err(drv)?;
        let rgb_h: Vec<u8> = host[..pixels * 3].to_vec();
        let mut rgb = s.memcpy_stod(&rgb_h).map_err(drv)?;
        let mut sat = s.alloc_zeros::<u8>(pixels).map_err(drv)?;
        let mut hist = s.alloc_zeros::<u64>(2 * cpu::CONC_BINS).map_err(drv)?;
        let mut sums = s.alloc_zeros::<f64>(10).map_err(drv)?;
        let e = s.memcpy_stod(&[0.6f32, -0.7, 0.3, 0.5, 0.6, 0.62]).map_err(drv)?;
        let m = s
            .memcpy_stod(&[0.9f32, 0.2, -0.1, 0.1, 1.1, 0.05, -0.05, 0.3, 0.8])
            .map_err(drv)?;
        // Rows of 4096 pixels for the reductions.
        let width = 4096usize;
        let rows = pixels / width;
        let r = Reduce2::tiled(width, 254, 1);
        let (lo, start, count, w) = r.flat();
        let taps = [lo, start, count, w].map(|v| s.memcpy_stod(&v));
        let [lo, start, count, w] = taps;
        let (lo, start, count, w) = (
            lo.map_err(drv)?,
            start.map_err(drv)?,
            count.map_err(drv)?,
            w.map_err(drv)?,
        );
        let mut reduced = s.alloc_zeros::<u8>(rows * r.output_len() * 3).map_err(drv)?;
        let (beta, pi, ascale, bins) = (
            cpu::BETA,
            std::f32::consts::PI,
            cpu::ANGLE_SCALE,
            cpu::ANGLE_BINS as i32,
        );
        let (io, in_w, rows_i, out_w) = (cpu::IO as f32, width as i32, rows as i32, r.output_len() as i32);
        let time = |launch: &mut dyn FnMut() -> Result<(), GpuError>| -> Result<f64, GpuError> {
            launch()?;
            s.synchronize().map_err(drv)?;
            let mut t = Vec::with_capacity(repeats);
            for _ in 0..repeats {
                let a = std::time::Instant::now();
                launch()?;
                s.synchronize().map_err(drv)?;
                t.push(a.elapsed().as_secs_f64());
            }
            t.sort_by(f64::total_cmp);
            Ok(t[t.len() / 2])
        };
        let mut out = Vec::new();
        let gb = |bytes: f64, secs: f64| bytes / secs / 1e9;
        let px = pixels as f64;
        let t = time(&mut || {
            let mut b = s.launch_builder(self.f("bgra_to_rgb_sat"));
            b.arg(&bgra).arg(&mut rgb).arg(&mut sat).arg(&n);
            // SAFETY: buffers hold `pixels` pixels.
            unsafe { b.launch(grid(n)) }.map(|_| ()).map_err(drv)
        })?;
        out.push(("bgra_to_rgb_sat", gb(px * 8.0, t)));
        let t = time(&mut || {
            let mut b = s.launch_builder(self.f("histogram256"));
            b.arg(&sat).arg(&n).arg(&mut hist);
            // SAFETY: as above.
            unsafe { b.launch(grid(n.min(1 << 22))) }.map(|_| ()).map_err(drv)
        })?;
        out.push(("histogram256", gb(px, t)));
        let t = time(&mut || {
            let mut b = s.launch_builder(self.f("reduce_rows"));
            b.arg(&rgb)
                .arg(&in_w)
                .arg(&rows_i)
                .arg(&lo)
                .arg(&start)
                .arg(&count)
                .arg(&w)
                .arg(&mut reduced)
                .arg(&out_w);
            // SAFETY: rows × width pixels in, rows × out_w out.
            unsafe { b.launch(grid((rows * r.output_len()) as u64)) }
                .map(|_| ())
                .map_err(drv)
        })?;
        out.push((
            "reduce_rows",
            gb((rows * width * 3 + rows * r.output_len() * 3) as f64, t),
        ));
        let t = time(&mut || {
            let mut b = s.launch_builder(self.f("od_sums"));
            b.arg(&rgb).arg(&n).arg(&self.od).arg(&beta).arg(&mut sums);
            // SAFETY: as above.
            unsafe { b.launch(grid(n.min(1 << 20))) }.map(|_| ()).map_err(drv)
        })?;
        out.push(("od_sums", gb(px * 3.0, t)));
        let t = time(&mut || {
            let mut b = s.launch_builder(self.f("angle_histogram"));
            b.arg(&rgb)
                .arg(&n)
                .arg(&self.od)
                .arg(&beta)
                .arg(&e)
                .arg(&pi)
                .arg(&ascale)
                .arg(&mut hist)
                .arg(&bins);
            // SAFETY: as above.
            unsafe { b.launch(grid(n)) }.map(|_| ()).map_err(drv)
        })?;
        out.push(("angle_histogram", gb(px * 3.0, t)));
        let t = time(&mut || {
            let mut b = s.launch_builder(self.f("macenko_apply"));
            b.arg(&mut rgb).arg(&n).arg(&self.od).arg(&m).arg(&io);
            // SAFETY: as above.
            unsafe { b.launch(grid(n)) }.map(|_| ()).map_err(drv)
        })?;
        out.push(("macenko_apply", gb(px * 6.0, t)));
        Ok(out)
    }

    /// Device-to-device copy bandwidth in GB/s over `bytes` (the benchmark's yardstick).
    pub fn copy_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64, GpuError> {
        let _g = self.guard();
        let s = &self.stream;
        let a = s.alloc_zeros::<u8>(bytes).map_err(drv)?;
        let mut b = s.alloc_zeros::<u8>(bytes).map_err(drv)?;
        s.memcpy_dtod(&a, &mut b).map_err(drv)?;
        s.synchronize().map_err(drv)?;
        let t = std::time::Instant::now();
        for _ in 0..repeats {
            s.memcpy_dtod(&a, &mut b).map_err(drv)?;
        }
        s.synchronize().map_err(drv)?;
        // A copy reads and writes every byte.
        Ok(2.0 * bytes as f64 * repeats as f64 / t.elapsed().as_secs_f64() / 1e9)
    }
}
