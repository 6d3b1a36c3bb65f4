//! A small HTTP/1.1 client for talking to one engine's control endpoints (/health, /props),
//! over TCP or a Unix socket, with keep-alive and a bounded response size. Only the sidecar's
//! probes use it; token traffic never goes through the sidecar.

use bytes::Bytes;
use daemon_support::errors::error_chain;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pool_ipc::registry::Endpoint;
use std::time::Duration;

/// Responses larger than this are an engine fault, not something to buffer.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub enum EngineHttp {
    Tcp {
        client: Client<HttpConnector, Empty<Bytes>>,
        authority: String,
    },
    Unix {
        client: Client<hyperlocal::UnixConnector, Empty<Bytes>>,
        path: String,
    },
}

impl EngineHttp {
    pub fn new(endpoint: &Endpoint) -> EngineHttp {
        match endpoint {
            Endpoint::Http { authority } => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                EngineHttp::Tcp {
                    client: Client::builder(TokioExecutor::new())
                        .pool_max_idle_per_host(1)
                        .build(connector),
                    authority: authority.clone(),
                }
            }
            Endpoint::Unix { path } => EngineHttp::Unix {
                client: Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build(hyperlocal::UnixConnector),
                path: path.clone(),
            },
        }
    }

    /// GETs `path`; an error says what went wrong in words an operator can act on.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<(StatusCode, Bytes), String> {
        let request = async {
            let response = match self {
                EngineHttp::Tcp { client, authority } => {
                    let uri: hyper::Uri = format!("http://{authority}{path}")
                        .parse()
                        .map_err(|error| format!("bad probe URL: {error}"))?;
                    client.get(uri).await
                }
                EngineHttp::Unix {
                    client,
                    path: socket,
                } => client.get(hyperlocal::Uri::new(socket, path).into()).await,
            }
            .map_err(|error| error_chain(&error))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|error| format!("reading the response failed: {error}"))?
                .to_bytes();
            Ok((status, body))
        };
        match tokio::time::timeout(timeout, request).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }
}
