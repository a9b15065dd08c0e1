//! The x25519 + HKDF session handshake (DESIGN §3).
