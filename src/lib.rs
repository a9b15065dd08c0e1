//! seam: an encrypted service-mesh sidecar proxy.
//!
//! The crate is laid out one module per concern (see DESIGN §7): `config` reads and
//! validates the YAML, `identity` owns certificates and the rustls configs, `handshake`
//! derives per-peer session keys, and `session` seals messages and caches sessions.
#![forbid(unsafe_code)]

pub mod config;
pub mod handshake;
pub mod identity;
pub mod session;
