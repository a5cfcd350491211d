//! What the loopback proxies in front of MiniStack share: serving a router
//! on 127.0.0.1 until dropped, and passing a request upstream and its
//! answer back with the hop-by-hop headers left out.

use std::net::Ipv4Addr;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::oneshot;

/// A router served on a loopback port; stops when dropped.
pub struct Served {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Served {
    pub async fn start(app: Router, what: &str) -> Served {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|e| panic!("binding the {what}: {e}"));
        let addr = listener.local_addr().expect("proxy address");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Served {
            endpoint: format!("http://{addr}"),
            shutdown: Some(tx),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Sends `method path` with `headers` and `body` to `upstream`; the
/// answer's status, headers (hop-by-hop ones left out) and body, or a 502.
pub async fn pass_upstream(
    client: &reqwest::Client,
    upstream: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), Response> {
    let mut request = client
        .request(method, format!("{upstream}{path}"))
        .body(body);
    for (name, value) in headers {
        if !matches!(
            name.as_str(),
            "host" | "content-length" | "connection" | "transfer-encoding"
        ) {
            request = request.header(name, value);
        }
    }
    let answer = request
        .send()
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, format!("proxy: {e}")).into_response())?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut back = HeaderMap::new();
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "content-length" | "connection" | "transfer-encoding"
        ) {
            back.insert(name, value.clone());
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    Ok((status, back, bytes))
}

/// An answer from its parts.
pub fn answer(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response {
    let mut response = (status, body).into_response();
    for (name, value) in &headers {
        response.headers_mut().insert(name, value.clone());
    }
    response
}
