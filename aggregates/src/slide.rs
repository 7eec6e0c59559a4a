//! The Slide aggregate: registered → uploaded → verified | rejected → deleted.

use std::sync::Arc;

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use mira_events::seal::{self, Keyring};
use mira_events::{Sealed, SlideEvent, SlideId, SlideMetadata};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlideStatus {
    #[default]
    New,
    Registered,
    Uploaded,
    Verified,
    Rejected,
    Deleted,
}

impl SlideStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Registered => "registered",
            Self::Uploaded => "uploaded",
            Self::Verified => "verified",
            Self::Rejected => "rejected",
            Self::Deleted => "deleted",
        }
    }

    /// Every status a registered slide can be in: what the API shows.
    pub const SHOWN: [SlideStatus; 5] = [
        Self::Registered,
        Self::Uploaded,
        Self::Verified,
        Self::Rejected,
        Self::Deleted,
    ];
}

impl utoipa::PartialSchema for SlideStatus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::schema::status_schema(Self::SHOWN.iter().map(|s| s.as_str()))
    }
}

impl utoipa::ToSchema for SlideStatus {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Slide {
    pub status: SlideStatus,
    pub slide_id: Option<SlideId>,
    pub name: Option<Sealed>,
    pub size_bytes: u64,
    pub content_type: String,
    pub object_key: String,
    /// The SHA-256 the client declared when registering, checked when the slide is verified.
    #[serde(default)]
    pub sha256: Option<String>,
    pub metadata: Option<SlideMetadata>,
    pub rejection: Option<String>,
    /// The immutable copy's version id, when the store keeps versions.
    #[serde(default)]
    pub version_id: Option<String>,
    /// The SHA-256 of the copy verification read: what every job must fetch.
    #[serde(default)]
    pub verified_sha256: Option<String>,
}

/// Where an uploaded slide's immutable copy lives: `POST …/uploaded` copies the upload there
/// before recording `SlideUploaded`, and the worker verifies and processes only the copy. No
/// URL is ever issued for it, so the bytes verified are the bytes processed, even if the upload
/// URL is used again before it expires.
pub fn copy_key(object_key: &str) -> String {
    format!("immutable/{}", object_key.strip_prefix("slides/").unwrap_or(object_key))
}

#[derive(Debug, Clone, PartialEq)]
pub enum SlideCommand {
    Register {
        slide_id: SlideId,
        name: String,
        file_name: Option<String>,
        size_bytes: u64,
        content_type: String,
        sha256: Option<String>,
        object_key: String,
    },
    MarkUploaded {
        size_bytes: u64,
        /// The immutable copy's version id (S3, versioned bucket).
        version_id: Option<String>,
    },
    Verify {
        metadata: SlideMetadata,
        /// The SHA-256 (hex) of the copy the verifier read.
        sha256: String,
        /// OpenSlide properties that can name files or people; sealed before storage.
        sensitive_properties: Option<serde_json::Value>,
    },
    Reject {
        reason: String,
    },
    Delete {
        reason: Option<String>,
    },
}

impl SlideCommand {
    /// The command's name in `/metrics` (`mira_command_seconds{command}`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Register { .. } => "slide.register",
            Self::MarkUploaded { .. } => "slide.mark_uploaded",
            Self::Verify { .. } => "slide.verify",
            Self::Reject { .. } => "slide.reject",
            Self::Delete { .. } => "slide.delete",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SlideError {
    #[error("slide already exists")]
    AlreadyExists,
    #[error("slide does not exist")]
    NotFound,
    #[error("cannot {command} a slide that is {status}")]
    InvalidTransition {
        command: &'static str,
        status: &'static str,
    },
    #[error("uploaded object has {actual} bytes, but {declared} were declared")]
    SizeMismatch { declared: u64, actual: u64 },
    #[error("invalid slide command: {0}")]
    Invalid(String),
    #[error("sealing patient data failed: {0}")]
    Sealing(String),
}

/// The Slide aggregate's one side effect: sealing patient data under the slide's key.
#[derive(Clone)]
pub struct SlideServices {
    pub keyring: Arc<dyn Keyring>,
}

impl std::fmt::Debug for SlideServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlideServices")
    }
}

const MAX_NAME: usize = 512;

impl Slide {
    fn refuse(&self, command: &'static str) -> SlideError {
        if self.status == SlideStatus::New {
            SlideError::NotFound
        } else {
            SlideError::InvalidTransition {
                command,
                status: self.status.as_str(),
            }
        }
    }
}

