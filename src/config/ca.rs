//! Reading `upstream.ca_file`: the PEM certificates of a private CA that
//! an https upstream is trusted with, besides the public web roots.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The certificates of `upstream.ca_file`: a missing or unreadable file,
/// or one without a PEM certificate, is an error naming the key.
pub(crate) fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("upstream.ca_file: {}: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("upstream.ca_file: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "upstream.ca_file: {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{no_env, tenant};
    use crate::config::Config;

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("sluice-ca-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("missing.pem");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        for path in [&missing, &empty] {
            let text = format!(
                "[upstream]\nca_file = \"{}\"\n{}",
                path.display(),
                tenant("")
            );
            let err = Config::parse(&text, no_env)
                .expect_err("refused")
                .to_string();
            assert!(err.contains("upstream.ca_file"), "{err}");
        }
        // Relative to the config file's directory.
        let file = dir.join("s.toml");
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
