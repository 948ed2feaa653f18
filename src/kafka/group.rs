//! Consumer-group plumbing shared by the processor and the reconciler: rejoining a group left
//! without partitions, and asking the broker which group protocols it serves.

use std::time::Duration;

use crate::config::KafkaSettings;

/// When a group member left without partitions should leave its group and join it again.
///
/// A stretch without partitions starts when the group has answered with an assignment (not
/// while joining); after `wait` of it the member rejoins, and each rejoin doubles the wait (up
/// to an hour) before the next one, within the stretch and in the next stretch alike: a member
/// the broker leaves out again gets another try (45 s, then 90 s, 180 s… later), and two
/// members in excess cannot keep taking one partition from each other. On Kafka that is one
/// more rebalance for a member in excess of the partitions, less and less often; on Tansu
/// 0.6.0 it is what gets a member its partitions when the broker formed the group with an
/// empty assignment (a dead leader expiring between a new member's JoinGroup and SyncGroup:
/// README, Reconciliation, Scaling).
#[derive(Debug, Clone)]
pub struct RejoinWatch {
    /// Start of the stretch without partitions, and when the next rejoin is due.
    stretch: Option<(std::time::Instant, std::time::Instant)>,
    wait: Duration,
}

/// Three session timeouts (HELIOS's consumers use 15 s): a member that died is expired by then.
pub const DEFAULT_REJOIN_AFTER: Duration = Duration::from_secs(45);

/// The longest wait between two rejoins.
const MAX_REJOIN_WAIT: Duration = Duration::from_secs(3600);

impl RejoinWatch {
    pub fn new(wait: Duration) -> Self {
        RejoinWatch {
            stretch: None,
            wait,
        }
    }

    /// Takes the member's state now (`none`: it owns no partition; `answered`: the group has
    /// answered with an assignment at least once). Some(how long it has owned nothing) when it
    /// is time to rejoin.
    pub fn observe(&mut self, none: bool, answered: bool) -> Option<Duration> {
        self.observe_at(none, answered, std::time::Instant::now())
    }

    /// How long the next rejoin will wait.
    pub fn next_wait(&self) -> Duration {
        self.wait
    }

    fn observe_at(
        &mut self,
        none: bool,
        answered: bool,
        now: std::time::Instant,
    ) -> Option<Duration> {
        if !none {
            self.stretch = None;
            return None;
        }
        match self.stretch {
            None if answered => {
                self.stretch = Some((now, now + self.wait));
                None
            }
            Some((since, due)) if now >= due => {
                self.wait = (self.wait * 2).min(MAX_REJOIN_WAIT);
                self.stretch = Some((since, now + self.wait));
                Some(now.duration_since(since))
            }
            _ => None,
        }
    }
}

/// Leaves the group and joins it again on `topics` (a member [`RejoinWatch`] found without
/// partitions for `after`), saying so in a warning.
pub fn rejoin_group<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    topics: &[&str],
    role: &str,
    after: Duration,
    next: Duration,
) {
    use rdkafka::consumer::Consumer;
    tracing::warn!(
        role,
        seconds = after.as_secs(),
        next_try_seconds = next.as_secs(),
        "no partition assigned to this instance: joining its consumer group again (and again \
         after next_try_seconds if it still owns none). Either there are more instances than \
         partitions, or the group coordinator left this member out (seen on Tansu 0.6.0 after \
         an instance was killed)"
    );
    let mut topics = topics.to_vec();
    topics.sort_unstable();
    consumer.unsubscribe();
    if let Err(e) = consumer.subscribe(&topics) {
        tracing::warn!(role, error = %e, "subscribing again failed");
    }
}

/// Kafka's API key of ConsumerGroupHeartbeat (the KIP-848 consumer group protocol).
pub const API_CONSUMER_GROUP_HEARTBEAT: i16 = 68;

