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

/// The file in `data_dir` that a serving process holds locked.
pub const LOCK_FILE: &str = "serve.lock";

/// Takes `dir` for this process: an exclusive lock on [`LOCK_FILE`], held
/// until the returned file is dropped or the process ends, however it
/// ends (the kernel drops the lock of a killed process). Two servers on
/// one data dir would write one store, each with its own idea of the
/// audit chain's head and of the requests it just wrote, and the same
/// recordings directory. `what` (`serve`, `store copy`) names the taker:
/// the file holds its pid and `what`, so that a refusal names the holder.
pub fn lock(dir: &Path, what: &str) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let mut open = std::fs::OpenOptions::new();
    open.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    let mut f = open
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            // "PID WHAT", as the holder wrote it below.
            let mut held_by = String::new();
            let _ = (&f).take(64).read_to_string(&mut held_by);
            let held_by = held_by.trim();
            let (pid, holder) = held_by.split_once(' ').unwrap_or((held_by, ""));
            let pid = pid.parse::<u32>().ok();
            // Only a name this function writes; anything else on disk is
            // not repeated to the user.
            let holder = Some(holder)
                .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_lowercase() || c == ' '))
                .unwrap_or("serve");
            let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            bail!(
                "{what}: {} is held by a running `breakglass {holder}`{pid}: one process at a time may use a data_dir (stop it first, or give each node its own data_dir)",
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{} {what}", std::process::id())?;
    Ok(f)
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
    fn one_holder_at_a_time_and_the_next_is_told_who() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let held = lock(tmp.path(), "serve").expect("first");
        let err = lock(tmp.path(), "store copy")
            .expect_err("second")
            .to_string();
        assert!(err.starts_with("store copy: "), "{err}");
        assert!(
            err.contains(&format!(
                "held by a running `breakglass serve` (pid {})",
                std::process::id()
            )),
            "{err}"
        );
        assert!(err.contains("one process at a time"), "{err}");
        assert_eq!(mode(&tmp.path().join(LOCK_FILE)), 0o600);
        drop(held);
        // The holder is named, whoever it is.
        let copying = lock(tmp.path(), "store copy").expect("free again once dropped");
        let err = lock(tmp.path(), "serve").expect_err("held").to_string();
        assert!(
            err.starts_with("serve: ") && err.contains("`breakglass store copy` (pid "),
            "{err}"
        );
        drop(copying);
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
