//! The outbox relay (DESIGN §5.1): follows the log from a durable cursor and publishes every
//! settled event. The cursor advances only after the topic accepted every event up to it, so
//! a crash between publish and cursor update republishes (FIFO deduplication by event id
//! absorbs most repeats, and consumers are idempotent for the rest); nothing is lost.
//!
//! One relay is active at a time: it holds a session advisory lock on a connection of its
//! own for as long as it runs. A standby waits for the lock.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use mira_eventlog::checkpoint::{CheckpointError, CheckpointInfo, Checkpointer};
use mira_eventlog::{Cursor, EventLog, StoredEvent};
use sqlx::{Connection, PgConnection, Row};
use tokio_util::sync::CancellationToken;

use crate::message::EventMessage;
use crate::{BusError, Publisher};

const LOCK_KEY: i64 = 0x6d69_7261_7265_6c61; // "mirarela"

/// One active relay per name: the main relay, and private ones (a `mira dev` worker feeding
/// its own in-memory bus) that keep their own cursor.
fn lock_key(name: &str) -> i64 {
    if name == "main" {
        return LOCK_KEY;
    }
    // FNV-1a: stable across builds, unlike the standard hasher.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    LOCK_KEY ^ h as i64
}
/// SNS `PublishBatch` takes at most ten entries.
pub const PUBLISH_BATCH: usize = 10;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub name: String,
    /// Events read from the log per round.
    pub read_batch: i64,
    /// Pause when the log has nothing new.
    pub idle_poll: Duration,
    pub checkpoint_every_events: u64,
    pub checkpoint_every: Duration,
    pub max_backoff: Duration,
}

