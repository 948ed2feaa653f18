//! `helios demo --send-samples --once` on ephemeral ports: exits 0 with a summary that matches
//! the samples, and works a second time on the same store file.

use std::process::Command;

use crate::common::scratch_dir;

#[test]
fn demo_sends_samples_and_reports_what_happened_twice_on_one_store() {
    let dir = scratch_dir("demo");
    let store = dir.join("demo.db");
    for run in 1..=2 {
        let out = Command::new(env!("CARGO_BIN_EXE_helios"))
            .args(["demo", "--send-samples", "--once", "--port", "0", "--store"])
            .arg(&store)
            .env("RUST_LOG", "warn")
            .env_remove("HELIOS_TOPOLOGY")
            .output()
            .expect("run helios demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in [
            "OrderPlaced          2 stored (expected 2)",
            "PaymentProcessed     2 stored (expected 2)",
            "InventoryReserved    1 stored (expected 1)",
            "duplicates           1 (expected 1)",
            "DLQ                  1 (expected 1: missing_required_field)",
            "7 events in = 5 out + 1 duplicates + 1 DLQ; 3 handshakes skipped",
            "Everything arrived as expected.",
            "completed       O-1001   aws → azure → gcp in 10.7s",
            "missing         O-2002   PaymentProcessed never came",
            "orphan          O-3003   OrderPlaced never came",
            "mismatch        O-1001   amount: OrderPlaced says 129.5, PaymentProcessed says 129.0",
        ] {
            assert!(
                stdout.contains(line),
                "run {run}: missing `{line}` in:\n{stdout}"
            );
        }
        assert!(stdout.contains("librdkafka mock cluster"), "{stdout}");
        // What the demo configured itself is not a warning, and its shutdown is quiet.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let loud: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        assert!(loud.is_empty(), "run {run} logged:\n{}", loud.join("\n"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
