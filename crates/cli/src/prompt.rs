//! Questions asked on the terminal (only when stdin and stderr are one).

use std::io::{self, BufRead, IsTerminal, Read, Write};

/// The most characters of an answer read.
const ANSWER_LEN_MAX: u64 = 256;

/// Whether a person is there to answer: stdin and stderr are terminals.
pub fn interactive() -> bool {
    io::stdin().is_terminal() && io::stderr().is_terminal()
}

/// Asks for the current one-time code after the server said `why`.
pub fn otp_code(why: &str) -> io::Result<String> {
    let mut err = io::stderr().lock();
    writeln!(err, "{}", crate::render::clean(why))?;
    write!(err, "One-time code: ")?;
    err.flush()?;
    let mut line = String::new();
    io::stdin()
        .lock()
        .take(ANSWER_LEN_MAX)
        .read_line(&mut line)?;
    let code = line.trim().to_string();
    if code.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no code given"));
    }
    Ok(code)
}
