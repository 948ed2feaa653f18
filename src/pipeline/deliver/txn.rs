//! Exactly-once delivery: fan-out, DLQ and offsets in one Kafka transaction, PostgreSQL first
//! (idempotent, outside it), librdkafka's error classes deciding what follows a failed call.

use super::*;

impl Delivery {
    /// Exactly-once: fan-out, DLQ and offsets in one transaction (PostgreSQL first, idempotent,
    /// outside it). A refusal aborts the transaction, isolates the refused units, and the
    /// transaction is done again without them (each round removes at least one unit, so this
    /// ends). librdkafka's error classes decide what follows a failed call: retriable → the same
    /// call again, abortable → abort and redo, fatal → [`Stop::Fatal`].
    pub(super) async fn transaction<S: EventStore, D: DedupStore>(
        &mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<(), Stop> {
        loop {
            self.store(out).await?;
            if self.follow_prior(out).await? {
                continue;
            }
            let avro = self.avro_values(out).await?;
            ks::begin(&out.producer).await.map_err(txn_stop)?;
            for p in &mut self.progress {
                p.fanned = false;
            }
            self.dlq_sent.clear();
            let attempt = self.transaction_body(out, &avro).await;
            match attempt {
                Ok(TxnStep::Commit) => match self.end_transaction(out).await {
                    Ok(()) => return Ok(()),
                    Err(TxnError::Abortable(e)) => {
                        tracing::warn!(error = %e, "the transaction failed; aborting and doing the batch again");
                        metrics::counter!("helios_processor_transaction_retries_total", "step" => "abort").increment(1);
                        abort_or_fatal(out).await?;
                    }
                    Err(e @ TxnError::Retriable(_)) => {
                        // Only when shutting down: the commit's outcome is the broker's now.
                        return Err(Stop::Unavailable(e.unavailable()));
                    }
                    Err(TxnError::Fatal(e)) => return Err(Stop::Fatal(e)),
                },
                Ok(TxnStep::Redo(refused)) => {
                    abort_or_fatal(out).await?;
                    self.take_back(out, refused).await?;
                }
                Err(stop) => {
                    abort_or_fatal(out).await?;
                    return Err(stop);
                }
            }
        }
    }

    /// Everything sent inside an open transaction; no `?` here leaves it open (the caller
    /// aborts on every outcome but `Commit`).
    async fn transaction_body<S: EventStore, D: DedupStore>(
        &mut self,
        out: &Outputs<'_, S, D>,
        avro: &BTreeMap<usize, Vec<u8>>,
    ) -> Result<TxnStep, Stop> {
        let (refused, transient) = self.fanout(out, avro, false).await?;
        if let Some(e) = transient {
            return Err(e.into());
        }
        if !refused.is_empty() {
            return Ok(TxnStep::Redo(refused));
        }
        if self.dead_letter(out, true).await?.is_some() {
            return Ok(TxnStep::Redo(vec![]));
        }
        // Marks are released inside the transaction's window: if it then fails, reprocessing
        // simply claims them again.
        self.release(out).await?;
        if self.reclaim_in_batch(out).await? {
            return Ok(TxnStep::Redo(vec![]));
        }
        if out.ownership.as_ref().is_some_and(|o| self.fenced_any(o)) {
            return Err(Stop::Fenced);
        }
        Ok(TxnStep::Commit)
    }

    /// The batch's offsets into the transaction, then the commit.
    async fn end_transaction<S, D>(&self, out: &Outputs<'_, S, D>) -> Result<(), TxnError> {
        let mut offsets = TopicPartitionList::new();
        for s in self.ticket.iter().flat_map(|t| t.spans()) {
            let _ =
                offsets.add_partition_offset(&s.key.topic, s.key.partition, Offset::Offset(s.next));
        }
        if offsets.count() > 0 {
            let group = out
                .group
                .clone()
                .ok_or_else(|| TxnError::Fatal("the consumer has no group metadata".into()))?;
            ks::send_offsets(&out.producer, &offsets, &group).await?;
        }
        ks::commit(&out.producer, out.commit_timeout, &out.shutdown).await
    }
}

/// What a transaction attempt ended with.
enum TxnStep {
    Commit,
    /// Abort; take these events' rows back (they move to the DLQ); do it again.
    Redo(Refused),
}

fn txn_stop(e: TxnError) -> Stop {
    match e {
        TxnError::Fatal(e) => Stop::Fatal(e),
        other => Stop::Unavailable(other.unavailable()),
    }
}

/// Aborts the open transaction; a refused abort means the producer is unusable.
async fn abort_or_fatal<S, D>(out: &Outputs<'_, S, D>) -> Result<(), Stop> {
    ks::abort(&out.producer)
        .await
        .map_err(|e| Stop::Fatal(format!("abort_transaction was refused: {e}")))
}