/// The API keys a broker serves (ApiVersions v0, asked over a plain TCP connection to the first
/// bootstrap server that answers). `None` when it cannot be asked this way: the cluster uses TLS
/// (`security.protocol` SSL or SASL_SSL), or no bootstrap server answered within `timeout`.
/// ApiVersions is answered before any SASL handshake, so SASL_PLAINTEXT clusters can be asked.
pub fn broker_api_keys(
    settings: &KafkaSettings,
    timeout: Duration,
) -> Option<std::collections::HashSet<i16>> {
    use std::io::{Read, Write};
    let protocol = settings
        .properties
        .get("security.protocol")
        .map(|p| p.to_ascii_lowercase())
        .unwrap_or_else(|| "plaintext".into());
    if protocol != "plaintext" && protocol != "sasl_plaintext" {
        return None;
    }
    for server in settings.bootstrap_servers.split(',') {
        let server = server.trim().trim_start_matches("PLAINTEXT://");
        let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(server) else {
            continue;
        };
        for addr in addrs {
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(timeout));
            let _ = s.set_write_timeout(Some(timeout));
            // Request header v1: api_key 18 (ApiVersions), version 0, correlation id, client id.
            let client = b"helios-probe";
            let mut req = Vec::with_capacity(32);
            req.extend_from_slice(&18i16.to_be_bytes());
            req.extend_from_slice(&0i16.to_be_bytes());
            req.extend_from_slice(&7i32.to_be_bytes());
            req.extend_from_slice(&(client.len() as i16).to_be_bytes());
            req.extend_from_slice(client);
            let mut frame = (req.len() as i32).to_be_bytes().to_vec();
            frame.extend_from_slice(&req);
            if s.write_all(&frame).is_err() {
                continue;
            }
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let len = i32::from_be_bytes(len);
            if !(10..=1 << 20).contains(&len) {
                continue;
            }
            let mut body = vec![0u8; len as usize];
            if s.read_exact(&mut body).is_err() {
                continue;
            }
            // correlation id (4), error code (2), array length (4), then (key, min, max) × n.
            let error = i16::from_be_bytes([body[4], body[5]]);
            let n = i32::from_be_bytes([body[6], body[7], body[8], body[9]]);
            if error != 0 || n < 0 || body.len() < 10 + 6 * n as usize {
                continue;
            }
            return Some(
                (0..n as usize)
                    .map(|i| i16::from_be_bytes([body[10 + 6 * i], body[11 + 6 * i]]))
                    .collect(),
            );
        }
    }
    None
}

#[cfg(test)]
mod rejoin_tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_member_rejoins_less_and_less_often_while_it_owns_nothing() {
        let s = Duration::from_secs;
        let t = Instant::now();
        let mut w = RejoinWatch::new(s(45));
        // Joining (no answer yet): no stretch.
        assert_eq!(w.observe_at(true, false, t), None);
        assert_eq!(w.observe_at(true, false, t + s(100)), None);
        // Answered with nothing: the stretch starts now.
        assert_eq!(w.observe_at(true, true, t + s(100)), None);
        assert_eq!(w.observe_at(true, true, t + s(144)), None);
        assert_eq!(w.observe_at(true, true, t + s(145)), Some(s(45)));
        assert_eq!(w.next_wait(), s(90));
        // Left out again: another try 90 s after the first, then 180 s after that.
        assert_eq!(w.observe_at(true, true, t + s(145 + 89)), None);
        assert_eq!(w.observe_at(true, true, t + s(145 + 90)), Some(s(135)));
        assert_eq!(w.observe_at(true, true, t + s(235 + 179)), None);
        assert_eq!(w.observe_at(true, true, t + s(235 + 180)), Some(s(315)));
        // Partitions, then none again: a new stretch waits as long as the last wait grew to.
        assert_eq!(w.observe_at(false, true, t + s(500)), None);
        assert_eq!(w.observe_at(true, true, t + s(501)), None);
        assert_eq!(w.observe_at(true, true, t + s(501 + 359)), None);
        assert_eq!(w.observe_at(true, true, t + s(501 + 360)), Some(s(360)));
        // Capped at an hour.
        let mut w = RejoinWatch::new(s(3000));
        w.observe_at(true, true, t);
        assert!(w.observe_at(true, true, t + s(3000)).is_some());
        assert_eq!(w.observe_at(true, true, t + s(3000 + 3599)), None);
        assert!(w.observe_at(true, true, t + s(3000 + 3600)).is_some());
        assert_eq!(w.next_wait(), s(3600));
    }
}
