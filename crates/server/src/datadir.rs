//! The data directory: created owner-only (0700), its files owner-only
//! (0600), and refused at start-up when group or others may write to it,
//! since whoever can write there can replace the store, the signing key or
//! a recording.

use std::path::Path;

use anyhow::{Context, bail};

/// Creates `dir` (0700) when missing; refuses one that group or others can
/// write to. Makes the store file owner-only before the store opens it:
/// SQLite gives its journal files the same mode.
pub fn prepare(dir: &Path, store_file: Option<&Path>) -> anyhow::Result<()> {
    create_private_dir(dir).with_context(|| format!("cannot create data_dir {}", dir.display()))?;
    check_not_shared(dir)?;
    if let Some(store_file) = store_file {
        create_private_file(store_file)
            .with_context(|| format!("cannot create {}", store_file.display()))?;
    }
    Ok(())
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    // An older store file keeps its mode on open: tighten it.
    let mode = f.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn create_private_file(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn check_not_shared(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read data_dir {}", dir.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o022 != 0 {
        bail!(
            "data_dir {} can be written by {} (mode {mode:o}): anyone who can write there can replace the store, the signing key or a recording; run `chmod go-w {}` (or `chmod 700`) and start again",
            dir.display(),
            if mode & 0o002 != 0 {
                "anyone"
            } else {
                "its group"
            },
            dir.display()
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_not_shared(_dir: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn created_private_and_shared_ones_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/data");
        let db = dir.join("breakglass.db");
        prepare(&dir, Some(&db)).expect("fresh");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&db), 0o600);
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        prepare(&dir, Some(&db)).expect("again");
        assert_eq!(mode(&db), 0o600, "an old store file is tightened");
        for (m, who) in [(0o770, "its group"), (0o757, "anyone")] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).expect("chmod");
            let e = prepare(&dir, Some(&db)).expect_err("shared").to_string();
            assert!(e.contains(&dir.display().to_string()), "{e}");
            assert!(e.contains(who), "{e}");
            assert!(e.contains("chmod go-w"), "{e}");
        }
    }
}
