//! A small HTTP/3 client of the REST API (h3 on quinn), pinned to the test
//! server's certificate.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use quiver_gateway::tls::{Trust, client_config};
use serde_json::Value;

use super::{Server, TOKEN};

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

pub struct H3 {
    pub send: SendRequest,
    _endpoint: quinn::Endpoint,
}

pub async fn connect(server: &Server) -> H3 {
    let tls = client_config(&Trust::Pinned(server.fingerprint.clone()), &[b"h3"]).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(server.quic, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    H3 {
        send,
        _endpoint: endpoint,
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl H3 {
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Answer {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"));
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        if let Some(body) = &body {
            b = b.header("content-length", body.len());
        }
        let mut stream = self.send.send_request(b.body(()).unwrap()).await.unwrap();
        if let Some(body) = body {
            // The server may refuse before reading it all.
            let _ = stream.send_data(Bytes::from(body)).await;
        }
        let _ = stream.finish().await;
        let resp = stream.recv_response().await.unwrap();
        let mut out = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.unwrap() {
            while chunk.has_remaining() {
                let c = chunk.chunk();
                out.extend_from_slice(c);
                let n = c.len();
                chunk.advance(n);
            }
        }
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: out,
        }
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.call(
            "GET",
            path,
            &[("authorization", format!("Bearer {TOKEN}"))],
            None,
        )
        .await
    }

    pub async fn post_json(&mut self, path: &str, body: &Value) -> Answer {
        self.call(
            "POST",
            path,
            &[
                ("authorization", format!("Bearer {TOKEN}")),
                ("content-type", "application/json".into()),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await
    }
}
