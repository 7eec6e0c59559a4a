//! One attempt's pipeline in a child process (`mira-worker process --report`), supervised by
//! `mira-worker run` (ADR 0022).
//!
//! A thread stuck in native code (a decoder looping on a hostile file) can be neither finished
//! nor stopped from Rust; a process can be killed. The worker kills the child when the job is
//! cancelled, when it reports no progress for `Worker__StallSeconds`, and when it runs past
//! `Worker__MaxAttemptSeconds`. The child reads and writes local files only: it gets no
//! database login, no cloud credentials and no other setting from the worker's environment,
//! and it dies with the worker (`PR_SET_PDEATHSIG`). Resource limits for hostile slides go in
//! [`Supervisor::command`] too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mira_events::JobSpec;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kernels::Device;
use crate::slide::Reader;

/// The environment a child keeps: what locating libraries, logging and the GPU need. The
/// rest (the database URL, AWS credentials, tokens) stays with the worker.
const KEPT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "Logging__Format",
    "LD_LIBRARY_PATH",
];
const KEPT_PREFIXES: &[&str] = &["CUDA_", "NVIDIA_"];

/// How attempts are run and watched.
#[derive(Debug, Clone)]
pub struct Supervisor {
    /// The `mira-worker` binary (the running one).
    pub program: PathBuf,
    /// No progress for this long: killed as stalled.
    pub stall: Duration,
    /// Running longer than this: killed as over its budget.
    pub budget: Duration,
    /// `Worker__BandPauseMillis`.
    pub band_pause: Duration,
    /// `Worker__TestHangAtBand`.
    pub hang_at_band: u64,
    /// `Worker__MemoryBudgetBytes`: the child's estimate is checked against it, and the child
    /// cannot allocate past it (`RLIMIT_DATA`).
    pub memory_budget: u64,
    /// `Worker__SecondsPerGigapixel`: the attempt's time budget grows with the slide.
    pub seconds_per_gigapixel: u64,
    /// `Worker__MaxSlidePixels`.
    pub max_slide_pixels: u64,
    /// `Worker__TestAllocateBytes`.
    pub allocate_bytes: u64,
}

/// How long a child may take to end after its layers' upload failed.
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// The child's file descriptor for the layers' pipe.
const LAYERS_FD: std::os::fd::RawFd = 3;

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    #[allow(unsafe_code)]
    // SAFETY: pipe2 writes two new descriptors into `fds`, which this function then owns.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        ))
    }
}

/// The fixed part of an attempt's time budget.
pub const BUDGET_BASE_SECONDS: u64 = 600;

/// An attempt's time budget for a slide of `pixels`: 600 s and `per_gigapixel` seconds a
/// gigapixel, at most `cap`.
pub fn time_budget(pixels: u64, per_gigapixel: u64, cap: Duration) -> Duration {
    let secs = BUDGET_BASE_SECONDS as f64 + per_gigapixel as f64 * pixels as f64 / 1e9;
    Duration::from_secs_f64(secs).min(cap)
}

/// Where an attempt's layers are uploaded as the child writes them (ADR 0036).
#[derive(Debug, Clone)]
pub struct LayerUpload {
    pub store: mira_blobs::ObjectStore,
    /// The attempt's results prefix.
    pub prefix: String,
    pub settings: mira_blobs::stream::StreamSettings,
}

/// How a child's attempt ended.
#[derive(Debug)]
pub enum Ended {
    /// The manifest and the results other than the layers are in the output directory; the
    /// layers are stored, by name.
    Done(
        serde_json::Value,
        std::collections::BTreeMap<String, mira_blobs::stream::Streamed>,
    ),
    /// The pipeline failed and said so.
    Failed { reason: String, retryable: bool },
    /// Killed for making no progress.
    Stalled(String),
    /// Killed for running past its time budget, or failed for want of memory: never retried.
    OverBudget(String),
    /// Killed because `stop` was cancelled.
    Stopped,
}

