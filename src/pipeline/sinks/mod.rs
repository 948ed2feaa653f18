//! What a delivery writes to, one file per sink, each as functions that return what was
//! acknowledged and what was refused: PostgreSQL with its isolation ([`store`]), the fan-out
//! records and their order ([`fanout`]), DLQ records ([`dlq`]), and the Kafka sending and
//! transactions under both ([`kafka`]).

pub mod dlq;
pub mod fanout;
pub mod kafka;
pub mod store;
