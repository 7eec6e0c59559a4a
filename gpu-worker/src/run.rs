//! `mira-worker run` (DESIGN §8): the consumer of the `gpu-jobs` queue; and `mira-worker
//! verify`, the consumer of the `verify` queue, on CPUs (ADR 0026).
//!
//! * `SlideUploaded` (`verify`): fetch the slide, open it, record `SlideVerified` with its
//!   metadata (the properties that can name files or people sealed), or `SlideRejected` with
//!   the reason.
//! * `JobQueued`: start the attempt with a lease, run the pipeline in a child process
//!   ([`crate::attempt`]: killed on cancellation, stall or overrun), heartbeat (extending the
//!   lease, reporting progress, noticing cancellation) until done, upload the results under
//!   a prefix of their own for this attempt with the manifest last, then record
//!   `JobSucceeded` with the manifest's key and hash, or the failure and whether a retry can
//!   help. Every command carries the attempt number, so a stale worker is refused.
//!
//! A delivery for a slide already verified or a job no longer queued at that attempt is a
//! duplicate and does nothing. With `Messaging__Provider=InMemory` (`mira dev`) the worker runs
//! its own relay, named `worker`, into a private in-memory bus, and the verifier one named
//! `verifier`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use cqrs_es::AggregateError;
use mira_aggregates::{JobCommand, JobError, JobStatus, SlideCommand, SlideError, SlideStatus};
use mira_bus::consumer::{Apply, ApplyError, Consumer, ConsumerConfig};
use mira_bus::{Bus, Group};
use mira_config::{MessagingProvider, Settings, StorageProvider};
use mira_eventlog::commands::Commands;
use mira_eventlog::{EventLog, StoredEvent};
use mira_events::params::JobSpec;
use mira_events::{Actor, CommandContext, JobEvent, JobId, Metadata, SlideId, TenantId, Usage};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use mira_blobs::ObjectStore;

use crate::attempt::{Ended, Supervisor};
use crate::kernels::Device;
use crate::process::{Listed, Manifest, ProcessError, MANIFEST};

/// Where slides come from and where results go ([`mira_blobs::ObjectStore`]), as the settings
/// say: `AWS__S3__BucketName`, and `AWS__S3__ResultsBucketName` (the same bucket unless set).
async fn stores_from_settings(s: &Settings) -> anyhow::Result<(ObjectStore, ObjectStore)> {
    Ok(match s.storage.provider {
        StorageProvider::Local => (
            ObjectStore::Local(s.storage.local_dir.clone()),
            ObjectStore::Local(s.storage.local_dir.clone()),
        ),
        StorageProvider::S3 => {
            let sdk = mira_bus::aws::sdk_config(s.aws.region.as_deref()).await;
            let slides = s.aws.s3.bucket_name.clone().context("AWS__S3__BucketName is not set")?;
            let results = s.aws.s3.results_bucket_name.clone().unwrap_or_else(|| slides.clone());
            (
                ObjectStore::s3(&sdk, s.aws.s3.region.as_deref(), slides),
                ObjectStore::s3(&sdk, s.aws.s3.region.as_deref(), results),
            )
        }
    })
}

pub struct Worker {
    commands: Commands,
    device: Device,
    /// Where the slides' immutable copies are read.
    store: ObjectStore,
    /// Where results are written.
    results: ObjectStore,
    worker_id: String,
    lease: Duration,
    scratch: PathBuf,
    /// Runs each attempt's pipeline in a child process and watches it.
    supervisor: Supervisor,
    reader: crate::slide::Reader,
    /// Progress is recorded at most this often, and only when it moved.
    progress_every: Duration,
    /// How layers are streamed to `results` (`Worker__LayerPartBytes`,
    /// `Worker__LayerUploadParallel`).
    layer_stream: mira_blobs::stream::StreamSettings,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("worker_id", &self.worker_id).finish()
    }
}

fn ctx(e: &StoredEvent, tenant: &TenantId, worker: &str) -> CommandContext {
    let meta: Option<Metadata> = serde_json::from_str(&e.metadata).ok();
    let mut c = CommandContext::new(tenant.clone(), Actor::worker(worker));
    if let Some(m) = meta {
        c.correlation_id = m.correlation_id;
        // The event's trace, continued from the span this runs in where traces are recorded.
        c.traceparent = mira_telemetry::traceparent_within(&m.traceparent);
    }
    c.causation_id = e.event_id;
    c
}

