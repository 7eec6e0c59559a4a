//! Upcasters: they turn a stored event of an older version into the current shape before it
//! is deserialised. Stored bytes are never rewritten; the hash covers what was stored.

use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use serde_json::Value;

/// The `max_attempts` that version 1 of `JobSubmitted` implied.
pub const V1_DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Every upcaster, for cqrs-es's event store and for Mira's own readers.
/// In order: each moves one version to the next, so an event of any version reaches the
/// current one.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![
        Box::new(Upcaster {
            event_type: "JobSubmitted",
            from: "1",
            to: "2",
            f: |payload| {
                if let Value::Object(map) = payload {
                    map.entry("max_attempts")
                        .or_insert(Value::from(V1_DEFAULT_MAX_ATTEMPTS));
                }
            },
        }),
        // Jobs submitted before priorities were routine.
        Box::new(Upcaster {
            event_type: "JobSubmitted",
            from: "2",
            to: "3",
            f: routine,
        }),
        Box::new(Upcaster {
            event_type: "JobQueued",
            from: "1",
            to: "2",
            f: routine,
        }),
    ]
}

fn routine(payload: &mut Value) {
    if let Value::Object(map) = payload {
        map.entry("priority").or_insert(Value::from("routine"));
    }
}

/// Moves one event type from one exact version to the next. Versions are plain integers
/// written as text, the same text `DomainEvent::event_version` gives.
struct Upcaster {
    event_type: &'static str,
    from: &'static str,
    to: &'static str,
    f: fn(&mut Value),
}

impl EventUpcaster for Upcaster {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        event_type == self.event_type && event_version == self.from
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        (self.f)(&mut event.payload);
        event.event_version = self.to.to_owned();
        event
    }
}

/// Applies the upcasters to one serialised event.
pub fn upcast(mut event: SerializedEvent) -> SerializedEvent {
    for u in upcasters() {
        if u.can_upcast(&event.event_type, &event.event_version) {
            event = u.upcast(event);
        }
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobEvent;

    /// Exactly the bytes a version-1 `JobSubmitted` was stored with.
    const V1_BYTES: &str = r#"{"type":"JobSubmitted","slide_id":"0190d5a4-0000-7000-8000-000000000002","kind":"wsi.preprocess","params":{"tile_size":254}}"#;

    #[test]
    fn loads_version_1_job_submitted() {
        let stored = SerializedEvent::new(
            "j".into(),
            1,
            "Job".into(),
            "JobSubmitted".into(),
            "1".into(),
            serde_json::from_str(V1_BYTES).unwrap(),
            Value::Null,
        );
        // Without the upcaster the old bytes do not load.
        assert!(serde_json::from_value::<JobEvent>(stored.payload.clone()).is_err());
        let up = upcast(stored);
        assert_eq!(up.event_version, "3");
        match serde_json::from_value::<JobEvent>(up.payload).unwrap() {
            JobEvent::JobSubmitted {
                max_attempts,
                spec,
                priority,
                ..
            } => {
                assert_eq!(priority, crate::Priority::Routine);
                assert_eq!(max_attempts, V1_DEFAULT_MAX_ATTEMPTS);
                assert_eq!(spec.kind(), Some(crate::JobKind::Preprocess));
                assert_eq!(spec.params()["tile_size"], 254);
            }
            other => panic!("upcast gave {other:?}"),
        }
    }

    #[test]
    fn current_versions_pass_through() {
        let stored = SerializedEvent::new(
            "j".into(),
            1,
            "Job".into(),
            "JobSubmitted".into(),
            "3".into(),
            serde_json::json!({"type":"JobSubmitted","slide_id":"0190d5a4-0000-7000-8000-000000000002","kind":"k","params":{},"max_attempts":7,"priority":"stat"}),
            Value::Null,
        );
        let up = upcast(stored.clone());
        assert_eq!(up, stored);
    }

    /// The job events of the published test vectors (`docs/audit/test-vectors.json`), stored
    /// before priorities existed, still decode, as routine; their bytes are the vectors' own
    /// (the vectors' test checks their hashes), and the upcast changes only the decoded value.
    #[test]
    fn the_vectors_job_events_read_as_routine() {
        let vectors: Value = serde_json::from_str(include_str!("../../docs/audit/test-vectors.json")).unwrap();
        let mut seen = Vec::new();
        let mut walk = vec![&vectors];
        while let Some(v) = walk.pop() {
            match v {
                Value::Object(m) => {
                    if let (Some(Value::String(t)), Some(Value::String(ver)), Some(Value::String(payload))) =
                        (m.get("event_type"), m.get("event_version"), m.get("payload"))
                    {
                        if t.starts_with("Job") {
                            let stored = SerializedEvent::new(
                                "j".into(),
                                1,
                                "Job".into(),
                                t.clone(),
                                ver.clone(),
                                serde_json::from_str(payload).unwrap(),
                                Value::Null,
                            );
                            let e: JobEvent = serde_json::from_value(upcast(stored).payload).unwrap();
                            let p = match e {
                                JobEvent::JobSubmitted { priority, .. } | JobEvent::JobQueued { priority, .. } => {
                                    priority
                                }
                                other => panic!("{other:?}"),
                            };
                            assert_eq!(p, crate::Priority::Routine, "{t} v{ver}");
                            seen.push((t.clone(), ver.clone()));
                        }
                    }
                    walk.extend(m.values());
                }
                Value::Array(a) => walk.extend(a.iter()),
                _ => {}
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen,
            [
                ("JobQueued".to_string(), "1".to_string()),
                ("JobSubmitted".to_string(), "2".to_string())
            ]
        );
    }
}
