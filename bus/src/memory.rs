//! The in-memory bus (DESIGN §5.5): the topic, three FIFO queues with the same filters, and
//! the same semantics as SNS/SQS FIFO: at-least-once, per-aggregate order (one message group
//! per aggregate, blocked while a message of it is in flight), deduplication by event id,
//! visibility timeouts, redelivery on failure, and a dead-letter queue after too many receives.
//! It is a product feature of `mira dev`, not a test double.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::message::EventMessage;
use crate::{Bus, BusError, Delivery, Group, Publisher, Queue, QueueDepth};

const DEDUP_WINDOW: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Msg {
    group: String,
    body: String,
    sent: Instant,
    visible_at: Instant,
    receive_count: u32,
    receipt: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    msgs: Vec<Msg>,
    dedup: HashMap<String, Instant>,
    dlq: Vec<Msg>,
}

/// One FIFO queue.
#[derive(Debug)]
pub struct MemoryQueue {
    /// The group's name, for `/metrics`.
    label: &'static str,
    state: Mutex<State>,
    notify: Notify,
    visibility: Duration,
    max_receives: u32,
}

impl MemoryQueue {
    pub fn new(visibility: Duration, max_receives: u32) -> Self {
        Self::named("memory", visibility, max_receives)
    }

    /// A queue whose metrics carry `label` (its group's name).
    pub fn named(label: &'static str, visibility: Duration, max_receives: u32) -> Self {
        Self {
            label,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            visibility,
            max_receives,
        }
    }

    /// Enqueues unless a message with the same dedup id arrived within the window.
    pub fn send(&self, group: String, dedup_id: String, body: String) {
        let now = Instant::now();
        let mut s = self.state.lock().expect("queue lock");
        s.dedup.retain(|_, t| now.duration_since(*t) < DEDUP_WINDOW);
        if s.dedup.insert(dedup_id, now).is_some() {
            return;
        }
        s.msgs.push(Msg {
            group,
            body,
            sent: now,
            visible_at: now,
            receive_count: 0,
            receipt: None,
        });
        drop(s);
        self.notify.notify_waiters();
    }

    pub fn depth(&self) -> usize {
        self.state.lock().expect("queue lock").msgs.len()
    }

    fn take(&self, max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut s = self.state.lock().expect("queue lock");
        let mut blocked: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.msgs.len() && out.len() < max {
            let m = &s.msgs[i];
            if blocked.contains(&m.group) {
                i += 1;
                continue;
            }
            if m.visible_at > now {
                blocked.insert(m.group.clone());
                i += 1;
                continue;
            }
            if m.receive_count >= self.max_receives {
                let m = s.msgs.remove(i);
                s.dlq.push(m);
                continue;
            }
            let receipt = uuid::Uuid::new_v4().to_string();
            let m = &mut s.msgs[i];
            if m.receive_count == 0 {
                crate::record_receive_delay(self.label, now.duration_since(m.sent));
            }
            m.receive_count += 1;
            m.visible_at = now + self.visibility;
            m.receipt = Some(receipt.clone());
            blocked.insert(m.group.clone());
            out.push(Delivery {
                body: m.body.clone(),
                receipt,
                receive_count: m.receive_count,
            });
            i += 1;
        }
        out
    }

    fn with_receipt(&self, receipt: &str, f: impl FnOnce(&mut Vec<Msg>, usize)) {
        let mut s = self.state.lock().expect("queue lock");
        if let Some(i) = s.msgs.iter().position(|m| m.receipt.as_deref() == Some(receipt)) {
            f(&mut s.msgs, i);
        }
    }
}

