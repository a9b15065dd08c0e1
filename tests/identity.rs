//! Identity end to end: `init_certs` output on disk, real rustls handshakes over loopback TCP,
//! load-time errors, and the `seam certs init` binary.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, NamedGroup, ProtocolVersion,
    ServerConfig, SignatureScheme,
};
use seam::identity::{
    CertsInit, DevCa, Identity, IdentityError, SpiffeId, init_certs, peer_identity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};

const TD: &str = "mesh.local";
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

type ServerResult = io::Result<server::TlsStream<TcpStream>>;
type ClientResult = io::Result<client::TlsStream<TcpStream>>;

/// Accepts any server certificate: stands in for a client that does no mesh checks, so that
/// the server's own checks are what a test exercises.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 not expected".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accepting_any_server(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut config = (*config).clone();
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(AcceptAnyServer(Arc::new(
            aws_lc_rs::default_provider(),
        ))));
    Arc::new(config)
}

fn init(dir: &Path, services: &[&str], force: bool) -> Result<Vec<PathBuf>, IdentityError> {
    init_certs(&CertsInit {
        dir: dir.to_owned(),
        trust_domain: TD.to_owned(),
        services: services.iter().map(|s| s.to_string()).collect(),
        force,
        validity: 365 * DAY,
    })
}

fn load(dir: &Path, service: &str) -> Result<Identity, IdentityError> {
    let svc = dir.join(service);
    Identity::load(
        &svc.join("ca.crt"),
        &svc.join("tls.crt"),
        &svc.join("tls.key"),
        TD,
        service,
    )
}

fn server_name(service: &str) -> ServerName<'static> {
    SpiffeId::new(TD, service).unwrap().server_name().unwrap()
}

/// Runs one handshake over real loopback TCP and returns both sides. The client also reads one
/// byte: in TLS 1.3 the client finishes before the server has judged its certificate, so a
/// server-side rejection only reaches the client as an alert on its first read.
async fn handshake(
    server_config: Arc<ServerConfig>,
    client_config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> (ServerResult, ClientResult) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server_config).accept(tcp).await?;
        tls.write_all(b"!").await?;
        tls.flush().await?;
        Ok(tls)
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = async {
        let mut tls = TlsConnector::from(client_config).connect(name, tcp).await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        Ok(tls)
    }
    .await;
    (server.await.unwrap(), client)
}

fn rustls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}

/// The handshake failed because the other side's certificate chains to another CA.
fn assert_signed_by_another_ca(err: &std::io::Error) {
    assert!(
        matches!(
            rustls_error(err),
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            )
        ),
        "{err:?}"
    );
}

/// The message of an `IdentityError` that a custom verifier returned inside rustls.
fn verifier_message(e: &io::Error) -> String {
    match rustls_error(e) {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other.0.to_string(),
        other => panic!("expected a verifier error, got {other:?}"),
    }
}

fn dev_identity(ca: &DevCa, service: &str) -> Identity {
    let now = SystemTime::now();
    let issued = ca.issue(service, now - DAY, now + DAY).unwrap();
    Identity::from_pem(&ca.ca_pem(), &issued.cert_pem, &issued.key_pem, TD, service).unwrap()
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap();
    path
}

/// Writes ca.crt, tls.crt and tls.key into `dir` and loads them as `orders`.
fn load_files(dir: &Path, ca_pem: &str, cert_pem: &str, key_pem: &str) -> IdentityError {
    let ca = write(dir, "ca.crt", ca_pem);
    let cert = write(dir, "tls.crt", cert_pem);
    let key = write(dir, "tls.key", key_pem);
    Identity::load(&ca, &cert, &key, TD, "orders").unwrap_err()
}