/// One line of a child's report.
#[derive(Debug, PartialEq)]
enum Line {
    Stage(String),
    Progress(u64, u64),
    Summary(serde_json::Value),
    Error { reason: String, retryable: bool },
}

fn parse(line: &str) -> Option<Line> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if let Some(s) = v.get("stage").and_then(|s| s.as_str()) {
        return Some(Line::Stage(s.to_owned()));
    }
    if let (Some(d), Some(t)) = (v["done"].as_u64(), v["total"].as_u64()) {
        return Some(Line::Progress(d, t));
    }
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Some(Line::Error {
            reason: e.to_owned(),
            retryable: v["retryable"].as_bool().unwrap_or(true),
        });
    }
    v.get("summary").map(|s| Line::Summary(s.clone()))
}

impl Supervisor {
    /// The child's command line and environment, for this slide and this job, on `device`
    /// reading slides as `reader` says.
    pub fn command(
        &self,
        input: &Path,
        out: &Path,
        spec: &JobSpec,
        device: &Device,
        reader: Reader,
        layers_fd: Option<std::os::fd::RawFd>,
    ) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.program);
        c.arg("process")
            .arg(input)
            .arg("--out")
            .arg(out)
            .arg("--spec")
            .arg(serde_json::to_string(spec).unwrap_or_default())
            .args(["--band-pause-millis", &self.band_pause.as_millis().to_string()])
            .args(["--hang-at-band", &self.hang_at_band.to_string()])
            .args(["--max-slide-pixels", &self.max_slide_pixels.to_string()])
            .args(["--memory-budget-bytes", &self.memory_budget.to_string()])
            .args(["--allocate-bytes", &self.allocate_bytes.to_string()])
            .arg("--report");
        if layers_fd.is_some() {
            c.args(["--layers-fd", &LAYERS_FD.to_string()]);
        }
        c.env_clear();
        for (k, v) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if KEPT_ENV.contains(&name.as_ref()) || KEPT_PREFIXES.iter().any(|p| name.starts_with(p)) {
                c.env(&k, v);
            }
        }
        // The device the worker chose, not one the child might choose differently.
        c.env(
            "MIRA_GPU",
            if matches!(device, Device::Gpu(_)) {
                "require"
            } else {
                "off"
            },
        );
        c.env("Worker__SlideReader", reader.setting());
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.kill_on_drop(true);
        let worker = std::process::id() as libc::pid_t;
        let data = libc::rlimit {
            rlim_cur: self.memory_budget as libc::rlim_t,
            rlim_max: self.memory_budget as libc::rlim_t,
        };
        #[allow(unsafe_code)]
        // SAFETY: setpgid, prctl, getppid, fcntl, dup2 and _exit are async-signal-safe and
        // touch only the child's own state.
        unsafe {
            c.pre_exec(move || {
                // A group of its own: a Ctrl-C at a terminal, or a signal to the worker's group,
                // is the worker's to act on (it drains the attempt, then stops it).
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The child dies with the worker, however the worker ends (the signal comes when
                // the thread that spawned it ends: one of the runtime's, which live as long as
                // the worker).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The attempt's memory: heap and private mappings, whoever allocates them
                // (OpenSlide, libjpeg, CUDA's host side), stop at the budget.
                if libc::setrlimit(libc::RLIMIT_DATA, &data) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The worker ended before the signal was asked for.
                if libc::getppid() != worker {
                    libc::_exit(1);
                }
                // The layers' pipe as fd 3, left open across exec (a dup2 copy has no
                // close-on-exec; the same number keeps the flag, so it is cleared).
                if let Some(w) = layers_fd {
                    let moved = if w == LAYERS_FD {
                        libc::fcntl(w, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(w, LAYERS_FD)
                    };
                    if moved < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        c
    }

    /// Runs `spec` on a slide of `pixels` to its end; `progress` gets (tiles done, tiles in
    /// all) as the child reports them. Killed when `stop` is cancelled.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        input: &Path,
        out: &Path,
        spec: &JobSpec,
        (device, reader): (&Device, Reader),
        pixels: u64,
        progress: &tokio::sync::watch::Sender<(u64, u64)>,
        stop: &CancellationToken,
        layers: Option<&LayerUpload>,
    ) -> anyhow::Result<Ended> {
        let started = Instant::now();
        let budget = time_budget(pixels, self.seconds_per_gigapixel, self.budget);
        // The layers' pipe: the child writes, a task of this worker uploads as the bytes come.
        let (mut receiving, write_end) = match layers {
            Some(up) => {
                let (read, write) = pipe()?;
                let from = tokio::fs::File::from_std(std::fs::File::from(read));
                let up = up.clone();
                let task = tokio::spawn(async move {
                    crate::layerpipe::receive(from, &up.store, &up.prefix, crate::layerpipe::LAYERS, up.settings).await
                });
                (Some(task), Some(write))
            }
            None => (None, None),
        };
        let spawned = self
            .command(
                input,
                out,
                spec,
                device,
                reader,
                write_end.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            )
            .spawn();
        // The child has its copy; this one would keep the pipe from ever ending.
        drop(write_end);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if let Some(t) = receiving {
                    let _ = t.await;
                }
                anyhow::bail!("cannot start {}: {e}", self.program.display());
            }
        };
        let mut stored_layers: Option<
            Result<std::collections::BTreeMap<String, mira_blobs::stream::Streamed>, String>,
        > = None;
        // When the layers' upload failed: the child gets a moment to end and say why itself (a
        // pipeline that failed mid-layer ends the pipe too, and its own reason, and whether a
        // retry can help, is the one to keep); one still running then is waiting on a pipe no
        // one reads, and is stopped.
        let mut pipe_failed: Option<Instant> = None;
        let stdout = child.stdout.take().expect("the child's stdout is piped");
        // The child's log goes on to the worker's; its last lines explain an abnormal end.
        let stderr = child.stderr.take().expect("the child's stderr is piped");
        let said = tokio::spawn(async move {
            let mut last = std::collections::VecDeque::new();
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                eprintln!("{l}");
                if last.len() == 8 {
                    last.pop_front();
                }
                last.push_back(l);
            }
            last
        });
        let mut lines = BufReader::new(stdout).lines();
        let mut stage = "starting".to_owned();
        // A span per stage, from its start to the next one's (or the end), in the attempt's trace.
        let mut stage_span: Option<tracing::Span> = None;
        // When the current stage began, for `mira_job_stage_seconds` (recorded as the next one
        // begins, or when the process ends well).
        let (kind, mut in_stage, mut stage_began) = (spec.kind_name(), false, Instant::now());
        let mut moved = Instant::now();
        let mut first = true;
        let mut last: Option<Line> = None;
        let kill = |why: &str| tracing::warn!(pid = child.id(), "stopping the attempt's process: {why}");
        let killed = loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(l)) => {
                        if first {
                            first = false;
                            tracing::info!(pid = child.id(), startup_ms = started.elapsed().as_millis() as u64, "attempt process started");
                        }
                        match parse(&l) {
                            Some(Line::Stage(s)) => {
                                stage_span = Some(tracing::info_span!("worker.stage", stage = %s));
                                if in_stage {
                                    record_stage(kind, &stage, stage_began);
                                }
                                (in_stage, stage_began) = (true, Instant::now());
                                stage = s;
                                moved = Instant::now();
                            }
                            Some(Line::Progress(d, t)) => {
                                if progress.send_replace((d, t)) != (d, t) {
                                    moved = Instant::now();
                                }
                            }
                            Some(end @ (Line::Summary(_) | Line::Error { .. })) => last = Some(end),
                            None => tracing::debug!(line = l, "unreadable line from the attempt's process"),
                        }
                    }
                    Ok(None) | Err(_) => break None,
                },
                got = async { receiving.as_mut().expect("polled only while receiving").await }, if receiving.is_some() => {
                    receiving = None;
                    let got = got.unwrap_or_else(|e| Err(format!("the layers' upload ended: {e}")));
                    if got.is_err() {
                        pipe_failed = Some(Instant::now() + PIPE_GRACE);
                    }
                    stored_layers = Some(got);
                }
                _ = async { tokio::time::sleep_until(pipe_failed.expect("polled only once set")).await }, if pipe_failed.is_some() => {
                    let why = match &stored_layers {
                        Some(Err(why)) => why.clone(),
                        _ => "the layers' upload failed".to_owned(),
                    };
                    break Some(Ended::Failed { reason: format!("cannot store the results: {why}"), retryable: true });
                }
                _ = stop.cancelled() => {
                    kill("the attempt was stopped");
                    let _ = child.kill().await;
                    finish_receiving(receiving).await;
                    return Ok(Ended::Stopped);
                }
                _ = tokio::time::sleep_until(moved + self.stall) => {
                    let (d, t) = *progress.borrow();
                    let at = if t > 0 { format!(" (tiles {d} of {t})") } else { String::new() };
                    break Some(Ended::Stalled(format!("no progress for {} s in stage {stage}{at}", self.stall.as_secs())));
                }
                _ = tokio::time::sleep_until(started + budget) => {
                    break Some(Ended::OverBudget(format!(
                        "the attempt ran past its time budget of {} s for a slide of {:.2} gigapixels \
                         ({BUDGET_BASE_SECONDS} s and Worker__SecondsPerGigapixel {} s a gigapixel, at most \
                         Worker__MaxAttemptSeconds {} s), in stage {stage}",
                        budget.as_secs(),
                        pixels as f64 / 1e9,
                        self.seconds_per_gigapixel,
                        self.budget.as_secs()
                    )));
                }
            }
        };
        drop(stage_span);
        if let Some(end) = killed {
            if let Ended::Stalled(why) | Ended::OverBudget(why) | Ended::Failed { reason: why, .. } = &end {
                kill(why);
            }
            let _ = child.kill().await;
            finish_receiving(receiving).await;
            return Ok(end);
        }
        let status = child.wait().await?;
        // The child is gone and its end of the pipe with it: the upload ends now.
        if let Some(t) = receiving.take() {
            stored_layers = Some(
                t.await
                    .unwrap_or_else(|e| Err(format!("the layers' upload ended: {e}"))),
            );
        }
        let layers_stored = match stored_layers {
            Some(Ok(l)) => l,
            Some(Err(why)) if status.success() => {
                return Ok(Ended::Failed {
                    reason: format!("cannot store the results: {why}"),
                    retryable: true,
                })
            }
            _ => Default::default(),
        };
        if in_stage && status.success() {
            record_stage(kind, &stage, stage_began);
        }
        let stderr = said.await.unwrap_or_default();
        Ok(match last {
            Some(Line::Summary(s)) if status.success() => Ended::Done(s, layers_stored),
            Some(Line::Error { reason, retryable }) => Ended::Failed { reason, retryable },
            _ => match stderr.iter().rev().find(|l| l.contains("memory allocation of")) {
                // Rust's own words when an allocation fails: the data limit was reached.
                Some(l) => Ended::OverBudget(format!(
                    "the attempt ran out of memory ({}; Worker__MemoryBudgetBytes is {}) in stage {stage}",
                    l.trim().trim_start_matches("mira-worker: "),
                    crate::slide::readable_bytes(self.memory_budget)
                )),
                None => Ended::Failed {
                    reason: format!(
                        "the pipeline's process ended without a result ({status}) in stage {stage}{}",
                        stderr.back().map(|l| format!(": {}", l.trim())).unwrap_or_default()
                    ),
                    retryable: true,
                },
            },
        })
    }
}

