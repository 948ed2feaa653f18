//! Azure: Event Grid webhooks, Event Grid schema and CloudEvents schema, with both handshakes.

pub mod eventgrid;