impl RelayConfig {
    /// How a relay named `name` runs: checkpoints as `Audit__*` say; an idle relay asks for
    /// new events every 10 ms (one index probe that finds nothing, cheap for PostgreSQL, and
    /// it bounds how long an event waits).
    pub fn from_settings(settings: &mira_config::Settings, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            checkpoint_every_events: settings.audit.checkpoint_every_events,
            checkpoint_every: Duration::from_secs(settings.audit.checkpoint_every_seconds),
            idle_poll: Duration::from_millis(10),
            ..Default::default()
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            name: "main".into(),
            read_batch: 500,
            idle_poll: Duration::from_millis(50),
            checkpoint_every_events: 1000,
            checkpoint_every: Duration::from_secs(60),
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database error in the relay: {0}")]
    Db(#[from] sqlx::Error),
    #[error("publishing failed: {0}")]
    Bus(#[from] BusError),
    #[error("the relay lost its lock connection")]
    LostLock,
}

/// Events published but whose cursor is not yet stored.
#[derive(Debug, Clone)]
pub struct Published {
    pub upto: Cursor,
    pub events: u64,
}

pub struct Relay {
    log: EventLog,
    publisher: Arc<dyn Publisher>,
    cfg: RelayConfig,
    checkpoints: Option<Checkpointer>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("cfg", &self.cfg).finish()
    }
}

impl Relay {
    /// The relay named `name` over `log` into `publisher`, configured as
    /// [`RelayConfig::from_settings`]: the one way a relay is made, by the platform's roles and
    /// by the worker's private relay. `checkpoints`: who signs and witnesses checkpoints, if
    /// this relay writes them.
    pub fn from_settings(
        settings: &mira_config::Settings,
        name: &str,
        log: EventLog,
        publisher: Arc<dyn Publisher>,
        checkpoints: Option<mira_eventlog::checkpoint::Checkpointer>,
    ) -> Self {
        Self::new(log, publisher, RelayConfig::from_settings(settings, name), checkpoints)
    }

    pub fn new(
        log: EventLog,
        publisher: Arc<dyn Publisher>,
        cfg: RelayConfig,
        checkpoints: Option<Checkpointer>,
    ) -> Self {
        Self {
            log,
            publisher,
            cfg,
            checkpoints,
        }
    }

    /// The durable cursor.
    /// Forgets this relay's cursor, so it publishes the whole log again. For a relay feeding
    /// the in-memory bus: what it published before this process started died with the last
    /// process, whether or not a consumer had taken it, so the cursor it left is no promise.
    /// Consumers keep their own records and skip what they have applied.
    pub async fn forget_cursor(&self) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM relay_cursor WHERE name = $1")
            .bind(&self.cfg.name)
            .execute(self.log.pool())
            .await?;
        Ok(())
    }

    pub async fn cursor(&self) -> Result<Cursor, sqlx::Error> {
        let row = sqlx::query("SELECT tx_id::text::bigint AS tx_id, position FROM relay_cursor WHERE name = $1")
            .bind(&self.cfg.name)
            .fetch_optional(self.log.pool())
            .await?;
        Ok(match row {
            Some(r) => Cursor {
                tx_id: r.try_get("tx_id")?,
                position: r.try_get("position")?,
            },
            None => Cursor::START,
        })
    }

    /// Publishes the next settled events after the cursor, retrying failed entries with
    /// backoff until the topic accepted all of them. Does not move the cursor.
    pub async fn publish_next(&self, shutdown: &CancellationToken) -> Result<Option<Published>, RelayError> {
        let cursor = self.cursor().await?;
        let events = self.log.read_after(cursor, self.cfg.read_batch).await?;
        let Some(last) = events.last() else {
            return Ok(None);
        };
        let upto = last.cursor();
        for chunk in events.chunks(PUBLISH_BATCH) {
            // One batch carries events of many traces: its span links to each event's.
            let span = tracing::info_span!("relay.publish", events = chunk.len());
            for e in chunk {
                if let Some(tp) = e.traceparent() {
                    mira_telemetry::link(&span, &tp);
                }
            }
            let t = mira_telemetry::prom::Timer::start();
            self.publish_all(chunk, shutdown).instrument(span).await?;
            t.record(metrics::histogram!("mira_relay_publish_seconds"));
            metrics::histogram!("mira_relay_batch_events").record(chunk.len() as f64);
            metrics::counter!("mira_relay_published_events_total").increment(chunk.len() as u64);
        }
        Ok(Some(Published {
            upto,
            events: events.len() as u64,
        }))
    }

    async fn publish_all(&self, chunk: &[StoredEvent], shutdown: &CancellationToken) -> Result<(), RelayError> {
        let mut pending: Vec<EventMessage> = chunk.iter().map(EventMessage::from).collect();
        let mut backoff = Duration::from_millis(100);
        loop {
            let failed = match self.publisher.publish(&pending).await {
                Ok(failed) => failed,
                Err(e) => {
                    tracing::warn!(error = %e, "publish failed; retrying the whole batch");
                    (0..pending.len()).collect()
                }
            };
            if failed.is_empty() {
                return Ok(());
            }
            tracing::warn!(
                failed = failed.len(),
                of = pending.len(),
                "publish partly failed; retrying those entries"
            );
            pending = failed.into_iter().filter_map(|i| pending.get(i).cloned()).collect();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return Err(RelayError::Bus(BusError::Transport("shut down while retrying a publish".into()))),
            }
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
    }

    /// Stores the cursor after a publish was accepted.
    pub async fn commit(&self, p: &Published) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO relay_cursor (name, tx_id, position, published) VALUES ($1, $2::text::xid8, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, \
             published = relay_cursor.published + EXCLUDED.published, updated_at = now()",
        )
        .bind(&self.cfg.name)
        .bind(p.upto.tx_id.to_string())
        .bind(p.upto.position)
        .bind(p.events as i64)
        .execute(self.log.pool())
        .await?;
        Ok(())
    }

    /// Publishes and commits until the log is drained; returns the events published.
    pub async fn drain(&self, shutdown: &CancellationToken) -> Result<u64, RelayError> {
        let mut n = 0;
        while let Some(p) = self.publish_next(shutdown).await? {
            self.commit(&p).await?;
            n += p.events;
        }
        Ok(n)
    }