#[test]
fn init_certs_writes_a_usable_mesh() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let written = init(&dir, &["orders", "billing"], false).unwrap();

    let mut expected = vec![dir.join("ca.crt"), dir.join("ca.key")];
    for svc in ["orders", "billing"] {
        for file in ["tls.crt", "tls.key", "ca.crt"] {
            expected.push(dir.join(svc).join(file));
        }
    }
    assert_eq!(written, expected);
    for path in &written {
        let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
        if path.extension().is_some_and(|e| e == "key") {
            assert_eq!(mode, 0o600, "{}", path.display());
        } else {
            assert_eq!(mode & 0o600, 0o600, "{}", path.display());
            assert_eq!(mode & 0o022, 0, "{}", path.display());
        }
    }

    let ca_pem = fs::read(dir.join("ca.crt")).unwrap();
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
    let ca = ca_pem.parse_x509().unwrap();
    let bc = ca.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = ca.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    assert_eq!(ca.subject().to_string(), "CN=seam mesh CA mesh.local");
    for svc in ["orders", "billing"] {
        assert_eq!(
            fs::read(dir.join(svc).join("ca.crt")).unwrap(),
            fs::read(dir.join("ca.crt")).unwrap()
        );
        let pem = fs::read(dir.join(svc).join("tls.crt")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let leaf = pem.parse_x509().unwrap();
        assert_eq!(leaf.subject().to_string(), format!("CN={svc}"));
        assert_eq!(leaf.issuer(), ca.subject());
        let uris: Vec<_> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(uri) => uri.to_string(),
                other => panic!("unexpected SAN {other}"),
            })
            .collect();
        assert_eq!(uris, [format!("spiffe://mesh.local/{svc}")]);
        let spki = &leaf.public_key().algorithm;
        assert_eq!(spki.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        assert_eq!(
            spki.parameters.as_ref().unwrap().as_oid().unwrap(),
            OID_EC_P256
        );
        assert_eq!(
            leaf.signature_algorithm.algorithm,
            OID_SIG_ECDSA_WITH_SHA256
        );
        assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(leaf.key_usage().unwrap().unwrap().value.digital_signature());
        let validity = leaf.validity();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(validity.not_before.timestamp() < now);
        let days = (validity.not_after.timestamp() - now) as f64 / DAY.as_secs() as f64;
        assert!((364.9..=365.1).contains(&days), "{days}");

        let identity = load(&dir, svc).unwrap();
        assert_eq!(
            identity.spiffe_id().to_string(),
            format!("spiffe://mesh.local/{svc}")
        );
        let not_after = identity
            .not_after()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(not_after as i64, validity.not_after.timestamp());
    }

    let before = fs::read(dir.join("orders/tls.key")).unwrap();
    let err = init(&dir, &["orders", "billing"], false).unwrap_err();
    assert!(
        matches!(err, IdentityError::AlreadyExists { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("ca.crt"), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(
        fs::read(dir.join("orders/tls.key")).unwrap(),
        before,
        "untouched"
    );

    init(&dir, &["orders", "billing"], true).unwrap();
    assert_ne!(
        fs::read(dir.join("orders/tls.key")).unwrap(),
        before,
        "reissued"
    );
    load(&dir, "orders").unwrap();
    load(&dir, "billing").unwrap();
}

#[test]
fn init_certs_refuses_any_single_existing_file() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("billing")).unwrap();
    fs::write(tmp.path().join("billing/tls.key"), "keep me").unwrap();
    let err = init(tmp.path(), &["orders", "billing"], false).unwrap_err();
    assert!(err.to_string().contains("billing/tls.key"), "{err}");
    assert!(
        !tmp.path().join("ca.crt").exists(),
        "nothing written on refusal"
    );
}

