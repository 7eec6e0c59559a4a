//! A pyramid layer as a job's manifest records it (ADR 0036): one tiled, pyramidal BigTIFF per
//! layer, and where each level's tile index lies in it, so that whoever serves a tile (the
//! gateway) reads that index with one ranged read and the tile with another, with no TIFF
//! parsing at request time. The worker writes these entries; the gateway reads them.

use serde::{Deserialize, Serialize};

use crate::stream::PartHash;

/// Where a level's tile offsets and byte counts lie in the object (each an array of
/// little-endian u64, `columns × rows` long, row by row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelPlace {
    pub width: u32,
    pub height: u32,
    pub columns: u32,
    pub rows: u32,
    pub offsets_at: u64,
    pub byte_counts_at: u64,
}

impl LevelPlace {
    pub fn tiles(&self) -> u64 {
        u64::from(self.columns) * u64::from(self.rows)
    }
}

/// One layer of a job's results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerEntry {
    /// The object, relative to the attempt's prefix (`slide.tiff`).
    pub key: String,
    pub width: u32,
    pub height: u32,
    /// Every level's tiles: 256, without overlap.
    pub tile_size: u32,
    /// The tiles' JPEG quality.
    pub quality: u8,
    /// Full resolution first; DeepZoom level n is `levels.len() − 1 − n`.
    pub levels: Vec<LevelPlace>,
    /// The object's size.
    pub bytes: u64,
    /// The upload's parts in order (the first included), each with its SHA-256, as sent to the
    /// store; filled in by the worker that uploaded the layer.
    #[serde(default)]
    pub parts: Vec<PartHash>,
    /// The SHA-256 of the parts' digests in order (S3's composite checksum of the object).
    #[serde(default)]
    pub sha256_of_parts: Option<String>,
}

impl LayerEntry {
    /// DeepZoom level `n`'s place, when the layer has it.
    pub fn deepzoom_level(&self, n: u32) -> Option<&LevelPlace> {
        let count = self.levels.len();
        ((n as usize) < count).then(|| &self.levels[count - 1 - n as usize])
    }

    /// The layer as a DeepZoom image: 256-pixel JPEG tiles without overlap.
    pub fn dzi(&self) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Image xmlns=\"http://schemas.microsoft.com/deepzoom/2008\" \
             Format=\"jpeg\" Overlap=\"0\" TileSize=\"{}\"><Size Width=\"{}\" Height=\"{}\"/></Image>\n",
            self.tile_size, self.width, self.height
        )
    }
}
