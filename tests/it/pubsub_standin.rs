//! A local stand-in for Google Cloud Pub/Sub, for `helios publish --cloud gcp`.
//!
//! Google's Pub/Sub emulator ships only with the gcloud SDK (a Java program downloaded from
//! Google), which no package registry reachable here carries. So this is the next most real
//! thing: a gRPC server over HTTP/2 that speaks the actual `google.pubsub.v1.Publisher/Publish`
//! wire format (protobuf field numbers of google/pubsub/v1/pubsub.proto, gRPC framing, status in
//! trailers) to the official client, answers like Pub/Sub (server-assigned message ids,
//! NOT_FOUND for an unknown topic, INVALID_ARGUMENT for an empty message), and, like a push
//! subscription, delivers every published message to a push endpoint in Pub/Sub's wrapped push
//! format, retrying non-2xx answers with backoff.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

#[derive(Clone, PartialEq, prost::Message)]
pub struct PubsubMessage {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    #[prost(map = "string, string", tag = "2")]
    pub attributes: HashMap<String, String>,
    #[prost(string, tag = "3")]
    pub message_id: String,
    #[prost(string, tag = "5")]
    pub ordering_key: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishRequest {
    #[prost(string, tag = "1")]
    pub topic: String,
    #[prost(message, repeated, tag = "2")]
    pub messages: Vec<PubsubMessage>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishResponse {
    #[prost(string, repeated, tag = "1")]
    pub message_ids: Vec<String>,
}

/// What the stand-in accepted: (topic, message with its assigned id, request headers).
#[derive(Debug, Clone)]
pub struct Published {
    pub topic: String,
    pub message: PubsubMessage,
    pub request_params: String,
}

struct State {
    topics: BTreeSet<String>,
    push_endpoint: Option<String>,
    next_id: Mutex<u64>,
    published: Mutex<Vec<Published>>,
    http: reqwest::Client,
}

pub struct PubSubStandIn {
    /// host:port, what PUBSUB_EMULATOR_HOST takes.
    pub host: String,
    state: Arc<State>,
}

impl PubSubStandIn {
    /// Serves `topics` (full names); pushes each published message to `push_endpoint` if given.
    pub async fn start(topics: &[&str], push_endpoint: Option<String>) -> PubSubStandIn {
        let state = Arc::new(State {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            push_endpoint,
            next_id: Mutex::new(17_000_000_000_000),
            published: Mutex::default(),
            http: reqwest::Client::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                    .await;
                });
            }
        });
        PubSubStandIn { host, state }
    }

    pub fn published(&self) -> Vec<Published> {
        self.state.published.lock().unwrap().clone()
    }
}

type GrpcBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A trailers-only gRPC answer carrying an error status.
fn grpc_error(code: u32, message: &str) -> hyper::Response<GrpcBody> {
    hyper::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", message.replace(' ', "%20"))
        .body(StreamBody::new(futures::stream::iter(vec![])))
        .unwrap()
}

fn grpc_ok(msg: &impl prost::Message) -> hyper::Response<GrpcBody> {
    let payload = msg.encode_to_vec();
    let mut framed = BytesMut::with_capacity(payload.len() + 5);
    framed.put_u8(0);
    framed.put_u32(payload.len() as u32);
    framed.put_slice(&payload);
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    hyper::Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures::stream::iter(vec![
            Ok(Frame::data(framed.freeze())),
            Ok(Frame::trailers(trailers)),
        ])))
        .unwrap()
}

async fn handle(
    st: Arc<State>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<GrpcBody>, Infallible> {
    const UNIMPLEMENTED: u32 = 12;
    const INVALID_ARGUMENT: u32 = 3;
    const NOT_FOUND: u32 = 5;
    if req.uri().path() != "/google.pubsub.v1.Publisher/Publish" {
        return Ok(grpc_error(
            UNIMPLEMENTED,
            &format!("{} is not served by this stand-in", req.uri().path()),
        ));
    }
    let grpc = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"));
    if !grpc {
        return Ok(grpc_error(
            INVALID_ARGUMENT,
            "content-type is not application/grpc",
        ));
    }
    let request_params = req
        .headers()
        .get("x-goog-request-params")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Ok(grpc_error(INVALID_ARGUMENT, "unreadable request body"));
    };
    // One length-prefixed, uncompressed message.
    if body.len() < 5 || body[0] != 0 {
        return Ok(grpc_error(
            INVALID_ARGUMENT,
            "expected one uncompressed gRPC message",
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let Some(bytes) = body.get(5..5 + len) else {
        return Ok(grpc_error(INVALID_ARGUMENT, "truncated gRPC message"));
    };
    let Ok(request) = <PublishRequest as prost::Message>::decode(bytes) else {
        return Ok(grpc_error(INVALID_ARGUMENT, "not a PublishRequest"));
    };
    if !st.topics.contains(&request.topic) {
        let id = request.topic.rsplit('/').next().unwrap_or("");
        return Ok(grpc_error(
            NOT_FOUND,
            &format!("Resource not found (resource={id})."),
        ));
    }
    if request.messages.is_empty()
        || request
            .messages
            .iter()
            .any(|m| m.data.is_empty() && m.attributes.is_empty())
    {
        return Ok(grpc_error(
            INVALID_ARGUMENT,
            "Some messages contain no data and no attributes.",
        ));
    }
    let mut ids = vec![];
    for mut m in request.messages {
        let id = {
            let mut n = st.next_id.lock().unwrap();
            *n += 1;
            n.to_string()
        };
        m.message_id = id.clone();
        ids.push(id);
        st.published.lock().unwrap().push(Published {
            topic: request.topic.clone(),
            message: m.clone(),
            request_params: request_params.clone(),
        });
        if let Some(endpoint) = st.push_endpoint.clone() {
            tokio::spawn(push(st.http.clone(), endpoint, request.topic.clone(), m));
        }
    }
    Ok(grpc_ok(&PublishResponse { message_ids: ids }))
}

/// A push subscription's delivery: the wrapped push body, retried with backoff until a 2xx.
async fn push(http: reqwest::Client, endpoint: String, topic: String, m: PubsubMessage) {
    let now = chrono::Utc::now().to_rfc3339();
    let project = topic.split('/').nth(1).unwrap_or("");
    let body = serde_json::json!({
        "message": {
            "data": base64::engine::general_purpose::STANDARD.encode(&m.data),
            "attributes": m.attributes,
            "messageId": m.message_id, "message_id": m.message_id,
            "publishTime": now, "publish_time": now,
        },
        "subscription": format!("projects/{project}/subscriptions/helios-push"),
    });
    let mut delay = Duration::from_millis(100);
    for _ in 0..30 {
        let r = http
            .post(&endpoint)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        if r.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
