//! The x25519 + HKDF session handshake (DESIGN §3).
//!
//! One round trip over an already mutually authenticated TLS connection:
//!
//! ```text
//! client -> server  ClientHello { version, ephemeral public key, 32-byte random }
//! server -> client  ServerHello { version, session id (UUIDv7), ephemeral public key,
//!                                 32-byte random, key confirmation }
//! ```
//!
//! Both sides hash the transcript (version, both SPIFFE ids, both public keys, both
//! randoms, the session id) and use it as the HKDF-SHA256 salt over the x25519 shared
//! secret. Distinct labels yield the client->server key, the server->client key and the
//! confirmation value the server returns, which proves to the client that both sides
//! hold the same keys. The SPIFFE ids come from the verified TLS certificates, so a
//! session is bound to the two authenticated identities that made it.
//!
//! The wire encoding is fixed-length and versioned; the decoders never panic and
//! return typed errors for any other input.

use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;
use x25519_dalek::{EphemeralSecret, PublicKey};
use zeroize::Zeroizing;

/// The only protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;

const KIND_CLIENT_HELLO: u8 = 1;
const KIND_SERVER_HELLO: u8 = 2;

/// Encoded sizes: version, kind, then the fixed fields.
pub const CLIENT_HELLO_LEN: usize = 1 + 1 + 32 + 32;
pub const SERVER_HELLO_LEN: usize = 1 + 1 + 16 + 32 + 32 + 32;

const TRANSCRIPT_CONTEXT: &[u8] = b"seam handshake v1";
const LABEL_CLIENT_TO_SERVER: &[u8] = b"seam v1 key client->server";
const LABEL_SERVER_TO_CLIENT: &[u8] = b"seam v1 key server->client";
const LABEL_CONFIRM: &[u8] = b"seam v1 key confirmation";

/// A 256-bit AES key that is wiped from memory when dropped.
pub type SecretKey = Zeroizing<[u8; 32]>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error(
        "handshake message {message} has {got} bytes, expected {expected}; the peer speaks another protocol or the message was cut"
    )]
    WrongLength {
        message: &'static str,
        expected: usize,
        got: usize,
    },
    #[error(
        "peer speaks handshake version {0}, this seam speaks version {PROTOCOL_VERSION}; upgrade the older seam"
    )]
    UnsupportedVersion(u8),
    #[error("expected a {expected} but got message kind {got}; the peer is not a seam")]
    UnexpectedKind { expected: &'static str, got: u8 },
    #[error("the peer's key share gives a non-contributory (all-zero) shared secret; rejected")]
    NonContributory,
    #[error(
        "the server's key confirmation does not match; the handshake was tampered with or the peers disagree on identities"
    )]
    ConfirmationMismatch,
    #[error("session id {0} is not a UUIDv7; the peer is not a seam")]
    BadSessionId(Uuid),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// First message: the client's ephemeral key share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    pub public: [u8; 32],
    pub random: [u8; 32],
}

/// Second message: the server's key share, the session it created and its confirmation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHello {
    pub session_id: Uuid,
    pub public: [u8; 32],
    pub random: [u8; 32],
    pub confirm: [u8; 32],
}

/// The keys both sides end up with. Dropping it wipes the keys.
pub struct SessionKeys {
    pub session_id: Uuid,
    pub client_to_server: SecretKey,
    pub server_to_client: SecretKey,
}

