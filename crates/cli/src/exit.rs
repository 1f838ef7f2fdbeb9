//! Exit codes (DESIGN §7, contract) and the errors that choose one.
//!
//! Scripts tell *refused* from *failed* by the exit code alone, so every error
//! path ends in exactly one [`Exit`]: API errors carry the HTTP status they came
//! from, local failures say which code they mean.

use std::fmt;
use std::process::ExitCode;

/// The process exit codes of every `breakglass` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Success,
    /// 1: error: bad input from the server's view, I/O, server unreachable,
    /// internal.
    Error,
    /// 2: usage: a bad flag or value (clap uses 2 for its own errors too).
    Usage,
    /// 3: refused by policy or authorization (HTTP 401 and 403).
    Refused,
    /// 4: `--wait` ran out of time before the request was decided.
    WaitTimeout,
    /// `connect -- CMD` on an SSH target: the remote command's own status.
    Child(u8),
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Error => 1,
            Exit::Usage => 2,
            Exit::Refused => 3,
            Exit::WaitTimeout => 4,
            Exit::Child(c) => c,
        }
    }

    /// The exit code for an HTTP error status from the server. 401 (no or bad
    /// token) and 403 (policy or authorization said no, including
    /// self-approval) are refusals; everything else the server rejects or
    /// fails at is an error.
    pub fn for_status(status: u16) -> Exit {
        match status {
            200..=299 => Exit::Success,
            401 | 403 => Exit::Refused,
            _ => Exit::Error,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

/// A local failure that knows its exit code and its stable short code, printed
/// as `error: <message> (<code>)`.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub code: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            exit,
            code,
            message: message.into(),
        }
    }

    pub fn usage(code: &'static str, message: impl Into<String>) -> Self {
        Failure::new(Exit::Usage, code, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_to_exit_code() {
        let table = [
            (200, 0),
            (201, 0),
            (204, 0),
            (400, 1),
            (401, 3),
            (403, 3),
            (404, 1),
            (409, 1),
            (422, 1),
            (429, 1),
            (500, 1),
            (502, 1),
            (503, 1),
            // A redirect is never expected from the API: an error, not success.
            (302, 1),
        ];
        for (status, code) in table {
            assert_eq!(Exit::for_status(status).code(), code, "status {status}");
        }
    }

    #[test]
    fn codes_are_the_contract() {
        assert_eq!(Exit::Success.code(), 0);
        assert_eq!(Exit::Error.code(), 1);
        assert_eq!(Exit::Usage.code(), 2);
        assert_eq!(Exit::Refused.code(), 3);
        assert_eq!(Exit::WaitTimeout.code(), 4);
    }
}
