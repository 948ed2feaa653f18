//! Direct ingestion settings: the API key.

/// Direct ingestion flags and environment variables (flattened into `helios ingress`).
#[derive(Debug, Clone, clap::Args)]
pub struct DirectArgs {
    /// API key for `/api/v1/events/ingest`.
    #[arg(long, env = "HELIOS_INGEST_API_KEY", hide_env_values = true)]
    pub ingest_api_key: Option<String>,
    /// Header that carries the ingest API key.
    #[arg(
        long,
        env = "HELIOS_INGEST_API_KEY_HEADER",
        default_value = "x-api-key"
    )]
    pub ingest_api_key_header: String,
}

/// Direct ingest API key.
#[derive(Debug, Clone)]
pub struct IngestAuth {
    pub api_key: Option<String>,
    pub header: String,
}

impl Default for IngestAuth {
    fn default() -> Self {
        IngestAuth {
            api_key: None,
            header: "x-api-key".into(),
        }
    }
}

impl DirectArgs {
    /// The runtime configuration.
    pub fn resolve(&self) -> IngestAuth {
        IngestAuth {
            api_key: self.ingest_api_key.clone().filter(|s| !s.is_empty()),
            header: self.ingest_api_key_header.clone(),
        }
    }
}

impl IngestAuth {
    /// What accepts unauthenticated requests.
    pub fn open_endpoints(&self) -> Vec<String> {
        if self.api_key.is_none() {
            vec!["Direct ingest: set HELIOS_INGEST_API_KEY".into()]
        } else {
            vec![]
        }
    }
}
