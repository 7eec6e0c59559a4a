//! `mira-worker`: Mira's slide-processing worker.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mira_events::params::{parse_name, KindParams, PreprocessParams};
use mira_events::{JobSpec, ParamsError};
use mira_gpu_worker::kernels::{self, Device};
use mira_gpu_worker::pipeline::{self, Host};
use mira_gpu_worker::process::{self, TileFormat, Watch};

#[derive(Parser)]
#[command(name = "mira-worker", version, about = "Mira's slide-processing worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Turn one local slide into a DeepZoom pyramid (the `.dzi` and its tiles) and a
    /// manifest, with no platform around it.
    Process {
        /// The slide (any format OpenSlide reads).
        slide: PathBuf,
        /// Output directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Tile encoding: jpeg or png.
        #[arg(long, default_value = "jpeg", value_parser = parse_name::<TileFormat>)]
        format: TileFormat,
        /// Tile edge in pixels, without overlap.
        #[arg(long, default_value_t = 254, value_parser = clap::value_parser!(u32).range(16..=4096))]
        tile_size: u32,
        /// Pixels shared with each neighbouring tile.
        #[arg(long, default_value_t = 1)]
        overlap: u32,
        /// JPEG quality.
        #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(1..=100))]
        quality: u8,
        /// Also write a stain-normalised pyramid (`normalized.dzi`): none, macenko or reinhard.
        #[arg(long, default_value = "none", value_parser = parse_name::<process::Normalize>)]
        normalize: process::Normalize,
        /// Skip the tissue mask and the tiles' tissue fractions.
        #[arg(long)]
        no_tissue: bool,
        /// Write each pyramid as one pyramidal BigTIFF (`slide.tiff`, ADR 0036), as the worker
        /// stores results, instead of a DeepZoom tree.
        #[arg(long)]
        layers: bool,
        /// As an attempt of `mira-worker run`: send the layers through this file descriptor, a
        /// pipe the worker reads and uploads from.
        #[arg(long, hide = true, value_name = "FD")]
        layers_fd: Option<i32>,
        /// The job to run, as `JobSubmitted` stores it (`{"kind": …, "params": …}`), in place of
        /// the options above: how `mira-worker run` starts an attempt.
        #[arg(long, hide = true, value_name = "JSON")]
        spec: Option<String>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// As an attempt of `mira-worker run`: one JSON object per line on standard output
        /// (each stage as it begins, progress, then the summary or the error and whether a
        /// retry can help), exit status 3 on a failure.
        #[arg(long, hide = true)]
        report: bool,
        /// Pause after every band (`Worker__BandPauseMillis`).
        #[arg(long, hide = true, default_value_t = 0)]
        band_pause_millis: u64,
        /// A test hook (`Worker__TestHangAtBand`): stop for ever before band N.
        #[arg(long, hide = true, default_value_t = 0)]
        hang_at_band: u64,
        /// `Worker__MaxSlidePixels` (default: the setting).
        #[arg(long, hide = true)]
        max_slide_pixels: Option<u64>,
        /// `Worker__MemoryBudgetBytes` (default: the setting).
        #[arg(long, hide = true)]
        memory_budget_bytes: Option<u64>,
        /// A test hook (`Worker__TestAllocateBytes`): allocate this much first, on a slide of a
        /// megapixel or more.
        #[arg(long, hide = true, default_value_t = 0)]
        allocate_bytes: u64,
    },
    /// Compile every CUDA kernel with NVRTC (no GPU needed) and, when a GPU can be used,
    /// check each against its CPU implementation and time it against the device's copy
    /// bandwidth.
    Kernels {
        /// Compile for this compute capability (e.g. 90) instead of the device's.
        #[arg(long)]
        arch: Option<i32>,
    },
    /// Take work from the `gpu-jobs` queue until SIGTERM: run queued jobs. Settings as for
    /// `mira` (DATABASE_URL, Messaging__Provider, Storage__…).
    Run {
        /// Optional TOML settings file, read after the defaults and before the environment.
        #[arg(long, env = "MIRA_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// This worker's name in the log, unique to the process (default: host name, process id
        /// and a random part).
        #[arg(long)]
        worker_id: Option<String>,
        /// Serve this worker's metrics at http://ADDR/metrics (jobs by stage and outcome,
        /// megapixels per second on the GPU or the CPU, its consumer's apply times).
        #[arg(long, env = "MIRA_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Take work from the `verify` queue until SIGTERM: fetch each uploaded slide, hash it,
    /// open it and record it verified or rejected. On CPUs only (no GPU is looked for), so it
    /// runs beside the API rather than on the GPU fleet. Settings as for `run`.
    Verify {
        /// Optional TOML settings file, read after the defaults and before the environment.
        #[arg(long, env = "MIRA_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// This verifier's name in the log, unique to the process (default: `verify-`, host
        /// name, process id and a random part).
        #[arg(long)]
        worker_id: Option<String>,
        /// Serve this worker's metrics at http://ADDR/metrics (jobs by stage and outcome,
        /// megapixels per second on the GPU or the CPU, its consumer's apply times).
        #[arg(long, env = "MIRA_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Open a slide and print the metadata Mira records for it, or why it is refused.
    Inspect { slide: PathBuf },
    /// Write a succeeded job's pyramids as DeepZoom trees (`slide.dzi`, `slide_files/`; the
    /// normalised ones as `normalized.*`) with the job's tile size, overlap and format, for
    /// anyone who wants files. Settings as for `run`.
    Export {
        /// Optional TOML settings file, read after the defaults and before the environment.
        #[arg(long, env = "MIRA_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// The job's tenant.
        #[arg(long)]
        tenant: String,
        /// The job.
        #[arg(long)]
        job: String,
        /// An empty (or new) directory to write the trees into.
        #[arg(long, value_name = "DIR")]
        dzi: PathBuf,
    },
}

/// Which queue `run` and `verify` consume.
#[derive(Clone, Copy)]
enum Consume {
    Jobs,
    Verify,
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            config,
            worker_id,
            metrics_listen,
        } => consume(Consume::Jobs, config, worker_id, metrics_listen)?,
        Command::Verify {
            config,
            worker_id,
            metrics_listen,
        } => consume(Consume::Verify, config, worker_id, metrics_listen)?,
        Command::Process {
            slide,
            out,
            format,
            tile_size,
            overlap,
            quality,
            normalize,
            no_tissue,
            layers,
            layers_fd,
            spec,
            json,
            report,
            band_pause_millis,
            hang_at_band,
            max_slide_pixels,
            memory_budget_bytes,
            allocate_bytes,
        } => {
            // An attempt runs the job as stored; otherwise the flags make a `wsi.preprocess`.
            let spec = match spec {
                Some(text) => serde_json::from_str::<JobSpec>(&text).map_err(|e| anyhow::anyhow!("--spec: {e}"))?,
                None => {
                    let p = PreprocessParams {
                        tile_size,
                        overlap,
                        format,
                        quality,
                        tissue: !no_tissue,
                        normalize,
                    };
                    // Named as the flags are: `--overlap: …`.
                    p.validate().map_err(|e| match e {
                        ParamsError::Invalid {
                            field: Some(f),
                            message,
                        } => anyhow::anyhow!("--{}: {message}", f.replace('_', "-")),
                        e => e.into(),
                    })?;
                    JobSpec::Preprocess(p)
                }
            };
            let settings = mira_config::Settings::load(None, std::env::vars())?;
            let host = Host {
                device: pick_device()?,
                reader: settings.worker.slide_reader.into(),
                limits: mira_gpu_worker::slide::Limits {
                    max_pixels: max_slide_pixels.unwrap_or(settings.worker.max_slide_pixels),
                },
                memory_budget: memory_budget_bytes.unwrap_or(settings.worker.memory_budget_bytes),
                layers: match layers_fd {
                    Some(fd) => Some(process::LayerOutput::Pipe(layer_pipe(fd)?)),
                    None => layers.then_some(process::LayerOutput::Files),
                },
            };
            if report {
                if allocate_bytes > 0 {
                    allocate_on_large(&slide, allocate_bytes);
                }
                return Ok(attempt_report(
                    &spec,
                    &slide,
                    &out,
                    &host,
                    std::time::Duration::from_millis(band_pause_millis),
                    hang_at_band,
                ));
            }
            let progress = |done: u64, total: u64| {
                if !json {
                    eprint!(
                        "\rtiles {done}/{total} ({:.0}%)   ",
                        100.0 * done as f64 / total.max(1) as f64
                    );
                }
            };
            let JobSpec::Preprocess(p) = &spec else {
                // A spec given by hand: its summary as JSON.
                println!(
                    "{}",
                    pipeline::run(&spec, &slide, &out, &host, &Watch::quiet(&progress))?
                );
                return Ok(ExitCode::SUCCESS);
            };
            let s = process::process(&slide, &out, &pipeline::preprocess(p, &host), progress)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                eprintln!();
                let tissue = s
                    .tissue_fraction
                    .map(|f| format!("{:.1} % tissue", 100.0 * f))
                    .unwrap_or_else(|| "no tissue mask".into());
                println!(
                    "{}×{} ({:.1} megapixels) in {:.2} s: {:.1} megapixels/s, {} levels, {} tiles, {tissue}, device {}, read by {}",
                    s.width, s.height, s.megapixels, s.seconds, s.megapixels_per_second, s.levels, s.tiles, s.device, s.reader
                );
            }
        }
        Command::Kernels { arch } => kernels(arch)?,
        Command::Export {
            config,
            tenant,
            job,
            dzi,
        } => {
            let settings = mira_config::Settings::load(config.as_deref(), std::env::vars())?;
            let tenant = mira_events::TenantId::parse(&tenant).map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
            let job = mira_events::JobId::parse(&job).map_err(|e| anyhow::anyhow!("--job: {e}"))?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let written = rt.block_on(mira_gpu_worker::run::export(settings, tenant, job, dzi.clone()))?;
            for w in written {
                println!("{}", dzi.join(w).display());
            }
        }
        Command::Inspect { slide } => {
            let settings = mira_config::Settings::load(None, std::env::vars())?;
            let s = mira_gpu_worker::slide::Slide::open_limited(
                &slide,
                settings.worker.slide_reader.into(),
                &mira_gpu_worker::slide::Limits {
                    max_pixels: settings.worker.max_slide_pixels,
                },
            )?;
            let (meta, private) = s.metadata();
            println!(
                "{}",
                serde_json::json!({"metadata": meta, "readers": (0..meta.levels.len() as u32).map(|l| s.reader(l)).collect::<Vec<_>>(), "sealed_before_storage": private.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>())})
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `mira-worker run` and `mira-worker verify`: consume their queue until SIGTERM.
fn consume(
    what: Consume,
    config: Option<PathBuf>,
    worker_id: Option<String>,
    metrics_listen: Option<String>,
) -> anyhow::Result<()> {
    let settings = mira_config::Settings::load(config.as_deref(), std::env::vars())?;
    // The verifier opens slides and hashes them on the CPU: it looks for no GPU.
    let device = match what {
        Consume::Jobs => pick_device()?,
        Consume::Verify => Device::Cpu,
    };
    // The log tells a worker which runs are its own by this id (a redelivered job runs only
    // under its own lease), so it must be unique to the process: containers share host names
    // and run as pid 1, hence the random part.
    let id = worker_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
        let nonce = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let role = match what {
            Consume::Jobs => "",
            Consume::Verify => "verify-",
        };
        format!("{role}{}-{}-{nonce}", host.trim(), std::process::id())
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let r = rt.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
                return;
            };
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                seen += 1;
                if seen == 1 {
                    s.cancel();
                } else {
                    // A second signal: stop now, whatever is in hand (its lease expires).
                    eprintln!("mira-worker: stopping at once");
                    std::process::exit(130);
                }
            }
        });
        // Started by `mira dev` (in a process group of its own): stop with it, even when
        // it is killed without a chance to stop this worker.
        if let Some(parent) = std::env::var("MIRA_EXIT_WITH_PARENT")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
        {
            let s = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    if std::os::unix::process::parent_id() != parent {
                        eprintln!("mira-worker: mira dev (pid {parent}) is gone; stopping");
                        s.cancel();
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        std::process::exit(1);
                    }
                }
            });
        }
        if let Some(at) = metrics_listen {
            let l = tokio::net::TcpListener::bind(&at)
                .await
                .map_err(|e| anyhow::anyhow!("--metrics-listen: cannot listen on {at}: {e}"))?;
            tracing::info!(addr = %l.local_addr()?, "serving /metrics");
            tokio::spawn(mira_telemetry::prom::serve(
                l,
                || {},
                shutdown.clone().cancelled_owned(),
            ));
        }
        match what {
            Consume::Jobs => mira_gpu_worker::run::run(settings, id, device, shutdown).await,
            Consume::Verify => mira_gpu_worker::run::verify(settings, id, shutdown).await,
        }
    });
    // An abandoned attempt's process dies with this one (ADR 0022); do not wait for
    // anything else left on a blocking thread.
    rt.shutdown_background();
    r?;
    Ok(())
}

