//! End to end: client certificates (`tls.client_ca`) on every protocol that
//! takes them: QUIC native, HTTP/3, REST over TLS (`https_listen`) and gRPC
//! over TLS (`grpcs_listen`). A CA made here with rcgen signs the good
//! client certificate; one from another CA, an expired one and none at all
//! are refused, on each protocol; the good one is served, and its identity
//! (its URI SAN) keys its rate limit.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quiver_gateway::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use quiver_gateway::proto::native::{Reply, reply};
use quiver_gateway::tensor::request_to_proto;
use quiver_gateway::tls::{Identity, Trust, client_config_with};
use quiver_kernels::{HostTensor, TensorData};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOUND: Duration = Duration::from_secs(10);

/// A CA and the client certificates the tests present.
struct Pki {
    dir: tempfile::TempDir,
    good: Identity,
    /// Another valid client of the same CA.
    second: Identity,
    /// A worker's server certificate from the same CA
    /// (`worker.quiver.test`) and `good`, as PEM (certificate, key).
    server_pem: (String, String),
    good_pem: (String, String),
    other_ca: Identity,
    expired: Identity,
}

fn ca(name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (rcgen::Issuer::new(params, key), cert.pem())
}

fn client(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, uri: &str, expired: bool) -> Identity {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, issuer).unwrap();
    Identity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        self_signed: false,
        self_signed_pem: None,
    }
}

fn server_pem(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A client certificate as an [`Identity`] and as PEM (certificate, key).
fn client_with_pem(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    uri: &str,
) -> (Identity, (String, String)) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    let pem = (cert.pem(), key.serialize_pem());
    let id = Identity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        self_signed: false,
        self_signed_pem: None,
    };
    (id, pem)
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (issuer, pem) = ca("quiver test clients");
    std::fs::write(dir.path().join("ca.pem"), pem).unwrap();
    let (stranger, _) = ca("someone else");
    let good = client_with_pem(&issuer, "spiffe://quiver.test/good");
    Pki {
        good: good.0,
        good_pem: good.1,
        second: client(&issuer, "spiffe://quiver.test/second", false),
        server_pem: server_pem(&issuer, "worker.quiver.test"),
        other_ca: client(&stranger, "spiffe://quiver.test/stranger", false),
        expired: client(&issuer, "spiffe://quiver.test/expired", true),
        dir,
    }
}

fn start(pki: &Pki) -> Server {
    let ca = pki.dir.path().join("ca.pem");
    Server::start(&format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\ngrpcs_listen = \"127.0.0.1:0\"\n\n\
         [tls]\nclient_ca = \"{}\"\n\n\
         [[models]]\nname = \"identity\"\nkind = \"identity\"\n\n\
         [[models]]\nname = \"limited\"\nkind = \"identity\"\n\
         rate_limit_per_sec = 1\nrate_limit_burst = 1\n",
        ca.display()
    ))
}

fn echo(model: &str, v: f32) -> quiver_gateway::proto::ModelInferRequest {
    let t = HostTensor::new("INPUT0", vec![1, 1], TensorData::F32(vec![v])).unwrap();
    request_to_proto(model, "", &[t], HashMap::new())
}

fn tls(server: &Server, alpn: &[&[u8]], cert: Option<&Identity>) -> rustls::ClientConfig {
    client_config_with(&Trust::Pinned(server.fingerprint.clone()), alpn, cert).unwrap()
}

/// A QUIC connection with `alpn`, presenting `cert`; `Err` if the
/// handshake fails.
async fn quic_connect(
    server: &Server,
    alpn: &[u8],
    cert: Option<&Identity>,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls(server, &[alpn], cert)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(server.quic, "localhost")
        .unwrap()
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok((endpoint, conn))
}

/// One request over QUIC native; `Err` with what refused it.
async fn quic_native(server: &Server, cert: Option<&Identity>, model: &str) -> Result<f32, String> {
    let attempt = async {
        let (_endpoint, conn) = quic_connect(server, quiver_gateway::NATIVE_ALPN, cert).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        quiver_gateway::framing::write_frame(&mut send, &echo(model, 2.5))
            .await
            .map_err(|e| e.to_string())?;
        let reply: Reply = quiver_gateway::framing::read_frame(&mut recv, 1 << 20)
            .await
            .map_err(|e| e.to_string())?;
        match reply.result {
            Some(reply::Result::Response(r)) => Ok(f32::from_le_bytes(
                r.raw_output_contents[0][..4].try_into().unwrap(),
            )),
            Some(reply::Result::Status(s)) => Err(format!("status {}: {}", s.code, s.message)),
            None => Err("empty reply".into()),
        }
    };
    tokio::time::timeout(BOUND, attempt).await.unwrap()
}

