//! TLS for listeners: certificates loaded with errors instead of panics, and Pingora's TLS
//! settings built from them.

use super::ListenError;
use pingora::listeners::tls::TlsSettings;
use std::sync::Arc;
use switchyard_config::Config;

/// Load a certificate chain and key into rustls' form, with errors instead of panics.
fn load_cert(
    t: &switchyard_config::TlsConfig,
) -> Result<Arc<pingora::tls::sign::CertifiedKey>, ListenError> {
    use pingora::tls;
    tls::install_default_crypto_provider();
    let bad = |why: String| ListenError::Tls {
        cert: t.cert.clone(),
        key: t.key.clone(),
        why,
    };
    for f in [&t.cert, &t.key] {
        if let Err(e) = std::fs::File::open(f) {
            return Err(bad(format!("cannot read {}: {e}", f.display())));
        }
    }
    let (certs, key) =
        tls::load_certs_and_key_files(&t.cert.to_string_lossy(), &t.key.to_string_lossy())
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("no certificate or no private key found in the PEM files".into()))?;
    let provider = tls::CryptoProvider::get_default()
        .ok_or_else(|| bad("no TLS crypto provider installed".into()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(e.to_string()))?;
    let ck = tls::sign::CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| bad(format!("certificate and key do not match: {e}")))?;
    Ok(Arc::new(ck))
}

/// Serves the one certificate of a listener (the resolver route lets Pingora's TLS settings
/// be built without it re-reading — and panicking on — the PEM files).
#[derive(Debug)]
struct OneCert(Arc<pingora::tls::sign::CertifiedKey>);

impl pingora::tls::ResolvesServerCert for OneCert {
    fn resolve(
        &self,
        _hello: pingora::tls::ClientHello<'_>,
    ) -> Option<Arc<pingora::tls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Pingora TLS settings for a listener, or a start error.
pub(crate) fn tls_settings(
    t: &switchyard_config::TlsConfig,
    http2: bool,
) -> Result<TlsSettings, ListenError> {
    let cert = load_cert(t)?;
    let mut s = TlsSettings::intermediate("", "").map_err(|e| ListenError::Tls {
        cert: t.cert.clone(),
        key: t.key.clone(),
        why: e.to_string(),
    })?;
    s.set_cert_resolver(Arc::new(OneCert(cert)));
    if http2 {
        s.enable_h2();
    }
    Ok(s)
}

/// Check a TLS listener's files (for `switchyard check` and reloads).
pub(crate) fn check_tls(t: &switchyard_config::TlsConfig) -> Result<(), ListenError> {
    load_cert(t).map(|_| ())
}

/// Checks that need the machine, not just the file (`switchyard check` runs them, like
/// `nginx -t`): TLS certificates and keys load, the sticky key file reads. Each problem names
/// its config path.
pub fn preflight(config: &Config) -> Vec<switchyard_config::FieldError> {
    let root = switchyard_config::FieldPath::root().key("listen");
    let mut problems: Vec<_> = config
        .listen
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let t = l.tls.as_ref()?;
            check_tls(t).err().map(|e| switchyard_config::FieldError {
                path: root.index(i).key("tls"),
                message: e.to_string(),
            })
        })
        .collect();
    if let Some(path) = &config.sticky_key_file {
        if let Err(message) = crate::routing::sticky::StickyKey::from_file(path) {
            problems.push(switchyard_config::FieldError {
                path: switchyard_config::FieldPath::root().key("sticky_key_file"),
                message,
            });
        }
    }
    problems
}
