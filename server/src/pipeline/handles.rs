//! Feature handles: the backbone features of an image kept under an unguessable id, so that
//! heads can run on the image later without it being sent, decoded or run through the backbone
//! again.
//!
//! Each handle lives a time-to-live from when it was made; the least recently used are evicted
//! once their bytes pass a budget. Either way the handle is then unknown and the caller has to
//! send the image again.

use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use moka::future::Cache;
use moka::policy::EvictionPolicy;
use serde::Serialize;

use super::types::{ExtractedFeatures, ImageInput};
use super::{Pipeline, cache};
use crate::engine::NamedTensors;
use crate::error::Error;
use crate::geometry::Geometry;
use crate::telemetry::metrics;

/// Random bytes in a handle.
const HANDLE_BYTES: usize = 16;

/// Characters of an unknown handle quoted back in the error.
const QUOTED_CHARS: usize = 8;

/// The feature handles' settings.
#[derive(Debug, Clone, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HandleConfig {
    /// How long a feature handle from ExtractFeatures stays usable, in seconds.
    #[arg(
        long,
        env = "POLYHEAD_HANDLE_TTL_SECONDS",
        default_value_t = 600,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub handle_ttl_seconds: u32,

    /// Memory the features behind feature handles may hold, in bytes of feature tensors; the
    /// least recently used handles are forgotten beyond it. An image whose features alone are
    /// larger gets no handle (FAILED_PRECONDITION).
    #[arg(long, env = "POLYHEAD_HANDLE_BYTES", default_value_t = 512 << 20)]
    pub handle_bytes: u64,
}

impl HandleConfig {
    /// How long a handle lives.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.handle_ttl_seconds))
    }
}

impl Default for HandleConfig {
    fn default() -> Self {
        Self {
            handle_ttl_seconds: 600,
            handle_bytes: 512 << 20,
        }
    }
}

/// The backbone features of one image and its geometry.
#[derive(Clone)]
pub struct HandleEntry {
    pub tensors: NamedTensors,
    pub geometry: Geometry,
}

/// Feature handles and the features they name.
pub struct HandleStore {
    entries: Cache<String, HandleEntry>,
    ttl: Duration,
    /// The bytes the entries may weigh in all (`--handle-bytes`).
    budget: u64,
}

impl HandleStore {
    /// The store `config` describes.
    pub fn new(config: &HandleConfig) -> Self {
        Self::with_budget(config.handle_bytes, config.ttl())
    }

    fn with_budget(bytes: u64, ttl: Duration) -> Self {
        let entries = Cache::builder()
            .max_capacity(bytes)
            .weigher(|handle: &String, entry: &HandleEntry| weight(handle, entry))
            .time_to_live(ttl)
            .eviction_policy(EvictionPolicy::lru())
            .build();
        Self {
            entries,
            ttl,
            budget: bytes,
        }
    }

    /// How long a handle lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Keeps `entry` under a new handle; returns the handle and when it expires.
    /// FAILED_PRECONDITION when the entry alone weighs more than the whole budget: the cache
    /// would drop it at once, and the handle would name nothing.
    pub async fn insert(&self, entry: HandleEntry) -> Result<(String, SystemTime), Error> {
        let handle = new_handle()?;
        let bytes = u64::from(weight(&handle, &entry));
        if bytes > self.budget {
            return Err(Error::FailedPrecondition(format!(
                "the features of this image take {bytes} bytes, more than the server keeps for \
                 all feature handles (--handle-bytes {}); send the image with each call instead",
                self.budget
            )));
        }
        let expires_at = SystemTime::now() + self.ttl;
        self.entries.insert(handle.clone(), entry).await;
        // Evict what the new entry pushed over the budget now: moka applies its writes only
        // every so many inserts, and a burst of them would hold that many more features.
        self.entries.run_pending_tasks().await;
        Ok((handle, expires_at))
    }

    /// Forgets the handles whose time to live has passed (the store tidies itself only as it
    /// is used); answers the bytes and handles it holds then.
    pub async fn housekeep(&self) -> (u64, u64) {
        self.entries.run_pending_tasks().await;
        (self.entries.weighted_size(), self.entries.entry_count())
    }

    /// The features `handle` names; NOT_FOUND when it is unknown, expired or evicted.
    pub async fn get(&self, handle: &str) -> Result<HandleEntry, Error> {
        self.entries.get(handle).await.ok_or_else(|| {
            let quoted: String = handle.chars().take(QUOTED_CHARS).collect();
            let ellipsis = if quoted.len() < handle.len() {
                "…"
            } else {
                ""
            };
            Error::NotFound(format!(
                "feature handle '{quoted}{ellipsis}' is unknown or expired (handles live {} s); \
                 send the image again",
                self.ttl.as_secs()
            ))
        })
    }
}

