//! The backbone feature cache: the backbone's outputs for recently seen inputs, least recently
//! used evicted first once their bytes pass a budget, each valid for a time-to-live.
//!
//! An entry is keyed by a BLAKE3 digest of the preprocessed input tensor and its shape, never by
//! anything the client names, so equal keys mean equal backbone inputs and equal features.
//! Lookups are single flight: concurrent requests for one key share ONE backbone run, and only
//! the request that ran it counts a backbone pass.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use serde::Serialize;

use crate::engine::{EngineError, Memory, NamedTensors};
use crate::telemetry::metrics;

/// Values hashed per update of the digest.
const HASH_CHUNK: usize = 4096;

/// The backbone feature cache's settings.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CacheConfig {
    /// Memory the backbone feature cache may hold, in bytes of feature tensors; the least
    /// recently used features are evicted beyond it. 0 turns the cache off. Applies to features
    /// in host memory (the CPU provider, or --feature-placement host).
    #[arg(long, env = "POLYHEAD_CACHE_BYTES", default_value_t = 256 << 20)]
    pub cache_bytes: u64,

    /// The feature cache's budget when features are kept in GPU memory (CUDA with
    /// --feature-placement device), in bytes of device memory. 0 turns the cache off there.
    #[arg(long, env = "POLYHEAD_DEVICE_CACHE_BYTES", default_value_t = 1 << 30)]
    pub device_cache_bytes: u64,

    /// How long cached features are served after they were computed, in seconds.
    #[arg(
        long,
        env = "POLYHEAD_CACHE_TTL_SECONDS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub cache_ttl_seconds: u32,
}

impl CacheConfig {
    /// How long an entry lives.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.cache_ttl_seconds))
    }
}

/// A BLAKE3 digest of a preprocessed backbone input: its shape and its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureKey([u8; 32]);

impl FeatureKey {
    /// The key of the tensor of `shape` holding `values` (row-major).
    pub fn of(shape: &[usize], values: &[f32]) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(shape.len() as u64).to_le_bytes());
        for &dim in shape {
            hasher.update(&(dim as u64).to_le_bytes());
        }
        let mut bytes = Vec::with_capacity(HASH_CHUNK * size_of::<f32>());
        for chunk in values.chunks(HASH_CHUNK) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            hasher.update(&bytes);
        }
        Self(*hasher.finalize().as_bytes())
    }
}

/// Where a lookup's features came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This lookup ran the computation.
    Computed,
    /// Another lookup's computation: cached earlier, or finished while this one waited for it.
    Cached,
}

/// The cache, or nothing when it is turned off.
pub struct FeatureCache {
    entries: Option<Cache<FeatureKey, NamedTensors>>,
}

impl FeatureCache {
    /// The cache `config` describes for features held in `memory`: the device budget for GPU
    /// memory, the host budget otherwise; off when that budget is 0.
    pub fn new(config: &CacheConfig, memory: Memory) -> Self {
        let budget = match memory {
            Memory::Cuda(_) => config.device_cache_bytes,
            Memory::Host | Memory::Cpu => config.cache_bytes,
        };
        Self::with_budget(budget, config.ttl())
    }

    /// A cache of at most `bytes` of feature tensors, each entry living `ttl`; off when `bytes`
    /// is 0.
    fn with_budget(bytes: u64, ttl: Duration) -> Self {
        if bytes == 0 {
            return Self::disabled();
        }
        let entries = Cache::builder()
            .max_capacity(bytes)
            .weigher(|_, tensors: &NamedTensors| weight(tensors))
            .time_to_live(ttl)
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(|_, _, cause| {
                if cause == RemovalCause::Size {
                    metrics::record_feature_cache_eviction();
                }
            })
            .build();
        Self {
            entries: Some(entries),
        }
    }

    /// A cache that holds nothing: every lookup computes.
    pub fn disabled() -> Self {
        Self { entries: None }
    }

    /// Whether lookups can hit; when not, computing keys is wasted work.
    pub fn is_enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// The features for `key`: cached ones, the result of a computation for `key` already under
    /// way, or else `compute`'s, which are then cached. A failed computation fails every lookup
    /// that waited for it and caches nothing.
    pub async fn get_or_compute<F>(
        &self,
        key: FeatureKey,
        compute: F,
    ) -> Result<(NamedTensors, Source), EngineError>
    where
        F: Future<Output = Result<NamedTensors, EngineError>>,
    {
        let Some(entries) = &self.entries else {
            return Ok((compute.await?, Source::Computed));
        };
        let entry = entries
            .entry(key)
            .or_try_insert_with(compute)
            .await
            .map_err(Arc::unwrap_or_clone)?;
        let source = if entry.is_fresh() {
            // Evict what the new entry pushed over the budget now, not at the cache's next
            // housekeeping, so that the memory held stays within the budget.
            entries.run_pending_tasks().await;
            Source::Computed
        } else {
            Source::Cached
        };
        metrics::record_feature_cache_lookup(source == Source::Cached);
        publish_size(entries);
        Ok((entry.into_value(), source))
    }