#[async_trait::async_trait]
impl Queue for MemoryQueue {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            let got = self.take(max);
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            // Wake on a send, or when an in-flight message may have become visible again.
            let _ = tokio::time::timeout_at(deadline.min(Instant::now() + Duration::from_millis(50)), notified).await;
        }
    }

    async fn delete(&self, receipt: &str) -> Result<(), BusError> {
        self.with_receipt(receipt, |msgs, i| {
            msgs.remove(i);
        });
        self.notify.notify_waiters();
        Ok(())
    }

    async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), BusError> {
        self.with_receipt(receipt, |msgs, i| msgs[i].visible_at = Instant::now() + visibility);
        Ok(())
    }

    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), BusError> {
        self.with_receipt(receipt, |msgs, i| msgs[i].visible_at = Instant::now() + delay);
        self.notify.notify_waiters();
        Ok(())
    }

    async fn dead_letter_count(&self) -> Result<u64, BusError> {
        Ok(self.state.lock().expect("queue lock").dlq.len() as u64)
    }

    async fn depth(&self) -> Result<QueueDepth, BusError> {
        let now = Instant::now();
        let s = self.state.lock().expect("queue lock");
        let hidden = s.msgs.iter().filter(|m| m.visible_at > now).count() as u64;
        Ok(QueueDepth {
            visible: s.msgs.len() as u64 - hidden,
            in_flight: hidden,
            delayed: 0,
            dead_letters: s.dlq.len() as u64,
            oldest_age: s.msgs.iter().map(|m| now.duration_since(m.sent)).max(),
        })
    }

    async fn redrive_dead_letters(&self) -> Result<u64, BusError> {
        let mut s = self.state.lock().expect("queue lock");
        let moved: Vec<Msg> = std::mem::take(&mut s.dlq);
        let n = moved.len() as u64;
        for mut m in moved {
            m.receive_count = 0;
            m.visible_at = Instant::now();
            m.receipt = None;
            s.msgs.push(m);
        }
        drop(s);
        self.notify.notify_waiters();
        Ok(n)
    }
}

/// The topic and the queues that have a consumer in this process. A queue nothing reads would
/// hold every event it admits for as long as the process lives, so only the groups named when
/// the bus is made get a queue; asking for another gets an empty, detached queue that receives
/// nothing (and says so in the log).
#[derive(Debug, Clone)]
pub struct MemoryBus {
    queues: Arc<HashMap<&'static str, Arc<MemoryQueue>>>,
    visibility: Duration,
    max_receives: u32,
}

impl MemoryBus {
    /// A bus with a queue for each of `consumers`: the groups this process consumes.
    pub fn new(visibility: Duration, max_receives: u32, consumers: &[Group]) -> Self {
        let queues = consumers
            .iter()
            .map(|g| {
                (
                    g.suffix(),
                    Arc::new(MemoryQueue::named(g.suffix(), visibility, max_receives)),
                )
            })
            .collect();
        Self {
            queues: Arc::new(queues),
            visibility,
            max_receives,
        }
    }

    /// The groups that have a queue.
    pub fn groups(&self) -> Vec<Group> {
        Group::ALL
            .into_iter()
            .filter(|g| self.queues.contains_key(g.suffix()))
            .collect()
    }

    pub fn memory_queue(&self, g: Group) -> Arc<MemoryQueue> {
        match self.queues.get(g.suffix()) {
            Some(q) => q.clone(),
            None => {
                tracing::error!(
                    group = ?g,
                    "no in-memory queue for this group: it was not declared as consumed here; it receives nothing"
                );
                Arc::new(MemoryQueue::new(self.visibility, self.max_receives))
            }
        }
    }
}

#[async_trait::async_trait]
impl Publisher for MemoryBus {
    async fn publish(&self, batch: &[EventMessage]) -> Result<Vec<usize>, BusError> {
        for m in batch {
            for g in Group::ALL {
                if let Some(q) = self.queues.get(g.suffix()).filter(|_| g.admits(m)) {
                    q.send(m.group_id(), m.event_id.to_string(), m.to_body());
                }
            }
        }
        Ok(Vec::new())
    }
}