impl Worker {
    pub fn new(
        commands: Commands,
        store: ObjectStore,
        worker_id: String,
        lease: Duration,
        scratch: PathBuf,
        device: Device,
    ) -> Self {
        Self {
            commands,
            device,
            results: store.clone(),
            store,
            worker_id,
            lease,
            scratch,
            supervisor: Supervisor {
                program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("mira-worker")),
                stall: Duration::from_secs(300),
                budget: Duration::from_secs(6 * 3600),
                band_pause: Duration::ZERO,
                hang_at_band: 0,
                memory_budget: 8 << 30,
                seconds_per_gigapixel: 600,
                max_slide_pixels: crate::slide::Limits::default().max_pixels,
                allocate_bytes: 0,
            },
            reader: crate::slide::Reader::Auto,
            progress_every: Duration::from_secs(10),
            layer_stream: mira_blobs::stream::StreamSettings::default(),
        }
    }

    /// Layers are uploaded in parts of `part_size`, `parallel` at a time.
    pub fn with_layer_stream(mut self, part_size: u64, parallel: usize) -> Self {
        self.layer_stream = mira_blobs::stream::StreamSettings { part_size, parallel };
        self
    }

    /// Writes results to `results` instead of the slides' store.
    pub fn with_results_store(mut self, results: ObjectStore) -> Self {
        self.results = results;
        self
    }

    /// Pauses after every band of rows, so a small slide runs as long as a large one.
    pub fn with_band_pause(mut self, pause: Duration) -> Self {
        self.supervisor.band_pause = pause;
        self
    }

    /// `Worker__StallSeconds` and `Worker__MaxAttemptSeconds`: an attempt is killed after this
    /// long without progress, or this long in all.
    pub fn with_stall_guard(mut self, stall: Duration, budget: Duration) -> Self {
        self.supervisor.stall = stall;
        self.supervisor.budget = budget;
        self
    }

    /// `Worker__MaxSlidePixels`, `Worker__MemoryBudgetBytes` and `Worker__SecondsPerGigapixel`
    /// (ADR 0023).
    pub fn with_slide_limits(mut self, max_pixels: u64, memory_budget: u64, seconds_per_gigapixel: u64) -> Self {
        self.supervisor.max_slide_pixels = max_pixels;
        self.supervisor.memory_budget = memory_budget;
        self.supervisor.seconds_per_gigapixel = seconds_per_gigapixel;
        self
    }

    /// `Worker__TestAllocateBytes`: the attempt's process allocates this much first (tests).
    pub fn with_allocate_bytes(mut self, bytes: u64) -> Self {
        self.supervisor.allocate_bytes = bytes;
        self
    }

    /// `Worker__TestHangAtBand`: the pipeline stops for ever before band `band` (tests).
    pub fn with_hang_at_band(mut self, band: u64) -> Self {
        self.supervisor.hang_at_band = band;
        self
    }

    /// `Worker__ProgressSeconds`: progress at most this often.
    pub fn with_progress_every(mut self, every: Duration) -> Self {
        self.progress_every = every;
        self
    }

    /// Reads slides this way (`Worker__SlideReader`).
    pub fn with_reader(mut self, reader: crate::slide::Reader) -> Self {
        self.reader = reader;
        self
    }

    #[tracing::instrument(name = "worker.verify", skip_all, fields(slide_id = %e.aggregate_id))]
    async fn verify(&self, e: &StoredEvent) -> Result<(), ApplyError> {
        let tenant = e.tenant()?;
        let id = e.id::<SlideId>()?;
        let Some(slide) = self
            .commands
            .load_slide(&tenant, id)
            .await
            .map_err(ApplyError::failed)?
        else {
            return Ok(());
        };
        if slide.status != SlideStatus::Uploaded {
            return Ok(());
        }
        let scratch = self.scratch.join(format!("verify-{id}"));
        tokio::fs::create_dir_all(&scratch).await.map_err(ApplyError::failed)?;
        let path = self
            .store
            .fetch(
                &mira_aggregates::copy_key(&slide.object_key),
                slide.version_id.as_deref(),
                &scratch,
            )
            .await
            .map_err(ApplyError::failed)?;
        let declared = slide.sha256.clone();
        let reader = self.reader;
        let limits = crate::slide::Limits {
            max_pixels: self.supervisor.max_slide_pixels,
        };
        // Reasons reach the API: they name the upload, never where this worker keeps it.
        let where_ = path.display().to_string();
        // The checksum first, recorded with the verdict so that every job can check it fetched
        // these bytes. A copy that cannot be read (yet) is no verdict on the slide: the work is
        // tried again later (the consumer's backoff), and the slide is never rejected for it.
        let got = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || crate::slide::sha256_of(&path))
                .await
                .map_err(ApplyError::failed)?
                .map_err(|e| ApplyError::failed(format!("cannot read the uploaded copy: {e}")))?
        };
        let opened = tokio::task::spawn_blocking(move || {
            // Against the declared checksum: a slide that is not the bytes the client meant is
            // refused however well it opens.
            if let Some(want) = declared {
                if !got.eq_ignore_ascii_case(&want) {
                    return Err(crate::slide::SlideError::Checksum {
                        declared: want,
                        actual: got,
                    });
                }
            }
            crate::slide::Slide::open_limited(&path, reader, &limits).map(|s| (s.metadata(), got))
        })
        .await
        .map_err(ApplyError::failed)?;
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        match &opened {
            Ok(((m, _), _)) => {
                tracing::info!(slide_id = %id, levels = m.levels.len(), "slide verified: {}×{} px", m.width, m.height)
            }
            Err(why) => tracing::info!(slide_id = %id, "slide rejected: {why}"),
        }
        let command = match opened {
            Ok(((metadata, private), sha256)) => SlideCommand::Verify {
                metadata,
                sha256,
                sensitive_properties: private.as_object().is_some_and(|o| !o.is_empty()).then_some(private),
            },
            Err(why) => SlideCommand::Reject {
                reason: why.to_string().replace(&where_, "the uploaded file"),
            },
        };
        match self
            .commands
            .slide(&ctx(e, &tenant, &self.worker_id), id, command)
            .await
        {
            Ok(()) | Err(AggregateError::UserError(SlideError::InvalidTransition { .. })) => Ok(()),
            Err(e) => Err(ApplyError::failed(e)),
        }
    }

    async fn job_command(
        &self,
        c: &CommandContext,
        id: JobId,
        command: JobCommand,
    ) -> Result<(), AggregateError<JobError>> {
        self.commands.job(c, id, command).await
    }

    /// The consumer's effect for `JobQueued`: take the attempt's lease with `JobStarted`, in the
    /// command's own short transaction. A job no longer queued at that attempt (a duplicate, a
    /// job another worker took) is left alone.
    #[tracing::instrument(name = "worker.lease", skip_all, fields(job_id = %e.aggregate_id, attempt))]
    async fn take_lease(&self, e: &StoredEvent, attempt: u32) -> Result<(), ApplyError> {
        let tenant = e.tenant()?;
        let id = e.id::<JobId>()?;
        let Some(job) = self.commands.load_job(&tenant, id).await.map_err(ApplyError::failed)? else {
            return Ok(());
        };
        if job.status != JobStatus::Queued || job.attempt != attempt {
            return Ok(());
        }
        let now = Utc::now();
        let lease = chrono::Duration::from_std(self.lease).map_err(ApplyError::failed)?;
        let start = JobCommand::Start {
            attempt,
            worker_id: self.worker_id.clone(),
            lease_until: now + lease,
            now,
        };
        match self.job_command(&ctx(e, &tenant, &self.worker_id), id, start).await {
            Ok(()) => {
                tracing::info!(job_id = %id, attempt, "job started");
                Ok(())
            }
            Err(AggregateError::UserError(_)) => Ok(()),
            Err(e) => Err(ApplyError::failed(e)),
        }
    }

    /// The work after the lease, outside any transaction: runs the attempt when the log says
    /// this worker holds its lease, then records the outcome. A redelivery finds the job
    /// running under this worker's lease only while this worker runs it, one message at a
    /// time, so it never starts a second run; another worker, or this one after a restart
    /// (a new id: ids are unique to the process), finds someone else's lease and leaves it to
    /// expire.
    #[tracing::instrument(name = "worker.job", skip_all, fields(job_id = %e.aggregate_id, attempt))]
    async fn run_job(&self, e: &StoredEvent, attempt: u32) -> Result<(), ApplyError> {
        let tenant = e.tenant()?;
        let id = e.id::<JobId>()?;
        let c = ctx(e, &tenant, &self.worker_id);
        let Some(job) = self.commands.load_job(&tenant, id).await.map_err(ApplyError::failed)? else {
            return Ok(());
        };
        let mine = matches!(job.status, JobStatus::Running | JobStatus::CancelRequested)
            && job.attempt == attempt
            && job.worker_id.as_deref() == Some(self.worker_id.as_str());
        if !mine {
            return Ok(());
        }
        let started = Instant::now();
        let job_ref = JobRef {
            c: &c,
            tenant: &tenant,
            id,
            attempt,
        };
        let outcome = self.attempt(&job_ref, &job).await;
        record_attempt(&job, &outcome, started);
        let now = Utc::now();
        let command = match outcome {
            Ok(AttemptEnd::Succeeded(Stored { key, sha256, bytes })) => JobCommand::Succeed {
                attempt,
                manifest_key: key,
                manifest_sha256: sha256,
                usage: Usage {
                    device: self.device.name(),
                    device_seconds: started.elapsed().as_secs_f64(),
                    bytes_written: bytes,
                },
            },
            Ok(AttemptEnd::Cancelled) => JobCommand::ConfirmCancelled { attempt },
            Ok(AttemptEnd::Superseded) => return Ok(()),
            Err(Failure {
                reason,
                retryable,
                stalled,
            }) => JobCommand::Fail {
                attempt,
                reason,
                retryable,
                stalled,
                now,
            },
        };
        tracing::info!(job_id = %id, attempt, ?command, "job ended");
        // The outcome is retried here, with backoff, before giving up: an error would have the
        // message delivered again and the whole attempt run again.
        let mut wait = Duration::from_millis(500);
        loop {
            match self.job_command(&c, id, command.clone()).await {
                Ok(()) | Err(AggregateError::UserError(_)) => return Ok(()),
                Err(e) if wait > Duration::from_secs(16) => return Err(ApplyError::failed(e)),
                Err(e) => {
                    tracing::warn!(job_id = %id, attempt, error = %e, "recording the outcome failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }

    /// One attempt: fetch the slide, run the job's pipeline, store the results. Returns how
    /// it ended, or why it failed.
    #[tracing::instrument(name = "worker.attempt", skip_all, fields(job_id = %job_ref.id, attempt = job_ref.attempt, kind))]
    async fn attempt(&self, job_ref: &JobRef<'_>, job: &mira_aggregates::Job) -> Result<AttemptEnd, Failure> {
        // A kind or parameters this worker cannot read fail the job for good (a retry would
        // read the same), before anything is fetched.
        let spec = match &job.spec {
            None => return Err(Failure::new("the job has no kind", false)),
            Some(JobSpec::Unknown { kind, .. }) => return Err(Failure::from(ProcessError::UnknownKind(kind.clone()))),
            Some(spec) => spec,
        };
        let kind = spec.kind_name();
        tracing::Span::current().record("kind", kind);
        let t = Instant::now();
        let fetched = self.fetch(job_ref, job).await?;
        stage_seconds(kind, "download", t);
        let out = fetched.scratch.join("out");
        let t = Instant::now();
        match self.run_pipeline(job_ref, spec, &fetched, &out).await? {
            Ran::Done(summary, layers) => {
                // What this device processed, and how long it took: megapixels per second.
                let device = if self.device.is_gpu() { "gpu" } else { "cpu" };
                metrics::histogram!("mira_worker_compute_seconds", "device" => device)
                    .record(t.elapsed().as_secs_f64());
                metrics::counter!("mira_worker_pixels_total", "device" => device).increment(fetched.pixels);
                let t = Instant::now();
                let stored = self.store(job_ref, &out, layers).await?;
                stage_seconds(kind, "upload", t);
                let _ = tokio::fs::remove_dir_all(&fetched.scratch).await;
                tracing::info!(job_id = %job_ref.id, attempt = job_ref.attempt, %summary, "results stored");
                Ok(AttemptEnd::Succeeded(stored))
            }
            Ran::Interrupted(Interrupted::Cancelled) => Ok(AttemptEnd::Cancelled),
            Ran::Interrupted(Interrupted::Superseded) => Ok(AttemptEnd::Superseded),
        }
    }

    /// The job's slide, fetched into the attempt's scratch directory and checked against the
    /// bytes verified.
    #[tracing::instrument(name = "worker.fetch", skip_all)]
    async fn fetch(&self, job_ref: &JobRef<'_>, job: &mira_aggregates::Job) -> Result<Fetched, Failure> {
        let (tenant, id, attempt) = (job_ref.tenant, job_ref.id, job_ref.attempt);
        let slide_id = job
            .slide_id
            .ok_or_else(|| Failure::new("the job names no slide", false))?;
        let slide = self
            .commands
            .load_slide(tenant, slide_id)
            .await
            .map_err(|e| Failure::new(e.to_string(), true))?
            .ok_or_else(|| Failure::new("the slide no longer exists", false))?;
        let scratch = self.scratch.join(format!("{id}-{attempt}"));
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        tokio::fs::create_dir_all(&scratch)
            .await
            .map_err(|e| Failure::new(e.to_string(), true))?;
        let input = self
            .store
            .fetch(
                &mira_aggregates::copy_key(&slide.object_key),
                slide.version_id.as_deref(),
                &scratch,
            )
            .await
            .map_err(|e| Failure::new(format!("cannot fetch the slide: {e:#}"), true))?;
        // The bytes verified are the bytes processed: a copy that changed after verification
        // fails the job for good (a retry would fetch the same).
        // A slide verified before the hash was recorded has the one its client declared, which
        // verification checked the copy against; a slide with neither is processed unchecked.
        let verified = slide.verified_sha256.clone().or_else(|| slide.sha256.clone());
        if verified.is_none() {
            tracing::warn!(job_id = %id, slide_id = %slide_id, "the slide was verified before its hash was recorded and declared none: processed without checking its bytes");
        }
        if let Some(want) = verified {
            let path = input.clone();
            let got = tokio::task::spawn_blocking(move || crate::slide::sha256_of(&path))
                .await
                .map_err(|e| Failure::new(e.to_string(), true))?
                .map_err(|e| Failure::new(format!("cannot read the fetched slide: {e}"), true))?;
            if !got.eq_ignore_ascii_case(&want) {
                tracing::error!(job_id = %id, slide_id = %slide_id, verified = %want, fetched = %got, "the slide changed after verification");
                return Err(Failure::new(
                    format!(
                        "the slide's bytes changed after it was verified (verified SHA-256 {want}, fetched {got}): it is not processed"
                    ),
                    false,
                ));
            }
        }
        let pixels = slide
            .metadata
            .as_ref()
            .map(|m| m.width.saturating_mul(m.height))
            .unwrap_or(0);
        Ok(Fetched { scratch, input, pixels })
    }

    /// Runs `spec` on the fetched slide in a child process ([`crate::pipeline::run`] there),
    /// killed when the attempt is stopped, stalls or runs past its budget; nothing the child
    /// does can hold this worker. A [`Heartbeat`] keeps the lease and reports progress
    /// meanwhile.
    async fn run_pipeline(
        &self,
        job_ref: &JobRef<'_>,
        spec: &JobSpec,
        fetched: &Fetched,
        out: &std::path::Path,
    ) -> Result<Ran, Failure> {
        let (progress, progress_rx) = tokio::sync::watch::channel((0u64, 0u64));
        let (stop, finished) = (CancellationToken::new(), CancellationToken::new());
        let beat = tokio::spawn(
            Heartbeat {
                commands: self.commands.clone(),
                c: job_ref.c.clone(),
                tenant: job_ref.tenant.clone(),
                id: job_ref.id,
                attempt: job_ref.attempt,
                lease: self.lease,
                progress_every: self.progress_every,
            }
            .run(progress_rx, stop.clone(), finished.clone()),
        );
        let layers = crate::attempt::LayerUpload {
            store: self.results.clone(),
            prefix: mira_aggregates::results_prefix(job_ref.tenant, job_ref.id, job_ref.attempt),
            settings: self.layer_stream,
        };
        let result = self
            .supervisor
            .run(
                &fetched.input,
                out,
                spec,
                (&self.device, self.reader),
                fetched.pixels,
                &progress,
                &stop,
                Some(&layers),
            )
            .await;
        finished.cancel();
        if let Ok(Some(interrupted)) = beat.await {
            return Ok(Ran::Interrupted(interrupted));
        }
        match result {
            Ok(Ended::Done(summary, layers)) => Ok(Ran::Done(summary, layers)),
            // Stopped without an interruption: the heartbeat's task ended early.
            Ok(Ended::Stopped) => Ok(Ran::Interrupted(Interrupted::Cancelled)),
            Ok(Ended::Failed { reason, retryable }) => Err(Failure::new(reason, retryable)),
            Ok(Ended::Stalled(reason)) => Err(Failure {
                reason,
                retryable: true,
                stalled: true,
            }),
            Ok(Ended::OverBudget(reason)) => Err(Failure::new(reason, false)),
            Err(e) => Err(Failure::new(format!("{e:#}"), true)),
        }
    }

    /// Uploads what the manifest under `out` lists under this attempt's own prefix, with the
    /// layers already streamed there (`layers`, by key) recorded in it, the manifest last.
    #[tracing::instrument(name = "worker.store", skip_all)]
    async fn store(
        &self,
        job_ref: &JobRef<'_>,
        out: &std::path::Path,
        mut layers: std::collections::BTreeMap<String, mira_blobs::stream::Streamed>,
    ) -> Result<Stored, Failure> {
        let (tenant, id, attempt) = (job_ref.tenant, job_ref.id, job_ref.attempt);
        let prefix = mira_aggregates::results_prefix(tenant, id, attempt);
        let bytes = tokio::fs::read(out.join(MANIFEST))
            .await
            .map_err(|e| Failure::new(format!("cannot read the manifest: {e}"), true))?;
        let mut manifest = Manifest::<Listed>::parse(&bytes)
            .map_err(|e| Failure::new(format!("the pipeline wrote an unreadable manifest: {e}"), false))?;
        let cannot_store = |e: mira_blobs::BlobError| Failure::new(format!("cannot store results: {e:#}"), true);
        let mut stored = 0u64;
        // The layers the attempt's process describes are the ones it streamed, byte for byte;
        // what the upload measured (the parts and their hashes) goes into the manifest.
        for (name, entry) in &mut manifest.layers {
            let Some(up) = layers.remove(&entry.key) else {
                return Err(Failure::new(
                    format!(
                        "the manifest lists the layer {name} ({}), which was not streamed: nothing is stored",
                        entry.key
                    ),
                    false,
                ));
            };
            if up.bytes != entry.bytes {
                return Err(Failure::new(
                    format!(
                        "the layer {name} was streamed with {} bytes, not the {} listed",
                        up.bytes, entry.bytes
                    ),
                    false,
                ));
            }
            entry.parts = up.parts;
            entry.sha256_of_parts = Some(up.sha256_of_parts);
            stored += up.bytes;
        }
        if let Some(key) = layers.keys().next() {
            return Err(Failure::new(
                format!("the layer {key} was streamed but the manifest does not list it: nothing is stored"),
                false,
            ));
        }
        for o in &manifest.objects {
            let data = read_listed(out, o).await?;
            stored += data.len() as u64;
            self.results
                .put(&format!("{prefix}{}", o.key), data)
                .await
                .map_err(cannot_store)?;
        }
        let bytes = if manifest.layers.is_empty() {
            bytes
        } else {
            manifest
                .to_bytes()
                .map_err(|e| Failure::new(format!("cannot write the manifest: {e}"), false))?
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        stored += bytes.len() as u64;
        let key = mira_aggregates::manifest_key(tenant, id, attempt);
        self.results.put(&key, bytes).await.map_err(cannot_store)?;
        Ok(Stored {
            key,
            sha256,
            bytes: stored,
        })
    }
}

/// An object the manifest lists, read from the attempt's output directory. The attempt's process
/// wrote the list, and it is not trusted: a key outside the directory, a link (to the worker's
/// own `/proc/<pid>/environ`, say) or anything but a regular file of the listed size is refused
/// for good, so nothing but the attempt's own files is ever stored as results.
async fn read_listed(out: &std::path::Path, o: &crate::process::ManifestObject) -> Result<Vec<u8>, Failure> {
    let refuse = |why: &str| {
        Failure::new(
            format!("the manifest lists {:?}, which {why}: nothing is stored", o.key),
            false,
        )
    };
    if !mira_blobs::valid_key(&o.key) {
        return Err(refuse("is not a key inside the results"));
    }
    let path = out.join(&o.key);
    let meta = tokio::fs::symlink_metadata(&path)
        .await
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", o.key), true))?;
    if !meta.file_type().is_file() {
        return Err(refuse("is not a regular file the attempt wrote"));
    }
    if meta.len() != o.bytes {
        return Err(refuse(&format!(
            "holds {} bytes, not the {} listed",
            meta.len(),
            o.bytes
        )));
    }
    tokio::fs::read(&path)
        .await
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", o.key), true))
}

/// The attempt a worker runs, and the context its commands carry.
struct JobRef<'a> {
    c: &'a CommandContext,
    tenant: &'a TenantId,
    id: JobId,
    attempt: u32,
}

/// The job's slide in the attempt's scratch directory.
struct Fetched {
    scratch: PathBuf,
    input: PathBuf,
    /// The slide's pixels, as verification recorded them (the attempt's time budget).
    pixels: u64,
}

/// How the pipeline ended, when it did not fail.
enum Ran {
    /// The results and their manifest are in the output directory and the layers stored; the
    /// pipeline's summary.
    Done(
        serde_json::Value,
        std::collections::BTreeMap<String, mira_blobs::stream::Streamed>,
    ),
    Interrupted(Interrupted),
}

/// What stopped an attempt from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupted {
    /// A user cancelled the job.
    Cancelled,
    /// Another attempt owns the job now; this one records nothing.
    Superseded,
}

/// While an attempt runs: the job's state is read every 2 s at most (a read, nothing appended)
/// to notice a cancellation; the lease is extended every third of its length (the handlers
/// schedule its expiry from these events); progress is recorded at most every
/// `Worker__ProgressSeconds` and only when it moved. A refused heartbeat or progress
/// (cancelled, superseded) stops the attempt too.
struct Heartbeat {
    commands: Commands,
    c: CommandContext,
    tenant: TenantId,
    id: JobId,
    attempt: u32,
    lease: Duration,
    progress_every: Duration,
}

impl Heartbeat {
    /// Beats until `finished`; cancels `stop` and says why when the attempt must stop.
    async fn run(
        self,
        progress: tokio::sync::watch::Receiver<(u64, u64)>,
        stop: CancellationToken,
        finished: CancellationToken,
    ) -> Option<Interrupted> {
        let (id, attempt) = (self.id, self.attempt);
        let renew_every = self.lease / 3;
        let tick = renew_every.min(Duration::from_secs(2));
        let (mut renewed, mut progressed) = (tokio::time::Instant::now(), tokio::time::Instant::now());
        let mut reported = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = finished.cancelled() => return None,
            }
            let interrupted = match self.commands.load_job(&self.tenant, id).await {
                Ok(Some(job)) if job.status == JobStatus::CancelRequested => {
                    tracing::info!(job_id = %id, attempt, "cancellation requested: stopping the attempt");
                    Some(Interrupted::Cancelled)
                }
                Ok(Some(job)) if job.attempt != attempt || job.status != JobStatus::Running => {
                    Some(Interrupted::Superseded)
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the job's state failed");
                    None
                }
            };
            let mut commands = Vec::new();
            if interrupted.is_none() && renewed.elapsed() >= renew_every {
                renewed = tokio::time::Instant::now();
                let until = Utc::now() + chrono::Duration::from_std(self.lease).unwrap_or_default();
                commands.push(JobCommand::Heartbeat {
                    attempt,
                    lease_until: until,
                });
            }
            let (done, total) = *progress.borrow();
            if interrupted.is_none() && total > 0 && done > reported && progressed.elapsed() >= self.progress_every {
                reported = done;
                progressed = tokio::time::Instant::now();
                commands.push(JobCommand::Progress { attempt, done, total });
            }
            let mut interrupted = interrupted;
            for command in commands {
                match self.commands.job(&self.c, id, command).await {
                    Ok(()) => {}
                    Err(AggregateError::UserError(JobError::CancelRequested)) => {
                        interrupted = Some(Interrupted::Cancelled);
                        break;
                    }
                    Err(AggregateError::UserError(_)) => {
                        interrupted = Some(Interrupted::Superseded);
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "recording the attempt's heartbeat or progress failed"),
                }
            }
            if interrupted.is_some() {
                stop.cancel();
                return interrupted;
            }
        }
    }
}

/// Why an attempt failed: the reason recorded, whether a retry can help, and whether it was
/// killed for making no progress.
#[derive(Debug)]
struct Failure {
    reason: String,
    retryable: bool,
    stalled: bool,
}

impl Failure {
    fn new(reason: impl Into<String>, retryable: bool) -> Self {
        Self {
            reason: reason.into(),
            retryable,
            stalled: false,
        }
    }
}

impl From<ProcessError> for Failure {
    fn from(e: ProcessError) -> Self {
        Self::new(format!("{e:#}"), e.retryable())
    }
}

/// Where an attempt's results were stored.
struct Stored {
    key: String,
    sha256: String,
    bytes: u64,
}

/// How an attempt ended, when it did not fail.
enum AttemptEnd {
    Succeeded(Stored),
    Cancelled,
    /// Another attempt owns the job now; this one records nothing.
    Superseded,
}

fn queued_attempt(e: &StoredEvent) -> Result<Option<u32>, ApplyError> {
    if (e.aggregate_type.as_str(), e.event_type.as_str()) != ("Job", "JobQueued") {
        return Ok(None);
    }
    match e.decode::<JobEvent>()? {
        JobEvent::JobQueued { attempt, .. } => Ok(Some(attempt)),
        _ => Ok(None),
    }
}

/// The consumer's transaction holds only the lease and the record; downloads, verification
/// and the pipeline run after it committed (DESIGN §4.1).
#[async_trait::async_trait]
impl Apply for Worker {
    async fn apply(&self, _tx: &mut PgConnection, e: &StoredEvent) -> Result<(), ApplyError> {
        match queued_attempt(e)? {
            Some(attempt) => self.take_lease(e, attempt).await,
            None => Ok(()),
        }
    }

    async fn after_commit(&self, e: &StoredEvent) -> Result<(), ApplyError> {
        if (e.aggregate_type.as_str(), e.event_type.as_str()) == ("Slide", "SlideUploaded") {
            return self.verify(e).await;
        }
        match queued_attempt(e)? {
            Some(attempt) => self.run_job(e, attempt).await,
            None => Ok(()),
        }
    }
}

/// `mira-worker run` until `shutdown`; the job in hand is finished first. Kernels run on
/// `device` (see [`crate::kernels::choose`]). A `SlideUploaded` that reaches `gpu-jobs` (one
/// published before the `verify` queue split them) is still verified here.
pub async fn run(
    settings: Settings,
    worker_id: String,
    device: Device,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (url, pool, worker) = start(&settings, worker_id, device).await?;
    // STAT jobs first: `gpu-jobs-stat` is polled before each receive from `gpu-jobs` (ADR 0027).
    consume(
        &settings,
        &url,
        pool,
        &[Group::GpuJobsStat, Group::GpuJobs],
        "worker",
        Arc::new(worker),
        shutdown,
    )
    .await
}

/// `mira-worker verify` until `shutdown` (ADR 0026): the consumer of the `verify` queue, on
/// CPUs. It verifies uploaded slides and nothing else, so no upload wakes a GPU node.
pub async fn verify(settings: Settings, worker_id: String, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (url, pool, worker) = start(&settings, worker_id, Device::Cpu).await?;
    let verifier = Verifier(worker);
    consume(
        &settings,
        &url,
        pool,
        &[Group::Verify],
        "verifier",
        Arc::new(verifier),
        shutdown,
    )
    .await
}

/// `mira-worker export`: a succeeded job's layers written as DeepZoom trees under `dir`
/// (`slide.dzi` and `slide_files/`, `normalized.dzi` and `normalized_files/` for a
/// stain-normalised job) with the job's tile size, overlap and format. The manifest is checked
/// against the hash the log recorded, and each layer against its parts' hashes, before a pixel
/// is read. Returns what was written.
pub async fn export(settings: Settings, tenant: TenantId, id: JobId, dir: PathBuf) -> anyhow::Result<Vec<String>> {
    let (_, _pool, worker) = start(&settings, format!("export-{}", std::process::id()), Device::Cpu).await?;
    let job = worker
        .commands
        .load_job(&tenant, id)
        .await?
        .with_context(|| format!("tenant {tenant} has no job {id}"))?;
    let (Some(key), Some(sha256), JobStatus::Succeeded) = (&job.manifest_key, &job.manifest_sha256, job.status) else {
        anyhow::bail!("the job is {}: it has no results", job.status.as_str());
    };
    let scratch = worker.scratch.join(format!("export-{id}"));
    tokio::fs::create_dir_all(&scratch).await?;
    let result = async {
        let path = worker.results.fetch_as(key, None, &scratch, "manifest.json").await?;
        let bytes = tokio::fs::read(&path).await?;
        anyhow::ensure!(
            hex::encode(Sha256::digest(&bytes)) == *sha256,
            "the manifest {key} is not the one the log recorded (its SHA-256 differs)"
        );
        let manifest = Manifest::<crate::process::Pyramid>::parse(&bytes).context("the manifest")?;
        anyhow::ensure!(
            !manifest.layers.is_empty(),
            "the job's results are a DeepZoom tree already (manifest format_version {}): copy its files",
            manifest.format_version
        );
        let prefix = key.trim_end_matches(MANIFEST);
        let deepzoom = &manifest.results.deepzoom;
        tokio::fs::create_dir_all(&dir).await?;
        let mut written = Vec::new();
        for (name, entry) in &manifest.layers {
            let layer = worker
                .results
                .fetch_as(&format!("{prefix}{}", entry.key), None, &scratch, &entry.key)
                .await?;
            check_parts(&layer, entry).await?;
            let mut opts = crate::process::Options::new(deepzoom.format);
            opts.tile_size = deepzoom.tile_size;
            opts.overlap = deepzoom.overlap;
            opts.quality = deepzoom.quality;
            opts.tissue = false;
            let out = scratch.join(format!("tree-{name}"));
            let into = out.clone();
            tokio::task::spawn_blocking(move || crate::process::process(&layer, &into, &opts, |_, _| {})).await??;
            for (from, to) in [
                ("slide.dzi".to_owned(), format!("{name}.dzi")),
                ("slide_files".to_owned(), format!("{name}_files")),
            ] {
                let target = dir.join(&to);
                if tokio::fs::metadata(&target).await.is_ok() {
                    anyhow::bail!("{} exists: export into an empty directory", target.display());
                }
                tokio::fs::rename(out.join(&from), &target).await?;
                written.push(to);
            }
        }
        Ok(written)
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    result
}

/// A layer read back is the one uploaded: its bytes, cut where its parts were, hash to the
/// parts' SHA-256 recorded in the manifest.
async fn check_parts(path: &std::path::Path, entry: &mira_blobs::layers::LayerEntry) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    anyhow::ensure!(
        f.metadata().await?.len() == entry.bytes,
        "the layer {} is not the size the manifest says",
        entry.key
    );
    anyhow::ensure!(
        !entry.parts.is_empty(),
        "the manifest records no parts for the layer {}",
        entry.key
    );
    for (i, part) in entry.parts.iter().enumerate() {
        let mut buf = vec![0u8; part.bytes as usize];
        f.read_exact(&mut buf).await?;
        anyhow::ensure!(
            hex::encode(Sha256::digest(&buf)) == part.sha256,
            "part {} of the layer {} is not the one uploaded",
            i + 1,
            entry.key
        );
    }
    Ok(())
}

/// The verifier: [`Worker`]'s slide verification alone. It takes no lease and runs no job,
/// whatever reaches its queue.
struct Verifier(Worker);

#[async_trait::async_trait]
impl Apply for Verifier {
    async fn apply(&self, _tx: &mut PgConnection, _e: &StoredEvent) -> Result<(), ApplyError> {
        Ok(())
    }

    async fn after_commit(&self, e: &StoredEvent) -> Result<(), ApplyError> {
        if (e.aggregate_type.as_str(), e.event_type.as_str()) == ("Slide", "SlideUploaded") {
            return self.0.verify(e).await;
        }
        Ok(())
    }
}

/// The worker's login (its URL, checked to hold `mira_worker`), and a [`Worker`] on it as the
/// settings say.
async fn start(
    settings: &Settings,
    worker_id: String,
    device: Device,
) -> anyhow::Result<(String, sqlx::PgPool, Worker)> {
    let (url, setting) = settings.login_url(mira_config::DbProcess::Worker)?;
    let url = url.to_owned();
    let pool = mira_eventlog::db::connect(
        &url,
        settings.database.max_connections,
        Duration::from_secs(settings.database.connect_timeout_seconds),
    )
    .await
    .with_context(|| setting.to_owned())?;
    // The worker's own login, holding mira_worker only (ADR 0012): it appends and reads the
    // log but cannot write the read models or the handlers' tables. The verifier uses it too.
    if !mira_eventlog::migrate::holds_role(&pool, "mira_worker").await? {
        let role = mira_eventlog::migrate::current_role(&pool).await.unwrap_or_default();
        anyhow::bail!(
            "the worker connects as {role} ({setting}), which does not hold mira_worker: set Database__Logins__Worker (or DATABASE_URL) to the worker's login (mira_svc_worker unless that setting names another; mira migrate creates it)"
        );
    }
    let keyring = mira_keys::keyring(settings, &pool).await?;
    let commands = Commands::new(EventLog::new(pool.clone()), keyring);
    let (store, results) = stores_from_settings(settings).await?;
    let scratch = std::env::temp_dir().join(format!("mira-worker-{worker_id}"));
    let worker = Worker::new(
        commands,
        store,
        worker_id,
        Duration::from_secs(settings.worker.lease_seconds),
        scratch,
        device,
    )
    .with_results_store(results)
    .with_band_pause(Duration::from_millis(settings.worker.band_pause_millis))
    .with_stall_guard(
        Duration::from_secs(settings.worker.stall_seconds),
        Duration::from_secs(settings.worker.max_attempt_seconds),
    )
    .with_hang_at_band(settings.worker.test_hang_at_band)
    .with_slide_limits(
        settings.worker.max_slide_pixels,
        settings.worker.memory_budget_bytes,
        settings.worker.seconds_per_gigapixel,
    )
    .with_allocate_bytes(settings.worker.test_allocate_bytes)
    .with_progress_every(Duration::from_secs(settings.worker.progress_seconds))
    .with_reader(settings.worker.slide_reader.into())
    .with_layer_stream(settings.worker.layer_part_bytes, settings.worker.layer_upload_parallel);
    Ok((url, pool, worker))
}

/// Consumes `groups`' queues with `apply` until `shutdown`, each before the next, under the
/// last one's consumer ([`Group::consumer`]); the work in hand gets `Worker__DrainSeconds`.
/// With the in-memory bus (`mira dev`) a private relay named `relay_name` feeds them from the
/// log.
async fn consume(
    settings: &Settings,
    url: &str,
    pool: sqlx::PgPool,
    groups: &[Group],
    relay_name: &str,
    apply: Arc<dyn Apply>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let group = *groups.last().context("no queue to consume")?;
    let mut cfg = ConsumerConfig::for_group(group);
    cfg.also = groups[..groups.len() - 1].to_vec();
    cfg.batch = 1;
    cfg.slow_retry = mira_bus::consumer::SlowRetry::from_settings(&settings.messaging);
    let mut relay = None;
    let bus: Arc<dyn Bus> = match settings.messaging.provider {
        MessagingProvider::Aws => {
            let sdk = mira_bus::aws::sdk_config(settings.aws.region.as_deref()).await;
            Arc::new(mira_bus::aws::AwsBus::connect(&sdk, &mira_bus::Names::from_settings(settings), None).await?)
        }
        MessagingProvider::InMemory => {
            let bus = mira_bus::memory::MemoryBus::new(Duration::from_secs(120), 10, groups);
            // No checkpoints: the platform's own relay writes them.
            let r = mira_bus::relay::Relay::from_settings(
                settings,
                relay_name,
                EventLog::new(pool.clone()),
                Arc::new(bus.clone()),
                None,
            );
            // What the last worker's bus held died with it; its consumer records skip the rest.
            r.forget_cursor().await?;
            let (url, stop) = (url.to_owned(), shutdown.clone());
            relay = Some(tokio::spawn(async move { r.run(&url, stop).await }));
            Arc::new(bus)
        }
    };
    let queue = groups[..groups.len() - 1]
        .iter()
        .rev()
        .fold(bus.queue(group), |then, g| -> Arc<dyn mira_bus::Queue> {
            let first = mira_bus::priority::FirstThen::new(bus.queue(*g), then);
            Arc::new(match settings.messaging.provider {
                MessagingProvider::Aws => first.with_first_wait(mira_bus::priority::SQS_FIRST_WAIT),
                MessagingProvider::InMemory => first,
            })
        });
    let names: Vec<&str> = groups.iter().map(|g| g.suffix()).collect();
    tracing::info!(queues = ?names, "worker ready");
    let consumer = Consumer::new(EventLog::new(pool), queue, apply, cfg);
    let drain = Duration::from_secs(settings.worker.drain_seconds);
    let consuming = consumer.run(shutdown.clone());
    tokio::pin!(consuming);
    // On a signal the work in hand gets `Worker__DrainSeconds`; past that a job's attempt is
    // abandoned: nothing more is recorded for it, its lease runs out, and the lifecycle
    // handlers give the job to another attempt. A verification abandoned is redelivered.
    let r = tokio::select! {
        r = &mut consuming => r,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::warn!(
                drain_s = drain.as_secs(),
                "the work in hand did not finish within Worker__DrainSeconds: abandoning it (a job's lease expires and the job is retried)"
            );
            Ok(())
        }
    };
    shutdown.cancel();
    if let Some(r) = relay {
        r.await??;
    }
    Ok(r?)
}

