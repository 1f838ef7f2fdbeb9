//! The gateway's own keys (its host key, the user CA it signs upstream
//! certificates with, the client CA that signs `connect`'s certificates)
//! and the certificates.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use breakglass_core::Timestamp;
use rand::RngCore;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{HashAlg, LineEnding};
pub use russh::keys::{Algorithm, Certificate, PrivateKey, PublicKey};

use crate::SshError;

/// Key files are at most this long (an OpenSSH ed25519 or ECDSA private key
/// is well under 1 KiB; RSA keys are not used).
pub const KEY_FILE_LEN_MAX: u64 = 16 * 1024;

/// A session certificate's key id is at most this long.
pub const KEY_ID_LEN_MAX: usize = 512;

/// A new ed25519 key from the operating system's random source.
pub fn random_ed25519() -> PrivateKey {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    key
}

/// Reads an OpenSSH private key file, refused when group or others may
/// read it (as OpenSSH refuses).
pub fn read_private_key(path: &Path) -> Result<PrivateKey, SshError> {
    let bad = |reason: String| SshError::Key {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > KEY_FILE_LEN_MAX {
        return Err(bad(format!("longer than {KEY_FILE_LEN_MAX} bytes")));
    }
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(
                "group or others may read it; make it mode 0600".to_string()
            ));
        }
    }
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let key = PrivateKey::from_openssh(&text).map_err(|e| bad(e.to_string()))?;
    if key.is_encrypted() {
        return Err(bad(
            "the key is encrypted; breakglass needs it unencrypted".into()
        ));
    }
    Ok(key)
}

/// Writes `key` to a new file at `path` (OpenSSH format, mode 0600 from
/// the start, synced); an existing file is an error.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), String> {
    let text = key.to_openssh(LineEnding::LF).map_err(|e| e.to_string())?;
    // INVARIANT: the private key is never readable by anyone else, not
    // even for a moment (created 0600, never chmod-ed after).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| e.to_string())?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| e.to_string())
}

/// Reads the key at `path`, or creates a new ed25519 key there (mode 0600)
/// when there is none. Returns the key and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(PrivateKey, bool), SshError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok((read_private_key(path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bad = |reason: String| SshError::Key {
                path: path.display().to_string(),
                reason,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
            }
            let key = random_ed25519();
            write_private_key(path, &key).map_err(bad)?;
            Ok((key, true))
        }
        Err(e) => Err(SshError::Key {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// `SHA256:...`, as `ssh-keygen -l` and the ssh client show it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Parses a pinned host key (`ssh-ed25519 AAAA...`, optionally with a
/// comment).
pub fn parse_public_key(text: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(text.trim()).map_err(|e| format!("not an OpenSSH public key: {e}"))
}

/// What a session certificate says.
#[derive(Debug, Clone)]
pub struct CertRequest<'a> {
    /// The login user on the target (the certificate's only principal).
    pub user: &'a str,
    /// `breakglass:<principal>:<request id>:<session id>`; sshd logs it.
    pub key_id: String,
    pub valid_after: Timestamp,
    /// The grant's `expires_at`.
    pub valid_before: Timestamp,
    /// Allow a PTY, as a shell needs.
    pub pty: bool,
    /// Allow port forwarding (a role with `port_forwarding = true`).
    pub port_forwarding: bool,
    /// A client certificate: the SHA-256 of the grant credential it
    /// stands for, in the [`CREDENTIAL_EXTENSION`] extension.
    pub credential: Option<[u8; 32]>,
}

/// The extension of a client certificate that names the grant credential
/// (its SHA-256, hex) the certificate stands for.
pub const CREDENTIAL_EXTENSION: &str = "credential@breakglass";

/// Checks a client certificate offered to the gateway for `target` (the
/// SSH user name) at `now` (Unix seconds): signed by the client CA whose
/// fingerprint is `ca`, within its validity, a user certificate for
/// `target`, no critical option; returns the credential hash it names.
/// The client's possession of the certified key was verified by russh.
pub fn check_client_certificate(
    cert: &Certificate,
    target: &str,
    ca: &russh::keys::ssh_key::Fingerprint,
    now: u64,
) -> Result<[u8; 32], &'static str> {
    cert.validate_at(now, [ca])
        .map_err(|_| "not signed by this service's client CA, or outside its validity")?;
    if cert.cert_type() != CertType::User {
        return Err("not a user certificate");
    }
    if !cert.valid_principals().iter().any(|p| p == target) {
        return Err("not a certificate for this target");
    }
    if !cert.critical_options().is_empty() {
        return Err("critical options this gateway does not know");
    }
    let hex_hash = cert
        .extensions()
        .get(CREDENTIAL_EXTENSION)
        .ok_or("names no grant credential")?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut hash).map_err(|_| "names no grant credential")?;
    Ok(hash)
}

