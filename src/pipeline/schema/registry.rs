//! A small client for the Confluent Schema Registry REST API (also served by Redpanda, Apicurio's
//! compatibility layer and Karapace): the calls `helios schemas` and the processor's writer
//! schemas need, and nothing else. Errors tell "the registry does not have it" (an answer) from
//! "the registry did not answer" (transient: retried by the caller).

use std::time::Duration;

use serde::Deserialize;

/// A subject's compatibility mode (`GET /config/{subject}`), as the registry names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "NONE" => Mode::None,
            "BACKWARD" => Mode::Backward,
            "BACKWARD_TRANSITIVE" => Mode::BackwardTransitive,
            "FORWARD" => Mode::Forward,
            "FORWARD_TRANSITIVE" => Mode::ForwardTransitive,
            "FULL" => Mode::Full,
            "FULL_TRANSITIVE" => Mode::FullTransitive,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "NONE",
            Mode::Backward => "BACKWARD",
            Mode::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Mode::Forward => "FORWARD",
            Mode::ForwardTransitive => "FORWARD_TRANSITIVE",
            Mode::Full => "FULL",
            Mode::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// A new schema must read data written with the old ones (consumers upgrade first).
    pub fn backward(self) -> bool {
        matches!(
            self,
            Mode::Backward | Mode::BackwardTransitive | Mode::Full | Mode::FullTransitive
        )
    }

    /// The old schemas must read data written with the new one (producers upgrade first).
    pub fn forward(self) -> bool {
        matches!(
            self,
            Mode::Forward | Mode::ForwardTransitive | Mode::Full | Mode::FullTransitive
        )
    }

    /// Against every registered version, not only the latest.
    pub fn transitive(self) -> bool {
        matches!(
            self,
            Mode::BackwardTransitive | Mode::ForwardTransitive | Mode::FullTransitive
        )
    }
}

/// One registered version of a subject.
#[derive(Debug, Clone, Deserialize)]
pub struct Registered {
    pub id: u32,
    pub version: u32,
    pub schema: String,
    #[serde(rename = "schemaType", default)]
    pub schema_type: Option<String>,
}

/// What went wrong talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No answer, or an answer that is not the API's (a proxy, a 5xx): worth retrying.
    #[error("schema registry {url} did not answer: {message}")]
    Unreachable { url: String, message: String },
    /// An answer that says no (`409` incompatible, `422` invalid schema, ...).
    #[error("schema registry refused ({status}, error_code {code}): {message}")]
    Refused {
        status: u16,
        code: i64,
        message: String,
    },
}

impl Error {
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    error_code: i64,
    #[serde(default)]
    message: String,
}

