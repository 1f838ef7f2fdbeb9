//! What each frontend (client) message does to the session recording: the
//! one table ([`action`]) the relay consults for every client frame after
//! login.
//!
//! The rule it implements: reading the recording alone tells exactly what
//! the database was asked to run, with which text and which settings. Every
//! message that can make the database execute anything is recorded before
//! it is forwarded, or refused and never forwarded. Settings come in two
//! ways: the start-up packet (checked and recorded in the session header,
//! see `settings`) and statements. SQL-level `SET`, `set_config()`, `SET`
//! inside a function, `PREPARE`/`EXECUTE`/`DEALLOCATE` and
//! `DECLARE`/`FETCH`/`CLOSE` are statements, so their text is in the
//! recorded `query` or `parse` entries like any other; what a function does
//! inside is as visible as the function's own definition.
//!
//! | tag | message      | recording                                                                 |
//! |-----|--------------|---------------------------------------------------------------------------|
//! | `Q` | Query        | `query` entry (full text) before forwarding                               |
//! | `P` | Parse        | `parse` entry (name, full text, parameter types) before forwarding        |
//! | `B` | Bind         | nothing yet: the portal's statement and parameters go in its `execute`    |
//! | `E` | Execute      | `execute` entry (portal, statement, parameters, `parse` seq) before forwarding |
//! | `C` | Close        | `close` entry before forwarding                                           |
//! | `D` | Describe     | nothing: runs nothing                                                     |
//! | `S` | Sync         | nothing: ends a batch                                                     |
//! | `H` | Flush        | nothing: runs nothing                                                     |
//! | `d` | CopyData     | counted: data of the recorded `COPY ... FROM STDIN`                       |
//! | `c` | CopyDone     | `copy_end` entry (bytes and messages of data) before forwarding           |
//! | `f` | CopyFail     | `copy_end` entry (with the client's message) before forwarding            |
//! | `X` | Terminate    | nothing: the session ends                                                 |
//! | `F` | FunctionCall | refused (see [`Refusal::FunctionCall`])                                    |
//! | `p` | Password...  | refused: authentication is over                                           |
//! | any other       || refused                                                                   |
//!
//! Server answers confirm what the gateway tracks (the statement a name
//! stands for, the portal a name stands for): ParseComplete, BindComplete
//! and CloseComplete in order, an ErrorResponse discarding the rest of its
//! batch as the server does. `transcript::Tracker` holds that model.

/// What the relay does with a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Record a `query` entry with the text, then forward.
    Query,
    /// Record a `parse` entry with the name and text, then forward; the
    /// name stands for this entry once the server answers ParseComplete.
    Parse,
    /// Forward; the portal stands for the bound statement and parameters
    /// once the server answers BindComplete (recorded by its Execute).
    Bind,
    /// Record an `execute` entry pointing at the `parse` entry of the
    /// statement it runs, then forward.
    Execute,
    /// Record a `close` entry, then forward; the name is forgotten once the
    /// server answers CloseComplete.
    Close,
    /// Forward: asks for descriptions, runs nothing.
    Describe,
    /// Forward: ends an extended-protocol batch.
    Sync,
    /// Forward unrecorded: Flush runs nothing.
    Flush,
    /// Forward, counted: data of a COPY whose statement is recorded.
    CopyData,
    /// Record a `copy_end` entry, then forward.
    CopyEnd,
    /// Forward and end the session.
    Terminate,
    /// Never forwarded; the client gets an ErrorResponse.
    Refuse(Refusal),
}

/// Why a client message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Fastpath FunctionCall runs a function named only by its OID with
    /// binary arguments. Refused rather than recorded: the recording would
    /// show a number, not what ran (naming it needs a catalog lookup the
    /// gateway cannot make without a second connection), and every such
    /// function can be called with a recorded `SELECT` instead. libpq's
    /// large-object functions (`lo_import`, `lo_read`, `\lo_export`, ...)
    /// use fastpath; their SQL forms (`lo_from_bytea`, `lo_get`, `lo_put`,
    /// `lo_unlink`) work through the gateway.
    FunctionCall,
    /// A password, SASL or GSSAPI message after authentication.
    Authentication,
    /// A message type the protocol does not define for clients.
    Unknown,
}

impl Refusal {
    /// The SQLSTATE and message the client gets.
    pub fn error(self, tag: u8) -> (&'static str, String) {
        match self {
            Refusal::FunctionCall => (
                "0A000",
                "breakglass gateway: fastpath function calls are refused, since the recording could not show which function ran; call the function with SELECT instead (for large objects: lo_from_bytea, lo_get, lo_put, lo_unlink)".to_string(),
            ),
            Refusal::Authentication => (
                "08P01",
                "breakglass gateway: authentication messages are refused after login".to_string(),
            ),
            Refusal::Unknown => (
                "08P01",
                format!(
                    "breakglass gateway: unknown message type {:?} (byte {tag}) refused",
                    char::from(tag)
                ),
            ),
        }
    }
}

/// The table: what a client message after login does to the recording.
pub const fn action(tag: u8) -> Action {
    match tag {
        b'Q' => Action::Query,
        b'P' => Action::Parse,
        b'B' => Action::Bind,
        b'E' => Action::Execute,
        b'C' => Action::Close,
        b'D' => Action::Describe,
        b'S' => Action::Sync,
        b'H' => Action::Flush,
        b'd' => Action::CopyData,
        b'c' | b'f' => Action::CopyEnd,
        b'X' => Action::Terminate,
        b'F' => Action::Refuse(Refusal::FunctionCall),
        b'p' => Action::Refuse(Refusal::Authentication),
        _ => Action::Refuse(Refusal::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte has exactly one action, and only the protocol's client
    /// messages are forwarded.
    #[test]
    fn only_known_client_messages_pass() {
        let passing: Vec<u8> = (0..=255u8)
            .filter(|&t| !matches!(action(t), Action::Refuse(_)))
            .collect();
        assert_eq!(passing, b"BCDEHPQSXcdf".to_vec());
        assert_eq!(action(b'F'), Action::Refuse(Refusal::FunctionCall));
    }
}