#[test]
fn force_tightens_the_mode_of_an_existing_key() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), &["orders"], false).unwrap();
    let key = tmp.path().join("orders/tls.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    init(tmp.path(), &["orders"], true).unwrap();
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test]
async fn mutual_tls_between_two_services_from_init_certs() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), &["orders", "billing"], false).unwrap();
    let orders = load(tmp.path(), "orders").unwrap();
    let billing = load(tmp.path(), "billing").unwrap();

    let (server, client) = handshake(
        billing.server_config().unwrap(),
        orders.client_config("billing").unwrap(),
        server_name("billing"),
    )
    .await;
    let server = server.unwrap();
    let client = client.unwrap();

    let (_, server_conn) = server.get_ref();
    let (_, client_conn) = client.get_ref();
    let sides: [&rustls::CommonState; 2] = [server_conn, client_conn];
    for conn in sides {
        assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(NamedGroup::X25519MLKEM768)
        );
    }
    assert_eq!(
        peer_identity(server_conn, TD).unwrap().to_string(),
        "spiffe://mesh.local/orders"
    );
    assert_eq!(
        peer_identity(client_conn, TD).unwrap().to_string(),
        "spiffe://mesh.local/billing"
    );
    let err = peer_identity(server_conn, "other.mesh").unwrap_err();
    assert!(
        matches!(err, IdentityError::ForeignTrustDomain { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn falls_back_to_x25519_for_a_classical_client() {
    let ca = DevCa::new(TD).unwrap();
    let orders = dev_identity(&ca, "orders");
    let billing = dev_identity(&ca, "billing");
    let classical = Arc::new(CryptoProvider {
        kx_groups: vec![aws_lc_rs::kx_group::X25519],
        ..aws_lc_rs::default_provider()
    });
    let mut client = ClientConfig::builder_with_provider(classical.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(classical)))
        .with_client_cert_resolver(
            orders
                .client_config("billing")
                .unwrap()
                .client_auth_cert_resolver
                .clone(),
        );
    client.alpn_protocols = vec![b"h2".to_vec()];

    let (server, client) = handshake(
        billing.server_config().unwrap(),
        Arc::new(client),
        server_name("billing"),
    )
    .await;
    let server = server.unwrap();
    client.unwrap();
    assert_eq!(
        server
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name()),
        Some(NamedGroup::X25519)
    );
}

#[tokio::test]
async fn server_rejects_a_client_without_certificate() {
    let ca = DevCa::new(TD).unwrap();
    let billing = dev_identity(&ca, "billing");
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];

    let (server, client) = handshake(
        billing.server_config().unwrap(),
        Arc::new(client),
        server_name("billing"),
    )
    .await;
    let err = server.unwrap_err();
    assert!(
        matches!(rustls_error(&err), rustls::Error::NoCertificatesPresented),
        "{err:?}"
    );
    client.unwrap_err();
}

#[tokio::test]
async fn server_rejects_a_client_certificate_from_another_ca() {
    let mesh = DevCa::new(TD).unwrap();
    let rogue = DevCa::new(TD).unwrap();
    let billing = dev_identity(&mesh, "billing");
    let now = SystemTime::now();
    let issued = rogue.issue("orders", now - DAY, now + DAY).unwrap();
    // The client trusts both CAs, so it accepts billing and gets to present its rogue cert.
    let roots = format!("{}{}", rogue.ca_pem(), mesh.ca_pem());
    let orders =
        Identity::from_pem(&roots, &issued.cert_pem, &issued.key_pem, TD, "orders").unwrap();

    let (server, client) = handshake(
        billing.server_config().unwrap(),
        orders.client_config("billing").unwrap(),
        server_name("billing"),
    )
    .await;
    let err = server.unwrap_err();
    assert_signed_by_another_ca(&err);
    client.unwrap_err();
}

#[tokio::test]
async fn server_rejects_a_client_from_a_foreign_trust_domain() {
    let ca = DevCa::new(TD).unwrap();
    let billing = dev_identity(&ca, "billing");
    let now = SystemTime::now();
    let issued = ca
        .issue_with_uris(
            "orders",
            &["spiffe://other.mesh/orders".to_owned()],
            now - DAY,
            now + DAY,
        )
        .unwrap();
    let orders = Identity::from_pem(
        &ca.ca_pem(),
        &issued.cert_pem,
        &issued.key_pem,
        "other.mesh",
        "orders",
    )
    .unwrap();

    let (server, client) = handshake(
        billing.server_config().unwrap(),
        // The client would reject billing (it expects spiffe://other.mesh/billing); let it
        // through so that the server's check is the one tested.
        accepting_any_server(orders.client_config("billing").unwrap()),
        server_name("billing"),
    )
    .await;
    let err = server.unwrap_err();
    let message = verifier_message(&err);
    assert!(message.contains("spiffe://other.mesh/orders"), "{message}");
    assert!(
        message.contains("outside the trust domain mesh.local"),
        "{message}"
    );
    client.unwrap_err();
}