impl std::fmt::Debug for SessionKeys {
    // Keys never reach a log line, not even through a stray `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

/// The client's half-finished handshake: its ephemeral secret waits for the reply.
pub struct ClientHandshake {
    secret: EphemeralSecret,
    hello: ClientHello,
    client_id: String,
    server_id: String,
}

/// Per-side derived secrets, kept together so they are wiped together.
struct Derived {
    client_to_server: SecretKey,
    server_to_client: SecretKey,
    confirm: Zeroizing<[u8; 32]>,
}

impl ClientHello {
    pub fn encode(&self) -> [u8; CLIENT_HELLO_LEN] {
        let mut out = [0u8; CLIENT_HELLO_LEN];
        out[0] = PROTOCOL_VERSION;
        out[1] = KIND_CLIENT_HELLO;
        out[2..34].copy_from_slice(&self.public);
        out[34..66].copy_from_slice(&self.random);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, HandshakeError> {
        check_prefix(bytes, "ClientHello", KIND_CLIENT_HELLO, CLIENT_HELLO_LEN)?;
        Ok(Self {
            public: array32(&bytes[2..34]),
            random: array32(&bytes[34..66]),
        })
    }
}

impl ServerHello {
    pub fn encode(&self) -> [u8; SERVER_HELLO_LEN] {
        let mut out = [0u8; SERVER_HELLO_LEN];
        out[0] = PROTOCOL_VERSION;
        out[1] = KIND_SERVER_HELLO;
        out[2..18].copy_from_slice(self.session_id.as_bytes());
        out[18..50].copy_from_slice(&self.public);
        out[50..82].copy_from_slice(&self.random);
        out[82..114].copy_from_slice(&self.confirm);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, HandshakeError> {
        check_prefix(bytes, "ServerHello", KIND_SERVER_HELLO, SERVER_HELLO_LEN)?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[2..18]);
        let session_id = Uuid::from_bytes(id);
        if session_id.get_version_num() != 7 {
            return Err(HandshakeError::BadSessionId(session_id));
        }
        Ok(Self {
            session_id,
            public: array32(&bytes[18..50]),
            random: array32(&bytes[50..82]),
            confirm: array32(&bytes[82..114]),
        })
    }
}

impl ClientHandshake {
    /// Starts a handshake from `client_id` (our SPIFFE id) to `server_id` (the peer we
    /// verified in its TLS certificate).
    pub fn start(client_id: &str, server_id: &str) -> Result<(Self, ClientHello), HandshakeError> {
        let secret = EphemeralSecret::random();
        let hello = ClientHello {
            public: PublicKey::from(&secret).to_bytes(),
            random: random32()?,
        };
        let state = Self {
            secret,
            hello: hello.clone(),
            client_id: client_id.to_owned(),
            server_id: server_id.to_owned(),
        };
        Ok((state, hello))
    }

    /// Completes the handshake with the server's reply; the ephemeral secret is consumed.
    pub fn finish(self, reply: &ServerHello) -> Result<SessionKeys, HandshakeError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(reply.public));
        if !shared.was_contributory() {
            return Err(HandshakeError::NonContributory);
        }
        let transcript = transcript_hash(
            &self.client_id,
            &self.server_id,
            &self.hello,
            reply.session_id,
            &reply.public,
            &reply.random,
        );
        let derived = derive(shared.as_bytes(), &transcript);
        if !bool::from(derived.confirm.ct_eq(&reply.confirm)) {
            return Err(HandshakeError::ConfirmationMismatch);
        }
        Ok(SessionKeys {
            session_id: reply.session_id,
            client_to_server: derived.client_to_server,
            server_to_client: derived.server_to_client,
        })
    }
}

/// The server's side: answers a ClientHello from the authenticated `client_id`.
pub fn respond(
    hello: &ClientHello,
    client_id: &str,
    server_id: &str,
) -> Result<(ServerHello, SessionKeys), HandshakeError> {
    let secret = EphemeralSecret::random();
    let public = PublicKey::from(&secret).to_bytes();
    let shared = secret.diffie_hellman(&PublicKey::from(hello.public));
    if !shared.was_contributory() {
        return Err(HandshakeError::NonContributory);
    }
    let random = random32()?;
    let session_id = Uuid::now_v7();
    let transcript = transcript_hash(client_id, server_id, hello, session_id, &public, &random);
    let derived = derive(shared.as_bytes(), &transcript);
    let reply = ServerHello {
        session_id,
        public,
        random,
        confirm: *derived.confirm,
    };
    let keys = SessionKeys {
        session_id,
        client_to_server: derived.client_to_server,
        server_to_client: derived.server_to_client,
    };
    Ok((reply, keys))
}

