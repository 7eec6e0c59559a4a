//! The fan-out topology of DESIGN §5.2: one FIFO topic, and one FIFO queue per consumer group,
//! each with its filter and its dead-letter queue. It is one data file, `bus/topology.json`,
//! compiled in here: `mira bus init` creates exactly it, the in-memory bus applies its filters,
//! and the Pulumi program (`pulumi/`) reads the same file.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::message::EventMessage;

/// `bus/topology.json` as written.
pub const TOPOLOGY_JSON: &str = include_str!("../topology.json");

/// The topology file.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Topology {
    pub topic: TopicSpec,
    pub queue_attributes: BTreeMap<String, String>,
    pub dead_letter: DeadLetterSpec,
    pub subscription_attributes: BTreeMap<String, String>,
    /// The message attributes every published event carries (what filter policies can name).
    pub message_attributes: Vec<String>,
    pub queues: Vec<QueueSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TopicSpec {
    pub default_name: String,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DeadLetterSpec {
    pub suffix: String,
    pub max_receive_count: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct QueueSpec {
    pub group: Group,
    /// The SNS filter policy on message attributes; `null` for every event.
    pub filter_policy: Option<BTreeMap<String, Vec<Matcher>>>,
}

/// One value of a filter policy's attribute: the attribute equals it, or (`{"exists":
/// false}`) the message has no such attribute. SNS admits a message if any of an attribute's
/// values matches, for every attribute the policy names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Matcher {
    Equals(String),
    Exists { exists: bool },
}

impl Matcher {
    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (Matcher::Equals(want), Some(v)) => want == v,
            (Matcher::Equals(_), None) => false,
            (Matcher::Exists { exists }, v) => *exists == v.is_some(),
        }
    }
}

/// The topology, parsed once. The file is part of the build: a malformed one fails the tests
/// (`the_topology_file_is_whole`), never a running process.
pub fn topology() -> &'static Topology {
    static T: LazyLock<Topology> =
        LazyLock::new(|| serde_json::from_str(TOPOLOGY_JSON).unwrap_or_else(|e| panic!("bus/topology.json: {e}")));
    &T
}

/// A consumer group's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    /// Every event.
    Projections,
    /// What gives the GPU worker something to do: queued routine jobs.
    GpuJobs,
    /// Job and slide lifecycle events.
    Handlers,
    /// Uploaded slides to verify (`mira-worker verify`, on CPUs: no upload wakes the GPU fleet).
    Verify,
    /// Queued STAT jobs: the GPU worker polls it before each receive from `gpu-jobs`.
    GpuJobsStat,
}

impl Group {
    pub const ALL: [Group; 5] = [
        Group::Projections,
        Group::GpuJobs,
        Group::Handlers,
        Group::Verify,
        Group::GpuJobsStat,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Group::Projections => "projections",
            Group::GpuJobs => "gpu-jobs",
            Group::Handlers => "handlers",
            Group::Verify => "verify",
            Group::GpuJobsStat => "gpu-jobs-stat",
        }
    }

    /// The consumer that takes this queue's messages, under whose name its records are kept:
    /// the GPU worker's one consumer takes both of its queues.
    pub fn consumer(self) -> &'static str {
        match self {
            Group::GpuJobsStat => Group::GpuJobs.suffix(),
            g => g.suffix(),
        }
    }

    fn spec(self) -> Option<&'static QueueSpec> {
        topology().queues.iter().find(|q| q.group == self)
    }

    /// The SNS filter policy on message attributes, or `None` for everything.
    pub fn filter_policy(self) -> Option<serde_json::Value> {
        self.spec()
            .and_then(|q| q.filter_policy.as_ref())
            .map(|p| serde_json::to_value(p).unwrap_or_default())
    }

    /// The same filter, applied in process: every attribute the policy names has one of its
    /// values.
    pub fn admits(self, m: &EventMessage) -> bool {
        match self.spec().and_then(|q| q.filter_policy.as_ref()) {
            None => true,
            Some(policy) => policy.iter().all(|(attr, values)| {
                let v = m.attribute(attr);
                values.iter().any(|x| x.matches(v))
            }),
        }
    }
}

/// Names from the settings `AWS__SNS__TopicName` and `AWS__SQS__QueuePrefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub topic: String,
    pub queue_prefix: String,
}

impl Names {
    /// The names `settings` give.
    pub fn from_settings(settings: &mira_config::Settings) -> Self {
        Self {
            topic: settings.aws.sns.topic_name.clone(),
            queue_prefix: settings.aws.sqs.queue_prefix.clone(),
        }
    }
}

impl Default for Names {
    fn default() -> Self {
        Self {
            topic: topology().topic.default_name.clone(),
            queue_prefix: "mira-".into(),
        }
    }
}

impl Names {
    /// `<prefix>projections.fifo`.
    pub fn queue(&self, g: Group) -> String {
        format!("{}{}.fifo", self.queue_prefix, g.suffix())
    }

