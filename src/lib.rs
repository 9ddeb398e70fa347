//! imagegate: an OpenAI-compatible gateway for image generation.
//!
//! The life of a request is in `server::handlers::generations`; the modules follow its steps
//! (see DESIGN in the repository's README for the map).

pub mod allocator;
pub mod api;
pub mod auth;
pub mod backends;
pub mod config;
pub mod images;
pub mod metering;
pub mod policy;
pub mod routing;
pub mod server;
pub mod store;
pub mod telemetry;
