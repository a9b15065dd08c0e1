//! Mesh identity: SPIFFE IDs, the development CA behind `seam certs init`, and the
//! rustls client/server configurations that authenticate peers by SPIFFE ID (DESIGN §2).
//!
//! Every seam holds one certificate with exactly one URI SAN `spiffe://<trust_domain>/<service>`,
//! signed by the mesh CA. Both directions use mutual TLS 1.3; the client checks that the server
//! is the service it meant to reach, and the server reads the client's SPIFFE ID after the
//! handshake with [`peer_identity`].

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct,
    DistinguishedName as TlsDistinguishedName, OtherError, PeerIncompatible, RootCertStore,
    ServerConfig, SignatureScheme,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use zeroize::{Zeroize, Zeroizing};

const SPIFFE_SCHEME: &str = "spiffe://";
const ALPN_H2: &[u8] = b"h2";
/// Leaves are backdated so that peers whose clocks run a little behind still accept them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The development CA outlives any leaf `seam certs init` would reasonably issue from it.
const DEV_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// The latest instant an X.509 GeneralizedTime (and humantime) can express: 9999-12-31T23:59:59Z.
const MAX_X509_SECS: i64 = 253_402_300_799;
/// 253 (longest DNS name) - 64 (longest label plus its dot), so that
/// `<service>.<trust_domain>` is always a valid DNS name for SNI.
const MAX_TRUST_DOMAIN_LEN: usize = 189;

/// Everything that can go wrong with identities. Messages name the file and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "invalid trust domain {0:?}: use a lowercase DNS name of at most 189 characters such \
         as mesh.local (letters, digits and '-', labels separated by '.')"
    )]
    InvalidTrustDomain(String),
    #[error(
        "invalid service name {0:?}: use a lowercase DNS label of 1-63 letters, digits or '-' \
         that does not start or end with '-', or <service-account>.<namespace> (two such \
         labels) for a Kubernetes-style identity"
    )]
    InvalidServiceName(String),
    #[error(
        "invalid SPIFFE ID {uri:?}: {reason}; expected spiffe://<trust-domain>/<service> or \
         spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    InvalidSpiffeId { uri: String, reason: &'static str },
    #[error("no services given; pass --service NAME at least once")]
    NoServices,
    #[error("service {0:?} is listed twice; list each service once")]
    DuplicateService(String),
    #[error("{} already exists; pass --force to overwrite it", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{file} does not contain a PEM {what}: {reason}")]
    NotPem {
        file: String,
        what: &'static str,
        reason: String,
    },
    #[error(
        "private key {key} cannot be used: {reason}; use the tls.key issued with the certificate"
    )]
    InvalidKey { key: String, reason: String },
    #[error(
        "private key {key} does not match certificate {cert}; use the tls.key issued together \
         with that tls.crt"
    )]
    KeyMismatch { key: String, cert: String },
    #[error("certificate {cert} expired on {not_after}; reissue it with `seam certs init`")]
    Expired { cert: String, not_after: String },
    #[error(
        "certificate {cert} is not valid until {not_before}; check the clock or reissue it \
         with `seam certs init`"
    )]
    NotYetValid { cert: String, not_before: String },
    #[error(
        "certificate {cert} is not signed by the mesh CA in {ca}; reissue it from that CA or \
         point the CA file at the CA that issued it"
    )]
    NotSignedByCa { cert: String, ca: String },
    #[error(
        "certificate {cert} has no URI SAN {expected}; reissue it for that identity with \
         `seam certs init`"
    )]
    MissingSpiffeId { cert: String, expected: String },
    #[error(
        "certificate {cert} carries {found}, expected {expected}; check the service name and \
         trust domain, or reissue the certificate"
    )]
    WrongSpiffeId {
        cert: String,
        found: String,
        expected: String,
    },
    #[error(
        "certificate {cert} carries {count} spiffe:// URI SANs; a mesh certificate must carry \
         exactly one"
    )]
    MultipleSpiffeIds { cert: String, count: usize },
    #[error("certificate {cert} cannot be used as a mesh certificate: {reason}")]
    InvalidCertificate { cert: String, reason: String },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error(
        "peer identity {found} is outside the trust domain {expected}; it belongs to another mesh"
    )]
    ForeignTrustDomain { found: SpiffeId, expected: String },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// `spiffe://<trust_domain>/<service>`, or the Kubernetes form
