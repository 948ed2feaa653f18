//! GCP: Pub/Sub push subscriptions (wrapped and unwrapped), with optional OIDC verification.

pub mod oidc;
pub mod pubsub;
