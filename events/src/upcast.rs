//! Upcasters: they turn a stored event of an older version into the current shape before it
//! is deserialised. Stored bytes are never rewritten; the hash covers what was stored.

use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use serde_json::Value;

/// The `max_attempts` that version 1 of `JobSubmitted` implied.
pub const V1_DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Every upcaster, for cqrs-es's event store and for Mira's own readers.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![Box::new(Upcaster {
        event_type: "JobSubmitted",
        from: "1",
        to: "2",
        f: |payload| {
            if let Value::Object(map) = payload {
                map.entry("max_attempts")
                    .or_insert(Value::from(V1_DEFAULT_MAX_ATTEMPTS));
            }
        },
    })]
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
        assert_eq!(up.event_version, "2");
        match serde_json::from_value::<JobEvent>(up.payload).unwrap() {
            JobEvent::JobSubmitted {
                max_attempts,
                kind,
                params,
                ..
            } => {
                assert_eq!(max_attempts, V1_DEFAULT_MAX_ATTEMPTS);
                assert_eq!(kind, "wsi.preprocess");
                assert_eq!(params["tile_size"], 254);
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
            "2".into(),
            serde_json::json!({"type":"JobSubmitted","slide_id":"0190d5a4-0000-7000-8000-000000000002","kind":"k","params":{},"max_attempts":7}),
            Value::Null,
        );
        let up = upcast(stored.clone());
        assert_eq!(up, stored);
    }
}
