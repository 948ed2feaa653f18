//! What a chaos scenario runs on, all of it its own so faults touch nothing else: a private
//! Tansu broker and a private Redis that can be killed and started again on the same port, a
//! PostgreSQL schema whose `events` table can be taken away, the ingress binary on a fixed port,
//! and a fleet of `helios process` binaries in one consumer group.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use helios::topology::Topology;

use crate::common::*;

/// A private Redis (no persistence, like the test machines' own): a restart loses every mark.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub fn start(port: u16) -> Redis {
        let mut r = Redis { child: None, port };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One process of the fleet (a processor or the ingress) and how to start it again.
pub struct Member {
    pub name: String,
    pub metrics: String,
    child: Option<Child>,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Member {
    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_helios"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start helios");
        self.child = Some(child);
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for it to stop by itself (up to 60 s; then SIGKILL). False when it had
    /// to be killed.
    pub fn terminate(&mut self) -> bool {
        match self.child.take() {
            Some(mut c) => terminate(&mut c, Duration::from_secs(60)).0,
            None => true,
        }
    }

    /// Starts it again, with `extra` environment for this run only.
    pub fn start_with(&mut self, extra: &[(&str, &str)]) {
        self.kill();
        let saved = self.env.clone();
        self.env
            .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.spawn();
        self.env = saved;
    }

    pub fn start(&mut self) {
        self.start_with(&[]);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The scenario's services and processes.
pub struct Rig {
    pub broker: Broker,
    pub redis: Redis,
    pub topology: Topology,
    pub pool: sqlx::PgPool,
    pub ingress: Member,
    pub ingress_url: String,
    /// The processors (some may be stopped).
    pub processors: Vec<Member>,
}

impl Rig {
    /// Starts a broker, Redis, the ingress and `processors` processors whose consumers use
    /// `strategy` (a librdkafka `partition.assignment.strategy`); `standby` more processors are
    /// ready to join later.
    pub async fn start(tag: &str, processors: usize, standby: usize, strategy: &str) -> Rig {
        let broker = Broker::start(scratch_dir(&format!("chaos-{tag}")), free_port());
        let redis = Redis::start(free_port());
        let mut topology = test_topology();
        topology.raw_topics.direct.partitions = 2;
        topology.raw_topics.aws.partitions = 2;
        helios::kafka::apply_topology(
            &helios::config::KafkaSettings::new(broker.bootstrap()),
            &topology,
            false,
        )
        .await
        .expect("topology apply on the scenario's broker");
        let (schema, prefix, pool) = scratch_store().await;
        helios::db::migrate(&pool).await.unwrap();
        let child_log = std::env::var("HELIOS_TEST_CHILD_LOG").unwrap_or_else(|_| "error".into());
        let base_env: Vec<(String, String)> = [
            (
                "HELIOS_TOPOLOGY",
                concat!(env!("CARGO_MANIFEST_DIR"), "/topology.yaml").to_string(),
            ),
            ("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap()),
            ("HELIOS_TOPIC_PREFIX", topology.topic_prefix.clone()),
            ("HELIOS_CONSUMER_GROUP", topology.consumer_group.clone()),
            ("RUST_LOG", child_log),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let ingress_port = free_port();
        let mut ingress_env = base_env.clone();
        ingress_env.extend(
            [
                ("API_HOST", "127.0.0.1".to_string()),
                ("API_PORT", ingress_port.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        );
        let mut ingress = Member {
            name: "ingress".into(),
            metrics: format!("127.0.0.1:{ingress_port}"),
            child: None,
            env: ingress_env,
            args: vec!["ingress".into()],
        };
        ingress.spawn();
        let mut proc_env = base_env.clone();
        proc_env.extend(
            [
                ("DATABASE_URL", database_url()),
                ("HELIOS_DB_SCHEMA", schema.clone()),
                ("REDIS_URL", redis.url()),
                ("HELIOS_DEDUP_PREFIX", prefix),
                ("HELIOS_BATCH_SIZE", "100".to_string()),
                ("KAFKA_PARTITION_ASSIGNMENT_STRATEGY", strategy.to_string()),
                // The broker is restarted mid-stream, and Tansu 0.6.0's storage panics on an
                // idempotent producer that outlives a restart (then every produce fails): the
                // fan-out keeps per-key order with one request in flight instead.
                ("KAFKA_ENABLE_IDEMPOTENCE", "false".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        );
        let processors = (0..processors + standby)
            .map(|i| {
                let metrics = free_addr();
                let mut env = proc_env.clone();
                env.push(("HELIOS_METRICS_ADDR".into(), metrics.clone()));
                let mut m = Member {
                    name: format!("processor-{i}"),
                    metrics,
                    child: None,
                    env,
                    args: vec!["process".into()],
                };
                if i < processors {
                    m.spawn();
                }
                m
            })
            .collect();
        let rig = Rig {
            broker,
            redis,
            topology,
            pool,
            ingress,
            ingress_url: format!("http://127.0.0.1:{ingress_port}"),
            processors,
        };
        rig.wait_ingress_ready().await;
        rig
    }

    /// Waits until the ingress answers its readiness probe (Kafka reachable).
    pub async fn wait_ingress_ready(&self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = client
                .get(format!("{}/api/v1/health", self.ingress_url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "the ingress never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes the `events` table away (a transient 42P01 for every write) or gives it back.
    pub async fn events_table(&self, present: bool) {
        let sql = if present {
            "ALTER TABLE events_away RENAME TO events"
        } else {
            "ALTER TABLE events RENAME TO events_away"
        };
        sqlx::query(sql).execute(&self.pool).await.expect(sql);
    }

    /// Rows stored so far.
    pub async fn stored(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }
}