#[tokio::test]
async fn client_rejects_a_server_with_another_spiffe_id() {
    let ca = DevCa::new(TD).unwrap();
    let orders = dev_identity(&ca, "orders");
    let reports = dev_identity(&ca, "reports");

    let (server, client) = handshake(
        reports.server_config().unwrap(),
        orders.client_config("billing").unwrap(),
        server_name("billing"),
    )
    .await;
    let err = client.unwrap_err();
    let message = verifier_message(&err);
    assert!(
        message
            .contains("carries spiffe://mesh.local/reports, expected spiffe://mesh.local/billing"),
        "{message}"
    );
    server.unwrap_err();
}

#[tokio::test]
async fn client_rejects_a_server_from_another_ca() {
    let mesh = DevCa::new(TD).unwrap();
    let rogue = DevCa::new(TD).unwrap();
    let orders = dev_identity(&mesh, "orders");
    let billing = dev_identity(&rogue, "billing");

    let (server, client) = handshake(
        billing.server_config().unwrap(),
        orders.client_config("billing").unwrap(),
        server_name("billing"),
    )
    .await;
    let err = client.unwrap_err();
    assert_signed_by_another_ca(&err);
    server.unwrap_err();
}

#[tokio::test]
async fn server_rejects_an_expired_client_certificate() {
    let ca = DevCa::new(TD).unwrap();
    let billing = dev_identity(&ca, "billing");
    let now = SystemTime::now();
    let issued = ca.issue("orders", now - 2 * DAY, now - DAY).unwrap();
    // Loading checks validity, so load as of a moment when the certificate was still valid.
    let orders = Identity::from_pem_at(
        &ca.ca_pem(),
        &issued.cert_pem,
        &issued.key_pem,
        TD,
        "orders",
        now - DAY - DAY / 2,
    )
    .unwrap();

    let (server, client) = handshake(
        billing.server_config().unwrap(),
        orders.client_config("billing").unwrap(),
        server_name("billing"),
    )
    .await;
    let err = server.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
    client.unwrap_err();
}

#[test]
fn load_reports_an_expired_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = DevCa::new(TD).unwrap();
    let jan_2_2026 = UNIX_EPOCH + Duration::from_secs(1_767_312_000);
    let issued = ca
        .issue("orders", jan_2_2026 - 30 * DAY, jan_2_2026)
        .unwrap();
    let err = load_files(tmp.path(), &ca.ca_pem(), &issued.cert_pem, &issued.key_pem);
    assert!(matches!(err, IdentityError::Expired { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "certificate {} expired on 2026-01-02T00:00:00Z; reissue it with `seam certs init`",
            tmp.path().join("tls.crt").display()
        )
    );
}

#[test]
fn load_reports_a_not_yet_valid_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = DevCa::new(TD).unwrap();
    let now = SystemTime::now();
    let issued = ca.issue("orders", now + DAY, now + 2 * DAY).unwrap();
    let err = load_files(tmp.path(), &ca.ca_pem(), &issued.cert_pem, &issued.key_pem);
    assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("tls.crt is not valid until "), "{message}");
    assert!(message.contains("check the clock or reissue"), "{message}");
}

