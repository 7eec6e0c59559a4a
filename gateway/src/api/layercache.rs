//! The layers of succeeded jobs as their manifests describe them, and each level's tile index
//! once read (ADR 0036): serving a tile then costs one ranged read of the layer. Bounded: past
//! [`JOBS`] jobs the oldest entry goes, and a job keeps at most [`LEVELS`] level indexes. A
//! succeeded attempt's results never change, so nothing here goes stale; the entry's key holds
//! the tenant, so one tenant's entry never answers another's request.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use mira_blobs::layers::LayerEntry;

/// Jobs whose layers are kept.
pub const JOBS: usize = 1024;
/// Level indexes kept per job.
pub const LEVELS: usize = 64;

/// (tenant, job, attempt).
pub type JobKey = (String, uuid::Uuid, u32);

/// One job's layers.
#[derive(Debug)]
pub struct JobLayers {
    /// The attempt's results prefix.
    pub prefix: String,
    /// By name (`slide`, `normalized`); empty for results stored as DeepZoom trees.
    pub layers: BTreeMap<String, LayerEntry>,
    index: Mutex<HashMap<(String, usize), Arc<TileIndex>>>,
}

/// A level's tiles: where each lies in the layer, row by row.
#[derive(Debug)]
pub struct TileIndex {
    pub offsets: Vec<u64>,
    pub byte_counts: Vec<u64>,
}

impl JobLayers {
    pub fn new(prefix: String, layers: BTreeMap<String, LayerEntry>) -> Self {
        Self {
            prefix,
            layers,
            index: Mutex::default(),
        }
    }

    /// The index of `layer`'s level `level` (0 is full resolution), when read before.
    pub fn index(&self, layer: &str, level: usize) -> Option<Arc<TileIndex>> {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(layer.to_owned(), level))
            .cloned()
    }

    pub fn keep_index(&self, layer: &str, level: usize, index: Arc<TileIndex>) {
        let mut m = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= LEVELS {
            m.clear();
        }
        m.insert((layer.to_owned(), level), index);
    }
}

/// The jobs kept, and the order they came in.
type Kept = (HashMap<JobKey, Arc<JobLayers>>, VecDeque<JobKey>);

#[derive(Debug, Default)]
pub struct LayerCache {
    inner: Mutex<Kept>,
}

impl LayerCache {
    pub fn get(&self, key: &JobKey) -> Option<Arc<JobLayers>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0.get(key).cloned()
    }

    pub fn keep(&self, key: JobKey, layers: Arc<JobLayers>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *inner;
        if map.insert(key.clone(), layers).is_none() {
            order.push_back(key);
        }
        while map.len() > JOBS {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_job_goes_first_and_tenants_never_share_an_entry() {
        let cache = LayerCache::default();
        let job = uuid::Uuid::nil();
        cache.keep(
            ("a".into(), job, 1),
            Arc::new(JobLayers::new("a/".into(), BTreeMap::new())),
        );
        assert!(cache.get(&("b".into(), job, 1)).is_none(), "another tenant's key");
        assert_eq!(cache.get(&("a".into(), job, 1)).unwrap().prefix, "a/");
        for i in 0..JOBS {
            cache.keep(
                ("t".into(), uuid::Uuid::from_u128(i as u128 + 1), 1),
                Arc::new(JobLayers::new(String::new(), BTreeMap::new())),
            );
        }
        assert!(cache.get(&("a".into(), job, 1)).is_none(), "the oldest went");
        assert!(cache
            .get(&("t".into(), uuid::Uuid::from_u128(JOBS as u128), 1))
            .is_some());
    }
}
