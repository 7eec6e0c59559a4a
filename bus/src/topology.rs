//! The fan-out topology of DESIGN §5.2: one FIFO topic, and one FIFO queue per consumer group,
//! each with its filter and its dead-letter queue. `mira bus init` and Pulumi create exactly
//! this; the in-memory bus applies the same filters.

use serde::Serialize;

use crate::message::EventMessage;

/// A consumer group's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    /// Every event.
    Projections,
    /// What gives the worker something to do: queued jobs and uploaded slides to verify.
    GpuJobs,
    /// Job and slide lifecycle events.
    Handlers,
}

impl Group {
    pub const ALL: [Group; 3] = [Group::Projections, Group::GpuJobs, Group::Handlers];

    pub fn suffix(self) -> &'static str {
        match self {
            Group::Projections => "projections",
            Group::GpuJobs => "gpu-jobs",
            Group::Handlers => "handlers",
        }
    }

    /// The SNS filter policy on message attributes, or `None` for everything.
    pub fn filter_policy(self) -> Option<serde_json::Value> {
        match self {
            Group::Projections => None,
            Group::GpuJobs => Some(serde_json::json!({ "event_type": ["JobQueued", "SlideUploaded"] })),
            Group::Handlers => Some(serde_json::json!({ "aggregate_type": ["Job", "Slide"] })),
        }
    }

    /// The same filter, applied in process.
    pub fn admits(self, m: &EventMessage) -> bool {
        match self {
            Group::Projections => true,
            Group::GpuJobs => m.event_type == "JobQueued" || m.event_type == "SlideUploaded",
            Group::Handlers => m.aggregate_type == "Job" || m.aggregate_type == "Slide",
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
            topic: "mira-events.fifo".into(),
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
        format!("{}{}-dlq.fifo", self.queue_prefix, g.suffix())
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
}