fn check_prefix(
    bytes: &[u8],
    message: &'static str,
    kind: u8,
    expected: usize,
) -> Result<(), HandshakeError> {
    // Version first: a future version may change the length, and "upgrade" is the
    // more useful message for the operator than "wrong length".
    match bytes.first() {
        Some(&PROTOCOL_VERSION) => {}
        Some(&other) => return Err(HandshakeError::UnsupportedVersion(other)),
        None => {
            return Err(HandshakeError::WrongLength {
                message,
                expected,
                got: 0,
            });
        }
    }
    if bytes.len() != expected {
        return Err(HandshakeError::WrongLength {
            message,
            expected,
            got: bytes.len(),
        });
    }
    if bytes[1] != kind {
        return Err(HandshakeError::UnexpectedKind {
            expected: message,
            got: bytes[1],
        });
    }
    Ok(())
}

fn array32(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(bytes);
    out
}

fn random32() -> Result<[u8; 32], HandshakeError> {
    let mut out = [0u8; 32];
    getrandom::fill(&mut out).map_err(|e| HandshakeError::Random(e.to_string()))?;
    Ok(out)
}

fn transcript_hash(
    client_id: &str,
    server_id: &str,
    hello: &ClientHello,
    session_id: Uuid,
    server_public: &[u8; 32],
    server_random: &[u8; 32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TRANSCRIPT_CONTEXT);
    h.update([PROTOCOL_VERSION]);
    // Length prefixes keep ("ab","c") and ("a","bc") from hashing alike.
    for id in [client_id, server_id] {
        h.update((id.len() as u32).to_be_bytes());
        h.update(id.as_bytes());
    }
    h.update(hello.public);
    h.update(server_public);
    h.update(hello.random);
    h.update(server_random);
    h.update(session_id.as_bytes());
    h.finalize().into()
}

