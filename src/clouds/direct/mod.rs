//! Direct ingestion, landing in `helios.raw.direct`: settings (`config`), the endpoint
//! (`ingress`) and normalization (`normalize`).

pub mod config;
pub mod ingress;
pub mod normalize;
