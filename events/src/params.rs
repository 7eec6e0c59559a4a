//! Parameters of the job kinds Mira runs (DESIGN §8). The gateway validates them and stores
//! them with every default filled in, so the worker reads exactly what was accepted.

use serde::{Deserialize, Serialize};

/// The one job kind today.
pub const WSI_PREPROCESS: &str = "wsi.preprocess";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TileFormat {
    Jpeg,
    Png,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    None,
    Macenko,
    Reinhard,
}

/// `wsi.preprocess` parameters. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessParams {
    pub tile_size: u32,
    pub overlap: u32,
    pub format: TileFormat,
    pub quality: u8,
    pub tissue: bool,
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
}