#[test]
fn load_reports_a_certificate_from_another_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let mesh = DevCa::new(TD).unwrap();
    let rogue = DevCa::new(TD).unwrap();
    let now = SystemTime::now();
    let issued = rogue.issue("orders", now - DAY, now + DAY).unwrap();
    let err = load_files(
        tmp.path(),
        &mesh.ca_pem(),
        &issued.cert_pem,
        &issued.key_pem,
    );
    assert!(
        matches!(err, IdentityError::NotSignedByCa { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string().split(';').next().unwrap(),
        format!(
            "certificate {} is not signed by the mesh CA in {}",
            tmp.path().join("tls.crt").display(),
            tmp.path().join("ca.crt").display()
        )
    );
}

#[test]
fn load_reports_a_missing_spiffe_id() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = DevCa::new(TD).unwrap();
    let now = SystemTime::now();
    let issued = ca
        .issue_with_uris("orders", &[], now - DAY, now + DAY)
        .unwrap();
    let err = load_files(tmp.path(), &ca.ca_pem(), &issued.cert_pem, &issued.key_pem);
    assert!(
        matches!(err, IdentityError::MissingSpiffeId { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("tls.crt has no URI SAN spiffe://mesh.local/orders"),
        "{err}"
    );
}

#[test]
fn load_reports_a_wrong_spiffe_id() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = DevCa::new(TD).unwrap();
    let now = SystemTime::now();
    let issued = ca.issue("billing", now - DAY, now + DAY).unwrap();
    let err = load_files(tmp.path(), &ca.ca_pem(), &issued.cert_pem, &issued.key_pem);
    assert!(
        matches!(err, IdentityError::WrongSpiffeId { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("carries spiffe://mesh.local/billing, expected spiffe://mesh.local/orders"),
        "{err}"
    );
}

#[test]
fn load_reports_several_spiffe_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = DevCa::new(TD).unwrap();
    let now = SystemTime::now();
    let uris = [
        "spiffe://mesh.local/orders".to_owned(),
        "spiffe://mesh.local/billing".to_owned(),
    ];
    let issued = ca
        .issue_with_uris("orders", &uris, now - DAY, now + DAY)
        .unwrap();
    let err = load_files(tmp.path(), &ca.ca_pem(), &issued.cert_pem, &issued.key_pem);
    assert!(
        matches!(err, IdentityError::MultipleSpiffeIds { count: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("exactly one"), "{err}");
}

#[test]
fn load_reports_a_key_that_does_not_match() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = DevCa::new(TD).unwrap();
    let now = SystemTime::now();
    let orders = ca.issue("orders", now - DAY, now + DAY).unwrap();
    let billing = ca.issue("billing", now - DAY, now + DAY).unwrap();
    let err = load_files(tmp.path(), &ca.ca_pem(), &orders.cert_pem, &billing.key_pem);
    assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("tls.key does not match certificate"),
        "{message}"
    );
    assert!(!message.contains("PRIVATE KEY"), "{message}");
}

#[test]
fn load_reports_a_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), &["orders"], false).unwrap();
    fs::remove_file(tmp.path().join("orders/tls.crt")).unwrap();
    let err = load(tmp.path(), "orders").unwrap_err();
    match &err {
        IdentityError::Read { path, source } => {
            assert_eq!(path, &tmp.path().join("orders/tls.crt"));
            assert_eq!(source.kind(), io::ErrorKind::NotFound);
        }
        other => panic!("expected Read, got {other:?}"),
    }
    assert!(err.to_string().starts_with("cannot read "), "{err}");
}

#[test]
fn load_reports_files_that_are_not_pem() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = DevCa::new(TD).unwrap();
    let now = SystemTime::now();
    let issued = ca.issue("orders", now - DAY, now + DAY).unwrap();

    let err = load_files(tmp.path(), &ca.ca_pem(), &issued.cert_pem, "not a key");
    assert!(
        matches!(
            err,
            IdentityError::NotPem {
                what: "private key",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("tls.key does not contain a PEM private key"),
        "{err}"
    );

    let err = load_files(tmp.path(), "garbage", &issued.cert_pem, &issued.key_pem);
    assert!(
        matches!(
            err,
            IdentityError::NotPem {
                what: "certificate",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("ca.crt does not contain a PEM certificate"),
        "{err}"
    );
}

#[test]
fn cli_certs_init_writes_files_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_seam"))
            .args(["certs", "init", "--dir"])
            .arg(tmp.path())
            .args([
                "--trust-domain",
                TD,
                "--service",
                "orders",
                "--service",
                "billing",
            ])
            .args(extra)
            .output()
            .unwrap()
    };

    let first = run(&[]);
    assert!(first.status.success(), "{first:?}");
    for file in [
        "ca.crt",
        "ca.key",
        "orders/tls.crt",
        "orders/tls.key",
        "billing/ca.crt",
    ] {
        assert!(tmp.path().join(file).is_file(), "{file}");
    }
    load(tmp.path(), "billing").unwrap();

    let second = run(&[]);
    assert!(!second.status.success(), "{second:?}");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("ca.crt already exists"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");

    let forced = run(&["--force", "--days", "30"]);
    assert!(forced.status.success(), "{forced:?}");
    let days_left = load(tmp.path(), "orders")
        .unwrap()
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        days_left <= 30 * DAY && days_left > 29 * DAY,
        "{days_left:?}"
    );
}
