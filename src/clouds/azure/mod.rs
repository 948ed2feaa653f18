//! Azure: Event Grid webhooks (Event Grid schema and CloudEvents schema), landing in
//! `helios.raw.azure`. Settings (`config`), the endpoint and both handshakes (`ingress`),
//! normalization (`normalize`), and publishing test events (`publish`).

pub mod config;
pub mod ingress;
pub mod normalize;
pub mod publish;