/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service-account>` that Istio and SPIRE issue,
/// whose service name is `<service-account>.<namespace>`. The two forms map one to one: a
/// service name has a dot exactly when it is the Kubernetes form, so no two SPIFFE IDs name
/// the same service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    service: String,
}

/// Options of `seam certs init`.
#[derive(Clone, Debug)]
pub struct CertsInit {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub services: Vec<String>,
    pub force: bool,
    pub validity: Duration,
}

/// An in-memory development CA (for the embedded demo, `seam certs init` and tests).
pub struct DevCa {
    trust_domain: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A freshly issued leaf certificate and its private key, both PEM. The key is wiped on drop.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// This seam's identity: its certificate chain and key, and the mesh CA roots.
pub struct Identity {
    spiffe_id: SpiffeId,
    not_after: SystemTime,
    certified_key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

/// Client side: verifies the server's chain and that it is exactly the expected peer.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: SpiffeId,
}

/// Server side: webpki's client verification plus a single SPIFFE ID in our trust domain, so
/// that certificates the mesh CA issued for other purposes cannot open a connection at all.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
}

/// What a certificate says about itself, as far as identity checks care.
struct CertFacts {
    not_before: i64,
    not_after: i64,
    spiffe_uris: Vec<String>,
}

/// Names used for the three inputs in error messages.
struct Labels {
    ca: String,
    cert: String,
    key: String,
}

#[derive(Clone, Copy)]
enum FileKind {
    Public,
    Secret,
}

impl SpiffeId {
    /// Validates the trust domain as a lowercase DNS name and the service with
    /// [`is_service_name`].
    pub fn new(trust_domain: &str, service: &str) -> Result<Self, IdentityError> {
        if !is_dns_name(trust_domain) {
            return Err(IdentityError::InvalidTrustDomain(trust_domain.to_owned()));
        }
        if !is_service_name(service) {
            return Err(IdentityError::InvalidServiceName(service.to_owned()));
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            service: service.to_owned(),
        })
    }

    /// Parses `spiffe://<trust_domain>/<service>` or
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service-account>`; other path shapes are
    /// not mesh identities.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let invalid = |reason| IdentityError::InvalidSpiffeId {
            uri: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| invalid("it does not start with spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("it has no service path"))?;
        if !is_dns_name(trust_domain) {
            return Err(invalid("the trust domain is not a lowercase DNS name"));
        }
        let service = match path.split('/').collect::<Vec<_>>()[..] {
            [service] if is_dns_label(service) => service.to_owned(),
            ["ns", namespace, "sa", account]
                if is_dns_label(namespace) && is_dns_label(account) =>
            {
                format!("{account}.{namespace}")
            }
            _ => {
                return Err(invalid(
                    "the path is neither one lowercase DNS label nor ns/<label>/sa/<label>",
                ));
            }
        };
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            service,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// `<service>.<trust_domain>` (only the service account of a Kubernetes-style name, so the
    /// longest names still fit 253 bytes), the SNI a client sends; verification ignores it and
    /// checks the SPIFFE ID instead, so it only needs to be a stable, valid DNS name.
    pub fn server_name(&self) -> Result<ServerName<'static>, IdentityError> {
        let label = self.service.split('.').next().unwrap_or(&self.service);
        ServerName::try_from(format!("{label}.{}", self.trust_domain))
            .map_err(|_| IdentityError::InvalidTrustDomain(self.trust_domain.clone()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.service.split_once('.') {
            Some((account, namespace)) => write!(
                f,
                "{SPIFFE_SCHEME}{}/ns/{namespace}/sa/{account}",
                self.trust_domain
            ),
            None => write!(f, "{SPIFFE_SCHEME}{}/{}", self.trust_domain, self.service),
        }
    }
}

/// Writes DIR/ca.crt, DIR/ca.key and per service DIR/<svc>/tls.crt, tls.key, ca.crt, and returns
/// the paths written.
///
/// Every run creates a new CA: reusing an existing ca.key would mean trusting whatever key sits
/// in the directory. So without `force` any existing output file is an error, checked before
/// anything is written; with `force` the whole set, CA included, is replaced.
pub fn init_certs(opts: &CertsInit) -> Result<Vec<PathBuf>, IdentityError> {
    if opts.services.is_empty() {
        return Err(IdentityError::NoServices);
    }
    let mut ids: Vec<SpiffeId> = Vec::with_capacity(opts.services.len());
    for service in &opts.services {
        let id = SpiffeId::new(&opts.trust_domain, service)?;
        if ids.contains(&id) {
            return Err(IdentityError::DuplicateService(service.clone()));
        }
        ids.push(id);
    }

    let ca = DevCa::new(&opts.trust_domain)?;
    let now = SystemTime::now();
    let not_before = now - BACKDATE;
    let not_after = now + opts.validity;
    let ca_pem = ca.ca_pem();
    let ca_key_pem = Zeroizing::new(ca.issuer.key().serialize_pem());

    let mut files: Vec<(PathBuf, FileKind, Zeroizing<String>)> = vec![
        (
            opts.dir.join("ca.crt"),
            FileKind::Public,
            Zeroizing::new(ca_pem.clone()),
        ),
        (opts.dir.join("ca.key"), FileKind::Secret, ca_key_pem),
    ];
    for id in &ids {
        let issued = ca.issue(id.service(), not_before, not_after)?;
        let dir = opts.dir.join(id.service());
        files.push((
            dir.join("tls.crt"),
            FileKind::Public,
            Zeroizing::new(issued.cert_pem.clone()),
        ));
        files.push((
            dir.join("tls.key"),
            FileKind::Secret,
            Zeroizing::new(issued.key_pem.clone()),
        ));
        files.push((
            dir.join("ca.crt"),
            FileKind::Public,
            Zeroizing::new(ca_pem.clone()),
        ));
    }

    if !opts.force
        && let Some((path, _, _)) = files.iter().find(|(path, _, _)| path.exists())
    {
        return Err(IdentityError::AlreadyExists { path: path.clone() });
    }
    let mut written = Vec::with_capacity(files.len());
    for (path, kind, contents) in &files {
        write_new_file(path, *kind, contents.as_bytes(), opts.force)?;
        written.push(path.clone());
    }
    Ok(written)
}

impl DevCa {
    /// A new P-256 CA for `trust_domain`, valid for ten years.
    pub fn new(trust_domain: &str) -> Result<DevCa, IdentityError> {
        if !is_dns_name(trust_domain) {
            return Err(IdentityError::InvalidTrustDomain(trust_domain.to_owned()));
        }
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&format!("seam mesh CA {trust_domain}"));
        // pathlen 0: the mesh CA signs leaves directly and nothing it signs may act as a CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + DEV_CA_VALIDITY).into();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(generate_error)?;
        Ok(DevCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
        })
    }

    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issue a leaf for `service` valid from `not_before` to `not_after`.
    pub fn issue(
        &self,
        service: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, IdentityError> {
        let id = SpiffeId::new(&self.trust_domain, service)?;
        self.issue_with_uris(service, &[id.to_string()], not_before, not_after)
    }

    /// Issue a leaf with arbitrary URI SANs (or none); tests use it to make bad certificates.
    pub fn issue_with_uris(
        &self,
        cn: &str,
        uris: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, IdentityError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(cn);
        params.subject_alt_names = uris
            .iter()
            .map(|uri| {
                let uri = uri.as_str().try_into().map_err(generate_error)?;
                Ok(SanType::URI(uri))
            })
            .collect::<Result<_, IdentityError>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every seam is both a server (inbound) and a client (outbound) with the same cert.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_error)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Drop for IssuedCert {
    fn drop(&mut self) {
        self.key_pem.zeroize();
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

impl Identity {
    /// Loads the three PEM files, checks the cert chains to the CA, is currently valid, carries
    /// exactly the SPIFFE ID spiffe://<trust_domain>/<service>, and that key matches cert.
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        trust_domain: &str,
        service: &str,
    ) -> Result<Identity, IdentityError> {
        let ca_pem = read_file(ca)?;
        let cert_pem = read_file(cert)?;
        let key_pem = Zeroizing::new(read_file(key)?);
        Self::build(
            Labels {
                ca: ca.display().to_string(),
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            },
            &ca_pem,
            &cert_pem,
            &key_pem,
            &SpiffeId::new(trust_domain, service)?,
            SystemTime::now(),
        )
    }

    /// Like [`Identity::load`] from PEM text; errors call the inputs ca.crt, tls.crt and tls.key.
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        service: &str,
    ) -> Result<Identity, IdentityError> {
        Self::from_pem_at(
            ca_pem,
            cert_pem,
            key_pem,
            trust_domain,
            service,
            SystemTime::now(),
        )
    }

    /// [`Identity::from_pem`] with validity judged at `now` instead of the current time. Tests use
    /// it to hold an expired certificate and prove that peers reject it in the handshake.
    #[doc(hidden)]
    pub fn from_pem_at(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        service: &str,
        now: SystemTime,
    ) -> Result<Identity, IdentityError> {
        Self::build(
            Labels {
                ca: "ca.crt".to_owned(),
                cert: "tls.crt".to_owned(),
                key: "tls.key".to_owned(),
            },
            ca_pem,
            cert_pem,
            key_pem,
            &SpiffeId::new(trust_domain, service)?,
            now,
        )
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// TLS 1.3 only, X25519MLKEM768 preferred then X25519, client certificate required and
    /// verified against the mesh CA, ALPN ["h2"]. After the handshake call [`peer_identity`].
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, IdentityError> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
        let verifier = Arc::new(SpiffeClientVerifier {
            inner,
            algorithms: self.provider.signature_verification_algorithms,
            trust_domain: self.spiffe_id.trust_domain.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(self.certified_key.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Resumed sessions skip certificate verification; mesh connections are long-lived and
        // pooled, so full verification on every connection costs little and keeps expiry and
        // CA changes effective immediately.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// TLS 1.3 only, presents our certificate, ALPN ["h2"], verifies the server's chain against
    /// the mesh CA and that its SPIFFE ID is exactly spiffe://<trust_domain>/<expected_peer>.
    /// Connect with [`SpiffeId::server_name`] of the peer (any fixed name works; it is not checked).
    pub fn client_config(&self, expected_peer: &str) -> Result<Arc<ClientConfig>, IdentityError> {
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.clone(),
            algorithms: self.provider.signature_verification_algorithms,
            expected: SpiffeId::new(&self.spiffe_id.trust_domain, expected_peer)?,
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(
                self.certified_key.clone(),
            )));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // See server_config: every connection is fully verified.
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }

    fn build(
        labels: Labels,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        expected: &SpiffeId,
        now: SystemTime,
    ) -> Result<Identity, IdentityError> {
        let provider = Arc::new(mesh_provider());
        let ca_certs = parse_certs(ca_pem, &labels.ca)?;
        let chain = parse_certs(cert_pem, &labels.cert)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            IdentityError::NotPem {
                file: labels.key.clone(),
                what: "private key",
                reason: e.to_string(),
            }
        })?;

        // Trust anchors are only a name and a key to webpki, which ignores their validity
        // dates in the handshake; judging them here would refuse what peers accept.
        let mut roots = RootCertStore::empty();
        for ca in &ca_certs {
            roots
                .add(ca.clone())
                .map_err(|e| IdentityError::InvalidCertificate {
                    cert: labels.ca.clone(),
                    reason: e.to_string(),
                })?;
        }
        let roots = Arc::new(roots);

        let leaf = &chain[0];
        let facts = cert_facts(leaf, &labels.cert)?;
        check_validity(&facts, &labels.cert, now)?;
        check_chain(leaf, &chain[1..], &roots, &provider, &labels, now)?;
        check_spiffe_id(&facts, &labels.cert, expected)?;

        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| IdentityError::InvalidKey {
                    key: labels.key.clone(),
                    reason: e.to_string(),
                })?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        // Unknown consistency is rejected too: an identity whose key we cannot tie to its
        // certificate would only fail later, in every handshake.
        certified_key
            .keys_match()
            .map_err(|_| IdentityError::KeyMismatch {
                key: labels.key.clone(),
                cert: labels.cert.clone(),
            })?;

        Ok(Identity {
            spiffe_id: expected.clone(),
            not_after: system_time(facts.not_after),
            certified_key: Arc::new(certified_key),
            roots,
            provider,
        })
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &rfc3339(unix_secs(self.not_after)))
            .finish_non_exhaustive()
    }
}

/// The SPIFFE ID of the verified peer certificate of an established connection (either side),
/// checked to be in `trust_domain`. Errors if there is no peer certificate, no or several
/// spiffe URI SANs, or a foreign trust domain.
pub fn peer_identity(conn: &CommonState, trust_domain: &str) -> Result<SpiffeId, IdentityError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(IdentityError::NoPeerCertificate)?;
    let label = "of the peer";
    let id = single_spiffe_id(&cert_facts(leaf, label)?, label)?;
    if id.trust_domain != trust_domain {
        return Err(IdentityError::ForeignTrustDomain {
            found: id,
            expected: trust_domain.to_owned(),
        });
    }
    Ok(id)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    /// The server name is deliberately not checked: mesh certificates carry only a URI SAN, and
    /// the SPIFFE ID is the name that matters.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let label = "of the server";
        cert_facts(end_entity, label)
            .and_then(|facts| check_spiffe_id(&facts, label, &self.expected))
            .map_err(tls_certificate_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig.into())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[TlsDistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let label = "of the client";
        let id = single_spiffe_id(
            &cert_facts(end_entity, label).map_err(tls_certificate_error)?,
            label,
        )
        .map_err(tls_certificate_error)?;
        if id.trust_domain != self.trust_domain {
            return Err(tls_certificate_error(IdentityError::ForeignTrustDomain {
                found: id,
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(PeerIncompatible::Tls12NotOffered.into())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// aws-lc-rs with only the key exchanges DESIGN §2 allows, hybrid post-quantum first.
/// TLS 1.3 suites in seam's order: AES-128-GCM first. Everything a seam sends to another
/// seam is already sealed with AES-256-GCM inside the session, so the outer layer's job is
/// authentication and hiding the few clear bytes around the sealed frames; AES-128-GCM does
/// that at about three quarters of AES-256's cost per byte (BoringSSL's order, too).
fn mesh_provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: vec![
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![kx_group::X25519MLKEM768, kx_group::X25519],
        ..aws_lc_rs::default_provider()
    }
}

/// Creates `path` with its final mode from the start, so a key is never readable by others,
/// not even briefly. With `overwrite` an existing file is removed first rather than truncated,
/// because truncation would keep whatever (possibly looser) mode the old file had.
fn write_new_file(
    path: &Path,
    kind: FileKind,
    contents: &[u8],
    overwrite: bool,
) -> Result<(), IdentityError> {
    let write_error = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(write_error)?;
    }
    if overwrite {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(write_error(e)),
            _ => {}
        }
    }
    let mode = match kind {
        FileKind::Public => 0o644,
        FileKind::Secret => 0o600,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => IdentityError::AlreadyExists {
                path: path.to_owned(),
            },
            _ => write_error(e),
        })?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

fn read_file(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_certs(pem: &str, label: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let not_pem = |reason: String| IdentityError::NotPem {
        file: label.to_owned(),
        what: "certificate",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(not_pem("no CERTIFICATE block found".to_owned()));
    }
    Ok(certs)
}

fn cert_facts(der: &CertificateDer<'_>, label: &str) -> Result<CertFacts, IdentityError> {
    let invalid = |reason: String| IdentityError::InvalidCertificate {
        cert: label.to_owned(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("not a valid X.509 certificate: {e}")))?;
    Ok(CertFacts {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        spiffe_uris: spiffe_uris(&cert)
            .map_err(|e| invalid(format!("unreadable subjectAltName: {e}")))?,
    })
}

fn spiffe_uris(cert: &X509Certificate<'_>) -> Result<Vec<String>, x509_parser::error::X509Error> {
    let Some(san) = cert.subject_alternative_name()? else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            // The scheme is case-insensitive (RFC 3986), so SPIFFE:// still counts as one of
            // ours and then fails parsing instead of being silently ignored.
            GeneralName::URI(uri)
                if uri
                    .get(..SPIFFE_SCHEME.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(SPIFFE_SCHEME)) =>
            {
                Some((*uri).to_owned())
            }
            _ => None,
        })
        .collect())
}

fn check_validity(facts: &CertFacts, label: &str, now: SystemTime) -> Result<(), IdentityError> {
    let now = unix_secs(now);
    if now < facts.not_before {
        return Err(IdentityError::NotYetValid {
            cert: label.to_owned(),
            not_before: rfc3339(facts.not_before),
        });
    }
    if now > facts.not_after {
        return Err(IdentityError::Expired {
            cert: label.to_owned(),
            not_after: rfc3339(facts.not_after),
        });
    }
    Ok(())
}

/// Our certificate serves both directions, so it must verify as a server and as a client.
fn check_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    labels: &Labels,
    now: SystemTime,
) -> Result<(), IdentityError> {
    let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    let map = |e: rustls::Error| match e {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => IdentityError::NotSignedByCa {
            cert: labels.cert.clone(),
            ca: labels.ca.clone(),
        },
        other => IdentityError::InvalidCertificate {
            cert: labels.cert.clone(),
            reason: other.to_string(),
        },
    };
    let parsed = ParsedCertificate::try_from(leaf).map_err(map)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(map)?;
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?
        .verify_client_cert(leaf, intermediates, now)
        .map_err(map)?;
    Ok(())
}

fn check_spiffe_id(
    facts: &CertFacts,
    label: &str,
    expected: &SpiffeId,
) -> Result<(), IdentityError> {
    match facts.spiffe_uris.as_slice() {
        [] => Err(IdentityError::MissingSpiffeId {
            cert: label.to_owned(),
            expected: expected.to_string(),
        }),
        [found] if SpiffeId::parse(found).ok().as_ref() == Some(expected) => Ok(()),
        [found] => Err(IdentityError::WrongSpiffeId {
            cert: label.to_owned(),
            found: found.clone(),
            expected: expected.to_string(),
        }),
        many => Err(IdentityError::MultipleSpiffeIds {
            cert: label.to_owned(),
            count: many.len(),
        }),
    }
}

fn single_spiffe_id(facts: &CertFacts, label: &str) -> Result<SpiffeId, IdentityError> {
    match facts.spiffe_uris.as_slice() {
        [] => Err(IdentityError::MissingSpiffeId {
            cert: label.to_owned(),
            expected: format!("{SPIFFE_SCHEME}<trust-domain>/<service>"),
        }),
        [uri] => SpiffeId::parse(uri),
        many => Err(IdentityError::MultipleSpiffeIds {
            cert: label.to_owned(),
            count: many.len(),
        }),
    }
}

fn tls_certificate_error(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn generate_error(e: rcgen::Error) -> IdentityError {
    IdentityError::Generate(e.to_string())
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

fn system_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.clamp(0, MAX_X509_SECS).unsigned_abs())
}

fn rfc3339(secs: i64) -> String {
    humantime::format_rfc3339_seconds(system_time(secs)).to_string()
}

/// A service name: one DNS label (`billing`), or `<service-account>.<namespace>` for a
/// Kubernetes-style SPIFFE ID (`billing.shop`). Config validation uses this too, so a name the
/// config accepts always makes a valid SPIFFE ID.
pub fn is_service_name(s: &str) -> bool {
    match s.split_once('.') {
        Some((account, namespace)) => is_dns_label(account) && is_dns_label(namespace),
        None => is_dns_label(s),
    }
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_name(s: &str) -> bool {
    (1..=MAX_TRUST_DOMAIN_LEN).contains(&s.len()) && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_round_trips() {
        let id = SpiffeId::new("mesh.local", "orders").unwrap();
        assert_eq!(id.to_string(), "spiffe://mesh.local/orders");
        assert_eq!(SpiffeId::parse("spiffe://mesh.local/orders").unwrap(), id);
        assert_eq!(id.trust_domain(), "mesh.local");
        assert_eq!(id.service(), "orders");
    }

    #[test]
    fn kubernetes_style_spiffe_id_is_account_dot_namespace() {
        let uri = "spiffe://cluster.local/ns/shop/sa/orders";
        let id = SpiffeId::parse(uri).unwrap();
        assert_eq!(id.service(), "orders.shop");
        assert_eq!(id.to_string(), uri);
        assert_eq!(SpiffeId::new("cluster.local", "orders.shop").unwrap(), id);
        // The plain form of the same words is a different identity.
        assert_ne!(
            SpiffeId::parse("spiffe://cluster.local/orders").unwrap(),
            id
        );
        assert_eq!(
            id.server_name().unwrap(),
            ServerName::try_from("orders.cluster.local").unwrap()
        );
    }

    #[test]
    fn spiffe_id_rejects_malformed_input() {
        for td in [
            "",
            "Mesh.local",
            "mesh..local",
            "-mesh.local",
            "mesh_local",
            "mesh.local.",
        ] {
            assert!(
                matches!(
                    SpiffeId::new(td, "orders"),
                    Err(IdentityError::InvalidTrustDomain(_))
                ),
                "{td:?}"
            );
        }
        for svc in [
            "",
            "Orders",
            "orders-",
            "a/b",
            "a.b.c",
            ".orders",
            "orders.",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(
                    SpiffeId::new("mesh.local", svc),
                    Err(IdentityError::InvalidServiceName(_))
                ),
                "{svc:?}"
            );
        }
        for uri in [
            "https://mesh.local/orders",
            "spiffe://mesh.local",
            "spiffe://mesh.local/",
            "spiffe://mesh.local/orders/v1",
            "spiffe://mesh.local:443/orders",
            "spiffe://user@mesh.local/orders",
            "spiffe://mesh.local/orders?x=1",
            "spiffe://mesh.local/orders#frag",
            "SPIFFE://mesh.local/orders",
            "spiffe://mesh.local/ns/shop/sa",
            "spiffe://mesh.local/ns//sa/orders",
            "spiffe://mesh.local/ns/shop/sa/orders/x",
            "spiffe://mesh.local/sa/orders/ns/shop",
            "spiffe://mesh.local/ns/Shop/sa/orders",
            "spiffe://mesh.local/ns/shop/sa/orders.v1",
            "spiffe://mesh.local/orders.shop",
        ] {
            assert!(
                matches!(
                    SpiffeId::parse(uri),
                    Err(IdentityError::InvalidSpiffeId { .. })
                ),
                "{uri:?}"
            );
        }
    }

    #[test]
    fn server_name_is_service_under_trust_domain() {
        let id = SpiffeId::new("mesh.local", "billing").unwrap();
        assert_eq!(
            id.server_name().unwrap(),
            ServerName::try_from("billing.mesh.local").unwrap()
        );
        let longest_td = ["a".repeat(63), "b".repeat(63), "c".repeat(61)].join(".");
        assert_eq!(longest_td.len(), MAX_TRUST_DOMAIN_LEN);
        let longest = SpiffeId::new(&longest_td, &"s".repeat(63)).unwrap();
        assert!(longest.server_name().is_ok());
        assert!(matches!(
            SpiffeId::new(&format!("{longest_td}a"), "orders"),
            Err(IdentityError::InvalidTrustDomain(_))
        ));
    }

    #[test]
    fn rfc3339_formats_and_clamps() {
        assert_eq!(rfc3339(1_767_312_000), "2026-01-02T00:00:00Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn issued_cert_debug_hides_the_key() {
        let ca = DevCa::new("mesh.local").unwrap();
        let now = SystemTime::now();
        let issued = ca
            .issue("orders", now, now + Duration::from_secs(60))
            .unwrap();
        let shown = format!("{issued:?} {ca:?}");
        assert!(!shown.contains("PRIVATE KEY"));
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn init_certs_rejects_bad_service_lists() {
        let dir = tempfile::tempdir().unwrap();
        let opts = |services: &[&str]| CertsInit {
            dir: dir.path().to_owned(),
            trust_domain: "mesh.local".to_owned(),
            services: services.iter().map(|s| s.to_string()).collect(),
            force: false,
            validity: Duration::from_secs(3600),
        };
        assert!(matches!(
            init_certs(&opts(&[])),
            Err(IdentityError::NoServices)
        ));
        assert!(matches!(
            init_certs(&opts(&["orders", "orders"])),
            Err(IdentityError::DuplicateService(_))
        ));
        assert!(matches!(
            init_certs(&opts(&["Orders"])),
            Err(IdentityError::InvalidServiceName(_))
        ));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing written"
        );
    }
}