fn derive(shared_secret: &[u8; 32], transcript: &[u8; 32]) -> Derived {
    let hk = Hkdf::<Sha256>::new(Some(transcript), shared_secret);
    let mut derived = Derived {
        client_to_server: Zeroizing::new([0u8; 32]),
        server_to_client: Zeroizing::new([0u8; 32]),
        confirm: Zeroizing::new([0u8; 32]),
    };
    // 32 bytes is far below HKDF-SHA256's 255*32 output limit, so expand cannot fail.
    for (label, out) in [
        (LABEL_CLIENT_TO_SERVER, &mut *derived.client_to_server),
        (LABEL_SERVER_TO_CLIENT, &mut *derived.server_to_client),
        (LABEL_CONFIRM, &mut *derived.confirm),
    ] {
        hk.expand(label, out)
            .expect("32-byte HKDF-SHA256 output is within the RFC 5869 limit");
    }
    derived
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ORDERS: &str = "spiffe://mesh.local/orders";
    const BILLING: &str = "spiffe://mesh.local/billing";

    fn full_handshake() -> (SessionKeys, SessionKeys) {
        let (client, hello) = ClientHandshake::start(ORDERS, BILLING).unwrap();
        let wire = hello.encode();
        let (reply, server_keys) =
            respond(&ClientHello::decode(&wire).unwrap(), ORDERS, BILLING).unwrap();
        let client_keys = client
            .finish(&ServerHello::decode(&reply.encode()).unwrap())
            .unwrap();
        (client_keys, server_keys)
    }

    #[test]
    fn both_sides_derive_the_same_distinct_directional_keys() {
        let (c, s) = full_handshake();
        assert_eq!(c.session_id, s.session_id);
        assert_eq!(c.session_id.get_version_num(), 7);
        assert_eq!(*c.client_to_server, *s.client_to_server);
        assert_eq!(*c.server_to_client, *s.server_to_client);
        assert_ne!(*c.client_to_server, *c.server_to_client);
        assert_ne!(*c.client_to_server, [0u8; 32]);
    }

    #[test]
    fn every_handshake_gives_fresh_keys_and_ids() {
        let (a, _) = full_handshake();
        let (b, _) = full_handshake();
        assert_ne!(a.session_id, b.session_id);
        assert_ne!(*a.client_to_server, *b.client_to_server);
    }

    #[test]
    fn identities_are_bound_into_the_keys() {
        let (client, hello) = ClientHandshake::start(ORDERS, BILLING).unwrap();
        // The server believes it talks to someone else: confirmation must fail.
        let (reply, _) = respond(&hello, "spiffe://mesh.local/reports", BILLING).unwrap();
        assert_eq!(
            client.finish(&reply).unwrap_err(),
            HandshakeError::ConfirmationMismatch
        );
    }

    #[test]
    fn tampered_reply_fails_confirmation() {
        let (client, hello) = ClientHandshake::start(ORDERS, BILLING).unwrap();
        let (mut reply, _) = respond(&hello, ORDERS, BILLING).unwrap();
        reply.random[0] ^= 1;
        assert_eq!(
            client.finish(&reply).unwrap_err(),
            HandshakeError::ConfirmationMismatch
        );
    }

    #[test]
    fn low_order_points_are_rejected_on_both_sides() {
        // The all-zero point (and other small-order points) make the shared secret zero.
        let evil = ClientHello {
            public: [0u8; 32],
            random: [7u8; 32],
        };
        assert_eq!(
            respond(&evil, ORDERS, BILLING).unwrap_err(),
            HandshakeError::NonContributory
        );
        let (client, _) = ClientHandshake::start(ORDERS, BILLING).unwrap();
        let mut one = [0u8; 32];
        one[0] = 1; // the point of order 1 (identity in Montgomery form)
        let reply = ServerHello {
            session_id: Uuid::now_v7(),
            public: one,
            random: [0u8; 32],
            confirm: [0u8; 32],
        };
        assert_eq!(
            client.finish(&reply).unwrap_err(),
            HandshakeError::NonContributory
        );
    }

    #[test]
    fn decoders_reject_wrong_lengths_versions_and_kinds() {
        let (_, hello) = ClientHandshake::start(ORDERS, BILLING).unwrap();
        let wire = hello.encode();
        assert!(matches!(
            ClientHello::decode(&wire[..65]),
            Err(HandshakeError::WrongLength {
                expected: 66,
                got: 65,
                ..
            })
        ));
        assert!(matches!(
            ClientHello::decode(&[]),
            Err(HandshakeError::WrongLength { got: 0, .. })
        ));
        let mut v2 = wire;
        v2[0] = 2;
        assert_eq!(
            ClientHello::decode(&v2).unwrap_err(),
            HandshakeError::UnsupportedVersion(2)
        );
        let mut kind = wire;
        kind[1] = KIND_SERVER_HELLO;
        assert!(matches!(
            ClientHello::decode(&kind),
            Err(HandshakeError::UnexpectedKind { got: 2, .. })
        ));
        let (reply, _) = respond(&hello, ORDERS, BILLING).unwrap();
        let mut v4 = reply.encode();
        v4[2..18].copy_from_slice(Uuid::new_v4().as_bytes());
        assert!(matches!(
            ServerHello::decode(&v4),
            Err(HandshakeError::BadSessionId(_))
        ));
    }

    #[test]
    fn session_keys_debug_hides_key_material() {
        let (c, _) = full_handshake();
        let shown = format!("{c:?}");
        assert!(shown.contains("session_id"));
        assert!(!shown.contains(&format!("{:?}", &c.client_to_server[..4])));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ClientHello::decode(&bytes);
            let _ = ServerHello::decode(&bytes);
        }

        #[test]
        fn well_formed_client_hellos_round_trip(public in any::<[u8; 32]>(), random in any::<[u8; 32]>()) {
            let hello = ClientHello { public, random };
            prop_assert_eq!(ClientHello::decode(&hello.encode()).unwrap(), hello);
        }

        #[test]
        fn random_bytes_with_a_valid_prefix_decode_or_fail_typed(mut bytes in proptest::collection::vec(any::<u8>(), SERVER_HELLO_LEN)) {
            bytes[0] = PROTOCOL_VERSION;
            bytes[1] = KIND_SERVER_HELLO;
            match ServerHello::decode(&bytes) {
                Ok(h) => prop_assert_eq!(h.session_id.get_version_num(), 7),
                Err(e) => prop_assert!(matches!(e, HandshakeError::BadSessionId(_))),
            }
        }
    }
}
