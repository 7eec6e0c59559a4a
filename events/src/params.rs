//! The job kinds Mira runs and their parameters (DESIGN §8), declared once in [`job_kinds!`]:
//! [`JobKind`] names them, [`JobSpec`] carries a kind with its parameters. The gateway parses a
//! request into a `JobSpec`, the `Job` aggregate stores it in `JobSubmitted` with every default
//! filled in (as `kind` + `params`, the shape it always had), and the worker dispatches on it
//! with one exhaustive `match`.
//!
//! Adding a kind is a line in the `job_kinds!` list, its parameters type (implementing
//! [`KindParams`]), the worker's arm for it and a test. A stored event whose kind (or
//! parameters) this build does not know decodes as [`JobSpec::Unknown`] and keeps its bytes, so
//! no stream becomes unreadable; the aggregate refuses to submit one.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a job's kind or parameters are refused. The message names the offending field, as
/// requests spell it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("kind: {kind:?} is not a job kind; the kinds are {}", JobSpec::KINDS.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", "))]
    UnknownKind { kind: String },
    /// `field` is the path under `params` (`tile_size`), or `None` for `params` itself.
    #[error("params{}: {message}", field.as_ref().map(|f| format!(".{f}")).unwrap_or_default())]
    Invalid { field: Option<String>, message: String },
}

impl ParamsError {
    /// `params.<field>: <message>`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: Some(field.to_owned()),
            message: message.into(),
        }
    }
}

/// A kind's parameters: read from a request (absent or `null` means all defaults), checked,
/// and stored whole.
pub trait KindParams: Serialize + DeserializeOwned + Default {
    /// Checks ranges and relations serde cannot.
    fn validate(&self) -> Result<(), ParamsError>;

    /// Reads parameters sent by a client and checks them. The error names the offending field.
    fn from_request(value: Option<&Value>) -> Result<Self, ParamsError> {
        let p: Self = match value {
            None | Some(Value::Null) => Self::default(),
            Some(v) if !v.is_object() => {
                return Err(ParamsError::Invalid {
                    field: None,
                    message: "must be a JSON object".into(),
                })
            }
            Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                ParamsError::Invalid {
                    field: (path != ".").then_some(path),
                    message: e.inner().to_string(),
                }
            })?,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Declares the job kinds: each variant's name as requests and the log spell it, and its
/// parameters type. Everything that lists or names kinds is generated from this one list.
macro_rules! job_kinds {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal ($params:ty), )+) => {
        /// A job's kind, without its parameters.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum JobKind {
            $( $(#[$doc])* $variant, )+
        }

        impl JobKind {
            pub const ALL: &'static [JobKind] = &[$(JobKind::$variant),+];

            /// The kind's name, as requests and the log spell it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(JobKind::$variant => $name,)+
                }
            }

            pub fn parse(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|k| k.as_str() == name)
            }
        }

        /// A job's kind and its parameters. Stored as `{"kind": …, "params": …}`.
        #[derive(Debug, Clone, PartialEq)]
        pub enum JobSpec {
            $( $(#[$doc])* $variant($params), )+
            /// A kind, or parameters, this build cannot read: from a stored event written by
            /// another version. Kept as stored; never submitted, and a worker fails it for good.
            Unknown { kind: String, params: Value },
        }

        impl JobSpec {
            /// Every kind's name, as requests and the log spell it.
            pub const KINDS: &'static [&'static str] = &[$($name),+];

            /// Each kind's parameters schema, by name, in the order of [`JobSpec::KINDS`]: the
            /// API's document describes `params` with them.
            pub fn params_schemas() -> Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)> {
                vec![$((
                    <$params as utoipa::ToSchema>::name().into_owned(),
                    <$params as utoipa::PartialSchema>::schema(),
                )),+]
            }

            /// The kind, or `None` for [`JobSpec::Unknown`].
            pub fn kind(&self) -> Option<JobKind> {
                match self {
                    $(Self::$variant(_) => Some(JobKind::$variant),)+
                    Self::Unknown { .. } => None,
                }
            }

            /// The parameters as stored, every default filled in.
            pub fn params(&self) -> Value {
                match self {
                    $(Self::$variant(p) => serde_json::to_value(p).unwrap_or_default(),)+
                    Self::Unknown { params, .. } => params.clone(),
                }
            }

            /// Checks the parameters as a request's are checked; a spec this build cannot read
            /// fails.
            pub fn validate(&self) -> Result<(), ParamsError> {
                match self {
                    $(Self::$variant(p) => p.validate(),)+
                    Self::Unknown { kind, .. } => Err(ParamsError::UnknownKind { kind: kind.clone() }),
                }
            }

            fn typed(kind: JobKind, params: Option<&Value>) -> Result<Self, ParamsError> {
                match kind {
                    $(JobKind::$variant => <$params as KindParams>::from_request(params).map(Self::$variant),)+
                }
            }

            fn stored(kind: JobKind, params: &Value) -> Option<Self> {
                if !params.is_object() {
                    return None;
                }
                match kind {
                    $(JobKind::$variant => serde_json::from_value::<$params>(params.clone()).ok().map(Self::$variant),)+
                }
            }
        }
    };
}