impl Bus for MemoryBus {
    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.clone())
    }

    fn groups(&self) -> Vec<Group> {
        MemoryBus::groups(self)
    }

    fn queue(&self, group: Group) -> Arc<dyn Queue> {
        self.memory_queue(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn depth_counts_waiting_taken_and_dead_lettered_messages() {
        let q = MemoryQueue::new(Duration::from_secs(30), 1);
        assert_eq!(Queue::depth(&q).await.unwrap(), QueueDepth::default());
        for (g, id) in [("a", "1"), ("b", "2"), ("c", "3")] {
            q.send(g.into(), id.into(), format!("m{id}"));
        }
        let got = q.receive(1, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        let d = Queue::depth(&q).await.unwrap();
        assert_eq!((d.visible, d.in_flight, d.dead_letters), (2, 1, 0), "{d:?}");
        assert!(d.oldest_age.is_some());
        // Received once with one receive allowed: its next receive dead-letters it.
        q.release(&got[0].receipt, Duration::ZERO).await.unwrap();
        let _ = q.receive(10, Duration::ZERO).await.unwrap();
        let d = Queue::depth(&q).await.unwrap();
        assert_eq!((d.visible, d.in_flight, d.dead_letters), (0, 2, 1), "{d:?}");
    }

    #[tokio::test]
    async fn groups_stay_in_order_and_failures_redeliver() {
        let q = MemoryQueue::new(Duration::from_millis(200), 3);
        q.send("a".into(), "1".into(), "a1".into());
        q.send("a".into(), "2".into(), "a2".into());
        q.send("b".into(), "3".into(), "b1".into());
        q.send("a".into(), "1".into(), "a1-again".into()); // deduplicated
        let first = q.receive(10, Duration::ZERO).await.unwrap();
        let bodies: Vec<&str> = first.iter().map(|d| d.body.as_str()).collect();
        assert_eq!(bodies, ["a1", "b1"], "one in flight per group");
        // a2 waits behind a1 while a1 is in flight.
        assert!(q.receive(10, Duration::ZERO).await.unwrap().is_empty());
        q.release(&first[0].receipt, Duration::ZERO).await.unwrap();
        let again = q.receive(10, Duration::ZERO).await.unwrap();
        assert_eq!(again[0].body, "a1");
        assert_eq!(again[0].receive_count, 2);
        q.delete(&again[0].receipt).await.unwrap();
        q.delete(&first[1].receipt).await.unwrap();
        let next = q.receive(10, Duration::from_millis(100)).await.unwrap();
        assert_eq!(next[0].body, "a2");
        assert_eq!(q.depth(), 1);
    }

    #[tokio::test]
    async fn too_many_receives_dead_letter_and_redrive() {
        let q = MemoryQueue::new(Duration::from_millis(1), 2);
        q.send("a".into(), "1".into(), "x".into());
        for _ in 0..2 {
            let d = q.receive(1, Duration::from_millis(50)).await.unwrap();
            assert_eq!(d.len(), 1);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(q.receive(1, Duration::from_millis(20)).await.unwrap().is_empty());
        assert_eq!(q.dead_letter_count().await.unwrap(), 1);
        assert_eq!(q.redrive_dead_letters().await.unwrap(), 1);
        assert_eq!(q.receive(1, Duration::ZERO).await.unwrap()[0].body, "x");
    }

    #[tokio::test]
    async fn only_consumed_groups_have_queues() {
        let bus = MemoryBus::new(Duration::from_secs(1), 3, &[Group::GpuJobs]);
        assert_eq!(bus.groups(), [Group::GpuJobs]);
        // Asking for another group gives a queue that nothing publishes to.
        let stray = bus.memory_queue(Group::Projections);
        assert!(!Arc::ptr_eq(&stray, &bus.memory_queue(Group::Projections)));
        assert_eq!(bus.groups(), [Group::GpuJobs], "no queue was added");
    }

    #[tokio::test]
    async fn long_poll_wakes_on_send() {
        let q = Arc::new(MemoryQueue::new(Duration::from_secs(30), 5));
        let q2 = q.clone();
        let t = tokio::spawn(async move { q2.receive(1, Duration::from_secs(5)).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.send("g".into(), "d".into(), "hello".into());
        let got = tokio::time::timeout(Duration::from_secs(2), t).await.unwrap().unwrap();
        assert_eq!(got[0].body, "hello");
    }
}
