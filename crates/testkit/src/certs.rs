//! A throwaway certificate authority for TLS tests, made with the real
//! `openssl` command (Debian package `openssl`, installed by the test
//! command).

use std::path::Path;
use std::process::{Command, Stdio};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (Debian package openssl) makes the test CA");
    assert!(status.success(), "openssl {args:?} failed");
}

/// Writes a test CA (`ca.pem`, `ca.key`) and a server certificate signed
/// by it (`srv.pem`, `srv.key`) into `dir`. `subject_alt_names` is what
/// the certificate names, as openssl writes it: `"DNS:localhost"` or
/// `"DNS:localhost,IP:127.0.0.1"`. P-256 keys, valid for one day.
pub fn make_test_ca(dir: &Path, subject_alt_names: &str) {
    const KEY: [&str; 5] = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(KEY);
    ca.extend([
        "-days",
        "1",
        "-subj",
        "/CN=breakglass test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(KEY);
    csr.extend([
        "-subj",
        "/CN=localhost",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "subjectAltName={subject_alt_names}\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .expect("write ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
}