/// `mira_job_stage_seconds{kind,stage}` for a stage the worker runs itself.
fn stage_seconds(kind: &str, stage: &'static str, began: Instant) {
    metrics::histogram!("mira_job_stage_seconds", "kind" => kind.to_owned(), "stage" => stage)
        .record(began.elapsed().as_secs_f64());
}

/// `mira_job_seconds{kind,outcome}` and `mira_jobs_finished_total{kind,outcome}` for an attempt.
fn record_attempt(job: &mira_aggregates::Job, outcome: &Result<AttemptEnd, Failure>, began: Instant) {
    let kind = match &job.spec {
        Some(JobSpec::Unknown { .. }) | None => "unknown",
        Some(spec) => spec.kind().map_or("unknown", mira_events::params::JobKind::as_str),
    };
    let outcome = match outcome {
        Ok(AttemptEnd::Succeeded(_)) => "succeeded",
        Ok(AttemptEnd::Cancelled) => "cancelled",
        Ok(AttemptEnd::Superseded) => "superseded",
        Err(Failure { stalled: true, .. }) => "stalled",
        Err(Failure { retryable: true, .. }) => "retry",
        Err(_) => "failed",
    };
    let labels = [("kind", kind), ("outcome", outcome)];
    metrics::histogram!("mira_job_seconds", &labels).record(began.elapsed().as_secs_f64());
    metrics::counter!("mira_jobs_finished_total", &labels).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ManifestObject;

    fn listed(key: &str, bytes: u64) -> ManifestObject {
        ManifestObject {
            key: key.into(),
            bytes,
            sha256: String::new(),
        }
    }

    /// Only the attempt's own regular files, of the size listed, are stored: a link to the
    /// worker's environment, a key outside the directory, or a device are refused for good.
    #[tokio::test]
    async fn only_the_attempts_own_files_are_stored() {
        let out = std::env::temp_dir().join(format!("mira-listed-{}", std::process::id()));
        std::fs::create_dir_all(out.join("slide_files/0")).unwrap();
        std::fs::write(out.join("slide_files/0/0_0.jpeg"), b"abc").unwrap();
        std::os::unix::fs::symlink("/proc/self/environ", out.join("slide.dzi")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", out.join("stats.json")).unwrap();
        assert_eq!(
            read_listed(&out, &listed("slide_files/0/0_0.jpeg", 3)).await.unwrap(),
            b"abc"
        );
        for (o, why) in [
            (listed("slide.dzi", 3), "regular file"),
            (listed("stats.json", 0), "regular file"),
            (listed("../secret", 3), "inside the results"),
            (listed("/etc/hostname", 3), "inside the results"),
            (listed("slide_files/0/0_0.jpeg", 4), "not the 4 listed"),
        ] {
            let e = read_listed(&out, &o).await.unwrap_err();
            assert!(!e.retryable, "{}", e.reason);
            assert!(e.reason.contains(why), "{}: {}", o.key, e.reason);
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}
