//! Azure settings: the Event Grid delivery secret and the subscription names HELIOS expects
//! (the only values that become metric labels).

/// Azure flags and environment variables (flattened into `helios ingress`).
#[derive(Debug, Clone, clap::Args)]
pub struct AzureArgs {
    /// Shared secret for Event Grid deliveries (query parameter or header).
    #[arg(long, env = "HELIOS_EVENTGRID_SECRET", hide_env_values = true)]
    pub eventgrid_secret: Option<String>,
    /// Query parameter that carries the Event Grid secret.
    #[arg(long, env = "HELIOS_EVENTGRID_SECRET_PARAM", default_value = "code")]
    pub eventgrid_secret_param: String,
    /// Header (delivery property) that carries the Event Grid secret.
    #[arg(
        long,
        env = "HELIOS_EVENTGRID_SECRET_HEADER",
        default_value = "x-helios-key"
    )]
    pub eventgrid_secret_header: String,
    /// Event Grid subscription names (comma-separated) shown as such in metrics; any other
    /// `aeg-subscription-name` is counted as `other`.
    #[arg(long, env = "HELIOS_EVENTGRID_SUBSCRIPTIONS", value_delimiter = ',')]
    pub eventgrid_subscriptions: Vec<String>,
}

/// Event Grid shared secret and known subscriptions.
#[derive(Debug, Clone)]
pub struct EventGridConfig {
    pub secret: Option<String>,
    pub secret_param: String,
    pub secret_header: String,
    /// Subscription names that may appear as metric labels.
    pub subscriptions: Vec<String>,
}

impl Default for EventGridConfig {
    fn default() -> Self {
        EventGridConfig {
            secret: None,
            secret_param: "code".into(),
            secret_header: "x-helios-key".into(),
            subscriptions: vec![],
        }
    }
}

impl AzureArgs {
    /// The runtime configuration.
    pub fn resolve(&self) -> EventGridConfig {
        EventGridConfig {
            secret: self.eventgrid_secret.clone().filter(|s| !s.is_empty()),
            secret_param: self.eventgrid_secret_param.clone(),
            secret_header: self.eventgrid_secret_header.clone(),
            subscriptions: self
                .eventgrid_subscriptions
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

impl EventGridConfig {
    /// What accepts unauthenticated requests.
    pub fn open_endpoints(&self) -> Vec<String> {
        if self.secret.is_none() {
            vec!["Event Grid: set HELIOS_EVENTGRID_SECRET".into()]
        } else {
            vec![]
        }
    }
}
