//! `helios tap` against the real broker: the raw, fan-out and DLQ records as JSON lines, with
//! their headers, filtered by source, type and order id.

use serde_json::{json, Value};

use crate::common::*;

fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn tap_prints_raw_events_and_dlq_records_filtered() {
    let app = spawn_app(|_| {}).await;
    let opts = ProcOpts::default();
    let proc = spawn_processor_with(&app.topology, opts.clone()).await;
    for (id, order, customer) in [
        ("tp-1", "O-T1", Some("C")),
        ("tp-2", "O-T2", Some("C")),
        ("tp-3", "O-T3", None),
    ] {
        let mut data = json!({"order_id": order});
        if let Some(c) = customer {
            data["customer_id"] = json!(c);
        }
        let r = app
            .client
            .post(app.url("/api/v1/events/ingest"))
            .json(&json!({"event_type": "OrderPlaced", "event_id": id, "data": data}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    expect_count(&proc.pool, "SELECT count(*) FROM events", 2).await;
    read_exactly(
        &app.kafka.bootstrap_servers,
        &app.topology.event_topic("OrderPlaced"),
        2,
    )
    .await;
    read_exactly(&app.kafka.bootstrap_servers, &app.topology.dlq_topic(), 1).await;
    let tap = |args: &[&str]| lines(&run_ok(helios_cli(&app.topology, &opts, args)));

    // Fan-out, one order: its record only, key and CloudEvents headers included.
    let ev = tap(&["tap", "events", "--from", "beginning", "--order-id", "O-T2"]);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["key"], "O-T2");
    assert_eq!(ev[0]["headers"]["ce_id"], "tp-2");
    assert_eq!(ev[0]["value"]["event_id"], "tp-2");
    // All fan-out of the type.
    assert_eq!(
        tap(&[
            "tap",
            "events",
            "--from",
            "beginning",
            "--type",
            "OrderPlaced"
        ])
        .len(),
        2
    );
    // Raw records of one source, untouched bodies, the landing headers.
    let raw = tap(&["tap", "raw", "--from", "beginning", "--source", "direct"]);
    assert_eq!(raw.len(), 3, "{raw:?}");
    assert!(raw
        .iter()
        .all(|r| r["headers"]["helios-source"] == "direct"));
    assert_eq!(
        tap(&["tap", "raw", "--from", "beginning", "--source", "aws"]).len(),
        0
    );
    // The DLQ with its reason; filtered by order id in the value.
    let dlq = tap(&["tap", "dlq", "--from", "beginning", "--order-id", "O-T3"]);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(
        dlq[0]["headers"]["helios-dlq-reason"],
        "missing_required_field"
    );
    assert_eq!(
        tap(&["tap", "dlq", "--from", "beginning", "--order-id", "O-T1"]).len(),
        0
    );
    // `--from end` without --follow: nothing new, returns at once.
    assert_eq!(tap(&["tap", "events", "--from", "end"]).len(), 0);
    // --limit.
    assert_eq!(
        tap(&["tap", "raw", "--from", "beginning", "--limit", "1"]).len(),
        1
    );

    // --follow: a record pushed after the tap started is printed as it flows.
    let mut child = helios_cli(
        &app.topology,
        &opts,
        &["tap", "events", "--from", "end", "--follow"],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The tap has assigned its partitions once a record pushed now reaches it: push until one does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut n = 0;
    let line = loop {
        n += 1;
        let r = app
            .client
            .post(app.url("/api/v1/events/ingest"))
            .json(&json!({"event_type": "OrderPlaced", "event_id": format!("tp-f{n}"), "data": {"order_id": "O-F", "customer_id": "C"}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        // Polled, never blocking: the ingress and processor run on this test's runtime.
        let wait_until = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut got = None;
        while got.is_none() && std::time::Instant::now() < wait_until {
            got = rx.try_recv().ok();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if let Some(l) = got {
            break l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "--follow printed nothing"
        );
    };
    let _ = child.kill();
    let _ = child.wait();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["key"], "O-F");
    assert!(v["value"]["event_id"].as_str().unwrap().starts_with("tp-f"));
    proc.stop().await;
}
