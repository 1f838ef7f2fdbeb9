//! The credentials file: tokens from `breakglass login`, kept per server in
//! `$XDG_CONFIG_HOME/breakglass/credentials.json` (else
//! `~/.config/breakglass/credentials.json`).
//!
//! The file is written atomically (a new file, mode 0600, renamed over the
//! old one) in a directory of mode 0700, and refused when group or others
//! may read it. Entries are keyed by the server's base URL, so logins to two
//! servers never mix. Tokens never appear in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exit::{Exit, Failure};

/// The most bytes of a credentials file read.
pub const FILE_BYTES_MAX: u64 = 1024 * 1024;
/// The file format's version.
const VERSION: u32 = 1;

/// How an entry's tokens were obtained, which says how to renew them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `breakglass login` (device or browser flow): renewed with the
    /// refresh token.
    Oidc,
    /// `breakglass login --github-actions`: fetched again by the job.
    GithubActions,
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The login for one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub source: Source,
    /// The issuer the tokens come from.
    pub issuer: String,
    /// The client id they were issued to (empty for GitHub Actions).
    #[serde(default)]
    pub client_id: String,
    /// Sent to the server as `Authorization: Bearer`.
    pub id_token: Secret,
    #[serde(default)]
    pub refresh_token: Option<Secret>,
    /// The ID token's `exp`, Unix seconds.
    pub expires_at: i64,
    /// The person or workload, as the token names it (for `logout`).
    #[serde(default)]
    pub subject: String,
}

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FileDoc {
    version: u32,
    #[serde(default)]
    servers: BTreeMap<String, Entry>,
}

/// The credentials file at one path.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

fn fail(message: String) -> Failure {
    Failure::new(Exit::Error, "credentials_file", message)
}

impl Store {
    /// The file named by the environment: `$XDG_CONFIG_HOME` (when set
    /// and absolute), else `$HOME/.config`.
    pub fn from_env() -> Result<Store, Failure> {
        let base = match std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from) {
            Some(dir) if dir.is_absolute() => dir,
            _ => {
                let home = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| {
                        fail(
                            "cannot find the credentials file: neither XDG_CONFIG_HOME nor HOME is set"
                                .to_string(),
                        )
                    })?;
                PathBuf::from(home).join(".config")
            }
        };
        Ok(Store {
            path: base.join("breakglass").join("credentials.json"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file; an absent file is an empty one. Refused when it is
    /// not a regular file or when group or others may read or write it.
    fn read(&self) -> Result<FileDoc, Failure> {
        let shown = self.path.display();
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileDoc::default()),
            Err(e) => return Err(fail(format!("cannot read {shown}: {e}"))),
        };
        if !meta.file_type().is_file() {
            return Err(fail(format!(
                "{shown} is not a regular file (a symlink or a directory); remove it and run `breakglass login`"
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(fail(format!(
                "refusing {shown}: its mode is {mode:04o}, so other users may read your tokens; \
                 run `chmod 600 {shown}` (and consider `breakglass logout` and a new login)"
            )));
        }
        let mut text = String::new();
        std::fs::File::open(&self.path)
            .and_then(|f| f.take(FILE_BYTES_MAX + 1).read_to_string(&mut text))
            .map_err(|e| fail(format!("cannot read {shown}: {e}")))?;
        if text.len() as u64 > FILE_BYTES_MAX {
            return Err(fail(format!(
                "{shown} is larger than {FILE_BYTES_MAX} bytes; remove it and run `breakglass login`"
            )));
        }
        let doc: FileDoc = serde_json::from_str(&text).map_err(|e| {
            fail(format!(
                "{shown} is not a credentials file ({e}); remove it and run `breakglass login`"
            ))
        })?;
        if doc.version != VERSION {
            return Err(fail(format!(
                "{shown} has version {}, this breakglass reads version {VERSION}",
                doc.version
            )));
        }
        Ok(doc)
    }

    /// Writes the whole file: a new file of mode 0600 in the same
    /// directory (0700, created if missing), synced, then renamed over the
    /// old one, so a reader sees the old or the new file, never half.
    fn write(&self, doc: &FileDoc) -> Result<(), Failure> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let shown = dir.display();
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create {shown}: {e}")))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(format!("cannot make {shown} private (mode 0700): {e}")))?;
        let tmp = dir.join(format!(".credentials.json.{}.tmp", std::process::id()));
        let text = serde_json::to_vec_pretty(doc)
            .map_err(|e| fail(format!("cannot encode the credentials: {e}")))?;
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(format!("cannot write {}: {e}", self.path.display())));
        }
        Ok(())
    }

    /// The entry for `server` (a normalized base URL).
    pub fn get(&self, server: &str) -> Result<Option<Entry>, Failure> {
        Ok(self.read()?.servers.get(server).cloned())
    }

    /// Stores (or replaces) the entry for `server`.
    pub fn put(&self, server: &str, entry: Entry) -> Result<(), Failure> {
        let mut doc = self.read()?;
        doc.version = VERSION;
        doc.servers.insert(server.to_string(), entry);
        self.write(&doc)
    }

    /// Removes the entry for `server`; returns it, if there was one.
    pub fn remove(&self, server: &str) -> Result<Option<Entry>, Failure> {
        let mut doc = self.read()?;
        let removed = doc.servers.remove(server);
        if removed.is_some() {
            doc.version = VERSION;
            self.write(&doc)?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(token: &str) -> Entry {
        Entry {
            source: Source::Oidc,
            issuer: "https://idp.example.com".into(),
            client_id: "cli".into(),
            id_token: Secret(token.into()),
            refresh_token: Some(Secret("r".into())),
            expires_at: 1,
            subject: "alice".into(),
        }
    }

    #[test]
    fn entries_are_kept_per_server_in_a_private_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store {
            path: dir.path().join("breakglass").join("credentials.json"),
        };
        assert_eq!(store.get("https://a").expect("empty"), None);
        store.put("https://a", entry("ta")).expect("put a");
        store.put("https://b", entry("tb")).expect("put b");
        assert_eq!(
            store.get("https://a").expect("get").map(|e| e.id_token.0),
            Some("ta".to_string())
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(store.path()), 0o600);
        assert_eq!(mode(store.path().parent().expect("dir")), 0o700);
        assert!(store.remove("https://a").expect("remove").is_some());
        assert!(store.remove("https://a").expect("remove again").is_none());
        assert!(store.get("https://b").expect("b stays").is_some());
        assert!(!format!("{:?}", entry("s3cret")).contains("s3cret"));

        std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let e = store.get("https://b").expect_err("readable by others");
        assert!(e.message.contains("chmod 600"), "{}", e.message);
    }
}