fn validate_register(
    name: &str,
    size_bytes: u64,
    content_type: &str,
    sha256: &Option<String>,
    object_key: &str,
) -> Result<(), SlideError> {
    let bad = |m: &str| Err(SlideError::Invalid(m.to_owned()));
    if name.trim().is_empty() || name.len() > MAX_NAME {
        return bad("name must be 1 to 512 bytes");
    }
    if size_bytes == 0 {
        return bad("size_bytes must be positive");
    }
    if content_type.trim().is_empty() {
        return bad("content_type must not be empty");
    }
    if let Some(h) = sha256 {
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return bad("sha256 must be 64 lowercase hex digits");
        }
    }
    if object_key.is_empty() {
        return bad("object_key must not be empty");
    }
    Ok(())
}

impl Aggregate for Slide {
    const TYPE: &'static str = "Slide";
    type Command = SlideCommand;
    type Event = SlideEvent;
    type Error = SlideError;
    type Services = SlideServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        use SlideStatus as S;
        let sealing = |e: mira_events::KeyringError| SlideError::Sealing(e.to_string());
        let event = match command {
            SlideCommand::Register {
                slide_id,
                name,
                file_name,
                size_bytes,
                content_type,
                sha256,
                object_key,
            } => {
                if self.status != S::New {
                    return Err(SlideError::AlreadyExists);
                }
                validate_register(&name, size_bytes, &content_type, &sha256, &object_key)?;
                let subject = SlideEvent::subject(&slide_id);
                let keyring = services.keyring.as_ref();
                let name = seal::seal(keyring, &subject, "name", &name).await.map_err(sealing)?;
                let file_name = match file_name {
                    Some(f) => Some(seal::seal(keyring, &subject, "file_name", &f).await.map_err(sealing)?),
                    None => None,
                };
                SlideEvent::SlideRegistered {
                    slide_id,
                    name,
                    file_name,
                    size_bytes,
                    content_type,
                    sha256,
                    object_key,
                }
            }
            SlideCommand::MarkUploaded { size_bytes, version_id } => {
                if self.status != S::Registered {
                    return Err(self.refuse("mark uploaded"));
                }
                if size_bytes != self.size_bytes {
                    return Err(SlideError::SizeMismatch {
                        declared: self.size_bytes,
                        actual: size_bytes,
                    });
                }
                SlideEvent::SlideUploaded { size_bytes, version_id }
            }
            SlideCommand::Verify {
                mut metadata,
                sha256,
                sensitive_properties,
            } => {
                if self.status != S::Uploaded {
                    return Err(self.refuse("verify"));
                }
                if metadata.levels.is_empty() || metadata.width == 0 || metadata.height == 0 {
                    return Err(SlideError::Invalid(
                        "verified metadata needs dimensions and at least one level".into(),
                    ));
                }
                if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(SlideError::Invalid("sha256 must be 64 hexadecimal digits".into()));
                }
                let slide_id = self.slide_id.ok_or(SlideError::NotFound)?;
                metadata.sealed_properties = match sensitive_properties {
                    Some(p) => Some(
                        seal::seal(
                            services.keyring.as_ref(),
                            &SlideEvent::subject(&slide_id),
                            "properties",
                            &p.to_string(),
                        )
                        .await
                        .map_err(sealing)?,
                    ),
                    None => None,
                };
                SlideEvent::SlideVerified {
                    metadata,
                    sha256: Some(sha256.to_ascii_lowercase()),
                    version_id: self.version_id.clone(),
                }
            }
            SlideCommand::Reject { reason } => {
                if !matches!(self.status, S::Registered | S::Uploaded) {
                    return Err(self.refuse("reject"));
                }
                if reason.trim().is_empty() {
                    return Err(SlideError::Invalid("a rejection needs a reason".into()));
                }
                SlideEvent::SlideRejected { reason }
            }
            SlideCommand::Delete { reason } => {
                if matches!(self.status, S::New | S::Deleted) {
                    return Err(self.refuse("delete"));
                }
                SlideEvent::SlideDeleted { reason }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            SlideEvent::SlideRegistered {
                slide_id,
                name,
                size_bytes,
                content_type,
                object_key,
                sha256,
                ..
            } => {
                self.status = SlideStatus::Registered;
                self.sha256 = sha256;
                self.slide_id = Some(slide_id);
                self.name = Some(name);
                self.size_bytes = size_bytes;
                self.content_type = content_type;
                self.object_key = object_key;
            }
            SlideEvent::SlideUploaded { version_id, .. } => {
                self.status = SlideStatus::Uploaded;
                self.version_id = version_id;
            }
            SlideEvent::SlideVerified {
                metadata,
                sha256,
                version_id,
            } => {
                self.status = SlideStatus::Verified;
                self.metadata = Some(metadata);
                self.verified_sha256 = sha256;
                self.version_id = version_id;
            }
            SlideEvent::SlideRejected { reason } => {
                self.status = SlideStatus::Rejected;
                self.rejection = Some(reason);
            }
            SlideEvent::SlideDeleted { .. } => self.status = SlideStatus::Deleted,
        }
    }
}