/// `mira-worker process --report`: one attempt of `mira-worker run`, in a process of its own
/// so that the worker can kill it (cancelled, stalled, over its budget) whatever it is stuck
/// in. Reports on standard output, one JSON object per line, flushed as written.
fn attempt_report(
    spec: &JobSpec,
    slide: &std::path::Path,
    out: &std::path::Path,
    host: &Host,
    pause: std::time::Duration,
    hang_at_band: u64,
) -> ExitCode {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    let say = |v: serde_json::Value| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{v}");
        let _ = o.flush();
    };
    let bands = AtomicU64::new(0);
    let stop = || {
        let band = bands.fetch_add(1, Ordering::Relaxed) + 1;
        if hang_at_band > 0 && band >= hang_at_band {
            // Stands for a decoder stuck in native code: nothing returns from here.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        false
    };
    let watch = Watch {
        begin: &|stage| say(serde_json::json!({ "stage": stage })),
        progress: &|done, total| say(serde_json::json!({ "done": done, "total": total })),
        stop: &stop,
    };
    match pipeline::run(spec, slide, out, host, &watch) {
        Ok(summary) => {
            say(serde_json::json!({ "summary": summary }));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(serde_json::json!({ "error": format!("{e:#}"), "retryable": e.retryable() }));
            ExitCode::from(3)
        }
    }
}

