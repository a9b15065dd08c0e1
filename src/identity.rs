//! Certificates, SPIFFE identities and the rustls configs (DESIGN §2).
