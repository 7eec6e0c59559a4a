//! The consumer runtime every consumer shares (DESIGN §5.3).
//!
//! A message is a notification, not the truth: for each one the runtime looks its event up
//! in the log by id, in the consumer's transaction, and goes on only when the log holds the
//! same event. A message whose event is not in the log is left for the dead-letter queue; it
//! never parks or advances an aggregate. Then, in that transaction, it locks the consumer's
//! record of the aggregate, applies the event's effect through its [`Apply`] and advances
//! the record; only after the commit is the message deleted. So duplicates, redelivery and
//! crashes change nothing: a redelivered event is at or below the record and is skipped.
//!
//! Per aggregate, events apply in sequence. An event ahead of the record (a gap) makes the
//! runtime read the missing events from the log itself and apply them first, in order.
//!
//! Slow work (a download, a GPU job) never runs in the transaction (DESIGN §4.1): the
//! consumer's [`Apply::after_commit`] runs it once the record committed, outside any
//! transaction, before the message is deleted.
//!
//! An event whose effect keeps failing parks its aggregate for this consumer after
//! `park_after_receives` deliveries: later events of that aggregate are set aside (recorded,
//! not dead-lettered one by one) while other aggregates flow on. `mira dlq redrive` requests a
//! redrive; the consumer then replays the aggregate from the log and un-parks it.
//!
//! Slow work that fails (a verification whose slide cannot be read yet, a fetch S3 throttles)
//! is not redelivered every few hundred milliseconds into the dead-letter queue: its retry is
//! scheduled in the due-time table (`due_work`, kind `slow-work:<consumer>`) with exponential
//! backoff (`Messaging__SlowRetry…`) and the message is deleted. The consumer runs what is due
//! between receives; after the last try the aggregate is parked with the reason, and a redrive
//! runs the work again (DESIGN §5.3, ADR 0025).

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use mira_eventlog::{EventLog, StoredEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::message::EventMessage;
use crate::{Delivery, Group, Queue};

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The consumer's own step failed (a command, a fetch); the error says which.
    #[error("{0}")]
    Failed(Box<dyn std::error::Error + Send + Sync>),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The event does not read as its consumer expects.
    #[error(transparent)]
    Decode(#[from] mira_eventlog::repo::DecodeError),
}

impl ApplyError {
    /// A failure of the consumer's own: any error, or a reason in words.
    pub fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Failed(e.into())
    }
}

/// A consumer's effect. `apply` runs inside the consumer's transaction; whatever it writes
/// commits together with the consumer's record of having applied the event. It must be quick:
/// the transaction holds a row lock for as long as it runs. It cannot append to the log
/// through `tx` (the transaction already holds an id; DESIGN §4.1): commands go through their
/// own short transactions, and must be safe to repeat, since a crash before the record
/// commits delivers the event again.
#[async_trait::async_trait]
pub trait Apply: Send + Sync {
    async fn apply(&self, tx: &mut PgConnection, event: &StoredEvent) -> Result<(), ApplyError>;

    /// Slow work the event calls for, run outside any transaction after the effect and the
    /// record committed, and before the message is deleted. It also runs for a redelivered
    /// event that was already applied (a crash may have cut the work short), so it must judge
    /// from the log whether the work is still due. An error leaves the message to be delivered
    /// again.
    async fn after_commit(&self, _event: &StoredEvent) -> Result<(), ApplyError> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer's name; its records are kept under it.
    pub name: String,
    pub batch: usize,
    pub wait: Duration,
    /// Visibility kept while a message is worked on; extended every third of it.
    pub visibility: Duration,
    /// Deliveries of a failing event before its aggregate is parked.
    pub park_after_receives: u32,
    /// Delay before a failed message is seen again.
    pub retry_delay: Duration,
    /// The queue's filter. Events it does not admit are skipped when a gap is filled from the
    /// log, as they would never have been delivered.
    pub group: Group,
    /// Other queues this consumer reads (the GPU worker's `gpu-jobs-stat` beside `gpu-jobs`):
    /// what their filters admit is admitted too.
    pub also: Vec<Group>,
    /// When failed slow work is tried again, and how often.
    pub slow_retry: SlowRetry,
}