/// Waits for the layers' upload of a child that was killed: the pipe has ended, so it fails
/// and aborts what it began.
async fn finish_receiving(
    receiving: Option<
        tokio::task::JoinHandle<Result<std::collections::BTreeMap<String, mira_blobs::stream::Streamed>, String>>,
    >,
) {
    if let Some(t) = receiving {
        if let Ok(Err(why)) = t.await {
            tracing::debug!(why, "the layers' upload of a stopped attempt was aborted");
        }
    }
}

/// `mira_job_stage_seconds{kind,stage}` for the stage `stage` that began at `began`.
fn record_stage(kind: &str, stage: &str, began: Instant) {
    metrics::histogram!(
        "mira_job_stage_seconds",
        "kind" => kind.to_owned(),
        "stage" => crate::process::stage::label(stage)
    )
    .record(began.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_budget_grows_with_the_slide_up_to_the_cap() {
        let cap = Duration::from_secs(21_600);
        assert_eq!(time_budget(0, 600, cap), Duration::from_secs(600));
        assert_eq!(time_budget(2_000_000_000, 600, cap), Duration::from_secs(1800));
        assert_eq!(time_budget(40_000_000_000, 600, cap), cap);
    }

    #[test]
    fn report_lines_are_read_and_anything_else_is_ignored() {
        assert_eq!(
            parse(r#"{"stage":"building the pyramid"}"#),
            Some(Line::Stage("building the pyramid".into()))
        );
        assert_eq!(parse(r#"{"done":3,"total":9}"#), Some(Line::Progress(3, 9)));
        assert_eq!(
            parse(r#"{"error":"not a slide","retryable":false}"#),
            Some(Line::Error {
                reason: "not a slide".into(),
                retryable: false
            })
        );
        assert!(matches!(parse(r#"{"summary":{"tiles":4}}"#), Some(Line::Summary(s)) if s["tiles"] == 4));
        assert_eq!(parse("tiles 3/9"), None);
        assert_eq!(parse(r#"{"other":1}"#), None);
    }

    /// A pipeline that fails in the middle of a layer ends the layers' pipe before it says why:
    /// the attempt fails with the child's own reason, and not retried when the child says a
    /// retry cannot help, rather than with the pipe's end (a stand-in child: it begins a layer,
    /// closes the pipe, and only a second later reports a slide error).
    #[tokio::test]
    async fn a_child_failing_mid_layer_is_failed_for_its_own_reason() {
        let dir = std::env::temp_dir().join(format!("mira-attempt-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("child.sh");
        std::fs::write(
            &program,
            "#!/bin/bash\nprintf 'S\\000\\012slide.tiffD\\000\\004\\000\\000\\000abcd' >&3\nexec 3>&-\nsleep 1\n\
             echo '{\"error\":\"the slide is damaged at tile 7\",\"retryable\":false}'\nexit 3\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let supervisor = Supervisor {
            program,
            stall: Duration::from_secs(60),
            budget: Duration::from_secs(60),
            band_pause: Duration::ZERO,
            hang_at_band: 0,
            memory_budget: 1 << 30,
            seconds_per_gigapixel: 600,
            max_slide_pixels: 1 << 30,
            allocate_bytes: 0,
        };
        let store = dir.join("store");
        let layers = LayerUpload {
            store: mira_blobs::ObjectStore::Local(store.clone()),
            prefix: "t/j/attempt-1/".into(),
            settings: mira_blobs::stream::StreamSettings::default(),
        };
        let (progress, _) = tokio::sync::watch::channel((0, 0));
        let spec = JobSpec::from_stored("wsi.preprocess", &serde_json::json!({}));
        let ended = supervisor
            .run(
                &dir.join("slide.svs"),
                &dir.join("out"),
                &spec,
                (&Device::Cpu, Reader::Auto),
                1,
                &progress,
                &CancellationToken::new(),
                Some(&layers),
            )
            .await
            .unwrap();
        match ended {
            Ended::Failed { reason, retryable } => {
                assert!(reason.contains("damaged at tile 7"), "{reason}");
                assert!(!retryable);
            }
            other => panic!("{other:?}"),
        }
        let left: Vec<_> = std::fs::read_dir(store.join("t/j/attempt-1"))
            .map(|d| d.count())
            .into_iter()
            .collect();
        assert!(
            left.iter().all(|n| *n == 0),
            "the unfinished layer left nothing: {left:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