/// The registry at one base URL.
#[derive(Clone)]
pub struct Registry {
    http: reqwest::Client,
    base: reqwest::Url,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.url())
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl Registry {
    pub fn new(url: &str) -> anyhow::Result<Registry> {
        let base = reqwest::Url::parse(url.trim_end_matches('/'))
            .map_err(|e| anyhow::anyhow!("SCHEMA_REGISTRY_URL `{url}` is not a URL: {e}"))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            anyhow::bail!("SCHEMA_REGISTRY_URL `{url}` must be an http(s) URL");
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        Ok(Registry { http, base })
    }

    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    fn at(&self, segments: &[&str]) -> reqwest::Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty().extend(segments);
        }
        u
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> Error {
        Error::Unreachable {
            url: self.base.to_string(),
            message: e.to_string(),
        }
    }

    /// Sends a request; `Ok(None)` for a 404 (the thing asked for does not exist).
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<T>, Error> {
        let resp = req
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.unreachable(format!("unexpected answer ({e})")));
        }
        if status.is_server_error() {
            return Err(self.unreachable(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )));
        }
        match serde_json::from_slice::<ApiError>(&body) {
            Ok(_) if status == reqwest::StatusCode::NOT_FOUND => Ok(None),
            Ok(e) => Err(Error::Refused {
                status: status.as_u16(),
                code: e.error_code,
                message: e.message,
            }),
            // A 4xx that is not the API's own error body: something else answered.
            Err(_) => Err(self.unreachable(format!(
                "{status} without the registry's error body: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))),
        }
    }

    /// A POST carrying an Avro schema, as the register and compatibility calls take it.
    fn post_schema(&self, url: reqwest::Url, schema: &str) -> reqwest::RequestBuilder {
        let body = serde_json::json!({"schema": schema, "schemaType": "AVRO"});
        self.http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body.to_string())
    }

    /// The subject's versions, oldest first (empty when the subject does not exist).
    pub async fn versions(&self, subject: &str) -> Result<Vec<u32>, Error> {
        let url = self.at(&["subjects", subject, "versions"]);
        Ok(self.call(self.http.get(url)).await?.unwrap_or_default())
    }

    /// One version of a subject (`None` when the registry does not have it).
    pub async fn version(&self, subject: &str, version: u32) -> Result<Option<Registered>, Error> {
        let url = self.at(&["subjects", subject, "versions", &version.to_string()]);
        self.call(self.http.get(url)).await
    }

    /// The subject's compatibility mode: its own, else the registry's global one.
    pub async fn mode(&self, subject: &str) -> Result<Mode, Error> {
        #[derive(Deserialize)]
        struct Config {
            #[serde(rename = "compatibilityLevel", alias = "compatibility")]
            level: String,
        }
        let mut url = self.at(&["config", subject]);
        url.query_pairs_mut().append_pair("defaultToGlobal", "true");
        let cfg: Option<Config> = match self.call(self.http.get(url)).await? {
            Some(c) => Some(c),
            None => self.call(self.http.get(self.at(&["config"]))).await?,
        };
        let level = cfg.map(|c| c.level).unwrap_or_else(|| "BACKWARD".into());
        Mode::parse(&level).ok_or_else(|| Error::Refused {
            status: 200,
            code: 0,
            message: format!("unknown compatibility level `{level}`"),
        })
    }

    /// The registry's verdict on `schema` against what the subject's mode asks for, with its
    /// messages (`verbose=true`); a subject that does not exist accepts anything.
    pub async fn test(&self, subject: &str, schema: &str) -> Result<(bool, Vec<String>), Error> {
        #[derive(Deserialize)]
        struct Verdict {
            is_compatible: bool,
            #[serde(default)]
            messages: Vec<String>,
        }
        let mut url = self.at(&["compatibility", "subjects", subject, "versions", "latest"]);
        url.query_pairs_mut().append_pair("verbose", "true");
        let req = self.post_schema(url, schema);
        match self.call::<Verdict>(req).await? {
            Some(v) => Ok((v.is_compatible, v.messages)),
            None => Ok((true, vec![])),
        }
    }

    /// Registers `schema` under `subject`; returns its id (the same id when it was there).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, Error> {
        #[derive(Deserialize)]
        struct Id {
            id: u32,
        }
        let url = self.at(&["subjects", subject, "versions"]);
        let req = self.post_schema(url, schema);
        match self.call::<Id>(req).await? {
            Some(i) => Ok(i.id),
            None => Err(Error::Refused {
                status: 404,
                code: 0,
                message: format!("subject `{subject}` cannot be written"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_say_which_directions_they_check() {
        for m in [
            "NONE",
            "BACKWARD",
            "BACKWARD_TRANSITIVE",
            "FORWARD",
            "FORWARD_TRANSITIVE",
            "FULL",
            "FULL_TRANSITIVE",
        ] {
            assert_eq!(Mode::parse(m).unwrap().as_str(), m);
        }
        assert!(Mode::parse("backward").is_none());
        assert!(Mode::Backward.backward() && !Mode::Backward.forward());
        assert!(Mode::Forward.forward() && !Mode::Forward.backward());
        assert!(Mode::Full.forward() && Mode::Full.backward() && !Mode::Full.transitive());
        assert!(Mode::FullTransitive.transitive());
        assert!(!Mode::None.forward() && !Mode::None.backward());
    }

    #[test]
    fn subjects_are_one_path_segment_whatever_they_hold() {
        let r = Registry::new("http://registry:8081/base/").unwrap();
        assert_eq!(
            r.at(&["subjects", "a/b c", "versions"]).as_str(),
            "http://registry:8081/base/subjects/a%2Fb%20c/versions"
        );
        assert!(Registry::new("ftp://x").is_err());
        assert!(Registry::new("not a url").is_err());
    }
}
