//! imagegate: an OpenAI-compatible gateway for image generation.
//!
//! Start with `ARCHITECTURE.md` in the repository: the life of a request as a list of stages
//! with the function that runs each (`server::handlers::generations` reads top to bottom the
//! same way), the module map with what each module may import, and where a new backend kind,
//! endpoint or storage mode goes.

pub mod allocator;
pub mod api;
pub mod auth;
pub mod backends;
pub mod batch;
pub mod clock;
pub mod config;
pub mod images;
pub mod metering;
pub mod policy;
pub mod routing;
pub mod server;
pub mod store;
pub mod telemetry;

/// Hash maps looked up on every request whose keys are not chosen by clients (model names
/// from the config, key digests, principals' tenant and key ids, budget scopes): foldhash,
/// seeded per process, instead of SipHash, which took ~1.5k instructions a request over
/// these lookups (callgrind). Maps a client can fill with keys of its choosing keep SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// [`FastMap`]'s concurrent kind.
pub(crate) type FastDashMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;
