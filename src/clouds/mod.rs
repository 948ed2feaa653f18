//! One folder per cloud, each holding everything HELIOS knows about that cloud: its settings,
//! its endpoints (push envelopes, handshakes, signature and token checks), the normalization of
//! what they landed, and its test-event publisher. Each exposes its routes; the ingress
//! assembles them. The clouds use the vocabulary (`crate::model`) and the HTTP kit
//! (`crate::http`) below them, and nothing above.

pub mod aws;
pub mod azure;
pub mod direct;
pub mod gcp;
