//! The job kinds Mira runs and their parameters (DESIGN §8), as one tagged type: [`JobSpec`].
//! The gateway parses a request into it and stores it with every default filled in, as the
//! event's `kind` + `params`; the worker reads it back and dispatches on it. Adding a kind is a
//! variant here, its parameters type, and the worker's arm for it.

use serde::{Deserialize, Serialize};

/// A job's kind and its parameters. Serialised adjacently tagged, `{"kind": …, "params": …}`:
/// the shape `JobSubmitted` has always stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "params")]
pub enum JobSpec {
    /// A DeepZoom pyramid, with the tissue mask, statistics and stain normalisation on request.
    #[serde(rename = "wsi.preprocess")]
    Preprocess(PreprocessParams),
}

impl JobSpec {
    /// Every kind's name, as requests and the log spell it.
    pub const KINDS: &'static [&'static str] = &["wsi.preprocess"];

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Preprocess(_) => "wsi.preprocess",
        }
    }

    /// The parameters as stored, every default filled in.
    pub fn params(&self) -> serde_json::Value {
        match self {
            Self::Preprocess(p) => serde_json::to_value(p).unwrap_or_default(),
        }
    }

    /// Reads a client's `kind` and `params` (`null` or absent means all defaults) and checks
    /// them. The error names the offending field.
    pub fn from_request(kind: &str, params: Option<&serde_json::Value>) -> Result<Self, String> {
        match kind {
            "wsi.preprocess" => PreprocessParams::from_request(params).map(Self::Preprocess),
            other => Err(format!(
                "kind: {other:?} is not a job kind; the kinds are {}",
                Self::KINDS
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Reads a stored `kind` and `params` back (the worker's side). Defaults are not filled in
    /// again: what was accepted was stored whole.
    pub fn from_stored(kind: &str, params: &serde_json::Value) -> Result<Self, String> {
        serde_json::from_value(serde_json::json!({"kind": kind, "params": params}))
            .map_err(|e| format!("job {kind:?}: invalid parameters: {e}"))
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
    #[schema(minimum = 16, maximum = 4096, default = 254)]
    pub tile_size: u32,
    /// At most a quarter of `tile_size`.
    #[schema(default = 1)]
    pub overlap: u32,
    #[schema(inline, default = "jpeg")]
    pub format: TileFormat,
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

impl PreprocessParams {
    /// Reads parameters sent by a client (`null` or absent means all defaults) and checks
    /// their ranges. The error names the offending field.
    pub fn from_request(value: Option<&serde_json::Value>) -> Result<Self, String> {
        let p: Self = match value {
            None | Some(serde_json::Value::Null) => Self::default(),
            Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                if path == "." {
                    format!("params: {}", e.inner())
                } else {
                    format!("params.{path}: {}", e.inner())
                }
            })?,
        };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(16..=4096).contains(&self.tile_size) {
            return Err(format!("params.tile_size: {} is outside 16..=4096", self.tile_size));
        }
        if self.overlap > self.tile_size / 4 {
            return Err(format!(
                "params.overlap: {} is more than a quarter of the tile size",
                self.overlap
            ));
        }
        if !(1..=100).contains(&self.quality) {
            return Err(format!("params.quality: {} is outside 1..=100", self.quality));
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
        assert!(e.contains("tile_sise"), "{e}");
        let e = PreprocessParams::from_request(Some(&json!({"quality": 0}))).unwrap_err();
        assert!(e.starts_with("params.quality"), "{e}");
        let e = PreprocessParams::from_request(Some(&json!({"format": "gif"}))).unwrap_err();
        assert!(e.starts_with("params.format"), "{e}");
        assert!(PreprocessParams::from_request(Some(&json!({"overlap": 100}))).is_err());
    }

    #[test]
    fn a_spec_is_stored_as_kind_and_params_and_read_back() {
        let spec = JobSpec::from_request("wsi.preprocess", Some(&json!({"format": "png"}))).unwrap();
        let stored = serde_json::to_value(&spec).unwrap();
        assert_eq!(stored["kind"], "wsi.preprocess");
        assert_eq!(stored["params"], spec.params());
        assert_eq!(stored["params"]["tile_size"], 254, "defaults are stored: {stored}");
        assert_eq!(JobSpec::from_stored(spec.kind(), &spec.params()).unwrap(), spec);
        let e = JobSpec::from_request("wsi.other", None).unwrap_err();
        assert!(e.starts_with("kind:") && e.contains("\"wsi.preprocess\""), "{e}");
        assert!(JobSpec::from_stored("wsi.other", &json!({})).is_err());
        assert!(JobSpec::from_stored("wsi.preprocess", &json!({"tile_sise": 1})).is_err());
        for k in JobSpec::KINDS {
            assert_eq!(JobSpec::from_request(k, None).unwrap().kind(), *k);
        }
        for f in TileFormat::ALL {
            assert_eq!(parse_name::<TileFormat>(f.ext()).unwrap(), f);
        }
        for n in Normalize::ALL {
            assert_eq!(parse_name::<Normalize>(n.as_str()).unwrap(), n);
        }
    }
}
