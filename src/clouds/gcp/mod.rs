//! GCP: Pub/Sub push subscriptions, landing in `helios.raw.gcp`. Settings (`config`), the push
//! endpoint (`ingress`) and its OIDC token check (`oidc`), normalization (`normalize`), and
//! publishing test events (`publish`).

pub mod config;
pub mod ingress;
pub mod normalize;
pub mod oidc;
pub mod publish;
