//! AWS: EventBridge API destinations and SNS HTTP(S) subscriptions, both landing in
//! `helios.raw.aws`. Everything HELIOS knows about AWS lives here: settings (`config`), the
//! endpoints (`ingress`) and SNS authenticity (`signature`), normalization of what they landed
//! (`normalize`), and publishing test events (`publish`).

pub mod config;
pub mod ingress;
pub mod normalize;
pub mod publish;
pub mod signature;
