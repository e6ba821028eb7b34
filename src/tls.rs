//! TLS setup shared by the model client (reqwest) and the database driver (sqlx): both use
//! rustls with the `ring` provider, which must be the process's default before either builds a
//! client. Installing it is idempotent, so every entry point calls [`install_provider`].

/// Makes `ring` the process-wide rustls provider, unless one is installed already.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