/// Signs a user certificate for `subject` with the CA key.
pub fn sign_user_certificate(
    ca: &PrivateKey,
    subject: &PublicKey,
    req: &CertRequest<'_>,
) -> Result<Certificate, SshError> {
    let bad = |e: &dyn std::fmt::Display| SshError::Certificate(e.to_string());
    if req.key_id.len() > KEY_ID_LEN_MAX {
        return Err(SshError::Certificate(format!(
            "key id longer than {KEY_ID_LEN_MAX} bytes"
        )));
    }
    let secs = |t: Timestamp| u64::try_from(t.millis().div_euclid(1000)).unwrap_or(0);
    // A minute of slack before now for clocks a little behind; none after
    // the grant's end.
    let after = secs(req.valid_after).saturating_sub(60);
    let before = secs(req.valid_before);
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut b = Builder::new(nonce.to_vec(), subject.key_data().clone(), after, before)
        .map_err(|e| bad(&e))?;
    b.serial(rand::rngs::OsRng.next_u64())
        .map_err(|e| bad(&e))?;
    b.cert_type(CertType::User).map_err(|e| bad(&e))?;
    b.key_id(req.key_id.clone()).map_err(|e| bad(&e))?;
    b.valid_principal(req.user).map_err(|e| bad(&e))?;
    if req.pty {
        b.extension("permit-pty", "").map_err(|e| bad(&e))?;
    }
    if req.port_forwarding {
        b.extension("permit-port-forwarding", "")
            .map_err(|e| bad(&e))?;
    }
    if let Some(hash) = req.credential {
        b.extension(CREDENTIAL_EXTENSION, hex::encode(hash))
            .map_err(|e| bad(&e))?;
    }
    b.sign(ca).map_err(|e| bad(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_keys_are_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("bg-sshkeys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("host_key");
        let (k1, created) = load_or_create(&path).expect("create");
        assert!(created);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (k2, created) = load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(k1.public_key(), k2.public_key());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create(&path).expect_err("readable by others");
        assert!(err.to_string().contains("mode 0600"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn session_certificates_name_the_user_and_end_with_the_grant() {
        let ca = random_ed25519();
        let subject = random_ed25519();
        let cert = sign_user_certificate(
            &ca,
            subject.public_key(),
            &CertRequest {
                user: "deploy",
                key_id: "breakglass:alice:r1:s1".into(),
                valid_after: Timestamp::from_millis(1_700_000_000_000),
                valid_before: Timestamp::from_millis(1_700_000_900_500),
                pty: true,
                port_forwarding: false,
                credential: None,
            },
        )
        .expect("sign");
        assert_eq!(cert.valid_principals(), ["deploy".to_string()]);
        assert_eq!(cert.key_id(), "breakglass:alice:r1:s1");
        assert_eq!(cert.valid_before(), 1_700_000_900);
        assert_eq!(cert.valid_after(), 1_700_000_000 - 60);
        assert_eq!(cert.signature_key(), ca.public_key().key_data());
        let too_long = sign_user_certificate(
            &ca,
            subject.public_key(),
            &CertRequest {
                user: "deploy",
                key_id: "x".repeat(KEY_ID_LEN_MAX + 1),
                valid_after: Timestamp::from_millis(0),
                valid_before: Timestamp::from_millis(1000),
                pty: false,
                port_forwarding: false,
                credential: None,
            },
        );
        assert!(too_long.is_err());
    }
}