/// The `Worker__TestAllocateBytes` hook: on a slide of a megapixel or more, allocate and fill
/// `bytes` (past the attempt's data limit, this is where it stops).
fn allocate_on_large(slide: &std::path::Path, bytes: u64) {
    let large = mira_gpu_worker::slide::Slide::open(slide)
        .map(|s| s.dimensions())
        .is_ok_and(|(w, h)| w * h >= 1_000_000);
    if large {
        let v = vec![1u8; bytes as usize];
        std::hint::black_box(&v);
    }
}

/// The pipe the worker gave this attempt for its layers, as file descriptor `fd`.
fn layer_pipe(fd: i32) -> anyhow::Result<mira_gpu_worker::layerpipe::Pipe> {
    use std::os::fd::{FromRawFd, OwnedFd};
    anyhow::ensure!(fd > 2, "--layers-fd: {fd} is not a pipe the worker gave");
    // SAFETY: the worker opened `fd` for this process (it is not stdin, stdout or stderr), and
    // nothing else in this process uses it.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(mira_gpu_worker::layerpipe::Pipe::new(std::fs::File::from(owned)))
}

/// `MIRA_GPU` → the device, with the reason logged.
fn pick_device() -> anyhow::Result<Device> {
    let (device, why) = kernels::choose(kernels::GpuMode::from_env()?)?;
    // Worth a warning only where a GPU was there to be had.
    if !device.is_gpu() && kernels::gpu::driver_present() {
        tracing::warn!("{why}");
    } else {
        tracing::info!(device = %device.name(), "{why}");
    }
    Ok(device)
}