/// The bytes `entry` holds under `handle`, capped to what the cache can weigh.
fn weight(handle: &str, entry: &HandleEntry) -> u32 {
    let bytes = u64::from(cache::weight(&entry.tensors)) + handle.len() as u64;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// A new handle: 128 bits from the operating system's random source, hex encoded.
fn new_handle() -> Result<String, Error> {
    let mut bytes = [0u8; HANDLE_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("no random bytes for a feature handle: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Pipeline {
    /// Runs the backbone on `image` (or takes its features from the feature cache or another
    /// handle) and keeps the features under a new handle. Records the request's stage latencies.
    pub async fn extract_features(&self, image: ImageInput) -> Result<ExtractedFeatures, Error> {
        let started = Instant::now();
        let found = self.features_of(image).await?;
        let geometry = found.geometry;
        let entry = HandleEntry {
            tensors: found.features.tensors.clone(),
            geometry,
        };
        let (handle, expires_at) = self.handles.insert(entry).await?;
        let mut timings = found.timings();
        timings.total = started.elapsed();
        metrics::record_request(&timings);
        Ok(ExtractedFeatures {
            handle,
            expires_at,
            image_width: geometry.orig_width,
            image_height: geometry.orig_height,
            timings,
        })
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, IxDyn};

    use super::*;
    use crate::engine::Tensor;

    fn entry(values: usize) -> HandleEntry {
        let array = ArrayD::from_elem(IxDyn(&[1, values]), 1.5);
        HandleEntry {
            tensors: vec![("stage1".to_string(), Tensor::from(array))],
            geometry: Geometry::letterbox(64, 48, 32, 32),
        }
    }

    fn is_not_found(result: Result<HandleEntry, Error>) -> bool {
        matches!(result, Err(Error::NotFound(_)))
    }

    #[tokio::test]
    async fn an_inserted_handle_gives_its_features_back() {
        let store = HandleStore::with_budget(1 << 20, Duration::from_secs(60));
        let (handle, expires_at) = store.insert(entry(10)).await.expect("insert");
        assert_eq!(handle.len(), 2 * HANDLE_BYTES);
        assert!(handle.bytes().all(|b| b.is_ascii_hexdigit()));
        let left = expires_at
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(left > Duration::from_secs(55) && left <= Duration::from_secs(60));
        let found = store.get(&handle).await.expect("known handle");
        assert_eq!(found.tensors.len(), 1);
        assert!(
            found.tensors[0]
                .1
                .array()
                .expect("host")
                .iter()
                .all(|&v| v == 1.5)
        );
        assert_eq!(found.geometry, Geometry::letterbox(64, 48, 32, 32));
    }

    #[tokio::test]
    async fn handles_are_distinct() {
        let store = HandleStore::new(&HandleConfig::default());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let (handle, _) = store.insert(entry(1)).await.expect("insert");
            assert!(seen.insert(handle));
        }
    }

    #[tokio::test]
    async fn an_unknown_handle_is_not_found_and_quoted_short() {
        let store = HandleStore::new(&HandleConfig::default());
        let Err(Error::NotFound(message)) = store.get("0123456789abcdef").await else {
            panic!("an unknown handle was found");
        };
        assert_eq!(
            message,
            "feature handle '01234567…' is unknown or expired (handles live 600 s); \
             send the image again"
        );
        assert!(is_not_found(store.get("").await));
    }

    #[tokio::test]
    async fn features_larger_than_the_whole_budget_get_no_handle() {
        let fits = u64::from(cache::weight(&entry(1_000).tensors)) + 2 * HANDLE_BYTES as u64;
        let store = HandleStore::with_budget(fits, Duration::from_secs(60));
        let (handle, _) = store.insert(entry(1_000)).await.expect("insert");
        assert!(store.get(&handle).await.is_ok(), "exactly the budget fits");
        let Err(Error::FailedPrecondition(message)) = store.insert(entry(1_001)).await else {
            panic!("a handle that would name nothing");
        };
        assert!(message.contains("--handle-bytes"), "{message}");
        assert!(
            store.get(&handle).await.is_ok(),
            "nothing was evicted for it"
        );
    }

    #[tokio::test]
    async fn handles_expire_after_their_time_to_live() {
        let ttl = Duration::from_millis(50);
        let store = HandleStore::with_budget(1 << 20, ttl);
        let (handle, _) = store.insert(entry(10)).await.expect("insert");
        assert!(store.get(&handle).await.is_ok());
        tokio::time::sleep(ttl * 2).await;
        assert!(is_not_found(store.get(&handle).await));
    }

    #[tokio::test]
    async fn housekeeping_forgets_expired_handles_without_a_lookup() {
        let ttl = Duration::from_millis(50);
        let store = HandleStore::with_budget(1 << 20, ttl);
        store.insert(entry(10)).await.expect("insert");
        assert_eq!(store.housekeep().await.1, 1);
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(store.housekeep().await, (0, 0));
    }

    #[tokio::test]
    async fn the_least_recently_used_handles_go_beyond_the_byte_budget() {
        let entry_bytes = u64::from(cache::weight(&entry(1_000).tensors)) + 2 * HANDLE_BYTES as u64;
        let store = HandleStore::with_budget(4 * entry_bytes, Duration::from_secs(60));
        let mut handles = Vec::new();
        for _ in 0..10 {
            handles.push(store.insert(entry(1_000)).await.expect("insert").0);
            assert!(store.entries.weighted_size() <= 4 * entry_bytes);
        }
        assert!(
            is_not_found(store.get(&handles[0]).await),
            "the oldest went"
        );
        assert!(store.get(&handles[9]).await.is_ok(), "the newest stays");
        assert_eq!(store.entries.entry_count(), 4);
    }

    #[test]
    fn the_defaults_are_ten_minutes_and_512_mib() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            handles: HandleConfig,
        }
        let flags = Flags::parse_from(["test"]);
        assert_eq!(flags.handles.handle_bytes, 512 << 20);
        assert_eq!(flags.handles.ttl(), Duration::from_secs(600));
        assert_eq!(
            flags.handles.handle_bytes,
            HandleConfig::default().handle_bytes
        );
        assert!(Flags::try_parse_from(["test", "--handle-ttl-seconds", "0"]).is_err());
    }
}
