//! HELIOS: one trustworthy Kafka stream from AWS EventBridge/SNS, GCP Pub/Sub and Azure Event
//! Grid pushes. The library holds everything; the `helios` binary only calls [`cli::main`], so
//! tests and benchmarks use the same code paths as production.

pub mod cli;
pub mod clouds;
pub mod config;
pub mod db;
pub mod demo;
pub mod dlq;
pub mod failpoint;
pub mod http;
pub mod ingress;
pub mod kafka;
pub mod limits;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod publish;
pub mod reconcile;
pub mod replay;
pub mod schemas;
pub mod shutdown;
pub mod source;
pub mod status;
pub mod tap;
pub mod telemetry;
pub mod topology;