fn kernels(arch: Option<i32>) -> anyhow::Result<()> {
    use kernels::gpu;
    let (major, minor) = gpu::nvrtc_version()?;
    let archs = gpu::nvrtc_archs()?;
    println!("NVRTC {major}.{minor}; CUBIN architectures {archs:?}");
    // The device (opened and self-checked once) decides the architecture unless one is given.
    let (device, why) = kernels::choose(kernels::GpuMode::from_env()?)?;
    let arch = match (arch, &device) {
        (Some(a), _) => a,
        (None, Device::Gpu(g)) => g.compute_capability.0 * 10 + g.compute_capability.1,
        (None, Device::Cpu) => *archs.last().unwrap_or(&75),
    };
    for (file, src) in gpu::SOURCES {
        for cubin in [false, true] {
            let image = gpu::compile(file, src, arch, cubin)?;
            let (kind, size) = match &image {
                gpu::Image::Cubin(b) => ("cubin", b.len()),
                gpu::Image::Ptx(s) => ("ptx", s.len()),
            };
            let text = match &image {
                gpu::Image::Ptx(s) => s.clone(),
                gpu::Image::Cubin(b) => String::from_utf8_lossy(b).into_owned(),
            };
            let missing: Vec<&str> = gpu::KERNELS
                .iter()
                .chain(gpu::MORE_KERNELS.iter())
                .filter(|(f, k)| *f == file && !text.contains(k))
                .map(|(_, k)| *k)
                .collect();
            anyhow::ensure!(missing.is_empty(), "{file}: {kind} lacks {missing:?}");
            println!("{file}: {kind} for {arch}: {size} bytes");
        }
    }
    match device {
        Device::Gpu(g) => {
            println!("{why}");
            for (name, gbps, copy) in kernels::bench(&g)? {
                println!(
                    "{name:<24} {gbps:8.1} GB/s  ({:5.1} % of the {copy:.0} GB/s device copy)",
                    100.0 * gbps / copy
                );
            }
        }
        Device::Cpu => println!("no GPU to check the kernels on: {why}"),
    }
    Ok(())
}

/// Keeps the pipeline's band buffers (tens of MiB, freed and allocated again for every band)
/// in the heap: with glibc's default they are fresh `mmap`s, and every band pays page faults,
/// zeroing and TLB shootdowns across the worker threads.
#[allow(unsafe_code)]
fn keep_large_buffers() {
    // SAFETY: mallopt only changes allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() -> ExitCode {
    keep_large_buffers();
    let telemetry = match mira_telemetry::init("mira-worker", "warn") {
        Ok(g) => g,
        Err(e) => {
            eprintln!("mira-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "mira-worker: {}",
                format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ")
            );
            ExitCode::from(2)
        }
    };
    // The last spans go out before the process ends.
    drop(telemetry);
    code
}
