//! `mira-bus` carries events from the log to every consumer (DESIGN §5).
//!
//! * [`relay`]: follows the log from a durable cursor and publishes each event once it is
//!   settled, advancing the cursor only after the publish was accepted (at-least-once). One
//!   relay is active at a time, behind an advisory lock. It also writes the signed checkpoints.
//! * [`consumer`]: the runtime every consumer shares: batches, visibility extension, the
//!   effect and its record committed in one transaction before the delete, per-aggregate
//!   order with gaps filled from the log, parking of poisoned aggregates, redrive.
//! * [`memory`]: the in-memory bus of `mira dev` and the unit tests.
//! * [`aws`]: SNS FIFO topic and SQS FIFO queues; `mira bus init` builds the topology.
//!
//! Both buses implement [`Publisher`] and [`Queue`] with the same semantics, and one test suite
//! runs against both.

pub mod aws;
pub mod consumer;
pub mod memory;
pub mod message;
pub mod priority;
pub mod relay;
pub mod topology;

use std::sync::Arc;
use std::time::Duration;

pub use message::EventMessage;
pub use topology::{Group, Names};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{0}")]
    Transport(String),
    #[error("{setting}: {reason}")]
    Config { setting: &'static str, reason: String },
}

/// One received message. `receive_count` counts deliveries, this one included.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub body: String,
    pub receipt: String,
    pub receive_count: u32,
}

/// Publishes to the topic.
#[async_trait::async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes up to 10 messages in order; returns the indexes of entries that failed and
    /// must be retried.
    async fn publish(&self, batch: &[EventMessage]) -> Result<Vec<usize>, BusError>;
}

/// One consumer group's queue.
#[async_trait::async_trait]
pub trait Queue: Send + Sync {
    /// Up to `max` messages, waiting up to `wait` for the first (long polling).
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;
    /// The message's effect is committed: remove it.
    async fn delete(&self, receipt: &str) -> Result<(), BusError>;
    /// Keep the message hidden for `visibility` from now.
    async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), BusError>;
    /// Make the message visible again after `delay`.
    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), BusError>;
    /// Messages in the dead-letter queue.
    async fn dead_letter_count(&self) -> Result<u64, BusError>;
    /// Moves dead-lettered messages back to the queue; returns how many.
    async fn redrive_dead_letters(&self) -> Result<u64, BusError>;
    /// How many messages the queue and its dead-letter queue hold now (approximate on SQS).
    async fn depth(&self) -> Result<QueueDepth, BusError>;
}

/// A queue's messages by state, for `/metrics` (`mira_queue_messages`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueDepth {
    /// Waiting to be received.
    pub visible: u64,
    /// Received and not yet deleted (or hidden by a retry's delay, on the in-memory bus).
    pub in_flight: u64,
    /// Sent with a delay that has not passed (SQS).
    pub delayed: u64,
    /// In the dead-letter queue.
    pub dead_letters: u64,
    /// Age of the oldest message in the queue, where the bus can tell (the in-memory bus; SQS
    /// gives it only to CloudWatch, as `ApproximateAgeOfOldestMessage`).
    pub oldest_age: Option<Duration>,
}

/// Records how long a message waited between its publication and its receipt.
pub(crate) fn record_receive_delay(queue: &str, waited: Duration) {
    metrics::histogram!("mira_consumer_receive_delay_seconds", "queue" => queue.to_owned())
        .record(waited.as_secs_f64());
}

/// A topic with its three queues.
pub trait Bus: Send + Sync {
    fn publisher(&self) -> Arc<dyn Publisher>;
    fn queue(&self, group: Group) -> Arc<dyn Queue>;
    /// The groups that have a queue here (every one on SNS/SQS; on the in-memory bus, those
    /// this process consumes).
    fn groups(&self) -> Vec<Group> {
        Group::ALL.to_vec()
    }
}
