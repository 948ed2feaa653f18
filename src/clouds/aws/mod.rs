//! AWS: EventBridge API destinations and SNS HTTP(S) subscriptions. Both land in `helios.raw.aws`.

pub mod eventbridge;
pub mod sns;