/// The backoff of slow work that fails: try `n` (1 the first retry) after
/// `first · 2^(n-1)`, at most `max`, `attempts` tries in all; then the aggregate is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowRetry {
    pub first: Duration,
    pub max: Duration,
    pub attempts: u32,
}

impl Default for SlowRetry {
    fn default() -> Self {
        Self::from_settings(&mira_config::MessagingSettings::default())
    }
}

impl SlowRetry {
    pub fn from_settings(m: &mira_config::MessagingSettings) -> Self {
        Self {
            first: Duration::from_secs(m.slow_retry_first_seconds),
            max: Duration::from_secs(m.slow_retry_max_seconds),
            attempts: m.slow_retry_attempts,
        }
    }

    /// The delay before try `n`.
    pub fn delay(&self, n: u32) -> Duration {
        let first = self.first.max(Duration::from_secs(1));
        first
            .saturating_mul(1u32 << n.saturating_sub(1).min(30))
            .min(self.max.max(first))
    }

    /// Every delay, first to last: the schedule an operator reads.
    pub fn schedule(&self) -> Vec<Duration> {
        (1..=self.attempts).map(|n| self.delay(n)).collect()
    }
}

impl ConsumerConfig {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            batch: 10,
            wait: Duration::from_secs(1),
            visibility: Duration::from_secs(30),
            park_after_receives: 3,
            retry_delay: Duration::from_millis(200),
            group: Group::Projections,
            also: Vec::new(),
            slow_retry: SlowRetry::default(),
        }
    }

    /// Whether one of this consumer's queues would have been delivered `m`.
    pub fn admits(&self, m: &EventMessage) -> bool {
        self.group.admits(m) || self.also.iter().any(|g| g.admits(m))
    }

    /// The consumer of `group`'s queue, named after it.
    pub fn for_group(group: Group) -> Self {
        Self {
            group,
            ..Self::new(group.suffix())
        }
    }
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Effects of this many events committed (more than one after filling a gap).
    Applied(u32),
    /// Already applied; nothing done.
    Duplicate,
    /// The aggregate is parked; the event was recorded behind it.
    SetAside,
    /// The event kept failing; its aggregate is now parked.
    Parked,
    /// The effect committed and its slow work failed: a retry is scheduled in the due-time
    /// table, and the message is done with.
    Deferred,
    /// The effect failed; the message will be delivered again.
    Retry,
    /// The body is not an event message (or its hash is wrong); left for the dead-letter queue.
    Malformed,
    /// The log holds no such event, or holds it with other content: the message was not
    /// published by the relay. Left for the dead-letter queue; nothing is applied or parked.
    NotInLog,
}

impl Outcome {
    /// The outcome's name in `/metrics` (`mira_consumer_apply_seconds{outcome}`).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied(_) => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::SetAside => "set_aside",
            Outcome::Parked => "parked",
            Outcome::Deferred => "deferred",
            Outcome::Retry => "retry",
            Outcome::Malformed => "malformed",
            Outcome::NotInLog => "not_in_log",
        }
    }

    /// Whether the message is done with and may be deleted.
    pub fn settled(&self) -> bool {
        !matches!(self, Outcome::Retry | Outcome::Malformed | Outcome::NotInLog)
    }
}

#[derive(Clone)]
pub struct Consumer {
    log: EventLog,
    queue: Arc<dyn Queue>,
    effect: Arc<dyn Apply>,
    cfg: ConsumerConfig,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("cfg", &self.cfg).finish()
    }
}

/// A parked aggregate, for `mira dlq list`.
#[derive(Debug, Clone, Serialize)]
pub struct Parked {
    pub consumer: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub last_sequence: i64,
    pub parked_sequence: Option<i64>,
    pub reason: Option<String>,
    pub parked_at: chrono::DateTime<chrono::Utc>,
    pub set_aside: i64,
    pub redrive_requested: bool,
}

