//! HELIOS's vocabulary, the bottom layer every other module may use and which uses none of
//! them: the raw record as landed, the canonical event it becomes, why a record is dead-lettered
//! (and at which stage), the drafts normalization builds, and the header names of every record
//! HELIOS writes.

pub mod draft;
pub mod event;
pub mod fault;
pub mod headers;
pub mod outcome;
pub mod raw;
pub mod text;

pub use event::{CanonicalEvent, RawRef};
pub use fault::{Fault, Sink};
pub use outcome::{DlqReason, DlqStage, NormalizeError, Normalized, Refusal};
pub use raw::RawRecord;
