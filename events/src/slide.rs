//! Slide events: registered → uploaded → verified (with metadata) | rejected → deleted.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::ids::SlideId;
use crate::seal::Sealed;

/// One level of a slide's pyramid, as OpenSlide reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideLevel {
    pub width: u64,
    pub height: u64,
    pub downsample: f64,
}

/// What the worker learns when it opens a slide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideMetadata {
    pub vendor: Option<String>,
    pub width: u64,
    pub height: u64,
    pub levels: Vec<SlideLevel>,
    pub mpp_x: Option<f64>,
    pub mpp_y: Option<f64>,
    pub objective_power: Option<f64>,
    /// OpenSlide properties that can name files or people, sealed as one JSON object.
    /// (patient data)
    pub sealed_properties: Option<Sealed>,
}

/// Fields marked "(patient data)" are [`Sealed`]: ciphertext under the slide's subject key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SlideEvent {
    SlideRegistered {
        slide_id: SlideId,
        /// The slide's display name. (patient data)
        name: Sealed,
        /// The original file name, if the client sent one. (patient data)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_name: Option<Sealed>,
        size_bytes: u64,
        content_type: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// Where the upload lands in blob storage.
        object_key: String,
    },
    SlideUploaded {
        size_bytes: u64,
        /// The immutable copy's S3 version id (a versioned bucket), which verification and
        /// every job read; none on the local store.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version_id: Option<String>,
    },
    SlideVerified {
        metadata: SlideMetadata,
        /// The SHA-256 of the copy that was verified (hex): every job checks the bytes it
        /// fetches against it. Absent on slides verified before it was recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// The copy's version id, from `SlideUploaded`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version_id: Option<String>,
    },
    SlideRejected {
        reason: String,
    },
    SlideDeleted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl SlideEvent {
    /// Every event type a slide's stream may hold (see `JobEvent::NAMES`).
    pub const NAMES: &'static [&'static str] = &[
        "SlideRegistered",
        "SlideUploaded",
        "SlideVerified",
        "SlideRejected",
        "SlideDeleted",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::SlideRegistered { .. } => "SlideRegistered",
            Self::SlideUploaded { .. } => "SlideUploaded",
            Self::SlideVerified { .. } => "SlideVerified",
            Self::SlideRejected { .. } => "SlideRejected",
            Self::SlideDeleted { .. } => "SlideDeleted",
        }
    }

    /// The subject whose key seals this slide's patient-data fields.
    pub fn subject(slide_id: &SlideId) -> String {
        format!("slide:{slide_id}")
    }
}

impl DomainEvent for SlideEvent {
    fn event_type(&self) -> String {
        self.name().to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `NAMES` is every variant: serde's "unknown variant" error lists them all.
    #[test]
    fn names_are_every_event_type() {
        let err = serde_json::from_str::<SlideEvent>(r#"{"type":"NoSuchEvent"}"#)
            .unwrap_err()
            .to_string();
        let listed: Vec<&str> = err.split('`').skip(3).step_by(2).collect();
        assert_eq!(listed, SlideEvent::NAMES, "{err}");
    }
}