impl Consumer {
    pub fn new(log: EventLog, queue: Arc<dyn Queue>, effect: Arc<dyn Apply>, cfg: ConsumerConfig) -> Self {
        Self {
            log,
            queue,
            effect,
            cfg,
        }
    }

    fn pool(&self) -> &PgPool {
        self.log.pool()
    }

    /// Runs until `shutdown`; the batch in hand is finished first.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), crate::BusError> {
        while !shutdown.is_cancelled() {
            if let Err(e) = self.redrive_requested().await {
                tracing::warn!(error = %e, "redrive failed");
            }
            if let Err(e) = self.run_due_slow_work(&shutdown).await {
                tracing::warn!(error = %e, "running due slow work failed");
            }
            let batch = tokio::select! {
                b = self.queue.receive(self.cfg.batch, self.cfg.wait) => b?,
                _ = shutdown.cancelled() => break,
            };
            for d in batch {
                self.handle(&d).await;
            }
        }
        Ok(())
    }

    /// Processes one delivery and deletes it once settled (or releases it for a retry).
    #[tracing::instrument(name = "consume", skip_all, fields(consumer = %self.cfg.name, receive_count = d.receive_count))]
    pub async fn handle(&self, d: &Delivery) -> Outcome {
        let t = mira_telemetry::prom::Timer::start();
        let outcome = self.process_extending(d).await;
        let consumer = self.cfg.name.clone();
        t.record(metrics::histogram!("mira_consumer_apply_seconds", "consumer" => consumer.clone(), "outcome" => outcome.label()));
        if outcome == Outcome::Retry {
            metrics::counter!("mira_consumer_retries_total", "consumer" => consumer).increment(1);
        }
        let done = if outcome.settled() {
            self.queue.delete(&d.receipt).await
        } else {
            self.queue.release(&d.receipt, self.cfg.retry_delay).await
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not settle a message; it will be delivered again");
        }
        outcome
    }

    async fn process_extending(&self, d: &Delivery) -> Outcome {
        let (queue, receipt, vis) = (self.queue.clone(), d.receipt.clone(), self.cfg.visibility);
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(vis / 3);
            every.tick().await;
            loop {
                every.tick().await;
                if queue.extend(&receipt, vis).await.is_err() {
                    break;
                }
            }
        });
        let outcome = self.process(d).await;
        ticker.abort();
        outcome
    }

    /// Applies the delivery's effect and commits it, then runs its slow work outside
    /// the transaction; does not delete the message.
    pub async fn process(&self, d: &Delivery) -> Outcome {
        let msg = match EventMessage::from_body(&d.body) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(consumer = %self.cfg.name, error = %e, "unusable message");
                return Outcome::Malformed;
            }
        };
        match self.apply(&msg).await {
            Ok((o, follow)) => {
                for e in &follow {
                    let span = self.event_span("consume.after_commit", e);
                    if let Err(err) = self.effect.after_commit(e).instrument(span).await {
                        // Tried again from the due-time table, with backoff; the message has
                        // served its purpose. Where that cannot be recorded, the message stays.
                        return match self.defer(e, 1, &err.to_string()).await {
                            Ok(()) => Outcome::Deferred,
                            Err(db) => {
                                tracing::warn!(consumer = %self.cfg.name, aggregate = %e.aggregate_id, sequence = e.sequence, error = %err, db_error = %db, "work after the effect failed and its retry could not be scheduled; the message will be delivered again");
                                Outcome::Retry
                            }
                        };
                    }
                }
                o
            }
            Err((failed_seq, e)) => {
                tracing::warn!(consumer = %self.cfg.name, aggregate = %msg.aggregate_id, sequence = failed_seq, receives = d.receive_count, error = %e, "effect failed");
                if d.receive_count >= self.cfg.park_after_receives {
                    match self.park(&msg, failed_seq, &e.to_string()).await {
                        Ok(()) => Outcome::Parked,
                        Err(e) => {
                            tracing::error!(error = %e, "could not park");
                            Outcome::Retry
                        }
                    }
                } else {
                    Outcome::Retry
                }
            }
        }
    }

    /// A span for work on `e`, in the trace of the command that recorded it.
    fn event_span(&self, name: &'static str, e: &StoredEvent) -> tracing::Span {
        let span = match name {
            "consume.event" => {
                tracing::info_span!("consume.event", consumer = %self.cfg.name, event_type = %e.event_type, sequence = e.sequence)
            }
            _ => {
                tracing::info_span!("consume.after_commit", consumer = %self.cfg.name, event_type = %e.event_type, sequence = e.sequence)
            }
        };
        if let Some(tp) = e.traceparent() {
            mira_telemetry::follow(&span, &tp);
        }
        span
    }

    async fn lock_stream(
        &self,
        tx: &mut PgConnection,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<(i64, bool), sqlx::Error> {
        sqlx::query(
            "INSERT INTO consumer_streams (consumer, aggregate_type, aggregate_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&self.cfg.name)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "SELECT last_sequence, parked_at IS NOT NULL AS parked FROM consumer_streams \
             WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 FOR UPDATE",
        )
        .bind(&self.cfg.name)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_one(&mut *tx)
        .await?;
        Ok((row.try_get("last_sequence")?, row.try_get("parked")?))
    }

    /// Returns the outcome and the events whose slow work is to follow, or the failing
    /// sequence and error when an effect fails; the transaction is then rolled back and
    /// nothing of it stays.
    #[tracing::instrument(name = "consume.apply", skip_all, fields(aggregate_id = %msg.aggregate_id, sequence = msg.sequence))]
    async fn apply(&self, msg: &EventMessage) -> Result<(Outcome, Vec<StoredEvent>), (i64, ApplyError)> {
        let db = |e: sqlx::Error| (msg.sequence, ApplyError::Db(e));
        // The log is the truth; the message only says where to look. Until the message matched
        // the log, a failure is only retried: parking what a message names, unchecked, would let
        // anyone who can publish park a real aggregate.
        let unchecked = |e: sqlx::Error| {
            tracing::warn!(consumer = %self.cfg.name, error = %e, "cannot look the message's event up in the log; retrying");
        };
        let mut tx = match self.pool().begin().await {
            Ok(tx) => tx,
            Err(e) => {
                unchecked(e);
                return Ok((Outcome::Retry, Vec::new()));
            }
        };
        let stored = match mira_eventlog::store::read_event(&mut tx, msg.event_id).await {
            Ok(s) => s,
            Err(e) => {
                unchecked(e);
                return Ok((Outcome::Retry, Vec::new()));
            }
        };
        let Some(stored) = stored.filter(|e| EventMessage::from(e) == *msg) else {
            tracing::error!(consumer = %self.cfg.name, event_id = %msg.event_id, aggregate = %msg.aggregate_id, "a message names an event the log does not hold as sent; left for the dead-letter queue");
            return Ok((Outcome::NotInLog, Vec::new()));
        };
        let (last, parked) = self
            .lock_stream(&mut tx, &stored.aggregate_type, &stored.aggregate_id)
            .await
            .map_err(db)?;
        if parked {
            self.set_aside(&mut tx, msg).await.map_err(db)?;
            tx.commit().await.map_err(db)?;
            return Ok((Outcome::SetAside, Vec::new()));
        }
        if stored.sequence <= last {
            return Ok((Outcome::Duplicate, vec![stored]));
        }
        let events = if stored.sequence == last + 1 {
            vec![stored]
        } else {
            // A gap: the log is the source of truth for what was missed.
            let mut missing = self
                .log
                .read_stream(None, &msg.aggregate_type, &msg.aggregate_id, last)
                .await
                .map_err(db)?;
            missing.retain(|e| e.sequence <= msg.sequence);
            if missing.len() as i64 != msg.sequence - last {
                return Err((
                    msg.sequence,
                    ApplyError::failed(format!(
                        "the log lacks events {}..{} of this aggregate",
                        last + 1,
                        msg.sequence
                    )),
                ));
            }
            // What this consumer's filters admit, and always the event delivered: the queue's
            // subscription sent it, under a filter of its own time (a `SlideUploaded` left on
            // `gpu-jobs` from before the `verify` queue took them is still verified).
            missing.retain(|e| e.sequence == msg.sequence || self.cfg.admits(&EventMessage::from(e)));
            missing
        };
        for e in &events {
            self.effect
                .apply(&mut tx, e)
                .instrument(self.event_span("consume.event", e))
                .await
                .map_err(|err| (e.sequence, err))?;
        }
        self.advance(&mut tx, &msg.aggregate_type, &msg.aggregate_id, msg.sequence)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok((Outcome::Applied(events.len() as u32), events))
    }

    async fn advance(
        &self,
        tx: &mut PgConnection,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE consumer_streams SET last_sequence = $4, updated_at = now() \
             WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3",
        )
        .bind(&self.cfg.name)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(sequence)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Records an event behind its parked aggregate (its content stays in the log).
    async fn set_aside(&self, tx: &mut PgConnection, msg: &EventMessage) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO consumer_set_aside (consumer, aggregate_type, aggregate_id, sequence, event_id) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&self.cfg.name)
        .bind(&msg.aggregate_type)
        .bind(&msg.aggregate_id)
        .bind(msg.sequence)
        .bind(msg.event_id)
        .execute(tx)
        .await?;
        Ok(())
    }

    async fn park(&self, msg: &EventMessage, failed_seq: i64, reason: &str) -> Result<(), sqlx::Error> {
        let mut tx = self.pool().begin().await?;
        self.lock_stream(&mut tx, &msg.aggregate_type, &msg.aggregate_id)
            .await?;
        sqlx::query(
            "UPDATE consumer_streams SET parked_at = now(), parked_sequence = $4, parked_reason = $5, updated_at = now() \
             WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND parked_at IS NULL",
        )
        .bind(&self.cfg.name)
        .bind(&msg.aggregate_type)
        .bind(&msg.aggregate_id)
        .bind(failed_seq)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        self.set_aside(&mut tx, msg).await?;
        tx.commit().await?;
        tracing::error!(consumer = %self.cfg.name, aggregate = %msg.aggregate_id, sequence = failed_seq, "aggregate parked");
        Ok(())
    }

    /// The due-time table's kind for this consumer's slow work.
    fn slow_kind(&self) -> String {
        format!("slow-work:{}", self.cfg.name)
    }

    /// Schedules try `attempt` of `e`'s slow work after its delay.
    async fn defer(&self, e: &StoredEvent, attempt: u32, error: &str) -> Result<(), sqlx::Error> {
        let delay = self.cfg.slow_retry.delay(attempt);
        tracing::warn!(
            consumer = %self.cfg.name,
            aggregate = %e.aggregate_id,
            sequence = e.sequence,
            attempt,
            of = self.cfg.slow_retry.attempts,
            in_s = delay.as_secs(),
            error,
            "work after the effect failed; tried again later"
        );
        let payload = serde_json::json!({
            "event_id": e.event_id,
            "aggregate_type": e.aggregate_type,
            "aggregate_id": e.aggregate_id,
            "sequence": e.sequence,
            "attempt": attempt,
            "error": error,
        });
        sqlx::query(
            "INSERT INTO due_work (kind, key, due_at, payload) VALUES ($1, $2, now() + make_interval(secs => $3), $4) \
             ON CONFLICT (kind, key) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload",
        )
        .bind(self.slow_kind())
        .bind(format!("{}/{}/{}", e.aggregate_type, e.aggregate_id, e.sequence))
        .bind(delay.as_secs_f64())
        .bind(payload.to_string())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn slow_done(&self, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM due_work WHERE kind = $1 AND key = $2")
            .bind(self.slow_kind())
            .bind(key)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Runs this consumer's slow work that is due, one item at a time, each outside any
    /// transaction: an item is claimed by moving its due time past the work's likely length (a
    /// crash makes it due again; the work judges from the log whether it is still to do), then
    /// deleted when it succeeds, rescheduled when it fails, or its aggregate parked after the
    /// last try.
    pub async fn run_due_slow_work(&self, shutdown: &CancellationToken) -> Result<u32, ApplyError> {
        let mut ran = 0;
        while !shutdown.is_cancelled() {
            let claimed: Option<(String, String)> = sqlx::query_as(
                "UPDATE due_work SET due_at = now() + interval '15 minutes' \
                 WHERE kind = $1 AND key = (SELECT key FROM due_work WHERE kind = $1 AND due_at <= now() \
                                            ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
                 RETURNING key, payload",
            )
            .bind(self.slow_kind())
            .fetch_optional(self.pool())
            .await?;
            let Some((key, payload)) = claimed else { break };
            ran += 1;
            let p: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
            let attempt = p["attempt"].as_u64().unwrap_or(1) as u32;
            let event_id = p["event_id"].as_str().and_then(|s| s.parse::<uuid::Uuid>().ok());

            let event = match event_id {
                Some(id) => {
                    let mut conn = self.pool().acquire().await?;
                    mira_eventlog::store::read_event(&mut conn, id).await?
                }
                None => None,
            };
            let Some(e) = event else {
                tracing::error!(consumer = %self.cfg.name, key, "due slow work names no event of the log; dropped");
                self.slow_done(&key).await?;
                continue;
            };
            match self.effect.after_commit(&e).await {
                Ok(()) => {
                    tracing::info!(consumer = %self.cfg.name, aggregate = %e.aggregate_id, sequence = e.sequence, attempt, "slow work done on a retry");
                    self.slow_done(&key).await?;
                }
                Err(err) if attempt < self.cfg.slow_retry.attempts => {
                    self.defer(&e, attempt + 1, &err.to_string()).await?;
                }
                Err(err) => {
                    let reason = format!(
                        "the work after {} {} failed {} times, the last: {err}",
                        e.event_type, e.sequence, attempt
                    );
                    self.park(&EventMessage::from(&e), e.sequence, &reason).await?;
                    self.slow_done(&key).await?;
                }
            }
        }
        Ok(ran)
    }

    /// Redrives every parked aggregate of this consumer whose redrive was requested: replays
    /// its events from the log, after the last applied one, and un-parks it. An aggregate whose
    /// effect still fails stays parked. Returns the aggregates un-parked.
    pub async fn redrive_requested(&self) -> Result<u64, ApplyError> {
        let rows = sqlx::query(
            "SELECT aggregate_type, aggregate_id FROM consumer_streams \
             WHERE consumer = $1 AND parked_at IS NOT NULL AND redrive_requested IS NOT NULL",
        )
        .bind(&self.cfg.name)
        .fetch_all(self.pool())
        .await?;
        let mut n = 0;
        for r in rows {
            let (t, id): (String, String) = (r.try_get("aggregate_type")?, r.try_get("aggregate_id")?);
            match self.redrive_one(&t, &id).await {
                Ok(applied) => {
                    n += 1;
                    // The slow work of what was replayed, as for a delivery; its messages were
                    // set aside and deleted, so nothing else would run it.
                    // Work that fails again goes back to the due-time table, tries counted afresh.
                    for e in &applied {
                        if let Err(err) = self.effect.after_commit(e).await {
                            tracing::error!(consumer = %self.cfg.name, aggregate = %id, sequence = e.sequence, error = %err, "work after a redriven event failed");
                            self.defer(e, 1, &err.to_string()).await?;
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(consumer = %self.cfg.name, aggregate = %id, error = %e, "redrive failed; still parked");
                    sqlx::query(
                        "UPDATE consumer_streams SET redrive_requested = NULL, parked_reason = $4 \
                         WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3",
                    )
                    .bind(&self.cfg.name)
                    .bind(&t)
                    .bind(&id)
                    .bind(e.to_string())
                    .execute(self.pool())
                    .await?;
                }
            }
        }
        Ok(n)
    }

    /// Replays a parked aggregate from the log and un-parks it; returns the events whose slow
    /// work is to run: those replayed, after the parked event when its effect had committed and
    /// only its slow work failed.
    async fn redrive_one(&self, aggregate_type: &str, aggregate_id: &str) -> Result<Vec<StoredEvent>, ApplyError> {
        let mut tx = self.pool().begin().await?;
        let (last, _) = self.lock_stream(&mut tx, aggregate_type, aggregate_id).await?;
        let parked: Option<i64> = sqlx::query_scalar(
            "SELECT parked_sequence FROM consumer_streams WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3",
        )
        .bind(&self.cfg.name)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_one(&mut *tx)
        .await?;
        let slow = match parked.filter(|p| *p <= last) {
            Some(p) => self
                .log
                .read_stream(None, aggregate_type, aggregate_id, p - 1)
                .await?
                .into_iter()
                .next()
                .filter(|e| e.sequence == p),
            None => None,
        };
        let mut events = self.log.read_stream(None, aggregate_type, aggregate_id, last).await?;
        let upto = events.last().map_or(last, |e| e.sequence);
        events.retain(|e| self.cfg.admits(&EventMessage::from(e)));
        for e in &events {
            self.effect.apply(&mut tx, e).await?;
        }
        self.advance(&mut tx, aggregate_type, aggregate_id, upto).await?;
        sqlx::query(
            "UPDATE consumer_streams SET parked_at = NULL, parked_sequence = NULL, parked_reason = NULL, redrive_requested = NULL \
             WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3",
        )
        .bind(&self.cfg.name)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM consumer_set_aside WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3")
            .bind(&self.cfg.name)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(consumer = %self.cfg.name, aggregate = %aggregate_id, events = events.len(), "aggregate redriven");
        Ok(slow.into_iter().chain(events).collect())
    }
}

/// Parked aggregates, for `mira dlq list`.
pub async fn list_parked(pool: &PgPool) -> Result<Vec<Parked>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT s.consumer, s.aggregate_type, s.aggregate_id, s.last_sequence, s.parked_sequence, s.parked_reason, s.parked_at, \
         s.redrive_requested IS NOT NULL AS redrive_requested, \
         (SELECT count(*) FROM consumer_set_aside a WHERE a.consumer = s.consumer AND a.aggregate_type = s.aggregate_type \
          AND a.aggregate_id = s.aggregate_id) AS set_aside \
         FROM consumer_streams s WHERE s.parked_at IS NOT NULL ORDER BY s.parked_at",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Parked {
                consumer: r.try_get("consumer")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                last_sequence: r.try_get("last_sequence")?,
                parked_sequence: r.try_get("parked_sequence")?,
                reason: r.try_get("parked_reason")?,
                parked_at: r.try_get("parked_at")?,
                set_aside: r.try_get("set_aside")?,
                redrive_requested: r.try_get("redrive_requested")?,
            })
        })
        .collect()
}

/// Asks the consumers to redrive parked aggregates (all, or one consumer's, or one
/// aggregate). Returns how many were marked.
pub async fn request_redrive(
    pool: &PgPool,
    consumer: Option<&str>,
    aggregate_id: Option<&str>,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE consumer_streams SET redrive_requested = now() WHERE parked_at IS NOT NULL \
         AND ($1::text IS NULL OR consumer = $1) AND ($2::text IS NULL OR aggregate_id = $2)",
    )
    .bind(consumer)
    .bind(aggregate_id)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

#[cfg(test)]
mod slow_retry_tests {
    use std::time::Duration;

    #[test]
    fn the_default_schedule_doubles_from_seconds_to_half_an_hour() {
        let s = super::SlowRetry::default();
        let secs: Vec<u64> = s.schedule().iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 1800]);
        // Far longer than ten minutes of trying before anything is parked.
        assert!(secs.iter().sum::<u64>() > 4000);
        let quick = super::SlowRetry {
            first: Duration::from_secs(1),
            max: Duration::from_secs(4),
            attempts: 5,
        };
        assert_eq!(quick.schedule(), [1, 2, 4, 4, 4].map(Duration::from_secs));
    }
}
