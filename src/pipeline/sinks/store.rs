//! The PostgreSQL side of a delivery: writing a batch's events with the events the database
//! refuses isolated (by halving: at most ~2·log2(n) extra statements per bad event), and taking
//! back the rows of events a later sink refused.

use crate::db::{EventStore, StoreError};
use crate::model::{CanonicalEvent, DlqReason, DlqStage, Fault, Refusal, Sink};
use crate::pipeline::Unavailable;

/// What writing a batch's events did.
#[derive(Debug, Default)]
pub struct StoreOutcome {
    /// Rows written.
    pub rows: u64,
    /// Events refused, by position in the slice written, with why.
    pub refused: Vec<(usize, Refusal)>,
    /// Events whose row was there already with another raw record's lineage (duplicates the
    /// store caught after their dedup mark was gone), by position.
    pub foreign: Vec<usize>,
}

/// Writes `events`; a refusal caused by the data is isolated by writing halves. Unclassified
/// errors are retried (an `Err` marked [`Unavailable::unclassified`]) until `isolate` is set;
/// then they are isolated like data errors, and when nothing of the batch could be written at
/// all it is an outage (`Err` again) rather than a batch of bad events.
pub async fn write_isolating<S: EventStore>(
    store: &S,
    events: &[&CanonicalEvent],
    replay_id: Option<&str>,
    isolate: bool,
) -> Result<StoreOutcome, Unavailable> {
    let mut out = StoreOutcome::default();
    let mut some_written = false;
    let mut unclassified_only: Option<StoreError> = None;
    let mut todo = vec![(0, events.len())];
    while let Some((lo, hi)) = todo.pop() {
        if lo == hi {
            continue;
        }
        match store.write_events(&events[lo..hi], replay_id).await {
            Ok(w) => {
                some_written = true;
                out.rows += w.rows;
                out.foreign.extend(w.foreign.into_iter().map(|i| lo + i));
            }
            Err(e) => match &e.fault {
                Fault::Transient => return Err(Unavailable::new(Sink::Postgres, e.message)),
                Fault::Unclassified { .. } if !isolate => {
                    return Err(Unavailable::unclassified(Sink::Postgres, e.message))
                }
                Fault::Data { code } | Fault::Unclassified { code } if hi - lo == 1 => {
                    let code = code.clone();
                    if matches!(e.fault, Fault::Unclassified { .. }) {
                        unclassified_only.get_or_insert(StoreError {
                            message: e.message.clone(),
                            fault: e.fault.clone(),
                        });
                    }
                    out.refused.push((
                        lo,
                        Refusal::new(DlqReason::SinkRejected, DlqStage::Store, e.message)
                            .sink_code(code),
                    ))
                }
                Fault::Data { .. } | Fault::Unclassified { .. } => {
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
            },
        }
    }
    if let Some(e) = unclassified_only {
        if !some_written {
            // Every part failed: the database, not the data (an outage nobody classified).
            return Err(Unavailable::unclassified(
                Sink::Postgres,
                format!("every event of the batch failed with an unclassified error: {e}"),
            ));
        }
    }
    out.foreign.sort_unstable();
    Ok(out)
}

/// Deletes the rows these events' own raw records wrote (a later sink refused them).
pub async fn take_back<S: EventStore>(
    store: &S,
    events: &[&CanonicalEvent],
) -> Result<(), Unavailable> {
    store
        .remove_events(events)
        .await
        .map(|_| ())
        .map_err(|e| Unavailable::new(Sink::Postgres, e.message))
}
