//! TLS for listeners: certificates loaded with errors instead of panics, and Pingora's TLS
//! settings built from them.

use super::ListenError;
use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use std::sync::Arc;
use switchyard_config::{CertPair, Config, TlsConfig};

/// Load a certificate chain and key into rustls' form, with errors instead of panics. The
/// key must belong to the certificate.
fn load_cert(t: &CertPair) -> Result<Arc<pingora::tls::sign::CertifiedKey>, ListenError> {
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

/// A listener's certificates, each with the DNS names it holds (lower case; `*.x` wildcards).
#[derive(Debug)]
struct CertSet {
    certs: Vec<(Vec<String>, Arc<pingora::tls::sign::CertifiedKey>)>,
}

impl CertSet {
    fn load(t: &TlsConfig) -> Result<CertSet, ListenError> {
        let mut certs = Vec::with_capacity(t.certs.len());
        for pair in &t.certs {
            let ck = load_cert(pair)?;
            let names = ck
                .cert
                .first()
                .and_then(|leaf| webpki::EndEntityCert::try_from(leaf).ok())
                .map(|ee| {
                    ee.valid_dns_names()
                        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                        .collect()
                })
                .unwrap_or_default();
            certs.push((names, ck));
        }
        Ok(CertSet { certs })
    }

    /// The certificate for `sni`: the first holding it exactly, else the first whose `*.`
    /// wildcard covers it (one label, as nginx prefers exact names), else the first.
    fn pick(&self, sni: Option<&str>) -> Option<Arc<pingora::tls::sign::CertifiedKey>> {
        if let Some(sni) = sni {
            let sni = sni.trim_end_matches('.').to_ascii_lowercase();
            let exact = self.certs.iter().find(|(names, _)| names.contains(&sni));
            let wildcard = || {
                self.certs.iter().find(|(names, _)| {
                    names.iter().any(|n| {
                        n.strip_prefix("*.").is_some_and(|rest| {
                            sni.split_once('.')
                                .is_some_and(|(label, tail)| !label.is_empty() && tail == rest)
                        })
                    })
                })
            };
            if let Some((_, ck)) = exact.or_else(wildcard) {
                return Some(ck.clone());
            }
        }
        self.certs.first().map(|(_, ck)| ck.clone())
    }
}

/// Certificates loaded by a reload, not serving yet.
#[derive(Debug)]
pub(crate) struct PreparedCerts(Arc<CertSet>);

/// Serves a listener's certificates by SNI (the resolver route also lets Pingora's TLS
/// settings be built without it re-reading — and panicking on — the PEM files). A reload swaps
/// the set: new handshakes get the new certificates, established connections go on.
#[derive(Debug)]
pub(crate) struct CertResolver(ArcSwap<CertSet>);

impl CertResolver {
    /// Load the files anew (renewed certificates at the same paths, or other files), to be
    /// [`Self::install`]ed once every listener's loaded.
    pub(crate) fn prepare(t: &TlsConfig) -> Result<PreparedCerts, ListenError> {
        CertSet::load(t).map(|s| PreparedCerts(Arc::new(s)))
    }

    /// Serve these from the next handshake on; established connections go on as they are.
    pub(crate) fn install(&self, p: PreparedCerts) {
        self.0.store(p.0);
    }

    /// Load without installing.
    pub(crate) fn check(t: &TlsConfig) -> Result<(), ListenError> {
        CertSet::load(t).map(|_| ())
    }
}

impl pingora::tls::ResolvesServerCert for CertResolver {
    fn resolve(
        &self,
        hello: pingora::tls::ClientHello<'_>,
    ) -> Option<Arc<pingora::tls::sign::CertifiedKey>> {
        self.0.load().pick(hello.server_name())
    }
}

/// Pingora TLS settings for a listener and its certificate resolver, or a start error.
pub(crate) fn tls_settings(
    t: &TlsConfig,
    http2: bool,
) -> Result<(TlsSettings, Arc<CertResolver>), ListenError> {
    let resolver = Arc::new(CertResolver(ArcSwap::from_pointee(CertSet::load(t)?)));
    let first = &t.certs[0];
    let mut s = TlsSettings::intermediate("", "").map_err(|e| ListenError::Tls {
        cert: first.cert.clone(),
        key: first.key.clone(),
        why: e.to_string(),
    })?;
    s.set_cert_resolver(resolver.clone());
    if http2 {
        s.enable_h2();
    }
    Ok((s, resolver))
}

/// Check a TLS listener's files (for `switchyard check` and reloads).
pub(crate) fn check_tls(t: &TlsConfig) -> Result<(), ListenError> {
    CertResolver::check(t)
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
