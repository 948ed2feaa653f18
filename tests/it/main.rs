//! Integration tests: the real ingress against the real broker (Tansu, started by
//! `scripts/test.sh`). One test binary, so the suite links once.

mod common;

mod avro;
mod aws_eventbridge;
mod aws_sns;
mod azure_eventgrid;
mod breaker;
mod chaos;
mod commit_path;
mod demo;
mod deploy;
mod direct;
mod dlq_heal;
mod docs;
mod exactly_once;
mod front_door;
mod gcp_pubsub;
mod kubernetes;
mod liveness;
mod ops;
mod outage;
mod overlap;
mod partitions;
mod poison;
mod processor;
mod publish;
mod pubsub_standin;
mod reconcile;
mod redis_cluster;
mod registry;
mod replay;
mod resilience;
mod schemas;
mod status;
mod status_page;
mod stores;
mod tap;
mod topology_apply;
mod trace;
