//! `breakglass evidence ID` (the request's evidence bundle, from the
//! server, to stdout) and `breakglass evidence verify FILE --key PUBKEY`
//! (offline: the bundle and the trusted keys, nothing else).

use std::io::Read;
use std::path::Path;

use anyhow::Context as _;
use breakglass_server::evidence::{self, BUNDLE_LEN_MAX};

use crate::cmd::{Ctx, print_json, print_text, resolve_id};
use crate::exit::{Exit, Failure};

/// Prints the bundle of request `id` as one JSON document, exactly as the
/// server sent it.
pub fn fetch(ctx: &Ctx, id: &str) -> anyhow::Result<Exit> {
    let client = ctx.client()?;
    let id = resolve_id(&client, id)?;
    let bundle = client.evidence(&id)?;
    print_json(&bundle)?;
    Ok(Exit::Success)
}

/// Verifies a bundle file (`-` reads stdin) against the trusted keys.
pub fn verify(ctx: &Ctx, file: &Path, keys: &[String]) -> anyhow::Result<Exit> {
    if keys.is_empty() {
        return Err(Failure::usage(
            "bad_arguments",
            "give the trusted public key with --key (64 hex digits or a copy of audit-signing.pub)",
        )
        .into());
    }
    let trusted = keys
        .iter()
        .map(|k| breakglass_server::keys::trusted_key_arg(k))
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(|e| Failure::usage("bad_arguments", e.to_string()))?;
    let mut bytes = Vec::new();
    let read = if file == Path::new("-") {
        std::io::stdin()
            .take(BUNDLE_LEN_MAX + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("cannot open {}", file.display()))?
            .take(BUNDLE_LEN_MAX + 1)
            .read_to_end(&mut bytes)
    };
    read.with_context(|| format!("cannot read {}", file.display()))?;
    let report = evidence::verify(&bytes, &trusted);
    if ctx.json() {
        print_json(&report)?;
    } else {
        print_text(&evidence::render(&report))?;
    }
    if report.ok {
        return Ok(Exit::Success);
    }
    let first = report
        .findings
        .first()
        .map(|f| f.to_string())
        .unwrap_or_default();
    Err(Failure::new(
        Exit::Error,
        "evidence_invalid",
        format!("the evidence bundle does not verify: {first}"),
    )
    .into())
}
