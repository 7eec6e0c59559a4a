//! The fan-out semantics, run against both buses: the in-memory bus and SNS/SQS on moto
//! (over real HTTP), with a real PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::CqrsFramework;
use mira_aggregates::{Job, JobCommand, Slide, SlideCommand, SlideServices};
use mira_bus::consumer::{self, Apply, ApplyError, Consumer, ConsumerConfig, Outcome};
use mira_bus::memory::MemoryBus;
use mira_bus::relay::{Relay, RelayConfig};
use mira_bus::{aws, Bus, EventMessage, Group, Names};
use mira_eventlog::testing::{settle, TestDb};
use mira_eventlog::{EventLog, PgEventRepository, StoredEvent};
use mira_events::{Actor, CommandContext, JobId, LocalKeyring, SlideId, TenantId};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

// ---- the two buses ------------------------------------------------------------------------

async fn memory_bus() -> Arc<dyn Bus> {
    Arc::new(MemoryBus::new(Duration::from_secs(2), 20, &Group::ALL))
}

fn moto_endpoint() -> String {
    std::env::var("MIRA_TEST_AWS_ENDPOINT")
        .expect("MIRA_TEST_AWS_ENDPOINT names the moto server; run the tests through scripts/test, which starts one")
}

async fn moto_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(moto_endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sns::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "mira-tests",
        ))
        .load()
        .await
}

fn unique_names() -> Names {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
    Names {
        topic: format!("mira-t{tag}-events.fifo"),
        queue_prefix: format!("mira-t{tag}-"),
    }
}

async fn moto_bus() -> Arc<dyn Bus> {
    let config = moto_config().await;
    let names = unique_names();
    aws::init(&config, &names).await.expect("bus init on moto");
    Arc::new(
        aws::AwsBus::connect(&config, &names, Some(Duration::from_secs(2)))
            .await
            .expect("connect"),
    )
}

// ---- a consumer whose effects the tests count ----------------------------------------------

struct Recorder {
    consumer: String,
    poison: Arc<Mutex<HashSet<String>>>,
    pool: sqlx::PgPool,
}

#[async_trait::async_trait]
impl Apply for Recorder {
    async fn apply(&self, tx: &mut PgConnection, e: &StoredEvent) -> Result<(), ApplyError> {
        if self.poison.lock().unwrap().contains(&e.aggregate_id) {
            return Err(ApplyError::failed(format!(
                "cannot apply {} of {}",
                e.event_type, e.aggregate_id
            )));
        }
        sqlx::query("INSERT INTO test_effects (consumer, aggregate_id, sequence, event_id, event_type) VALUES ($1, $2, $3, $4, $5)")
            .bind(&self.consumer)
            .bind(&e.aggregate_id)
            .bind(e.sequence)
            .bind(e.event_id)
            .bind(&e.event_type)
            .execute(tx)
            .await?;
        Ok(())
    }