/// One request over HTTP/3.
async fn http3(server: &Server, cert: Option<&Identity>) -> Result<u16, String> {
    let attempt = async {
        let (_endpoint, conn) = quic_connect(server, b"h3", cert).await?;
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let req = http::Request::get("https://localhost/v2/health/ready")
            .body(())
            .unwrap();
        let mut stream = send.send_request(req).await.map_err(|e| e.to_string())?;
        stream.finish().await.map_err(|e| e.to_string())?;
        let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(BOUND, attempt).await.unwrap()
}

async fn tls_stream(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One REST request over TLS (HTTP/1.1).
async fn https(server: &Server, cert: Option<&Identity>) -> Result<u16, String> {
    let attempt = async {
        let mut s = tls_stream(server.https.unwrap(), tls(server, &[b"http/1.1"], cert))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        s.write_all(
            b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        text.strip_prefix("HTTP/1.1 ")
            .and_then(|t| t.get(..3))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no HTTP answer: {text:?}"))
    };
    tokio::time::timeout(BOUND, attempt).await.unwrap()
}

/// One gRPC call over TLS (HTTP/2).
async fn grpcs(server: &Server, cert: Option<&Identity>) -> Result<f32, String> {
    let addr = server.grpcs.unwrap();
    let config = tls(server, &[b"h2"], cert);
    let attempt = async {
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let config = config.clone();
                async move {
                    let s = tls_stream(addr, config).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = GrpcInferenceServiceClient::new(channel);
        let resp = client
            .model_infer(echo("identity", 4.5))
            .await
            .map_err(|e| format!("{}: {}", e.code(), e.message()))?
            .into_inner();
        Ok(f32::from_le_bytes(
            resp.raw_output_contents[0][..4].try_into().unwrap(),
        ))
    };
    tokio::time::timeout(BOUND, attempt).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_and_checked_on_every_tls_protocol() {
    let pki = pki();
    let server = start(&pki);

    // The good certificate is served everywhere.
    assert_eq!(
        quic_native(&server, Some(&pki.good), "identity").await,
        Ok(2.5)
    );
    assert_eq!(http3(&server, Some(&pki.good)).await, Ok(200));
    assert_eq!(https(&server, Some(&pki.good)).await, Ok(200));
    assert_eq!(grpcs(&server, Some(&pki.good)).await, Ok(4.5));

    // Another CA's, an expired one, none: refused everywhere.
    for (what, cert) in [
        ("other CA", Some(&pki.other_ca)),
        ("expired", Some(&pki.expired)),
        ("none", None),
    ] {
        let native = quic_native(&server, cert, "identity").await;
        assert!(native.is_err(), "QUIC native, {what}: {native:?}");
        let h3 = http3(&server, cert).await;
        assert!(h3.is_err(), "HTTP/3, {what}: {h3:?}");
        let rest = https(&server, cert).await;
        assert!(rest.is_err(), "REST over TLS, {what}: {rest:?}");
        let grpc = grpcs(&server, cert).await;
        assert!(grpc.is_err(), "gRPC over TLS, {what}: {grpc:?}");
        eprintln!("{what}: native {native:?}; h3 {h3:?}; rest {rest:?}; grpc {grpc:?}");
    }

    // Still serving the good client afterwards.
    assert_eq!(
        quic_native(&server, Some(&pki.good), "identity").await,
        Ok(2.5)
    );
    assert_eq!(grpcs(&server, Some(&pki.good)).await, Ok(4.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_identity_keys_the_rate_limit() {
    let pki = pki();
    let server = start(&pki);
    // The Rust client presents its certificate too, and one from another
    // CA is refused.
    let options = |cert: Identity| {
        let mut o =
            quiver_gateway::client::ClientOptions::new(Trust::Pinned(server.fingerprint.clone()));
        o.certificate = Some(Arc::new(cert));
        o
    };
    let copy = |id: &Identity| Identity {
        chain: id.chain.clone(),
        key: id.key.clone_key(),
        self_signed: false,
        self_signed_pem: None,
    };
    let good = quiver_gateway::client::Client::connect(server.quic, options(copy(&pki.good)))
        .await
        .unwrap();
    assert!(good.infer(&echo("identity", 1.0)).await.is_ok());
    good.close().await;
    let stranger =
        match quiver_gateway::client::Client::connect(server.quic, options(copy(&pki.other_ca)))
            .await
        {
            Ok(c) => c
                .infer(&echo("identity", 1.0))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
    assert!(stranger.is_err(), "{stranger:?}");

    assert_eq!(
        quic_native(&server, Some(&pki.good), "limited").await,
        Ok(2.5)
    );
    // The same identity on a new connection: its bucket is empty.
    let refused = quic_native(&server, Some(&pki.good), "limited")
        .await
        .unwrap_err();
    assert!(
        refused.contains("client spiffe://quiver.test/good is over its rate limit"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_to_a_certificate_is_refused_with_another() {
    let pki = pki();
    let ca = pki.dir.path().join("ca.pem");
    let server = Server::start(&format!(
        "[server]\nauth_tokens = [\"bound-token\", \"free-token\"]\n\
         auth_token_identities = [\"spiffe://quiver.test/good\", \"\"]\n\n\
         [tls]\nclient_ca = \"{}\"\n\n\
         [[models]]\nname = \"identity\"\nkind = \"identity\"\n",
        ca.display()
    ));
    let call = |cert: &Identity, token: &str| {
        let mut o =
            quiver_gateway::client::ClientOptions::new(Trust::Pinned(server.fingerprint.clone()));
        o.certificate = Some(Arc::new(Identity {
            chain: cert.chain.clone(),
            key: cert.key.clone_key(),
            self_signed: false,
            self_signed_pem: None,
        }));
        o.token = Some(token.to_owned());
        let addr = server.quic;
        async move {
            let c = quiver_gateway::client::Client::connect(addr, o)
                .await
                .unwrap();
            let r = c.infer(&echo("identity", 1.0)).await;
            c.close().await;
            r.map(|_| ()).map_err(|e| e.to_string())
        }
    };
    assert_eq!(call(&pki.good, "bound-token").await, Ok(()));
    let stolen = call(&pki.second, "bound-token").await.unwrap_err();
    assert!(
        stolen.contains("UNAUTHENTICATED")
            && stolen.contains("bound to another client certificate"),
        "{stolen}"
    );
    assert_eq!(call(&pki.second, "free-token").await, Ok(()));
}

/// Writes PEM `(certificate, key)` as files `NAME.pem` and `NAME.key` in
/// `dir`; returns their paths.
fn write_pem(
    dir: &std::path::Path,
    name: &str,
    (cert_pem, key_pem): &(String, String),
) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_presents_its_certificate_to_workers_that_require_one() {
    let pki = pki();
    let dir = pki.dir.path();
    // The worker: a server certificate from the CA, client certificates
    // required on its TLS listeners.
    let (server_cert, server_key) = write_pem(dir, "worker", &pki.server_pem);
    let worker = Server::start(&format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\ngrpcs_listen = \"127.0.0.1:0\"\n\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n\n\
         [[models]]\nname = \"identity\"\nkind = \"identity\"\n",
        server_cert.display(),
        server_key.display(),
        dir.join("ca.pem").display()
    ));
    let (client_cert, client_key) = write_pem(dir, "gateway", &pki.good_pem);
    let input = HostTensor::new("INPUT0", vec![1, 2], TensorData::F32(vec![1.5, -3.0])).unwrap();
    for (scheme, addr) in [
        ("grpc", worker.grpcs.unwrap()),
        ("http", worker.https.unwrap()),
    ] {
        let endpoint = quiver_config::Endpoint::parse(&format!("{scheme}://{addr}")).unwrap();
        let mut config = quiver_config::Upstream::new(vec![endpoint]);
        let tls = |cert: bool| quiver_config::UpstreamTls {
            ca: dir.join("ca.pem"),
            cert: cert.then(|| client_cert.clone()),
            key: cert.then(|| client_key.clone()),
            server_name: Some("worker.quiver.test".into()),
        };

        // Without a client certificate the worker refuses the connection.
        config.tls = Some(tls(false));
        let err = support::infer_upstream("identity", &config, &input)
            .await
            .expect_err("the worker wants a client certificate");
        eprintln!("{scheme} without a certificate: {err}");

        config.tls = Some(tls(true));
        let served = support::infer_upstream("identity", &config, &input)
            .await
            .unwrap_or_else(|e| panic!("{scheme}: {e}"));
        assert_eq!(
            served.answer.outputs[0].data,
            TensorData::F32(vec![1.5, -3.0]),
            "{scheme}"
        );
    }
}
