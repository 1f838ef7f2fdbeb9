//! The audit signing key: an Ed25519 key created in `data_dir` on first
//! start (owner-only permissions), with its public half beside it so
//! verification needs no secret.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::rngs::OsRng;

const SECRET_FILE: &str = "audit-signing.key";
const PUBLIC_FILE: &str = "audit-signing.pub";

fn secret_path(dir: &Path) -> PathBuf {
    dir.join(SECRET_FILE)
}

fn public_path(dir: &Path) -> PathBuf {
    dir.join(PUBLIC_FILE)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn parse_hex32(text: &str, path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out)
        .with_context(|| format!("{}: expected 64 hex digits", path.display()))?;
    Ok(out)
}

/// Loads the signing key, creating it (and the data dir) on first start.
pub fn load_or_create(dir: &Path) -> anyhow::Result<SigningKey> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data_dir {}", dir.display()))?;
    let secret = secret_path(dir);
    let key = if secret.exists() {
        let text = std::fs::read_to_string(&secret)
            .with_context(|| format!("cannot read {}", secret.display()))?;
        SigningKey::from_bytes(&parse_hex32(&text, &secret)?)
    } else {
        let key = SigningKey::generate(&mut OsRng);
        write_new(&secret, &hex::encode(key.to_bytes()), 0o600)?;
        key
    };
    let public = public_path(dir);
    let expected = hex::encode(key.verifying_key().to_bytes());
    if public.exists() {
        let text = std::fs::read_to_string(&public)?;
        if text.trim() != expected {
            bail!(
                "{} does not match {}: the signing key was replaced; audit checkpoints would not verify",
                public.display(),
                secret.display()
            );
        }
    } else {
        write_new(&public, &format!("{expected}\n"), 0o600)?;
    }
    Ok(key)
}

/// Parses a public key as a node's `.pub` file holds it (64 hex digits).
pub fn parse_public(text: &str) -> Result<VerifyingKey, String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|_| {
        "expected 64 hex digits (the content of a node's audit-signing.pub)".to_string()
    })?;
    VerifyingKey::from_bytes(&out).map_err(|_| "not a valid Ed25519 public key".to_string())
}

/// Reads a trusted public key given on the command line: the key itself
/// (64 hex digits) or the path of a copy of a node's `.pub` file.
pub fn trusted_key_arg(arg: &str) -> anyhow::Result<VerifyingKey> {
    if let Ok(k) = parse_public(arg) {
        return Ok(k);
    }
    let path = Path::new(arg);
    let meta = std::fs::metadata(path).with_context(|| {
        format!("--key {arg:?}: neither 64 hex digits nor a readable public key file")
    })?;
    if meta.len() > 1024 {
        bail!("--key {}: not a public key file (too long)", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--key: cannot read {}", path.display()))?;
    parse_public(&text).map_err(|e| anyhow::anyhow!("--key {}: {e}", path.display()))
}

/// Loads the public key for offline verification.
pub fn load_public(dir: &Path) -> anyhow::Result<VerifyingKey> {
    let public = public_path(dir);
    let text = std::fs::read_to_string(&public)
        .with_context(|| format!("cannot read the audit public key {}", public.display()))?;
    VerifyingKey::from_bytes(&parse_hex32(&text, &public)?)
        .with_context(|| format!("{}: not a valid Ed25519 public key", public.display()))
}