job_kinds! {
    /// A DeepZoom pyramid, with the tissue mask, statistics and stain normalisation on request.
    Preprocess = "wsi.preprocess" (PreprocessParams),
}

impl JobSpec {
    /// The kind's name, as stored (an unknown kind's too).
    pub fn kind_name(&self) -> &str {
        match self {
            Self::Unknown { kind, .. } => kind,
            known => known.kind().map(JobKind::as_str).unwrap_or_default(),
        }
    }

    /// Reads a client's `kind` and `params` (`null` or absent means all defaults) and checks
    /// them. The error names the offending field.
    pub fn from_request(kind: &str, params: Option<&Value>) -> Result<Self, ParamsError> {
        let k = JobKind::parse(kind).ok_or_else(|| ParamsError::UnknownKind { kind: kind.to_owned() })?;
        Self::typed(k, params)
    }

    /// Reads a stored `kind` and `params` back. Defaults are not checked again (what was
    /// accepted was stored whole); what this build cannot read is [`JobSpec::Unknown`].
    pub fn from_stored(kind: &str, params: &Value) -> Self {
        JobKind::parse(kind)
            .and_then(|k| Self::stored(k, params))
            .unwrap_or_else(|| Self::Unknown {
                kind: kind.to_owned(),
                params: params.clone(),
            })
    }
}

/// The stored shape: exactly the two fields `JobSubmitted` has always had.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    kind: std::borrow::Cow<'a, str>,
    params: Value,
}

impl Serialize for JobSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Stored {
            kind: self.kind_name().into(),
            params: self.params(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for JobSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Stored::deserialize(d)?;
        Ok(Self::from_stored(&s.kind, &s.params))
    }
}

/// How tiles are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TileFormat {
    Jpeg,
    Png,
}

impl TileFormat {
    pub const ALL: [TileFormat; 2] = [TileFormat::Jpeg, TileFormat::Png];

    /// The file extension, which is also the serialised name.
    pub fn ext(self) -> &'static str {
        match self {
            Self::Jpeg => "jpeg",
            Self::Png => "png",
        }
    }
}

/// Which stain normalisation, if any, writes a second pyramid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    None,
    Macenko,
    Reinhard,
}

impl Normalize {
    pub const ALL: [Normalize; 3] = [Normalize::None, Normalize::Macenko, Normalize::Reinhard];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Macenko => "macenko",
            Self::Reinhard => "reinhard",
        }
    }
}

/// Parses a serialised name (`jpeg`, `macenko`, …): for command-line flags.
pub fn parse_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|e| e.to_string())
}

/// `wsi.preprocess` parameters. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessParams {
    /// The tile edge of the job's DeepZoom export. Results are stored as layers of 256-pixel
    /// tiles without overlap (ADR 0036), served and exported in this form.
    #[schema(minimum = 16, maximum = 4096, default = 254)]
    pub tile_size: u32,
    /// The DeepZoom export's overlap: at most a quarter of `tile_size`.
    #[schema(default = 1)]
    pub overlap: u32,
    /// The DeepZoom export's tile format. Stored tiles are JPEG at `quality`, so `png` is
    /// re-encoded from them: no longer lossless.
    #[schema(inline, default = "jpeg")]
    pub format: TileFormat,
    /// The JPEG quality of the stored layers' tiles.
    #[schema(minimum = 1, maximum = 100, default = 80)]
    pub quality: u8,
    #[schema(default = true)]
    pub tissue: bool,
    #[schema(inline, default = "none")]
    pub normalize: Normalize,
}

impl Default for PreprocessParams {
    fn default() -> Self {
        Self {
            tile_size: 254,
            overlap: 1,
            format: TileFormat::Jpeg,
            quality: 80,
            tissue: true,
            normalize: Normalize::None,
        }
    }
}