    /// `<prefix>projections-dlq.fifo`: `-dlq` after the queue name, `.fifo` kept last.
    pub fn dlq(&self, g: Group) -> String {
        format!(
            "{}{}{}.fifo",
            self.queue_prefix,
            g.suffix(),
            topology().dead_letter.suffix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let n = Names::default();
        assert_eq!(n.queue(Group::GpuJobs), "mira-gpu-jobs.fifo");
        assert_eq!(n.dlq(Group::Handlers), "mira-handlers-dlq.fifo");
        assert_eq!(n.topic, "mira-events.fifo");
    }

    #[test]
    fn the_topology_file_is_whole() {
        let t = topology();
        let groups: Vec<Group> = t.queues.iter().map(|q| q.group).collect();
        assert_eq!(groups, Group::ALL, "one queue per group, in order");
        for q in &t.queues {
            for attr in q.filter_policy.iter().flat_map(|p| p.keys()) {
                assert!(t.message_attributes.contains(attr), "{attr} is not published");
            }
        }
        // Every attribute the file names is one a message carries (and the relay publishes):
        // the job's priority on every JobQueued.
        let queued = EventMessage {
            event_type: "JobQueued".into(),
            event_version: "1".into(),
            payload: r#"{"type":"JobQueued","attempt":1}"#.into(),
            ..EventMessage::example()
        };
        for attr in &t.message_attributes {
            assert!(queued.attribute(attr).is_some(), "messages carry no {attr}");
        }
        assert_eq!(t.queue_attributes["FifoQueue"], "true");
        assert!(t.dead_letter.max_receive_count >= 1);
    }

    #[test]
    fn the_in_process_filters_are_the_files() {
        let m = |event_type: &str, aggregate_type: &str| EventMessage {
            event_type: event_type.into(),
            aggregate_type: aggregate_type.into(),
            ..EventMessage::example()
        };
        assert!(Group::GpuJobs.admits(&m("JobQueued", "Job")));
        assert!(
            !Group::GpuJobsStat.admits(&m("JobQueued", "Job")),
            "a JobQueued of version 1 is routine"
        );
        // An upload wakes no GPU node: only the verifier's queue takes it.
        assert!(!Group::GpuJobs.admits(&m("SlideUploaded", "Slide")));
        assert!(Group::Verify.admits(&m("SlideUploaded", "Slide")));
        assert!(!Group::Verify.admits(&m("JobQueued", "Job")));
        assert!(!Group::GpuJobs.admits(&m("JobSubmitted", "Job")));
        assert!(Group::Handlers.admits(&m("JobSubmitted", "Job")));
        assert!(!Group::Handlers.admits(&m("KeyRotated", "Tenant")));
        assert!(Group::Projections.admits(&m("KeyRotated", "Tenant")));
    }

    #[test]
    fn names_come_from_the_settings() {
        let settings = mira_config::Settings::load(
            None,
            [
                ("AWS__SQS__QueuePrefix", "lab-"),
                ("AWS__SNS__TopicName", "lab-events.fifo"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap();
        let n = Names::from_settings(&settings);
        assert_eq!(n.queue(Group::Handlers), "lab-handlers.fifo");
        assert_eq!(n.topic, "lab-events.fifo");
    }

    /// Every `JobQueued` carries its job's priority, and STAT and routine jobs reach their own
    /// queues; one published without the attribute (by the release before) is routine.
    #[test]
    fn queued_jobs_are_routed_by_priority() {
        let queued = |version: &str, payload: &str| EventMessage {
            event_type: "JobQueued".into(),
            event_version: version.into(),
            payload: payload.into(),
            ..EventMessage::example()
        };
        let v1 = queued("1", r#"{"type":"JobQueued","attempt":1}"#);
        let stat = queued("2", r#"{"type":"JobQueued","attempt":2,"priority":"stat"}"#);
        let routine = queued("2", r#"{"type":"JobQueued","attempt":1,"priority":"routine"}"#);
        assert_eq!(v1.attribute("priority"), Some("routine"));
        assert_eq!(stat.attribute("priority"), Some("stat"));
        assert_eq!(routine.attribute("priority"), Some("routine"));
        assert_eq!(
            EventMessage::example().attribute("priority"),
            None,
            "only JobQueued carries one"
        );
        for (m, to) in [
            (&v1, Group::GpuJobs),
            (&routine, Group::GpuJobs),
            (&stat, Group::GpuJobsStat),
        ] {
            let admitted: Vec<Group> = Group::ALL.into_iter().filter(|g| g.admits(m)).collect();
            let mut want = vec![Group::Projections, Group::Handlers, to];
            want.sort_by_key(|g| Group::ALL.iter().position(|x| x == g));
            assert_eq!(admitted, want, "{}", m.payload);
        }
        // A message without the attribute at all (a relay of the release before) is routine.
        let p = Group::GpuJobs.spec().and_then(|q| q.filter_policy.as_ref()).unwrap();
        assert!(p["priority"].iter().any(|x| x.matches(None)));
        assert!(!Group::GpuJobsStat
            .spec()
            .and_then(|q| q.filter_policy.as_ref())
            .unwrap()["priority"]
            .iter()
            .any(|x| x.matches(None)));
        assert_eq!(Group::GpuJobsStat.consumer(), "gpu-jobs");
    }
}
