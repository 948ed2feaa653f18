//! One module per cloud, each holding everything HELIOS knows about that cloud: its push
//! envelopes, handshakes, signature/token checks and ingress handlers.

pub mod aws;
pub mod azure;
pub mod direct;
pub mod gcp;
