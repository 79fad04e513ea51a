//! TLS credentials for tests: a CA of the test's own and certificates signed by it, written as
//! umemd reads them (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`; keys `0600`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

fn write(path: &Path, text: &str, mode: u32) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Makes `dir` (which must not exist yet) a credentials directory: a new CA, a server
/// certificate for `host_names` (DNS names or IP addresses, as the source's `tcp:HOST:PORT`
/// names the destination) and a client certificate, both signed by that CA. Returns `dir`.
pub fn make_creds(dir: &Path, host_names: &[&str]) -> PathBuf {
    std::fs::create_dir(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("umem test CA {}", dir.display()),
    );
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca.self_signed(&ca_key).expect("CA certificate");
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("certificate parameters");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca, &ca_key).expect("signing");
        (cert.pem(), key.serialize_pem())
    };
    let names = host_names.iter().map(|h| h.to_string()).collect();
    let (server_cert, server_key) = leaf(names, ExtendedKeyUsagePurpose::ServerAuth, "umemd");
    let (client_cert, client_key) = leaf(
        vec!["umem-source".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        "umem source",
    );
    write(&dir.join("ca-cert.pem"), &ca.pem(), 0o644);
    write(&dir.join("server-cert.pem"), &server_cert, 0o644);
    write(&dir.join("server-key.pem"), &server_key, 0o600);
    write(&dir.join("client-cert.pem"), &client_cert, 0o644);
    write(&dir.join("client-key.pem"), &client_key, 0o600);
    dir.to_path_buf()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_five_files_are_written_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("umem-kit-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        super::make_creds(&dir, &["127.0.0.1", "localhost"]);
        for (f, mode) in [
            ("ca-cert.pem", 0o644),
            ("server-cert.pem", 0o644),
            ("server-key.pem", 0o600),
            ("client-cert.pem", 0o644),
            ("client-key.pem", 0o600),
        ] {
            let m = std::fs::metadata(dir.join(f)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, mode, "{f}");
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{f}: {text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
