//! Peer authentication: a mutual challenge-response over a secret both umemds were given for
//! the migration, run at the start of every connection (the main stream, the urgent channel,
//! every connection a recovery opens) before anything else is read.
//!
//! ```text
//! source                                            destination
//!   AuthHello { method, nonce_s }          ->
//!                                          <-   AuthChallenge { nonce_d, proof_d }
//!   AuthProof { proof_s }                  ->
//! ```
//!
//! `proof_d = HMAC-SHA256(secret, "umem-auth-v1 destination" || nonce_s || nonce_d)` and
//! `proof_s` the same with the source's label. Each side checks the other's proof over both
//! fresh nonces, so a recorded exchange replayed later fails (the other side's nonce is new),
//! and the two labels differ, so a destination's proof reflected back is no source proof.
//! Without a secret (`AuthMethod::None`) the source sends only its `AuthHello`; a destination
//! that has a secret refuses it. This proves who is at the other end when the connection
//! opens; what flows afterwards is protected only by TLS.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (an HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Shortest secret accepted: 128 bits, as from `head -c 16 /dev/urandom`.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest secret accepted.
pub const MAX_SECRET_LEN: usize = 1024;

/// How a connection is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No secret: anybody who reaches the destination's address may be the source.
    None,
    /// HMAC-SHA256 challenge-response over a shared secret.
    HmacSha256,
}

impl AuthMethod {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            AuthMethod::None => 0,
            AuthMethod::HmacSha256 => 1,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Result<Self, crate::DecodeError> {
        match v {
            0 => Ok(AuthMethod::None),
            1 => Ok(AuthMethod::HmacSha256),
            other => Err(crate::DecodeError::invalid(
                "auth method",
                format!("unknown method {other}"),
            )),
        }
    }
}

/// Which side computes a proof; each has its own label, so one side's proof is never the
/// other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that sends the VM.
    Source,
    /// The side that receives it.
    Destination,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Source => b"umem-auth-v1 source",
            Role::Destination => b"umem-auth-v1 destination",
        }
    }
}

/// A migration's shared secret. Its bytes never appear in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why a secret is not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// Too short to resist guessing.
    #[error("a secret needs at least {MIN_SECRET_LEN} bytes, got {0} (make one with `head -c 32 /dev/urandom | base64`)")]
    TooShort(usize),
    /// Longer than the local protocol carries.
    #[error("a secret has at most {MAX_SECRET_LEN} bytes, got {0}")]
    TooLong(usize),
    /// The secret file cannot be read.
    #[error("reading secret file {path}: {err}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        err: String,
    },
    /// The secret file can be read by others than its owner.
    #[error("secret file {path} is readable by group or others (mode {mode:o}): chmod 600 {path}")]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

impl Secret {
    /// Takes `bytes` as a secret if its length is within bounds.
    pub fn new(bytes: Vec<u8>) -> Result<Self, SecretError> {
        match bytes.len() {
            n if n < MIN_SECRET_LEN => Err(SecretError::TooShort(n)),
            n if n > MAX_SECRET_LEN => Err(SecretError::TooLong(n)),
            _ => Ok(Secret(bytes)),
        }
    }

    /// Reads a secret from a file only its owner can read; trailing white space (a final
    /// newline) is not part of it.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SecretError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let read_err = |err: std::io::Error| SecretError::Read {
            path: shown.clone(),
            err: err.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::Exposed { path: shown, mode });
        }
        let mut bytes = std::fs::read(path).map_err(read_err)?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        Secret::new(bytes)
    }

    /// The secret's bytes, for the local protocol.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// `role`'s proof over the two nonces.
    pub fn proof(
        &self,
        role: Role,
        source_nonce: &[u8; NONCE_LEN],
        dest_nonce: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(role, source_nonce, dest_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is `role`'s proof over the two nonces, compared in constant time.
    pub fn verify(
        &self,
        role: Role,
        source_nonce: &[u8; NONCE_LEN],
        dest_nonce: &[u8; NONCE_LEN],
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.mac(role, source_nonce, dest_nonce)
            .verify_slice(proof)
            .is_ok()
    }

    fn mac(
        &self,
        role: Role,
        source_nonce: &[u8; NONCE_LEN],
        dest_nonce: &[u8; NONCE_LEN],
    ) -> Hmac<Sha256> {
        // HMAC takes a key of any length; `Secret::new` bounds it anyway.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        mac.update(role.label());
        mac.update(source_nonce);
        mac.update(dest_nonce);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn proofs_bind_the_role_the_nonces_and_the_secret() {
        let k = secret("0123456789abcdef-secret");
        let (ns, nd) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let p = k.proof(Role::Destination, &ns, &nd);
        assert!(k.verify(Role::Destination, &ns, &nd, &p));
        // Reflected: a destination's proof is no source proof.
        assert!(!k.verify(Role::Source, &ns, &nd, &p));
        // Replayed with another fresh nonce.
        assert!(!k.verify(Role::Destination, &ns, &[3u8; NONCE_LEN], &p));
        assert!(!k.verify(Role::Destination, &[3u8; NONCE_LEN], &nd, &p));
        // Another secret.
        assert!(!secret("0123456789abcdef-other!").verify(Role::Destination, &ns, &nd, &p));
    }

    #[test]
    fn known_answer() {
        // HMAC-SHA256(key = 16 x 0x0b, "umem-auth-v1 source" || 32 x 0x00 || 32 x 0xff), from
        // Python's hmac module, so that another implementation can check itself against it.
        let k = Secret::new(vec![0x0b; 16]).unwrap();
        let p = k.proof(Role::Source, &[0; NONCE_LEN], &[0xff; NONCE_LEN]);
        let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, KNOWN_SOURCE_PROOF);
    }

    const KNOWN_SOURCE_PROOF: &str =
        "983ea099a808cf89ec8aff5ae2930671e674b872cb096eaf3db167b0d674e7a1";

    #[test]
    fn secrets_are_bounded_and_never_shown() {
        assert_eq!(
            Secret::new(vec![1; 15]).unwrap_err(),
            SecretError::TooShort(15)
        );
        assert!(Secret::new(vec![1; MAX_SECRET_LEN + 1]).is_err());
        let k = secret("a-very-secret-value-123");
        assert!(!format!("{k:?}").contains("secret-value"));
    }

    #[test]
    fn secret_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("umem-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("key");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            Secret::from_file(&f).unwrap().as_bytes(),
            b"0123456789abcdef0123"
        );
        assert!(Secret::from_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
