//! An https upstream signed by a private CA (`upstream.ca_file`): trusted
//! with the file, refused without it or under the wrong name.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A private CA (its PEM) and a server certificate for `localhost` signed
/// by it.
fn pki() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca, ca_key);
    let server = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let server_key = KeyPair::generate().expect("key");
    let cert = server.signed_by(&server_key, &issuer).expect("signed");
    (
        ca_cert.pem(),
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    )
}

/// TLS in front of the simulator: accepts, terminates, and relays bytes.
async fn tls_front(
    upstream: SocketAddr,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

async fn gateway(base_url: &str, ca_file: Option<&std::path::Path>) -> TestGateway {
    let sim = sluice::simulator::Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("sim");
    let mut text = config_text(base_url, "");
    if let Some(ca) = ca_file {
        text = text.replace(
            "[upstream]\n",
            &format!("[upstream]\nca_file = \"{}\"\n", ca.display()),
        );
    }
    TestGateway::with(
        sim,
        parse(&text.replace("max_retries = 2", "max_retries = 0")),
    )
    .await
}

#[tokio::test]
async fn a_private_ca_is_trusted_with_ca_file_and_only_then() {
    let sim = sluice::simulator::Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("sim");
    let (ca_pem, cert, key) = pki();
    let front = tls_front(sim.addr(), cert, key).await;
    let ca = TempFile::new(&ca_pem);

    let by_name = format!("https://localhost:{}", front.port());
    let gw = gateway(&by_name, Some(&ca.0)).await;
    let r = call(&gw.url("/v1/chat/completions"), ALPHA, &chat("tls"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.calls(), 1);
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat_stream("tls stream"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));

    // Without the CA, the certificate is untrusted: a connect failure.
    let gw = gateway(&by_name, None).await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("untrusted"),
        &[],
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_unreachable");

    // The right CA but the wrong name.
    let by_ip = format!("https://127.0.0.1:{}", front.port());
    let gw = gateway(&by_ip, Some(&ca.0)).await;
    let r = call(
        &gw.url("/v1/chat/completions"),
        ALPHA,
        &chat("wrong name"),
        &[],
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_unreachable");
    assert_eq!(sim.calls(), 2, "neither reached upstream");
}