#[cfg(test)]
mod copy_key_tests {
    #[test]
    fn the_copy_lives_apart_from_every_upload_key() {
        assert_eq!(super::copy_key("slides/lab/0191"), "immutable/lab/0191");
        assert!(!super::copy_key("slides/lab/0191").starts_with("slides/"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;
    use mira_events::{LocalKeyring, SlideLevel};

    fn services() -> SlideServices {
        let dir = std::env::temp_dir().join(format!("mira-slide-test-{}", SlideId::new()));
        SlideServices {
            keyring: Arc::new(LocalKeyring::init(dir).unwrap().0),
        }
    }

    fn id() -> SlideId {
        SlideId::parse("0190d5a4-0000-7000-8000-000000000002").unwrap()
    }

    fn register() -> SlideCommand {
        SlideCommand::Register {
            slide_id: id(),
            name: "biopsy of J. Doe".into(),
            file_name: Some("jdoe.svs".into()),
            size_bytes: 100,
            content_type: "image/tiff".into(),
            sha256: None,
            object_key: "uploads/lab/x".into(),
        }
    }

    async fn registered(s: &SlideServices) -> SlideEvent {
        let ring = s.keyring.as_ref();
        let subject = SlideEvent::subject(&id());
        SlideEvent::SlideRegistered {
            slide_id: id(),
            name: seal::seal(ring, &subject, "name", "n").await.unwrap(),
            file_name: None,
            size_bytes: 100,
            content_type: "image/tiff".into(),
            sha256: None,
            object_key: "uploads/lab/x".into(),
        }
    }

    fn meta() -> SlideMetadata {
        SlideMetadata {
            vendor: Some("aperio".into()),
            width: 2220,
            height: 2967,
            levels: vec![SlideLevel {
                width: 2220,
                height: 2967,
                downsample: 1.0,
            }],
            mpp_x: Some(0.499),
            mpp_y: Some(0.499),
            objective_power: Some(20.0),
            sealed_properties: None,
        }
    }

    fn framework(s: &SlideServices) -> TestFramework<Slide> {
        TestFramework::with(s.clone())
    }

    #[tokio::test]
    async fn register_seals_patient_fields() {
        let s = services();
        let events = framework(&s)
            .given_no_previous_events()
            .when_async(register())
            .await
            .inspect_result()
            .unwrap();
        let [SlideEvent::SlideRegistered { name, file_name, .. }] = events.as_slice() else {
            panic!("{events:?}")
        };
        let json = serde_json::to_string(&events[0]).unwrap();
        assert!(
            !json.contains("Doe") && !json.contains("jdoe"),
            "plaintext stored: {json}"
        );
        assert_eq!(
            seal::open(s.keyring.as_ref(), name, "name").await.unwrap(),
            "biopsy of J. Doe"
        );
        let file = file_name.as_ref().unwrap();
        assert_eq!(
            seal::open(s.keyring.as_ref(), file, "file_name").await.unwrap(),
            "jdoe.svs"
        );
    }

    #[tokio::test]
    async fn register_twice_is_refused() {
        let s = services();
        framework(&s)
            .given(vec![registered(&s).await])
            .when_async(register())
            .await
            .then_expect_error(SlideError::AlreadyExists);
    }

    #[tokio::test]
    async fn register_validates_input() {
        let s = services();
        let mut cmd = register();
        if let SlideCommand::Register { size_bytes, .. } = &mut cmd {
            *size_bytes = 0;
        }
        framework(&s)
            .given_no_previous_events()
            .when_async(cmd)
            .await
            .then_expect_error(SlideError::Invalid("size_bytes must be positive".into()));
        let mut cmd = register();
        if let SlideCommand::Register { sha256, .. } = &mut cmd {
            *sha256 = Some("XYZ".into());
        }
        let r = framework(&s)
            .given_no_previous_events()
            .when_async(cmd)
            .await
            .inspect_result();
        assert!(matches!(r, Err(SlideError::Invalid(_))));
    }

    #[tokio::test]
    async fn uploaded_checks_size() {
        let s = services();
        framework(&s)
            .given(vec![registered(&s).await])
            .when_async(SlideCommand::MarkUploaded {
                size_bytes: 100,
                version_id: Some("v1".into()),
            })
            .await
            .then_expect_events(vec![SlideEvent::SlideUploaded {
                size_bytes: 100,
                version_id: Some("v1".into()),
            }]);
        framework(&s)
            .given(vec![registered(&s).await])
            .when_async(SlideCommand::MarkUploaded {
                size_bytes: 99,
                version_id: None,
            })
            .await
            .then_expect_error(SlideError::SizeMismatch {
                declared: 100,
                actual: 99,
            });
        framework(&s)
            .given_no_previous_events()
            .when_async(SlideCommand::MarkUploaded {
                size_bytes: 100,
                version_id: None,
            })
            .await
            .then_expect_error(SlideError::NotFound);
    }

    #[tokio::test]
    async fn verify_after_upload_only() {
        let s = services();
        framework(&s)
            .given(vec![
                registered(&s).await,
                SlideEvent::SlideUploaded {
                    size_bytes: 100,
                    version_id: Some("v7".into()),
                },
            ])
            .when_async(SlideCommand::Verify {
                metadata: meta(),
                sha256: "AB".repeat(32),
                sensitive_properties: None,
            })
            .await
            .then_expect_events(vec![SlideEvent::SlideVerified {
                metadata: meta(),
                sha256: Some("ab".repeat(32)),
                version_id: Some("v7".into()),
            }]);
        framework(&s)
            .given(vec![registered(&s).await])
            .when_async(SlideCommand::Verify {
                metadata: meta(),
                sha256: "AB".repeat(32),
                sensitive_properties: None,
            })
            .await
            .then_expect_error(SlideError::InvalidTransition {
                command: "verify",
                status: "registered",
            });
    }

    #[tokio::test]
    async fn verify_seals_sensitive_properties() {
        let s = services();
        let events = framework(&s)
            .given(vec![
                registered(&s).await,
                SlideEvent::SlideUploaded {
                    size_bytes: 100,
                    version_id: Some("v7".into()),
                },
            ])
            .when_async(SlideCommand::Verify {
                metadata: meta(),
                sha256: "AB".repeat(32),
                sensitive_properties: Some(serde_json::json!({"aperio.Filename": "jdoe"})),
            })
            .await
            .inspect_result()
            .unwrap();
        let SlideEvent::SlideVerified { metadata, .. } = &events[0] else {
            panic!()
        };
        let sealed = metadata.sealed_properties.as_ref().unwrap();
        assert!(!serde_json::to_string(&events[0]).unwrap().contains("jdoe"));
        let open = seal::open(s.keyring.as_ref(), sealed, "properties").await.unwrap();
        assert!(open.contains("jdoe"));
    }

    #[tokio::test]
    async fn reject_from_registered_or_uploaded() {
        let s = services();
        let rejected = SlideEvent::SlideRejected {
            reason: "not a slide".into(),
        };
        framework(&s)
            .given(vec![
                registered(&s).await,
                SlideEvent::SlideUploaded {
                    size_bytes: 100,
                    version_id: Some("v7".into()),
                },
            ])
            .when_async(SlideCommand::Reject {
                reason: "not a slide".into(),
            })
            .await
            .then_expect_events(vec![rejected.clone()]);
        framework(&s)
            .given(vec![registered(&s).await])
            .when_async(SlideCommand::Reject {
                reason: "not a slide".into(),
            })
            .await
            .then_expect_events(vec![rejected.clone()]);
        framework(&s)
            .given(vec![
                registered(&s).await,
                SlideEvent::SlideUploaded {
                    size_bytes: 100,
                    version_id: Some("v7".into()),
                },
                SlideEvent::SlideVerified {
                    metadata: meta(),
                    sha256: None,
                    version_id: None,
                },
            ])
            .when_async(SlideCommand::Reject { reason: "x".into() })
            .await
            .then_expect_error(SlideError::InvalidTransition {
                command: "reject",
                status: "verified",
            });
        framework(&s)
            .given(vec![registered(&s).await])
            .when_async(SlideCommand::Reject { reason: " ".into() })
            .await
            .then_expect_error(SlideError::Invalid("a rejection needs a reason".into()));
    }

    #[tokio::test]
    async fn delete_once() {
        let s = services();
        framework(&s)
            .given(vec![registered(&s).await, rejected_event()])
            .when_async(SlideCommand::Delete { reason: None })
            .await
            .then_expect_events(vec![SlideEvent::SlideDeleted { reason: None }]);
        framework(&s)
            .given(vec![registered(&s).await, SlideEvent::SlideDeleted { reason: None }])
            .when_async(SlideCommand::Delete { reason: None })
            .await
            .then_expect_error(SlideError::InvalidTransition {
                command: "delete",
                status: "deleted",
            });
        framework(&s)
            .given_no_previous_events()
            .when_async(SlideCommand::Delete { reason: None })
            .await
            .then_expect_error(SlideError::NotFound);
    }

    fn rejected_event() -> SlideEvent {
        SlideEvent::SlideRejected {
            reason: "corrupt".into(),
        }
    }
}
