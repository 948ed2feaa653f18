//! The outbox marks migration (0006) takes over what `published_at` said, row for row.

use crate::common::*;

#[tokio::test]
async fn the_outbox_migration_keeps_unpublished_outcomes_unpublished() {
    let schema = unique_schema();
    let pool = helios::db::connect(&database_url(), Some(&schema))
        .await
        .unwrap();
    // The tables as migrations 1–5 left them, with outcomes of three partitions: 0 all
    // published, 1 published up to a gap, 2 none published; and one from before `part` existed.
    for sql in [
        include_str!("../../../migrations/0001_events.sql"),
        include_str!("../../../migrations/0002_dlq_redrives.sql"),
        include_str!("../../../migrations/0003_reconciliation.sql"),
        include_str!("../../../migrations/0004_reconcile_progress.sql"),
        include_str!("../../../migrations/0005_reconcile_event_time.sql"),
    ] {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO reconciliation_results (id, flow, flow_key, outcome, step, part, published_at) VALUES
           (1, 'f', 'a', 'completed', '', 0, now()), (2, 'f', 'b', 'completed', '', 0, now()),
           (3, 'f', 'c', 'completed', '', 1, now()), (4, 'f', 'd', 'completed', '', 1, NULL),
           (5, 'f', 'e', 'completed', '', 1, now()), (6, 'f', 'g', 'completed', '', 2, NULL),
           (7, 'f', 'h', 'completed', '', NULL, now());
         SELECT setval(pg_get_serial_sequence('reconciliation_results', 'id'), 7);",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(include_str!(
        "../../../migrations/0006_reconcile_outbox_through.sql"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let marks: Vec<(i32, i64)> =
        sqlx::query_as("SELECT part, published_through FROM reconcile_outbox ORDER BY part")
            .fetch_all(&pool)
            .await
            .unwrap();
    // Partition 1 from its first unpublished row (5 is published again: a repeat, allowed).
    assert_eq!(marks, vec![(0, 2), (1, 3), (2, 5)]);
    let store = helios::reconcile::ReconStore::Pg(pool.clone());
    let ids: Vec<i64> = store
        .unpublished(&[0, 1, 2], 100)
        .await
        .unwrap()
        .iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(ids, vec![4, 5, 6], "what the sweep publishes");
    // Published, the marks move; nothing is left.
    store.advance_published(&[(1, 5), (2, 6)]).await.unwrap();
    store.advance_published(&[(1, 4)]).await.unwrap();
    assert!(store.unpublished(&[0, 1, 2], 100).await.unwrap().is_empty());
    let through: i64 =
        sqlx::query_scalar("SELECT published_through FROM reconcile_outbox WHERE part = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(through, 5, "a mark never goes back");
    let state_type: String = sqlx::query_scalar(
        "SELECT data_type FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'flow_state' AND column_name = 'state'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(state_type, "text");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap();
}