    /// Removes the entries whose time to live has passed and publishes what the cache holds
    /// then: the cache tidies itself only as it is used, so an idle server would otherwise keep
    /// expired features, and report them, until its next request. Answers (bytes, entries).
    pub async fn housekeep(&self) -> (u64, u64) {
        let Some(entries) = &self.entries else {
            return (0, 0);
        };
        entries.run_pending_tasks().await;
        publish_size(entries)
    }
}

/// Publishes the bytes and entries `entries` holds, and answers them.
fn publish_size(entries: &Cache<FeatureKey, NamedTensors>) -> (u64, u64) {
    let held = (entries.weighted_size(), entries.entry_count());
    metrics::set_feature_cache_size(held.0, held.1);
    held
}

/// The bytes an entry holds: its tensors' values and names, capped to what the cache can weigh.
pub(super) fn weight(tensors: &NamedTensors) -> u32 {
    let bytes: usize = tensors
        .iter()
        .map(|(name, t)| name.len() + t.len() * size_of::<f32>())
        .sum();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ndarray::{ArrayD, IxDyn};

    use super::*;
    use crate::engine::Tensor;

    /// One feature map of `values` floats, all `fill`.
    fn features(values: usize, fill: f32) -> NamedTensors {
        let array = ArrayD::from_elem(IxDyn(&[1, values]), fill);
        vec![("stage1".to_string(), Tensor::from(array))]
    }

    fn key(n: u8) -> FeatureKey {
        FeatureKey::of(&[1, 3, 2, 2], &[f32::from(n); 12])
    }

    /// Looks `key` up, computing `values` floats when needed and counting computations.
    async fn lookup(
        cache: &FeatureCache,
        key: FeatureKey,
        values: usize,
        runs: &AtomicUsize,
    ) -> Source {
        let compute = async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(features(values, 1.0))
        };
        let (_, source) = cache.get_or_compute(key, compute).await.expect("lookup");
        source
    }

    fn entries(cache: &FeatureCache) -> &Cache<FeatureKey, NamedTensors> {
        cache.entries.as_ref().expect("an enabled cache")
    }

    #[test]
    fn equal_tensors_have_equal_keys() {
        let values: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.5).collect();
        let shape = [1, 4, 50, 50];
        assert_eq!(
            FeatureKey::of(&shape, &values),
            FeatureKey::of(&shape, &values.clone())
        );
    }

    #[test]
    fn a_different_value_or_shape_changes_the_key() {
        let values: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.5).collect();
        let base = FeatureKey::of(&[1, 4, 50, 50], &values);
        let mut changed = values.clone();
        changed[9_999] += 1.0;
        assert_ne!(base, FeatureKey::of(&[1, 4, 50, 50], &changed));
        assert_ne!(base, FeatureKey::of(&[1, 4, 25, 100], &values));
        assert_ne!(base, FeatureKey::of(&[4, 50, 50], &values));
    }

    #[test]
    fn weight_counts_the_tensor_bytes() {
        assert_eq!(weight(&features(1_000, 0.0)), 4_000 + "stage1".len() as u32);
        assert_eq!(weight(&Vec::new()), 0);
    }

    #[tokio::test]
    async fn the_second_lookup_hits() {
        let cache = FeatureCache::with_budget(1 << 20, Duration::from_secs(60));
        let runs = AtomicUsize::new(0);
        assert_eq!(lookup(&cache, key(1), 10, &runs).await, Source::Computed);
        assert_eq!(lookup(&cache, key(1), 10, &runs).await, Source::Cached);
        assert_eq!(lookup(&cache, key(2), 10, &runs).await, Source::Computed);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_computation() {
        let cache = FeatureCache::with_budget(1 << 20, Duration::from_secs(60));
        let runs = AtomicUsize::new(0);
        let (gate, opened) = tokio::sync::watch::channel(false);
        let lookups = (0..8).map(|_| {
            let mut opened = opened.clone();
            let runs = &runs;
            let cache = &cache;
            async move {
                let compute = async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    opened.wait_for(|open| *open).await.expect("gate");
                    Ok(features(10, 2.0))
                };
                cache.get_or_compute(key(3), compute).await.expect("lookup")
            }
        });
        let all = futures_util::future::join_all(lookups);
        let open = async {
            tokio::task::yield_now().await;
            gate.send(true).expect("open");
        };
        let (results, ()) = tokio::join!(all, open);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let computed = results
            .iter()
            .filter(|(_, s)| *s == Source::Computed)
            .count();
        assert_eq!(computed, 1);
        assert!(
            results
                .iter()
                .all(|(t, _)| t[0].1.array().expect("host").iter().all(|&v| v == 2.0))
        );
    }

    #[tokio::test]
    async fn a_failed_computation_is_not_cached() {
        let cache = FeatureCache::with_budget(1 << 20, Duration::from_secs(60));
        let failing = async { Err(EngineError::Stopped("backbone".into())) };
        let err = cache
            .get_or_compute(key(4), failing)
            .await
            .expect_err("the computation failed");
        assert!(matches!(err, EngineError::Stopped(_)), "{err}");
        let runs = AtomicUsize::new(0);
        assert_eq!(lookup(&cache, key(4), 10, &runs).await, Source::Computed);
    }

    #[tokio::test]
    async fn the_byte_budget_is_never_exceeded() {
        let entry_bytes = u64::from(weight(&features(1_000, 1.0)));
        let budget = 10 * entry_bytes;
        let cache = FeatureCache::with_budget(budget, Duration::from_secs(60));
        let runs = AtomicUsize::new(0);
        for n in 0..40 {
            lookup(&cache, key(n), 1_000, &runs).await;
            entries(&cache).run_pending_tasks().await;
            assert!(entries(&cache).weighted_size() <= budget, "after {n}");
        }
        assert_eq!(entries(&cache).weighted_size(), budget, "full, not emptied");
        assert_eq!(entries(&cache).entry_count(), 10);
        assert_eq!(
            lookup(&cache, key(39), 1_000, &runs).await,
            Source::Cached,
            "the most recent entry stays"
        );
        assert_eq!(
            lookup(&cache, key(0), 1_000, &runs).await,
            Source::Computed,
            "the least recent entry went"
        );
    }

    #[tokio::test]
    async fn an_entry_larger_than_the_budget_is_not_kept() {
        let cache = FeatureCache::with_budget(1_000, Duration::from_secs(60));
        let runs = AtomicUsize::new(0);
        assert_eq!(lookup(&cache, key(5), 1_000, &runs).await, Source::Computed);
        entries(&cache).run_pending_tasks().await;
        assert_eq!(entries(&cache).weighted_size(), 0);
        assert_eq!(lookup(&cache, key(5), 1_000, &runs).await, Source::Computed);
    }

    #[tokio::test]
    async fn entries_expire_after_their_time_to_live() {
        let ttl = Duration::from_millis(50);
        let cache = FeatureCache::with_budget(1 << 20, ttl);
        let runs = AtomicUsize::new(0);
        assert_eq!(lookup(&cache, key(6), 10, &runs).await, Source::Computed);
        assert_eq!(lookup(&cache, key(6), 10, &runs).await, Source::Cached);
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(lookup(&cache, key(6), 10, &runs).await, Source::Computed);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn housekeeping_gives_back_expired_entries_without_a_lookup() {
        let ttl = Duration::from_millis(50);
        let cache = FeatureCache::with_budget(1 << 20, ttl);
        let runs = AtomicUsize::new(0);
        lookup(&cache, key(8), 1_000, &runs).await;
        let bytes = u64::from(weight(&features(1_000, 1.0)));
        assert_eq!(cache.housekeep().await, (bytes, 1));
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(cache.housekeep().await, (0, 0));
        assert_eq!(FeatureCache::disabled().housekeep().await, (0, 0));
    }

    #[tokio::test]
    async fn a_disabled_cache_always_computes() {
        let host_off = CacheConfig {
            cache_bytes: 0,
            device_cache_bytes: 1 << 20,
            cache_ttl_seconds: 300,
        };
        let device_off = CacheConfig {
            cache_bytes: 1 << 20,
            device_cache_bytes: 0,
            ..host_off.clone()
        };
        assert!(FeatureCache::new(&host_off, Memory::Cuda(0)).is_enabled());
        assert!(FeatureCache::new(&device_off, Memory::Cpu).is_enabled());
        for cache in [
            FeatureCache::disabled(),
            FeatureCache::new(&host_off, Memory::Host),
            FeatureCache::new(&host_off, Memory::Cpu),
            FeatureCache::new(&device_off, Memory::Cuda(0)),
        ] {
            assert!(!cache.is_enabled());
            let runs = AtomicUsize::new(0);
            for _ in 0..3 {
                assert_eq!(lookup(&cache, key(7), 10, &runs).await, Source::Computed);
            }
            assert_eq!(runs.load(Ordering::SeqCst), 3);
        }
    }

    #[test]
    fn the_default_budgets_are_256_mib_of_host_and_1_gib_of_device_memory_for_five_minutes() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            cache: CacheConfig,
        }
        let flags = Flags::parse_from(["test"]);
        assert_eq!(flags.cache.cache_bytes, 256 << 20);
        assert_eq!(flags.cache.device_cache_bytes, 1 << 30);
        assert_eq!(flags.cache.ttl(), Duration::from_secs(300));
        assert!(Flags::try_parse_from(["test", "--cache-ttl-seconds", "0"]).is_err());
    }
}