    /// Runs until `shutdown`: waits for the relay lock, then publishes, commits and writes
    /// checkpoints every `checkpoint_every_events` events or `checkpoint_every`.
    pub async fn run(&self, database_url: &str, shutdown: CancellationToken) -> Result<(), RelayError> {
        let mut lock = PgConnection::connect(database_url).await?;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(lock_key(&self.cfg.name))
                .fetch_one(&mut lock)
                .await?;
            if got {
                break;
            }
            tracing::info!("another relay is active; standing by");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        tracing::info!(name = %self.cfg.name, "relay active");
        let mut since_checkpoint = 0u64;
        let mut last_checkpoint = Instant::now();
        // Checkpoints are written beside publishing, one at a time: a witness that is slow or
        // unreachable delays checkpoints, never fan-out.
        let mut writing: Option<tokio::task::JoinHandle<Result<Option<CheckpointInfo>, CheckpointError>>> = None;
        // After a witness conflict, the epoch it happened in: checkpointing stays stopped until
        // an operator starts a new epoch (`mira audit new-epoch`) or restarts the relay.
        let mut stopped_in: Option<uuid::Uuid> = None;
        while !shutdown.is_cancelled() {
            if lock.ping().await.is_err() {
                return Err(RelayError::LostLock);
            }
            let published = match self.publish_next(&shutdown).await {
                Ok(p) => p,
                Err(e) if shutdown.is_cancelled() => {
                    tracing::info!(error = %e, "stopping");
                    break;
                }
                Err(e) => return Err(e),
            };
            if let Some(p) = &published {
                self.commit(p).await?;
                since_checkpoint += p.events;
            }
            if let Some(checkpoints) = &self.checkpoints {
                if writing.as_ref().is_some_and(|h| h.is_finished()) {
                    let r = writing.take().expect("checked").await;
                    match r {
                        Ok(Ok(None)) => {}
                        Ok(Ok(Some(info))) if info.written == 0 => {}
                        Ok(Ok(Some(info))) => tracing::info!(
                            seq = info.seq,
                            written = info.written,
                            rolled_forward = info.rolled_forward,
                            events = info.event_count,
                            witness = %info.witness,
                            "checkpoint written"
                        ),
                        Ok(Err(e @ CheckpointError::Conflict { .. })) => {
                            let epochs = mira_eventlog::checkpoint::db_epochs(self.log.pool()).await?;
                            stopped_in = Some(epochs.last().map_or(uuid::Uuid::nil(), |e| e.epoch));
                            tracing::error!(
                                error = %e,
                                conflicts = checkpoints.health.conflicts(),
                                "WITNESS CONFLICT: checkpointing stopped, publishing goes on; see docs/runbooks/verify.md"
                            );
                        }
                        // Nothing was written; the next round tries again.
                        // A probe of an idle witness (no checkpoint was due).
                        Ok(Err(CheckpointError::Witness { seq: 0, source })) => {
                            tracing::error!(error = %source, "the witness did not answer")
                        }
                        Ok(Err(e @ CheckpointError::Witness { .. })) => {
                            tracing::error!(error = %e, "checkpoint not written: the witness did not take it")
                        }
                        Ok(Err(CheckpointError::Db(e))) => return Err(e.into()),
                        Err(e) => tracing::error!(error = %e, "the checkpoint writer panicked"),
                    }
                }
                let due = since_checkpoint >= self.cfg.checkpoint_every_events
                    || (since_checkpoint > 0 && last_checkpoint.elapsed() >= self.cfg.checkpoint_every);
                if let Some(epoch) = stopped_in.filter(|_| due) {
                    let now = mira_eventlog::checkpoint::db_epochs(self.log.pool())
                        .await?
                        .pop()
                        .map(|e| e.epoch);
                    if now.is_some_and(|n| n != epoch) {
                        tracing::warn!("a new epoch was started: checkpointing resumes");
                        stopped_in = None;
                    } else {
                        tracing::error!(
                            conflicts = checkpoints.health.conflicts(),
                            "checkpointing is stopped after a witness conflict; see docs/runbooks/verify.md"
                        );
                        since_checkpoint = 0;
                        last_checkpoint = Instant::now();
                    }
                }
                if due && writing.is_none() && stopped_in.is_none() {
                    let (c, pool) = (checkpoints.clone(), self.log.pool().clone());
                    writing = Some(tokio::spawn(async move { c.write_due(&pool).await.map(Some) }));
                    since_checkpoint = 0;
                    last_checkpoint = Instant::now();
                } else if since_checkpoint == 0
                    && writing.is_none()
                    && stopped_in.is_none()
                    && last_checkpoint.elapsed() >= self.cfg.checkpoint_every
                {
                    // Nothing to checkpoint: show that the witness still answers.
                    let (c, pool) = (checkpoints.clone(), self.log.pool().clone());
                    writing = Some(tokio::spawn(async move { c.probe(&pool).await.map(|()| None) }));
                    last_checkpoint = Instant::now();
                }
            }
            if published.is_none() {
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.idle_poll) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
        if let Some(mut h) = writing {
            // A checkpoint half written (in the witness, not the database) is rolled forward
            // by the next writer; waiting briefly keeps that rare, and a hung witness does not
            // hold the drain.
            if tokio::time::timeout(Duration::from_secs(2), &mut h).await.is_err() {
                h.abort();
            }
        }
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(lock_key(&self.cfg.name))
            .execute(&mut lock)
            .await;
        Ok(())
    }
}