impl KindParams for PreprocessParams {
    fn validate(&self) -> Result<(), ParamsError> {
        if !(16..=4096).contains(&self.tile_size) {
            return Err(ParamsError::field(
                "tile_size",
                format!("{} is outside 16..=4096", self.tile_size),
            ));
        }
        if self.overlap > self.tile_size / 4 {
            return Err(ParamsError::field(
                "overlap",
                format!("{} is more than a quarter of the tile size", self.overlap),
            ));
        }
        if !(1..=100).contains(&self.quality) {
            return Err(ParamsError::field(
                "quality",
                format!("{} is outside 1..=100", self.quality),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_fill_in_and_ranges_are_checked() {
        let p = PreprocessParams::from_request(Some(&json!({"normalize": "macenko"}))).unwrap();
        assert_eq!(p.tile_size, 254);
        assert_eq!(p.normalize, Normalize::Macenko);
        assert_eq!(
            PreprocessParams::from_request(None).unwrap(),
            PreprocessParams::default()
        );
        let e = PreprocessParams::from_request(Some(&json!({"tile_sise": 256}))).unwrap_err();
        assert!(e.to_string().contains("tile_sise"), "{e}");
        let e = PreprocessParams::from_request(Some(&json!({"quality": 0}))).unwrap_err();
        assert!(e.to_string().starts_with("params.quality"), "{e}");
        let e = PreprocessParams::from_request(Some(&json!({"format": "gif"}))).unwrap_err();
        assert!(e.to_string().starts_with("params.format"), "{e}");
        let e = PreprocessParams::from_request(Some(&json!([1]))).unwrap_err();
        assert!(e.to_string().starts_with("params: "), "{e}");
        assert!(PreprocessParams::from_request(Some(&json!({"overlap": 100}))).is_err());
    }

    #[test]
    fn a_spec_is_stored_as_kind_and_params_and_read_back() {
        let spec = JobSpec::from_request("wsi.preprocess", Some(&json!({"format": "png"}))).unwrap();
        let stored = serde_json::to_value(&spec).unwrap();
        assert_eq!(stored["kind"], "wsi.preprocess");
        assert_eq!(stored["params"], spec.params());
        assert_eq!(stored["params"]["tile_size"], 254, "defaults are stored: {stored}");
        assert_eq!(JobSpec::from_stored(spec.kind_name(), &spec.params()), spec);
        assert_eq!(serde_json::from_value::<JobSpec>(stored).unwrap(), spec);
        let e = JobSpec::from_request("wsi.other", None).unwrap_err().to_string();
        assert!(e.starts_with("kind:") && e.contains("\"wsi.preprocess\""), "{e}");
        for k in JobKind::ALL {
            let spec = JobSpec::from_request(k.as_str(), None).unwrap();
            assert_eq!(spec.kind(), Some(*k));
            assert_eq!(spec.kind_name(), k.as_str());
            assert_eq!(JobKind::parse(k.as_str()), Some(*k));
        }
        assert_eq!(
            JobSpec::KINDS,
            JobKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>()
        );
        for f in TileFormat::ALL {
            assert_eq!(parse_name::<TileFormat>(f.ext()).unwrap(), f);
        }
        for n in Normalize::ALL {
            assert_eq!(parse_name::<Normalize>(n.as_str()).unwrap(), n);
        }
    }

    /// A kind this build does not know, or parameters it cannot read, still decode, and encode
    /// again to the same bytes: a stream written by another version stays readable.
    #[test]
    fn what_this_build_cannot_read_decodes_as_unknown_and_keeps_its_bytes() {
        for bytes in [
            r#"{"kind":"wsi.other","params":{"a":[1,2],"b":null}}"#,
            r#"{"kind":"wsi.preprocess","params":{"tile_sise":1}}"#,
            r#"{"kind":"wsi.preprocess","params":"not an object"}"#,
            r#"{"kind":"wsi.preprocess","params":[254]}"#,
        ] {
            let spec: JobSpec = serde_json::from_str(bytes).unwrap();
            assert!(matches!(spec, JobSpec::Unknown { .. }), "{bytes} gave {spec:?}");
            assert_eq!(spec.kind(), None);
            assert_eq!(serde_json::to_string(&spec).unwrap(), bytes);
        }
        assert_eq!(JobSpec::from_stored("wsi.other", &json!({})).kind_name(), "wsi.other");
        // What every build since the first stored reads as the kind it is.
        let v1: JobSpec = serde_json::from_str(r#"{"kind":"wsi.preprocess","params":{"tile_size":254}}"#).unwrap();
        assert_eq!(v1, JobSpec::Preprocess(PreprocessParams::default()));
    }
}
