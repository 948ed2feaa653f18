//! GCP settings: how Pub/Sub push deliveries are authenticated (OIDC token with the expected
//! audience *and* service account, or a shared `?token=`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

/// Google's published signing keys.
pub const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";

/// GCP flags and environment variables (flattened into `helios ingress`).
#[derive(Debug, Clone, clap::Args)]
pub struct GcpArgs {
    /// Expected `aud` of Pub/Sub push OIDC tokens; with HELIOS_PUBSUB_OIDC_EMAIL it turns OIDC
    /// authentication on.
    #[arg(long, env = "HELIOS_PUBSUB_OIDC_AUDIENCE")]
    pub pubsub_oidc_audience: Option<String>,
    /// Expected `email` (service account) of Pub/Sub push OIDC tokens (with `email_verified`).
    #[arg(long, env = "HELIOS_PUBSUB_OIDC_EMAIL")]
    pub pubsub_oidc_email: Option<String>,
    /// Where Google's signing keys (JWKS) are fetched from.
    #[arg(long, env = "HELIOS_PUBSUB_JWKS_URL", default_value = GOOGLE_JWKS_URL)]
    pub pubsub_jwks_url: String,
    /// A JWKS file to use instead of fetching (air-gapped installs, tests).
    #[arg(long, env = "HELIOS_PUBSUB_JWKS_FILE")]
    pub pubsub_jwks_file: Option<PathBuf>,
    /// Shared secret expected in the push URL's `?token=` (alternative to OIDC).
    #[arg(long, env = "HELIOS_PUBSUB_TOKEN", hide_env_values = true)]
    pub pubsub_token: Option<String>,
    /// At most one refresh of Google's keys per this many seconds (on a token with an unknown
    /// `kid`), whether it succeeded or failed.
    #[arg(long, env = "HELIOS_PUBSUB_JWKS_REFRESH_SECS", default_value_t = 60)]
    pub pubsub_jwks_refresh_secs: u64,
}

/// Pub/Sub push checks.
#[derive(Debug, Clone)]
pub struct PubSubConfig {
    pub oidc_audience: Option<String>,
    pub oidc_email: Option<String>,
    pub jwks_url: String,
    pub jwks_file: Option<PathBuf>,
    pub token: Option<String>,
    /// At most one key refresh per this interval.
    pub jwks_refresh: Duration,
}

impl Default for PubSubConfig {
    fn default() -> Self {
        PubSubConfig {
            oidc_audience: None,
            oidc_email: None,
            jwks_url: GOOGLE_JWKS_URL.into(),
            jwks_file: None,
            token: None,
            jwks_refresh: Duration::from_secs(60),
        }
    }
}

impl GcpArgs {
    /// The runtime configuration, with the values clap cannot check.
    pub fn resolve(&self) -> anyhow::Result<PubSubConfig> {
        let c = PubSubConfig {
            oidc_audience: self.pubsub_oidc_audience.clone().filter(|s| !s.is_empty()),
            oidc_email: self.pubsub_oidc_email.clone().filter(|s| !s.is_empty()),
            jwks_url: self.pubsub_jwks_url.clone(),
            jwks_file: self.pubsub_jwks_file.clone(),
            token: self.pubsub_token.clone().filter(|s| !s.is_empty()),
            jwks_refresh: Duration::from_secs(self.pubsub_jwks_refresh_secs.max(1)),
        };
        if c.oidc_email.is_some() && c.oidc_audience.is_none() {
            bail!("HELIOS_PUBSUB_OIDC_EMAIL is set but HELIOS_PUBSUB_OIDC_AUDIENCE is not: set the audience to turn OIDC verification on");
        }
        Ok(c)
    }
}

impl PubSubConfig {
    /// True when pushes are authenticated: a shared token, or OIDC with both the audience and
    /// the service account. An audience alone proves nothing (anyone can mint a Google-signed
    /// token for any audience from their own service account).
    pub fn authenticated(&self) -> bool {
        self.token.is_some() || (self.oidc_audience.is_some() && self.oidc_email.is_some())
    }

    /// What accepts unauthenticated requests (human-readable, for warnings and production mode).
    pub fn open_endpoints(&self) -> Vec<String> {
        if self.authenticated() {
            return vec![];
        }
        if self.oidc_audience.is_some() {
            return vec!["Pub/Sub: HELIOS_PUBSUB_OIDC_AUDIENCE is set but HELIOS_PUBSUB_OIDC_EMAIL is not: any Google service account could push; set HELIOS_PUBSUB_OIDC_EMAIL to the push subscription's service account".into()];
        }
        vec!["Pub/Sub: set HELIOS_PUBSUB_OIDC_AUDIENCE + HELIOS_PUBSUB_OIDC_EMAIL, or HELIOS_PUBSUB_TOKEN".into()]
    }
}
