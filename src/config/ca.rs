//! Reading `upstream.ca_file`: the PEM certificates of a private CA, each
//! parsed as an X.509 trust anchor, so that a file the TLS setup could not
//! use is refused with the config, naming the key.

use std::fmt;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

/// The trust anchors of `upstream.ca_file`. A missing or unreadable file,
/// one with no PEM certificate in it, or one holding a certificate that does
/// not parse, is an error naming the key.
pub(crate) fn read_ca_file(path: &Path) -> Result<Vec<TrustAnchor<'static>>, String> {
    let problem = |e: &dyn fmt::Display| format!("upstream.ca_file: {}: {e}", path.display());
    let bytes = std::fs::read(path).map_err(|e| problem(&e))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| problem(&e))?;
    if certs.is_empty() {
        return Err(problem(&"no PEM certificate in it"));
    }
    // rustls's root store parses each certificate as webpki will use it.
    let mut store = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        store.add(cert).map_err(|e| {
            let why = match e {
                // Without rustls's "invalid peer certificate": no peer here.
                rustls::Error::InvalidCertificate(e) => e.to_string(),
                e => e.to_string(),
            };
            problem(&format_args!(
                "certificate {} in it does not parse as an X.509 certificate ({why})",
                i + 1
            ))
        })?;
    }
    Ok(store.roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{no_env, tenant};
    use crate::config::Config;

    /// A directory of its own under the temp dir, removed on drop.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new() -> Dir {
            let dir = std::env::temp_dir().join(format!("sluice-ca-{:x}", rand::random::<u64>()));
            std::fs::create_dir_all(&dir).expect("dir");
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn refused(path: &Path) -> String {
        let text = format!(
            "[upstream]\nca_file = \"{}\"\n{}",
            path.display(),
            tenant("")
        );
        Config::parse(&text, no_env)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = Dir::new();
        let missing = dir.0.join("missing.pem");
        let empty = dir.0.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        for path in [&missing, &empty] {
            let err = refused(path);
            assert!(err.contains("upstream.ca_file"), "{err}");
        }
        // Relative to the config file's directory.
        let file = dir.0.join("s.toml");
        std::fs::write(
            &file,
            format!("[upstream]\nca_file = \"empty.pem\"\n{}", tenant("")),
        )
        .expect("write");
        let err = Config::load(&file, no_env)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("upstream.ca_file") && err.contains("empty.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_refused() {
        let dir = Dir::new();
        // A PEM block labelled CERTIFICATE whose contents are valid base64
        // but not DER of an X.509 certificate.
        let bogus =
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
        let path = dir.0.join("bogus.pem");
        std::fs::write(&path, bogus).expect("write");
        let err = read_ca_file(&path).expect_err("refused");
        assert!(
            err.starts_with("upstream.ca_file: ") && err.contains("bogus.pem"),
            "{err}"
        );
        assert!(err.contains("certificate 1 in it does not parse"), "{err}");
        assert!(refused(&path).contains("upstream.ca_file"));

        // One good certificate does not carry a bad one after it.
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .self_signed(&rcgen::KeyPair::generate().expect("key"))
            .expect("self-signed");
        let good = dir.0.join("good.pem");
        std::fs::write(&good, ca.pem()).expect("write");
        assert_eq!(read_ca_file(&good).expect("a real certificate").len(), 1);
        let mixed = dir.0.join("mixed.pem");
        std::fs::write(&mixed, format!("{}{bogus}", ca.pem())).expect("write");
        let err = read_ca_file(&mixed).expect_err("refused");
        assert!(err.contains("certificate 2 in it does not parse"), "{err}");
    }
}
