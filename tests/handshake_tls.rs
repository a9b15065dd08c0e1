//! The session handshake over a real mutual-TLS loopback connection whose identities
//! come from `seam certs init` output: both sides must end with the same keys, and the
//! SPIFFE ids bound into them are the ones the TLS layer verified.

use std::sync::Arc;
use std::time::Duration;

use seam::handshake::{
    CLIENT_HELLO_LEN, ClientHandshake, ClientHello, SERVER_HELLO_LEN, ServerHello, respond,
};
use seam::identity::{CertsInit, Identity, init_certs, peer_identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn load(dir: &std::path::Path, service: &str) -> Identity {
    Identity::load(
        &dir.join("ca.crt"),
        &dir.join(service).join("tls.crt"),
        &dir.join(service).join("tls.key"),
        "mesh.local",
        service,
    )
    .unwrap()
}

#[tokio::test]
async fn keys_agree_over_mutual_tls_from_certs_init_output() {
    let dir = tempfile::tempdir().unwrap();
    init_certs(&CertsInit {
        dir: dir.path().to_owned(),
        trust_domain: "mesh.local".into(),
        services: vec!["orders".into(), "billing".into()],
        force: false,
        validity: Duration::from_secs(86400),
    })
    .unwrap();
    let orders = load(dir.path(), "orders");
    let billing = load(dir.path(), "billing");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(billing.server_config().unwrap());
    let server_id = billing.spiffe_id().to_string();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let caller = peer_identity(tls.get_ref().1, "mesh.local").unwrap();
        let mut hello = [0u8; CLIENT_HELLO_LEN];
        tls.read_exact(&mut hello).await.unwrap();
        let (reply, keys) = respond(
            &ClientHello::decode(&hello).unwrap(),
            &caller.to_string(),
            &server_id,
        )
        .unwrap();
        tls.write_all(&reply.encode()).await.unwrap();
        tls.flush().await.unwrap();
        (caller.to_string(), keys)
    });

    let connector = TlsConnector::from(orders.client_config("billing").unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = seam::identity::SpiffeId::new("mesh.local", "billing")
        .unwrap()
        .server_name()
        .unwrap();
    let mut tls = connector.connect(server_name, tcp).await.unwrap();
    let verified_server = peer_identity(tls.get_ref().1, "mesh.local").unwrap();
    assert_eq!(verified_server.to_string(), "spiffe://mesh.local/billing");
    let (state, hello) = ClientHandshake::start(
        &orders.spiffe_id().to_string(),
        &verified_server.to_string(),
    )
    .unwrap();
    tls.write_all(&hello.encode()).await.unwrap();
    let mut reply = [0u8; SERVER_HELLO_LEN];
    tls.read_exact(&mut reply).await.unwrap();
    let client_keys = state.finish(&ServerHello::decode(&reply).unwrap()).unwrap();

    let (caller_seen, server_keys) = server.await.unwrap();
    assert_eq!(caller_seen, "spiffe://mesh.local/orders");
    assert_eq!(client_keys.session_id, server_keys.session_id);
    assert_eq!(*client_keys.client_to_server, *server_keys.client_to_server);
    assert_eq!(*client_keys.server_to_client, *server_keys.server_to_client);
    assert_ne!(*client_keys.client_to_server, *client_keys.server_to_client);

    // And the keys work as a session pair: a sealed message crosses.
    let limits = seam::session::SessionLimits {
        idle_ttl: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(600),
        max_messages: 100,
    };
    let client = Arc::new(
        seam::session::Session::new(client_keys, seam::session::Role::Client, "billing", limits)
            .unwrap(),
    );
    let server = Arc::new(
        seam::session::Session::new(server_keys, seam::session::Role::Server, "orders", limits)
            .unwrap(),
    );
    let (mut sealer, _g) = client.begin_request().unwrap();
    let mut wire = bytes::BytesMut::new();
    sealer
        .seal(seam::session::seal::FrameKind::Head, b"hello", &mut wire)
        .unwrap();
    let header = seam::session::seal::FrameHeader::decode(&wire).unwrap();
    let sealed = wire.split_off(seam::session::seal::HEADER_LEN);
    let (mut opener, _g) = server.request_opener();
    let opened = opener.open(&header, sealed).unwrap();
    assert_eq!(&opened.payload[..], b"hello");
}
