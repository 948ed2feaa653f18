//! AWS settings: the EventBridge API destination's connection credentials and the SNS
//! subscription checks (allow-list, signatures, certificate host, confirmation, message age).

use std::time::Duration;

use anyhow::{bail, Context};

/// Origins SNS signs and confirms from: `https://sns.<region>.amazonaws.com(.cn)`.
pub const DEFAULT_SNS_HOST_PATTERN: &str =
    r"^https://sns\.[a-zA-Z0-9-]{3,}\.amazonaws\.com(\.cn)?$";

/// Default oldest SNS message accepted: SNS retries an HTTP/S delivery for at most 3,600 s
/// ("total retry time hard-capped at 3600 seconds", Amazon SNS message delivery retries,
/// https://docs.aws.amazon.com/sns/latest/dg/sns-message-delivery-retries.html), so a genuine
/// delivery is never older than that; 5 minutes more absorb clock skew and the last attempt.
pub const DEFAULT_SNS_MAX_AGE_SECS: u64 = 3600 + 300;

/// AWS flags and environment variables (flattened into `helios ingress`).
#[derive(Debug, Clone, clap::Args)]
pub struct AwsArgs {
    /// Header that carries the EventBridge API destination's API key.
    #[arg(
        long,
        env = "HELIOS_EVENTBRIDGE_API_KEY_HEADER",
        default_value = "x-helios-key"
    )]
    pub eventbridge_api_key_header: String,
    /// Expected API key value (EventBridge connection of type API key).
    #[arg(long, env = "HELIOS_EVENTBRIDGE_API_KEY", hide_env_values = true)]
    pub eventbridge_api_key: Option<String>,
    /// Expected Basic user (EventBridge connection of type Basic).
    #[arg(long, env = "HELIOS_EVENTBRIDGE_BASIC_USER")]
    pub eventbridge_basic_user: Option<String>,
    /// Expected Basic password.
    #[arg(
        long,
        env = "HELIOS_EVENTBRIDGE_BASIC_PASSWORD",
        hide_env_values = true
    )]
    pub eventbridge_basic_password: Option<String>,
    /// SNS topic ARNs allowed to deliver (comma-separated). Empty: any topic (warned at start).
    #[arg(long, env = "HELIOS_SNS_TOPIC_ARNS", value_delimiter = ',')]
    pub sns_topic_arns: Vec<String>,
    /// Verify SNS message signatures (turn off only for local experiments).
    #[arg(long, env = "HELIOS_SNS_VERIFY_SIGNATURES", default_value_t = true, action = clap::ArgAction::Set)]
    pub sns_verify_signatures: bool,
    /// Regex the origin (`scheme://host[:port]`) of SigningCertURL and SubscribeURL must match.
    #[arg(long, env = "HELIOS_SNS_HOST_PATTERN", default_value = DEFAULT_SNS_HOST_PATTERN)]
    pub sns_host_pattern: String,
    /// Confirm SNS subscriptions automatically (GET SubscribeURL after the signature checked out).
    #[arg(long, env = "HELIOS_SNS_AUTO_CONFIRM", default_value_t = true, action = clap::ArgAction::Set)]
    pub sns_auto_confirm: bool,
    /// Secret expected in `?token=` for SNS raw message delivery (which carries no signature).
    #[arg(long, env = "HELIOS_SNS_RAW_DELIVERY_TOKEN", hide_env_values = true)]
    pub sns_raw_delivery_token: Option<String>,
    /// Oldest signed SNS message accepted, by its `Timestamp` (replays of captured messages are
    /// refused). Default: SNS's longest retry span for HTTP/S endpoints (1 h) plus 5 min.
    #[arg(long, env = "HELIOS_SNS_MAX_AGE_SECS", default_value_t = DEFAULT_SNS_MAX_AGE_SECS)]
    pub sns_max_age_secs: u64,
}

/// EventBridge API destination connection secrets (either may be set; both = either accepted).
#[derive(Debug, Clone, Default)]
pub struct EventBridgeAuth {
    pub api_key_header: String,
    pub api_key: Option<String>,
    pub basic: Option<(String, String)>,
}

impl EventBridgeAuth {
    /// True when credentials are configured.
    pub fn configured(&self) -> bool {
        self.api_key.is_some() || self.basic.is_some()
    }
}

/// SNS subscription checks.
#[derive(Debug, Clone)]
pub struct SnsConfig {
    pub topic_arns: Vec<String>,
    pub verify_signatures: bool,
    pub host_pattern: String,
    pub auto_confirm: bool,
    pub raw_delivery_token: Option<String>,
    /// Oldest message accepted (by its signed `Timestamp`).
    pub max_age: Duration,
}

impl Default for SnsConfig {
    fn default() -> Self {
        SnsConfig {
            topic_arns: vec![],
            verify_signatures: true,
            host_pattern: DEFAULT_SNS_HOST_PATTERN.into(),
            auto_confirm: true,
            raw_delivery_token: None,
            max_age: Duration::from_secs(DEFAULT_SNS_MAX_AGE_SECS),
        }
    }
}

impl AwsArgs {
    /// The runtime configuration, with the values clap cannot check.
    pub fn resolve(&self) -> anyhow::Result<(EventBridgeAuth, SnsConfig)> {
        let eventbridge = EventBridgeAuth {
            api_key_header: self.eventbridge_api_key_header.clone(),
            api_key: self.eventbridge_api_key.clone().filter(|s| !s.is_empty()),
            basic: match (&self.eventbridge_basic_user, &self.eventbridge_basic_password) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                (None, None) => None,
                _ => bail!(
                    "HELIOS_EVENTBRIDGE_BASIC_USER and HELIOS_EVENTBRIDGE_BASIC_PASSWORD must be set together"
                ),
            },
        };
        let sns = SnsConfig {
            topic_arns: self
                .sns_topic_arns
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            verify_signatures: self.sns_verify_signatures,
            host_pattern: self.sns_host_pattern.clone(),
            auto_confirm: self.sns_auto_confirm,
            raw_delivery_token: self
                .sns_raw_delivery_token
                .clone()
                .filter(|s| !s.is_empty()),
            max_age: Duration::from_secs(self.sns_max_age_secs),
        };
        regex::Regex::new(&sns.host_pattern)
            .with_context(|| "HELIOS_SNS_HOST_PATTERN / --sns-host-pattern is not a valid regex")?;
        if self.sns_max_age_secs == 0 {
            bail!("HELIOS_SNS_MAX_AGE_SECS / --sns-max-age-secs must be greater than 0");
        }
        Ok((eventbridge, sns))
    }
}

/// What accepts unauthenticated requests (human-readable, for warnings and production mode).
/// SNS arriving at the EventBridge endpoint needs the EventBridge credentials or the allow-list,
/// so it is covered by these two lines.
pub fn open_endpoints(eventbridge: &EventBridgeAuth, sns: &SnsConfig) -> Vec<String> {
    let mut open = vec![];
    if !eventbridge.configured() {
        open.push(
            "EventBridge: set HELIOS_EVENTBRIDGE_API_KEY or HELIOS_EVENTBRIDGE_BASIC_USER/PASSWORD"
                .into(),
        );
    }
    if !sns.verify_signatures {
        open.push("SNS: signature verification is off (HELIOS_SNS_VERIFY_SIGNATURES=false)".into());
    }
    if sns.topic_arns.is_empty() {
        open.push("SNS: any topic may deliver; set HELIOS_SNS_TOPIC_ARNS".into());
    }
    open
}