    /// Slow work: recorded under `<consumer>:after`, outside the effect's transaction.
    async fn after_commit(&self, e: &StoredEvent) -> Result<(), ApplyError> {
        sqlx::query("INSERT INTO test_effects (consumer, aggregate_id, sequence, event_id, event_type) VALUES ($1, $2, $3, $4, $5)")
            .bind(format!("{}:after", self.consumer))
            .bind(&e.aggregate_id)
            .bind(e.sequence)
            .bind(e.event_id)
            .bind(&e.event_type)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

struct World {
    db: TestDb,
    log: EventLog,
    bus: Arc<dyn Bus>,
    poison: Arc<Mutex<HashSet<String>>>,
    keyring: Arc<LocalKeyring>,
}

impl World {
    async fn new(bus: Arc<dyn Bus>) -> Self {
        let db = TestDb::new().await;
        // The test's own effect table, made by the owner for the application's role.
        sqlx::raw_sql(
            "CREATE TABLE test_effects (n bigserial PRIMARY KEY, consumer text, aggregate_id text, sequence bigint, event_id uuid, event_type text); \
             GRANT ALL ON test_effects, test_effects_n_seq TO mira_app",
        )
        .execute(&db.owner)
        .await
        .unwrap();
        let log = EventLog::new(db.pool.clone());
        let dir = std::env::temp_dir().join(format!("mira-bus-keys-{}", uuid::Uuid::new_v4()));
        Self {
            db,
            log,
            bus,
            poison: Arc::default(),
            keyring: Arc::new(LocalKeyring::init(dir).unwrap().0),
        }
    }

    fn consumer(&self, group: Group, park_after: u32) -> Consumer {
        let mut cfg = ConsumerConfig::for_group(group);
        cfg.wait = Duration::from_millis(300);
        cfg.visibility = Duration::from_secs(2);
        cfg.park_after_receives = park_after;
        cfg.retry_delay = Duration::ZERO;
        let handler = Arc::new(Recorder {
            consumer: group.suffix().into(),
            poison: self.poison.clone(),
            pool: self.db.pool.clone(),
        });
        Consumer::new(self.log.clone(), self.bus.queue(group), handler, cfg)
    }

    fn relay(&self) -> Relay {
        Relay::new(self.log.clone(), self.bus.publisher(), RelayConfig::default(), None)
    }

    fn ctx(&self) -> CommandContext {
        CommandContext::new(TenantId::parse("lab").unwrap(), Actor::user("u-1"))
    }

    /// Real commands: each job is submitted and queued; each slide registered and uploaded.
    async fn commands(&self, jobs: usize, slides: usize) -> Vec<String> {
        let mut ids = Vec::new();
        let job_cqrs: CqrsFramework<Job, _> = CqrsFramework::new(
            PersistedEventStore::<_, Job>::new_event_store(PgEventRepository::new(
                self.log.clone(),
                TenantId::parse("lab").unwrap(),
            )),
            vec![],
            (),
        );
        for n in 0..jobs {
            let id = JobId::new().to_string();
            let submit = JobCommand::Submit {
                slide_id: SlideId::new(),
                spec: mira_events::JobSpec::Preprocess(Default::default()),
                max_attempts: 3,
                // Every other job is STAT: its JobQueued goes to gpu-jobs-stat.
                priority: if n % 2 == 1 {
                    mira_aggregates::Priority::Stat
                } else {
                    mira_aggregates::Priority::Routine
                },
            };
            job_cqrs
                .execute_with_metadata(&id, submit, self.ctx().to_cqrs())
                .await
                .unwrap();
            job_cqrs
                .execute_with_metadata(&id, JobCommand::Queue { now: Utc::now() }, self.ctx().to_cqrs())
                .await
                .unwrap();
            ids.push(id);
        }
        let slide_cqrs: CqrsFramework<Slide, _> = CqrsFramework::new(
            PersistedEventStore::<_, Slide>::new_event_store(PgEventRepository::new(
                self.log.clone(),
                TenantId::parse("lab").unwrap(),
            )),
            vec![],
            SlideServices {
                keyring: self.keyring.clone(),
            },
        );
        for _ in 0..slides {
            let id = SlideId::new();
            let register = SlideCommand::Register {
                slide_id: id,
                name: "s".into(),
                file_name: None,
                size_bytes: 10,
                content_type: "image/tiff".into(),
                sha256: None,
                object_key: format!("uploads/{id}"),
            };
            slide_cqrs
                .execute_with_metadata(&id.to_string(), register, self.ctx().to_cqrs())
                .await
                .unwrap();
            slide_cqrs
                .execute_with_metadata(
                    &id.to_string(),
                    SlideCommand::MarkUploaded {
                        size_bytes: 10,
                        version_id: None,
                    },
                    self.ctx().to_cqrs(),
                )
                .await
                .unwrap();
            ids.push(id.to_string());
        }
        settle(&self.db.pool).await;
        ids
    }

    async fn effects(&self, group: Group) -> Vec<(String, i64, uuid::Uuid, String)> {
        sqlx::query_as(
            "SELECT aggregate_id, sequence, event_id, event_type FROM test_effects WHERE consumer = $1 ORDER BY n",
        )
        .bind(group.suffix())
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    async fn all_events(&self) -> Vec<StoredEvent> {
        let mut out = Vec::new();
        let mut cursor = mira_eventlog::Cursor::START;
        loop {
            let batch = self.log.read_after(cursor, 1000).await.unwrap();
            let Some(last) = batch.last() else { return out };
            cursor = last.cursor();
            out.extend(batch);
        }
    }

    /// Runs the group's consumer until `aggregate` is parked with at least `set_aside` events
    /// set aside behind it, or fails after 60 s.
    async fn consume_until_parked(&self, group: Group, park_after: u32, aggregate: &str, set_aside: i64) {
        let c = self.consumer(group, park_after);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { c.run(stop).await }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let parked = consumer::list_parked(&self.db.pool).await.unwrap();
            if parked
                .iter()
                .any(|p| p.aggregate_id == aggregate && p.set_aside >= set_aside)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{aggregate} not parked with {set_aside} set aside: {parked:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// Runs the group's consumer until `done` holds on its effects, or fails after 60 s.
    async fn consume_until(
        &self,
        group: Group,
        park_after: u32,
        done: impl Fn(&[(String, i64, uuid::Uuid, String)]) -> bool,
    ) {
        let c = self.consumer(group, park_after);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { c.run(stop).await }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let effects = self.effects(group).await;
            if done(&effects) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{group:?} consumer stalled with {} effects",
                effects.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}

/// Every effect exactly once, and per aggregate in sequence order.
fn assert_exactly_once_in_order(effects: &[(String, i64, uuid::Uuid, String)], expected: &[&StoredEvent]) {
    let ids: Vec<uuid::Uuid> = effects.iter().map(|e| e.2).collect();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an effect was applied twice");
    assert_eq!(unique, expected.iter().map(|e| &e.event_id).collect::<HashSet<_>>());
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (agg, seq, _, _) in effects {
        let prev = last.insert(agg, *seq).unwrap_or(0);
        assert!(*seq > prev, "{agg}: sequence {seq} applied after {prev}");
    }
}

// ---- the suite -----------------------------------------------------------------------------

async fn fanout_each_queue_gets_what_its_filter_admits_exactly_once(bus: Arc<dyn Bus>) {
    let w = World::new(bus).await;
    w.commands(4, 3).await;
    let published = w.relay().drain(&CancellationToken::new()).await.unwrap();
    let events = w.all_events().await;
    assert_eq!(published as usize, events.len());
    assert_eq!(events.len(), 4 * 2 + 3 * 2);
    for g in Group::ALL {
        let expected: Vec<&StoredEvent> = events.iter().filter(|e| g.admits(&EventMessage::from(*e))).collect();
        assert!(!expected.is_empty());
        // What /metrics samples: every admitted message waits in the queue, none dead-lettered.
        let depth = w.bus.queue(g).depth().await.unwrap();
        assert_eq!(
            (depth.visible + depth.in_flight + depth.delayed, depth.dead_letters),
            (expected.len() as u64, 0),
            "{g:?}: {depth:?}"
        );
        w.consume_until(g, 3, |fx| fx.len() >= expected.len()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_exactly_once_in_order(&w.effects(g).await, &expected);
        let depth = w.bus.queue(g).depth().await.unwrap();
        assert_eq!(
            depth.visible + depth.in_flight,
            0,
            "{g:?}: consumed and deleted: {depth:?}"
        );
    }
    // gpu-jobs saw only queued jobs, and the verifier's queue only uploaded slides: an upload
    // wakes no GPU node. STAT jobs went to their own queue, routine ones to gpu-jobs.
    let kinds: HashSet<String> = w.effects(Group::GpuJobs).await.into_iter().map(|e| e.3).collect();
    assert_eq!(kinds, HashSet::from(["JobQueued".to_string()]));
    let priority = |e: &StoredEvent| {
        serde_json::from_str::<serde_json::Value>(&e.payload).unwrap()["priority"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for (g, want) in [(Group::GpuJobs, "routine"), (Group::GpuJobsStat, "stat")] {
        let ids: HashSet<uuid::Uuid> = w.effects(g).await.into_iter().map(|e| e.2).collect();
        assert_eq!(ids.len(), 2, "{g:?}");
        for e in events.iter().filter(|e| ids.contains(&e.event_id)) {
            assert_eq!(priority(e), want, "{g:?}");
        }
    }
    let kinds: HashSet<String> = w.effects(Group::Verify).await.into_iter().map(|e| e.3).collect();
    assert_eq!(kinds, HashSet::from(["SlideUploaded".to_string()]));
}

async fn relay_crash_between_publish_and_cursor_republishes(bus: Arc<dyn Bus>) {
    let w = World::new(bus).await;
    w.commands(3, 0).await;
    let stop = CancellationToken::new();
    let crashed = w.relay();
    let p = crashed.publish_next(&stop).await.unwrap().unwrap();
    assert_eq!(p.events, 6);
    drop(crashed); // killed before storing its cursor
    let again = w.relay();
    assert_eq!(again.cursor().await.unwrap(), mira_eventlog::Cursor::START);
    assert_eq!(again.drain(&stop).await.unwrap(), 6, "everything is published again");
    assert_eq!(again.cursor().await.unwrap(), p.upto);
    let events = w.all_events().await;
    let expected: Vec<&StoredEvent> = events.iter().collect();
    w.consume_until(Group::Projections, 3, |fx| fx.len() >= 6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once_in_order(&w.effects(Group::Projections).await, &expected);
}

async fn consumer_crash_after_effect_before_delete_applies_once(bus: Arc<dyn Bus>) {
    let w = World::new(bus).await;
    w.commands(1, 0).await;
    w.relay().drain(&CancellationToken::new()).await.unwrap();
    let c = w.consumer(Group::Projections, 3);
    let queue = w.bus.queue(Group::Projections);
    let first = queue.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(c.process(&first[0]).await, Outcome::Applied(1));
    // The consumer dies here: the effect committed, the message was never deleted.
    drop(c);
    let events = w.all_events().await;
    let expected: Vec<&StoredEvent> = events.iter().collect();
    w.consume_until(Group::Projections, 3, |fx| fx.len() >= 2).await;
    // The redelivered first message must have come back and been skipped.
    let deadline = Instant::now() + Duration::from_secs(20);
    let queue_empty = loop {
        let left = queue.receive(10, Duration::from_millis(200)).await.unwrap();
        if left.is_empty() && Instant::now() > deadline {
            break true;
        }
        let mut all_dupes = true;
        for d in &left {
            let o = w.consumer(Group::Projections, 3).handle(d).await;
            all_dupes &= o == Outcome::Duplicate;
        }
        assert!(all_dupes);
        if left.is_empty() && w.effects(Group::Projections).await.len() == 2 {
            break true;
        }
    };
    assert!(queue_empty);
    assert_exactly_once_in_order(&w.effects(Group::Projections).await, &expected);
}

async fn a_poison_event_parks_its_aggregate_until_redrive(bus: Arc<dyn Bus>) {
    let w = World::new(bus).await;
    let ids = w.commands(3, 0).await;
    let bad = ids[1].clone();
    w.poison.lock().unwrap().insert(bad.clone());
    w.relay().drain(&CancellationToken::new()).await.unwrap();
    // The two healthy jobs flow on; the poisoned one parks after two receives.
    w.consume_until(Group::Projections, 2, |fx| fx.len() >= 4).await;
    w.consume_until_parked(Group::Projections, 2, &bad, 1).await;
    // Later events of the parked aggregate are set aside, not applied.
    let later = {
        let c: CqrsFramework<Job, _> = CqrsFramework::new(
            PersistedEventStore::<_, Job>::new_event_store(PgEventRepository::new(
                w.log.clone(),
                TenantId::parse("lab").unwrap(),
            )),
            vec![],
            (),
        );
        c.execute_with_metadata(&bad, JobCommand::Cancel { reason: None }, w.ctx().to_cqrs())
            .await
            .unwrap();
        settle(&w.db.pool).await;
        w.relay().drain(&CancellationToken::new()).await.unwrap()
    };
    assert_eq!(later, 2);
    w.consume_until_parked(Group::Projections, 2, &bad, 4).await;
    assert!(w.effects(Group::Projections).await.iter().all(|e| e.0 != bad));
    // Fixed, then redriven: the aggregate's four events apply, in order.
    w.poison.lock().unwrap().clear();
    assert_eq!(
        consumer::request_redrive(&w.db.pool, Some("projections"), Some(&bad))
            .await
            .unwrap(),
        1
    );
    assert_eq!(w.consumer(Group::Projections, 2).redrive_requested().await.unwrap(), 1);
    assert!(consumer::list_parked(&w.db.pool).await.unwrap().is_empty());
    let bad_effects: Vec<i64> = w
        .effects(Group::Projections)
        .await
        .into_iter()
        .filter(|e| e.0 == bad)
        .map(|e| e.1)
        .collect();
    assert_eq!(bad_effects, vec![1, 2, 3, 4]);
    // The redrive ran the slow work of what it replayed, too.
    let after: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM test_effects WHERE consumer = 'projections:after' AND aggregate_id = $1 ORDER BY n",
    )
    .bind(&bad)
    .fetch_all(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(after, vec![1, 2, 3, 4]);
    let events = w.all_events().await;
    assert_exactly_once_in_order(&w.effects(Group::Projections).await, &events.iter().collect::<Vec<_>>());
}

async fn out_of_order_and_duplicate_delivery_converges(bus: Arc<dyn Bus>) {
    let w = World::new(bus).await;
    w.commands(3, 2).await;
    let events = w.all_events().await;
    // Deliver newest first, each twice (a second time under a new dedup id would be a real
    // redelivery; FIFO dedup may drop the exact repeat, which is fine too).
    let mut msgs: Vec<EventMessage> = events.iter().map(EventMessage::from).collect();
    msgs.reverse();
    let publisher = w.bus.publisher();
    for chunk in msgs.chunks(5) {
        assert!(publisher.publish(chunk).await.unwrap().is_empty());
        assert!(publisher.publish(chunk).await.unwrap().is_empty());
    }
    w.consume_until(Group::Projections, 3, |fx| fx.len() >= events.len())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once_in_order(&w.effects(Group::Projections).await, &events.iter().collect::<Vec<_>>());
}

/// Messages of valid shape whose hashes match their own fields, but which the log does not hold:
/// the next event of a real job, and a real event with another payload.
async fn a_forged_message_changes_nothing_and_is_dead_lettered(bus: Arc<dyn Bus>) {
    let w = World::new(bus).await;
    w.commands(1, 0).await;
    let events = w.all_events().await;
    let last = events.last().unwrap();
    let mut next = last.clone();
    next.event_id = uuid::Uuid::now_v7();
    next.sequence = last.sequence + 1;
    next.global_position = last.global_position + 1;
    next.event_type = "JobSucceeded".into();
    next.prev_hash = last.hash;
    next.hash = next.recompute_hash();
    let mut altered = events[0].clone();
    altered.payload = altered.payload.replace("wsi.preprocess", "wsi.other");
    assert_ne!(altered.payload, events[0].payload);
    altered.hash = altered.recompute_hash();
    let forged = [EventMessage::from(&altered), EventMessage::from(&next)];
    assert!(w.bus.publisher().publish(&forged).await.unwrap().is_empty());

    let queue = w.bus.queue(Group::Projections);
    let c = w.consumer(Group::Projections, 2);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { c.run(stop).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue.dead_letter_count().await.unwrap() < 2 {
        assert!(Instant::now() < deadline, "the forged messages were not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(
        w.effects(Group::Projections).await.is_empty(),
        "a forged message was applied"
    );
    assert!(
        consumer::list_parked(&w.db.pool).await.unwrap().is_empty(),
        "a forged message parked a job"
    );
    let advanced: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_streams WHERE last_sequence > 0")
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
    assert_eq!(advanced, 0);
    // The real events still flow afterwards.
    w.relay().drain(&CancellationToken::new()).await.unwrap();
    w.consume_until(Group::Projections, 2, |fx| fx.len() >= events.len())
        .await;
    assert_exactly_once_in_order(&w.effects(Group::Projections).await, &events.iter().collect::<Vec<_>>());
}

/// A `JobQueued` published without a `priority` attribute (by a relay of the release before)
/// reaches the routine queue and not the STAT one: the `{"exists": false}` matcher, applied by
/// SNS itself on moto and by the in-memory bus.
async fn a_queued_job_without_a_priority_attribute_is_routine(bus: Arc<dyn Bus>) {
    let w = World::new(bus.clone()).await;
    w.commands(1, 0).await;
    let queued = w
        .all_events()
        .await
        .into_iter()
        .find(|e| e.event_type == "JobQueued")
        .expect("a queued job");
    // Not a Job's: this relay publishes no `priority` for it, as the release before did for
    // every JobQueued.
    let m = EventMessage {
        aggregate_type: "Legacy".into(),
        ..EventMessage::from(&queued)
    };
    assert_eq!(m.attribute("priority"), None);
    assert!(bus
        .publisher()
        .publish(std::slice::from_ref(&m))
        .await
        .unwrap()
        .is_empty());
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.is_empty() && Instant::now() < deadline {
        got = bus
            .queue(Group::GpuJobs)
            .receive(10, Duration::from_millis(500))
            .await
            .unwrap();
    }
    assert_eq!(got.len(), 1, "the routine queue has it");
    assert!(got[0].body.contains(&m.event_id.to_string()));
    let stat = bus
        .queue(Group::GpuJobsStat)
        .receive(10, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(stat.is_empty(), "the STAT queue has nothing");
}

macro_rules! both_buses {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::memory_bus().await).await })*
        }
        mod moto {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::moto_bus().await).await })*
        }
    };
}

both_buses!(
    fanout_each_queue_gets_what_its_filter_admits_exactly_once,
    relay_crash_between_publish_and_cursor_republishes,
    consumer_crash_after_effect_before_delete_applies_once,
    a_poison_event_parks_its_aggregate_until_redrive,
    out_of_order_and_duplicate_delivery_converges,
    a_forged_message_changes_nothing_and_is_dead_lettered,
    a_queued_job_without_a_priority_attribute_is_routine,
);

/// What `mira bus init` creates on moto, read back attribute by attribute, is the topology
/// file: the topic's attributes, each queue's and dead-letter queue's attributes and redrive
/// count, each subscription's attributes and filter policy.
#[tokio::test]
async fn bus_init_creates_exactly_the_topology_file() {
    let config = moto_config().await;
    let names = unique_names();
    let info = aws::init(&config, &names).await.unwrap();
    let file: serde_json::Value = serde_json::from_str(mira_bus::topology::TOPOLOGY_JSON).unwrap();
    let sns = aws_sdk_sns::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);
    let topic = sns
        .get_topic_attributes()
        .topic_arn(&info.topic_arn)
        .send()
        .await
        .unwrap();
    let topic_attrs = topic.attributes().unwrap();
    for (k, v) in file["topic"]["attributes"].as_object().unwrap() {
        assert_eq!(topic_attrs.get(k).map(String::as_str), v.as_str(), "topic {k}");
    }
    let specs = file["queues"].as_array().unwrap();
    assert_eq!(info.queues.len(), specs.len());
    for (q, spec) in info.queues.iter().zip(specs) {
        assert_eq!(serde_json::to_value(q.group).unwrap(), spec["group"]);
        for (url, what) in [(&q.url, "queue"), (&q.dlq_url, "dead-letter queue")] {
            let got = sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
                .send()
                .await
                .unwrap();
            let attrs = got.attributes().unwrap();
            for (k, v) in file["queue_attributes"].as_object().unwrap() {
                let key = aws_sdk_sqs::types::QueueAttributeName::from(k.as_str());
                assert_eq!(attrs.get(&key).map(String::as_str), v.as_str(), "{what} {url}: {k}");
            }
            if what == "queue" {
                let redrive: serde_json::Value = serde_json::from_str(
                    attrs
                        .get(&aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy)
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(redrive["deadLetterTargetArn"], q.dlq_arn.as_str());
                assert_eq!(
                    redrive["maxReceiveCount"].to_string().trim_matches('"'),
                    file["dead_letter"]["max_receive_count"].to_string()
                );
            }
        }
        assert_eq!(q.dlq_url.rsplit('/').next().unwrap(), names.dlq(q.group));
        let sub = sns
            .get_subscription_attributes()
            .subscription_arn(&q.subscription_arn)
            .send()
            .await
            .unwrap();
        let sub_attrs = sub.attributes().unwrap();
        for (k, v) in file["subscription_attributes"].as_object().unwrap() {
            assert_eq!(sub_attrs.get(k).map(String::as_str), v.as_str(), "subscription {k}");
        }
        let filter: Option<serde_json::Value> = sub_attrs.get("FilterPolicy").map(|f| serde_json::from_str(f).unwrap());
        assert_eq!(
            filter.unwrap_or(serde_json::Value::Null),
            spec["filter_policy"],
            "{:?}",
            q.group
        );
    }
}

// ---- the relay and the witness (ADR 0019) -------------------------------------------------

/// Polls `f` until it holds, for at most 60 s (a deadline, not a speed limit).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scalar(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A checkpointer of its own (key in a directory of the test's) writing to `witness`.
fn checkpointer(witness: Arc<dyn mira_eventlog::witness::Witness>) -> mira_eventlog::checkpoint::Checkpointer {
    let dir = std::env::temp_dir().join(format!("mira-relay-audit-{}", uuid::Uuid::new_v4()));
    let (key, _) = mira_eventlog::checkpoint::AuditKey::init(&dir.join("audit.key")).unwrap();
    mira_eventlog::checkpoint::Checkpointer::new(Arc::new(key), witness)
}

/// A relay writing a checkpoint after every published batch, running until the returned
/// token is cancelled.
fn run_checkpointing_relay(
    w: &World,
    c: &mira_eventlog::checkpoint::Checkpointer,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), mira_bus::relay::RelayError>>,
) {
    let cfg = RelayConfig {
        checkpoint_every_events: 1,
        idle_poll: Duration::from_millis(10),
        ..Default::default()
    };
    let relay = Relay::new(w.log.clone(), w.bus.publisher(), cfg, Some(c.clone()));
    let stop = CancellationToken::new();
    let url = w.db.url.clone();
    let s = stop.clone();
    (stop, tokio::spawn(async move { relay.run(&url, s).await }))
}

async fn published_all(w: &World) -> bool {
    let max = scalar(&w.db.pool, "SELECT coalesce(max(global_position), 0) FROM events").await;
    scalar(&w.db.pool, "SELECT coalesce(max(position), 0) FROM relay_cursor").await >= max
}

async fn checkpointed_all(w: &World) -> bool {
    let max = scalar(&w.db.pool, "SELECT coalesce(max(global_position), 0) FROM events").await;
    scalar(&w.db.pool, "SELECT coalesce(max(upto_position), 0) FROM checkpoints").await >= max
}

#[tokio::test]
async fn the_relay_stops_checkpointing_on_a_witness_conflict_and_publishing_goes_on() {
    let w = World::new(memory_bus().await).await;
    let wdir = std::env::temp_dir().join(format!("mira-relay-witness-{}", uuid::Uuid::new_v4()));
    let witness = Arc::new(mira_eventlog::witness::DirWitness::create_dir(&wdir).unwrap());
    let c = checkpointer(witness);
    let health = c.health.clone();
    let (stop, running) = run_checkpointing_relay(&w, &c);
    w.commands(2, 0).await;
    eventually("checkpoint 1", || checkpointed_all(&w)).await;
    let (first, first_end) = (
        scalar(&w.db.pool, "SELECT max(seq) FROM checkpoints").await,
        scalar(&w.db.pool, "SELECT max(upto_position) FROM checkpoints").await,
    );
    w.commands(2, 0).await;
    eventually("a later checkpoint", || checkpointed_all(&w)).await;
    assert!(health.last_success_unix() > 0);
    // The relay stops (no checkpoint is half done while the rows go); the superuser deletes
    // the tail and the checkpoints that covered it; the relay starts again.
    stop.cancel();
    running.await.unwrap().unwrap();
    let mut tx = w.db.owner.begin().await.unwrap();
    sqlx::raw_sql(&format!(
        "SET LOCAL session_replication_role = replica; DELETE FROM checkpoints WHERE seq > {first}; \
         DELETE FROM events WHERE global_position > {first_end}"
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let (stop, running) = run_checkpointing_relay(&w, &c);
    // Work goes on: the relay meets the witness's other checkpoint and stops checkpointing.
    w.commands(2, 0).await;
    eventually("the conflict", || async { health.conflicts() == 1 }).await;
    eventually("publishing", || published_all(&w)).await;
    w.commands(2, 0).await;
    eventually("publishing after the conflict", || published_all(&w)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(health.conflicts(), 1, "checkpointing stays stopped: no second attempt");
    assert_eq!(
        scalar(&w.db.pool, "SELECT max(seq) FROM checkpoints").await,
        first,
        "no checkpoint row was written after the conflict"
    );
    stop.cancel();
    running.await.unwrap().unwrap();
}

/// A witness that never answers.
#[derive(Debug)]
struct Silent;

#[async_trait::async_trait]
impl mira_eventlog::witness::Witness for Silent {
    fn describe(&self) -> String {
        "a witness that never answers".into()
    }
    async fn create(
        &self,
        _: &str,
        _: &[u8],
    ) -> Result<mira_eventlog::witness::Created, mira_eventlog::witness::WitnessError> {
        std::future::pending().await
    }
    async fn get(&self, _: &str) -> Result<Option<Vec<u8>>, mira_eventlog::witness::WitnessError> {
        std::future::pending().await
    }
    async fn epochs(&self) -> Result<Vec<uuid::Uuid>, mira_eventlog::witness::WitnessError> {
        std::future::pending().await
    }
    async fn list(
        &self,
        _: Option<uuid::Uuid>,
        _: &str,
        _: usize,
    ) -> Result<Vec<mira_eventlog::witness::Listed>, mira_eventlog::witness::WitnessError> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_witness_that_hangs_never_holds_publishing_back() {
    let w = World::new(memory_bus().await).await;
    let c = checkpointer(Arc::new(Silent));
    let health = c.health.clone();
    let (stop, running) = run_checkpointing_relay(&w, &c);
    for _ in 0..3 {
        w.commands(2, 0).await;
        eventually("publishing while the witness hangs", || published_all(&w)).await;
    }
    assert_eq!(scalar(&w.db.pool, "SELECT count(*) FROM checkpoints").await, 0);
    assert_eq!((health.conflicts(), health.last_success_unix()), (0, 0));
    stop.cancel();
    running.await.unwrap().unwrap();
}

/// A message its queue's subscription sent under an older filter (a `SlideUploaded` left on
/// `gpu-jobs` from before the `verify` queue took them) is applied, though the consumer's
/// filter no longer admits it: the gap before it is filled from the log without dropping it.
#[tokio::test]
async fn a_message_an_older_filter_delivered_is_applied() {
    let bus = Arc::new(MemoryBus::new(Duration::from_secs(2), 20, &[Group::GpuJobs]));
    let w = World::new(bus.clone()).await;
    w.commands(0, 1).await;
    let uploaded = w
        .all_events()
        .await
        .into_iter()
        .find(|e| e.event_type == "SlideUploaded")
        .expect("an uploaded slide");
    assert!(!Group::GpuJobs.admits(&EventMessage::from(&uploaded)));
    let m = EventMessage::from(&uploaded);
    bus.memory_queue(Group::GpuJobs)
        .send(m.group_id(), m.event_id.to_string(), m.to_body());
    w.consume_until(Group::GpuJobs, 3, |fx| !fx.is_empty()).await;
    let kinds: Vec<String> = w.effects(Group::GpuJobs).await.into_iter().map(|e| e.3).collect();
    assert_eq!(kinds, ["SlideUploaded"]);
}
