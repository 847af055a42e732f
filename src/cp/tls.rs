//! The one TLS setup of every connection to the control plane: the HTTP client (ureq) and
//! the control channel's `wss://` share the roots (Mozilla's, or CONTROL_PLANE_CA_FILE's
//! bundle instead), the crypto provider (ring) and the protocol versions (1.2 and 1.3).

use std::path::Path;
use std::sync::Arc;

/// The certificates an https control plane must chain to.
#[derive(Clone, Debug, Default)]
pub struct Roots {
    /// DER certificates of CONTROL_PLANE_CA_FILE; None: the built-in Mozilla roots.
    custom: Option<Arc<Vec<Vec<u8>>>>,
}

/// CONTROL_PLANE_CA_FILE cannot be used; the text names the file.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Roots {
    /// The built-in roots, or every certificate of the PEM bundle at `ca_file`.
    pub fn load(ca_file: Option<&Path>) -> Result<Roots, TlsError> {
        let Some(path) = ca_file else {
            return Ok(Roots::default());
        };
        let err =
            |why: String| TlsError(format!("CONTROL_PLANE_CA_FILE {}: {why}", path.display()));
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c.der().to_vec()),
                Ok(_) => {}
                Err(e) => return Err(err(e.to_string())),
            }
        }
        if certs.is_empty() {
            return Err(err("no PEM certificate in it".into()));
        }
        Ok(Roots {
            custom: Some(Arc::new(certs)),
        })
    }

    /// For the HTTP client.
    pub fn ureq(&self) -> ureq::tls::TlsConfig {
        let roots = match &self.custom {
            None => ureq::tls::RootCerts::WebPki,
            Some(certs) => certs
                .iter()
                .map(|d| ureq::tls::Certificate::from_der(d).to_owned())
                .into(),
        };
        ureq::tls::TlsConfig::builder().root_certs(roots).build()
    }

    /// For the control channel: what ureq builds from [`Roots::ureq`].
    pub fn rustls(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut store = rustls::RootCertStore::empty();
        match &self.custom {
            None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(certs) => {
                let ders = certs.iter().map(|d| d.clone().into());
                store.add_parsable_certificates(ders);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| TlsError(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_without_certificates_is_refused_by_name() {
        let dir = crate::sys::fake::temp_dir("tls-roots");
        let f = dir.join("ca.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let e = Roots::load(Some(&f)).unwrap_err().0;
        assert!(
            e.contains("CONTROL_PLANE_CA_FILE") && e.contains("ca.pem"),
            "{e}"
        );
        assert!(Roots::load(Some(&dir.join("missing.pem"))).is_err());
        assert!(Roots::load(None).unwrap().rustls().is_ok());
    }
}
