//! Two queues read as one, the first before the second: the GPU worker's `gpu-jobs-stat`
//! before its `gpu-jobs` (STAT before routine, ADR 0027). Each receive polls the first (on SQS
//! a one-second long poll, in process without waiting); only when it has nothing does the
//! second get the receive, with its wait. A STAT
//! job queued while the worker waits on the routine queue is taken on the next receive (within
//! the consumer's wait), and a STAT job never overtakes one already running: nothing is
//! preempted.

use std::sync::Arc;
use std::time::Duration;

use crate::{BusError, Delivery, Queue};

/// The wait on the STAT queue before each routine receive, on SQS: a long poll (a short one
/// samples SQS's servers and can miss a waiting message).
pub const SQS_FIRST_WAIT: Duration = Duration::from_secs(1);

/// `first`, then `then`. Receipts are tagged with the queue they came from, so each message
/// is deleted, extended or released on its own queue.
pub struct FirstThen {
    first: Arc<dyn Queue>,
    then: Arc<dyn Queue>,
    first_wait: Duration,
}

impl FirstThen {
    pub fn new(first: Arc<dyn Queue>, then: Arc<dyn Queue>) -> Self {
        Self {
            first,
            then,
            first_wait: Duration::ZERO,
        }
    }

    /// How long each receive waits on the first queue. SQS answers a receive that does not
    /// wait from a sample of its servers, and can answer nothing while a message waits: on
    /// SQS the worker waits a second (`mira_bus::priority::SQS_FIRST_WAIT`).
    pub fn with_first_wait(mut self, wait: Duration) -> Self {
        self.first_wait = wait;
        self
    }

    fn route(&self, receipt: &str) -> Result<(&dyn Queue, String), BusError> {
        match receipt.split_once(':') {
            Some(("1", r)) => Ok((&*self.first, r.to_owned())),
            Some(("2", r)) => Ok((&*self.then, r.to_owned())),
            _ => Err(BusError::Transport(format!("a receipt of no queue here: {receipt}"))),
        }
    }
}

fn tagged(tag: &str, batch: Vec<Delivery>) -> Vec<Delivery> {
    batch
        .into_iter()
        .map(|d| Delivery {
            receipt: format!("{tag}:{}", d.receipt),
            ..d
        })
        .collect()
}

#[async_trait::async_trait]
impl Queue for FirstThen {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let first = self.first.receive(max, self.first_wait).await?;
        if !first.is_empty() {
            return Ok(tagged("1", first));
        }
        Ok(tagged("2", self.then.receive(max, wait).await?))
    }

    async fn delete(&self, receipt: &str) -> Result<(), BusError> {
        let (q, r) = self.route(receipt)?;
        q.delete(&r).await
    }

    async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), BusError> {
        let (q, r) = self.route(receipt)?;
        q.extend(&r, visibility).await
    }

    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), BusError> {
        let (q, r) = self.route(receipt)?;
        q.release(&r, delay).await
    }

    async fn dead_letter_count(&self) -> Result<u64, BusError> {
        Ok(self.first.dead_letter_count().await? + self.then.dead_letter_count().await?)
    }

    async fn redrive_dead_letters(&self) -> Result<u64, BusError> {
        Ok(self.first.redrive_dead_letters().await? + self.then.redrive_dead_letters().await?)
    }

    async fn depth(&self) -> Result<crate::QueueDepth, BusError> {
        let (a, b) = (self.first.depth().await?, self.then.depth().await?);
        Ok(crate::QueueDepth {
            visible: a.visible + b.visible,
            in_flight: a.in_flight + b.in_flight,
            delayed: a.delayed + b.delayed,
            dead_letters: a.dead_letters + b.dead_letters,
            oldest_age: a.oldest_age.max(b.oldest_age),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryQueue;

    /// With both queues holding messages, every receive takes the first's until it is empty;
    /// each message is settled on its own queue.
    #[tokio::test]
    async fn the_first_queue_is_drained_first() {
        let (stat, routine) = (
            Arc::new(MemoryQueue::new(Duration::from_secs(30), 3)),
            Arc::new(MemoryQueue::new(Duration::from_secs(30), 3)),
        );
        for i in 0..3 {
            routine.send(format!("r{i}"), format!("r{i}"), format!("routine {i}"));
        }
        stat.send("s".into(), "s".into(), "stat".into());
        let q = FirstThen::new(stat.clone(), routine.clone());
        let got = q.receive(1, Duration::from_millis(10)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, "stat");
        q.delete(&got[0].receipt).await.unwrap();
        // A STAT job queued now, behind the routine ones already taken, still comes next.
        let next = q.receive(1, Duration::from_millis(10)).await.unwrap();
        assert_eq!(next[0].body, "routine 0");
        stat.send("s2".into(), "s2".into(), "stat 2".into());
        q.delete(&next[0].receipt).await.unwrap();
        let after = q.receive(1, Duration::from_millis(10)).await.unwrap();
        assert_eq!(after[0].body, "stat 2");
        q.delete(&after[0].receipt).await.unwrap();
        let rest = q.receive(5, Duration::from_millis(10)).await.unwrap();
        assert_eq!(
            rest.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(),
            ["routine 1", "routine 2"]
        );
        assert!(q.delete("3:x").await.is_err(), "a receipt of neither queue is refused");
    }
}
