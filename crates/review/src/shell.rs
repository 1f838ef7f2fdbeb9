//! Shell command lines classified by what they run: a small POSIX-style
//! lexer (quotes, escapes, pipelines, lists, redirections, command and
//! process substitution) and the facts the built-in rules look for.
//!
//! This is not a shell: it does not expand variables or aliases. It reads a
//! line the way a person reviewing it would, so that `sudo`, `rm -rf`,
//! `curl ... | sh` and writes to `authorized_keys` are seen through quotes,
//! paths (`/bin/rm`), wrappers (`env`, `nohup`, `sudo -u x`) and
//! substitutions (`bash -c "$(curl ...)"`, `sh <(wget ...)`).

use crate::{Class, Classified, Tag};

/// A command line longer than this is classified by its first
/// `COMMAND_LEN_MAX` bytes (and the summary says it was cut).
pub const COMMAND_LEN_MAX: usize = 64 * 1024;
/// Substitutions nested deeper than this are not looked into.
const NESTING_MAX: usize = 8;
/// Words of one line at most; the rest is not looked at.
const WORDS_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A word after quote removal; `subs` are the command lines of its
    /// `$(...)`, backquote and `<(...)` substitutions.
    Word { text: String, subs: Vec<String> },
    /// `|`
    Pipe,
    /// `;`, `&`, `&&`, `||`, newline
    Separator,
    /// `>`, `>>`, `>|`, `&>` (with an optional fd before it).
    RedirectOut,
    /// `<`, `<<`, `<<<`
    RedirectIn,
}

/// Classifies one command line (as typed, or as an SSH `exec` request).
pub fn classify_command(line: &str) -> Classified {
    let line = cut(line, COMMAND_LEN_MAX);
    let mut tags = Vec::new();
    scan(line, 0, &mut tags);
    tags.sort();
    tags.dedup();
    Classified {
        class: Class::Command,
        tags,
        normalised: line.trim().to_string(),
    }
}

/// `s` cut at a character boundary at most `max` bytes in.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn scan(line: &str, depth: usize, tags: &mut Vec<Tag>) {
    if depth > NESTING_MAX {
        return;
    }
    let tokens = lex(line);
    // Pipelines: lists of simple commands joined by `|`.
    let mut pipeline: Vec<Vec<Token>> = vec![Vec::new()];
    for t in tokens {
        match t {
            Token::Pipe => pipeline.push(Vec::new()),
            Token::Separator => {
                pipeline_facts(&pipeline, depth, tags);
                pipeline = vec![Vec::new()];
            }
            t => {
                if let Some(last) = pipeline.last_mut() {
                    last.push(t);
                }
            }
        }
    }
    pipeline_facts(&pipeline, depth, tags);
}

/// What one command of a pipeline is, after wrappers are peeled off.
#[derive(Debug, Default)]
struct Simple {
    /// Basename of the program run (after `sudo`, `env`, ...).
    program: String,
    args: Vec<String>,
    /// Targets of output redirections.
    writes: Vec<String>,
    /// Command lines of substitutions anywhere in the command.
    subs: Vec<String>,
    elevated: bool,
}

fn simple(tokens: &[Token]) -> Simple {
    let mut s = Simple::default();
    let mut words = Vec::new();
    let mut redirect_out = false;
    let mut redirect_in = false;
    for t in tokens {
        match t {
            Token::Word { text, subs } => {
                s.subs.extend(subs.iter().cloned());
                if redirect_out {
                    s.writes.push(text.clone());
                    redirect_out = false;
                } else if redirect_in {
                    redirect_in = false;
                } else {
                    words.push(text.clone());
                }
            }
            Token::RedirectOut => redirect_out = true,
            Token::RedirectIn => redirect_in = true,
            Token::Pipe | Token::Separator => {}
        }
    }
    let mut i = 0;
    // Peel wrappers: assignments, `env`, `nohup`, `sudo [opts] [user]`, ...
    while i < words.len() {
        let w = &words[i];
        let base = basename(w);
        if is_assignment(w) {
            i += 1;
        } else if matches!(
            base,
            "env" | "nohup" | "time" | "exec" | "command" | "nice" | "stdbuf" | "timeout" | "xargs"
        ) {
            i += 1;
            // Their options (and `timeout`'s duration) come before the program.
            while i < words.len() && (words[i].starts_with('-') || is_assignment(&words[i])) {
                i += 1;
            }
            if base == "timeout" && i < words.len() {
                i += 1;
            }
        } else if matches!(base, "sudo" | "doas" | "pkexec") {
            s.elevated = true;
            i += 1;
            while i < words.len() && words[i].starts_with('-') {
                // Options that take a value.
                let takes = matches!(
                    words[i].as_str(),
                    "-u" | "-g" | "-h" | "-p" | "-C" | "-D" | "-r" | "-t" | "-U"
                );
                i += if takes { 2 } else { 1 };
            }
        } else if base == "su" {
            s.elevated = true;
            // `su [user] -c CMD`: the command is what runs.
            if let Some(c) = words.iter().position(|w| w == "-c" || w == "--command")
                && let Some(cmd) = words.get(c + 1)
            {
                s.subs.push(cmd.clone());
            }
            s.program = "su".into();
            return s;
        } else {
            break;
        }
    }
    if let Some(p) = words.get(i) {
        s.program = basename(p).to_string();
        s.args = words[i + 1..].to_vec();
    }
    // `sh -c CMD`, `bash -c CMD`: CMD is a command line too.
    if is_shell(&s.program)
        && let Some(c) = s.args.iter().position(|a| a == "-c")
        && let Some(cmd) = s.args.get(c + 1)
    {
        s.subs.push(cmd.clone());
    }
    s
}

fn is_assignment(w: &str) -> bool {
    match w.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        }
        None => false,
    }
}

fn basename(w: &str) -> &str {
    w.rsplit('/').next().unwrap_or(w)
}

fn is_shell(p: &str) -> bool {
    matches!(
        p,
        "sh" | "bash" | "zsh" | "dash" | "ksh" | "fish" | "ash" | "busybox"
    )
}

/// Programs that run what they read: a download piped into one runs it.
fn is_interpreter(p: &str) -> bool {
    is_shell(p)
        || matches!(
            p,
            "python" | "python2" | "python3" | "perl" | "ruby" | "node" | "php" | "source" | "."
        )
}

fn is_download(p: &str) -> bool {
    matches!(p, "curl" | "wget" | "fetch" | "aria2c")
}

fn rm_rf(args: &[String]) -> bool {
    let (mut r, mut f) = (false, false);
    for a in args {
        if a == "--" {
            break;
        }
        match a.as_str() {
            "--recursive" => r = true,
            "--force" => f = true,
            a if a.starts_with('-') && !a.starts_with("--") => {
                r |= a.contains('r') || a.contains('R');
                f |= a.contains('f');
            }
            _ => {}
        }
    }
    r && f
}

/// Programs that write the files they are given (editors and copiers), or
/// in place with a flag (`sed -i`).
fn writes_files(p: &str, args: &[String]) -> bool {
    match p {
        "vi" | "vim" | "nvim" | "nano" | "emacs" | "ed" | "ex" | "pico" | "joe" | "mcedit"
        | "tee" | "cp" | "mv" | "install" | "dd" | "truncate" | "ln" | "rsync" | "scp"
        | "chmod" | "chown" | "chattr" | "rm" | "ssh-copy-id" => true,
        "sed" | "perl" => args
            .iter()
            .any(|a| a.starts_with("-i") || a == "--in-place"),
        _ => false,
    }
}

fn pipeline_facts(pipeline: &[Vec<Token>], depth: usize, tags: &mut Vec<Tag>) {
    let mut downloaded = false;
    for tokens in pipeline {
        if tokens.is_empty() {
            continue;
        }
        let s = simple(tokens);
        if s.elevated || s.program == "su" {
            tags.push(Tag::Sudo);
        }
        if s.program == "rm" && rm_rf(&s.args) {
            tags.push(Tag::RmRf);
        }
        let keys = |w: &String| w.contains("authorized_keys");
        if s.writes.iter().any(keys)
            || (writes_files(&s.program, &s.args) && s.args.iter().any(keys))
            || s.program == "ssh-copy-id"
        {
            tags.push(Tag::AuthorizedKeys);
        }
        // A download earlier in the pipeline feeds this interpreter.
        if downloaded && is_interpreter(&s.program) {
            tags.push(Tag::CurlPipeShell);
        }
        // `bash -c "$(curl ...)"`, `sh <(wget ...)`, `. <(curl ...)`.
        if is_interpreter(&s.program)
            && s.subs.iter().any(|sub| {
                lex(sub)
                    .iter()
                    .any(|t| matches!(t, Token::Word { text, .. } if is_download(basename(text))))
            })
        {
            tags.push(Tag::CurlPipeShell);
        }
        downloaded |= is_download(&s.program);
        for sub in &s.subs {
            scan(sub, depth + 1, tags);
        }
    }
}

/// Splits a line into words and operators. Unbalanced quotes run to the end
/// of the line (as a shell would keep reading); nothing is an error.
fn lex(line: &str) -> Vec<Token> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut word = String::new();
    let mut subs = Vec::new();
    let mut in_word = false;
    let mut i = 0;
    let flush =
        |out: &mut Vec<Token>, word: &mut String, subs: &mut Vec<String>, in_word: &mut bool| {
            if *in_word {
                out.push(Token::Word {
                    text: std::mem::take(word),
                    subs: std::mem::take(subs),
                });
                *in_word = false;
            }
        };
    while i < chars.len() && out.len() < WORDS_MAX {
        let c = chars[i];
        match c {
            ' ' | '\t' => {
                flush(&mut out, &mut word, &mut subs, &mut in_word);
                i += 1;
            }
            '#' if !in_word => break,
            '\n' | ';' => {
                flush(&mut out, &mut word, &mut subs, &mut in_word);
                out.push(Token::Separator);
                i += 1;
            }
            '|' => {
                flush(&mut out, &mut word, &mut subs, &mut in_word);
                if chars.get(i + 1) == Some(&'|') {
                    out.push(Token::Separator);
                    i += 2;
                } else {
                    out.push(Token::Pipe);
                    i += if chars.get(i + 1) == Some(&'&') { 2 } else { 1 };
                }
            }
            '&' => {
                flush(&mut out, &mut word, &mut subs, &mut in_word);
                if chars.get(i + 1) == Some(&'>') {
                    out.push(Token::RedirectOut);
                    i += 2;
                    while chars.get(i) == Some(&'>') {
                        i += 1;
                    }
                } else {
                    out.push(Token::Separator);
                    i += if chars.get(i + 1) == Some(&'&') { 2 } else { 1 };
                }
            }
            '<' | '>' if chars.get(i + 1) == Some(&'(') => {
                // Process substitution: a command line of its own.
                let (inner, next) = balanced(&chars, i + 2);
                subs.push(inner);
                in_word = true;
                i = next;
            }
            '>' | '<' => {
                // A word of digits just before it is the fd (`2>`).
                if in_word && !word.is_empty() && word.chars().all(|d| d.is_ascii_digit()) {
                    word.clear();
                    subs.clear();
                    in_word = false;
                }
                flush(&mut out, &mut word, &mut subs, &mut in_word);
                let mut j = i + 1;
                while matches!(chars.get(j), Some('>' | '<' | '|')) {
                    j += 1;
                }
                if chars.get(j) == Some(&'&') {
                    // `2>&1`: a duplication, not a file.
                    j += 1;
                    while chars
                        .get(j)
                        .is_some_and(|d| d.is_ascii_digit() || *d == '-')
                    {
                        j += 1;
                    }
                } else {
                    out.push(if c == '>' {
                        Token::RedirectOut
                    } else {
                        Token::RedirectIn
                    });
                }
                i = j;
            }
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
                i += 1;
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    match chars[i] {
                        '\\' if matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`')) => {
                            word.push(chars[i + 1]);
                            i += 2;
                        }
                        '$' if chars.get(i + 1) == Some(&'(') => {
                            let (inner, next) = balanced(&chars, i + 2);
                            subs.push(inner);
                            i = next;
                        }
                        '`' => {
                            let (inner, next) = backquoted(&chars, i + 1);
                            subs.push(inner);
                            i = next;
                        }
                        ch => {
                            word.push(ch);
                            i += 1;
                        }
                    }
                }
                i += 1;
            }
            '\\' => {
                in_word = true;
                if let Some(&n) = chars.get(i + 1)
                    && n != '\n'
                {
                    word.push(n);
                }
                i += 2;
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                let (inner, next) = balanced(&chars, i + 2);
                subs.push(inner);
                in_word = true;
                i = next;
            }
            '`' => {
                let (inner, next) = backquoted(&chars, i + 1);
                subs.push(inner);
                in_word = true;
                i = next;
            }
            '(' | ')' | '{' | '}' if !in_word => {
                // Subshells and groups: their contents are commands of the
                // same line.
                out.push(Token::Separator);
                i += 1;
            }
            ch => {
                in_word = true;
                word.push(ch);
                i += 1;
            }
        }
    }
    flush(&mut out, &mut word, &mut subs, &mut in_word);
    out
}

/// The text up to the `)` that closes one opened before `start`, and the
/// index after it (quotes inside are skipped over).
fn balanced(chars: &[char], start: usize) -> (String, usize) {
    let mut depth = 1;
    let mut i = start;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), '\\') => i += 1,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '\\') => i += 1,
            (None, '(') => depth += 1,
            (None, ')') => {
                depth -= 1;
                if depth == 0 {
                    return (chars[start..i].iter().collect(), i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    (
        chars[start.min(chars.len())..].iter().collect(),
        chars.len(),
    )
}

fn backquoted(chars: &[char], start: usize) -> (String, usize) {
    let mut i = start;
    while i < chars.len() && chars[i] != '`' {
        if chars[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    let end = i.min(chars.len());
    (chars[start.min(end)..end].iter().collect(), i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table: a command line and the tags it must get, as text.
    const TABLE: &[(&str, &str)] = &[
        ("ls -la /var/log", ""),
        ("sudo systemctl restart nginx", "sudo"),
        ("/usr/bin/sudo -u postgres psql", "sudo"),
        ("doas vi /etc/hosts", "sudo"),
        ("su - root -c 'id'", "sudo"),
        ("echo sudo", ""),
        ("grep sudo /var/log/auth.log", ""),
        ("rm -rf /tmp/build", "rm_rf"),
        ("rm -fr /", "rm_rf"),
        ("rm -r -f dir", "rm_rf"),
        ("rm --recursive --force dir", "rm_rf"),
        ("/bin/rm -Rfv old", "rm_rf"),
        ("rm -r dir", ""),
        ("rm -f file", ""),
        ("rm -- -rf", ""),
        ("echo 'rm -rf /'", ""),
        ("sudo rm -rf /var/lib/app", "sudo rm_rf"),
        ("cd /tmp && rm -rf *", "rm_rf"),
        ("find . -name x; rm -rf x", "rm_rf"),
        ("nohup env X=1 rm -rf d", "rm_rf"),
        ("curl -fsSL https://x.example/i.sh | sh", "curl_pipe_shell"),
        (
            "curl https://x.example/i.sh | sudo bash -s",
            "curl_pipe_shell sudo",
        ),
        ("wget -qO- x.example | python3", "curl_pipe_shell"),
        ("curl x.example | tee f | bash", "curl_pipe_shell"),
        ("curl -o f x.example && sh f", ""),
        ("curl x.example | grep foo", ""),
        (
            "bash -c \"$(curl -fsSL x.example/install.sh)\"",
            "curl_pipe_shell",
        ),
        ("sh <(wget -qO- x.example)", "curl_pipe_shell"),
        ("bash -c 'curl x.example | sh'", "curl_pipe_shell"),
        ("echo 'curl x | sh'", ""),
        ("vi ~/.ssh/authorized_keys", "authorized_keys"),
        (
            "echo ssh-ed25519 AAAA >> ~/.ssh/authorized_keys",
            "authorized_keys",
        ),
        ("echo k>>/root/.ssh/authorized_keys", "authorized_keys"),
        (
            "tee -a /home/u/.ssh/authorized_keys < key.pub",
            "authorized_keys",
        ),
        ("sed -i '/old/d' .ssh/authorized_keys", "authorized_keys"),
        ("cat ~/.ssh/authorized_keys", ""),
        ("sed -n 1p .ssh/authorized_keys", ""),
        ("grep ed25519 .ssh/authorized_keys 2>&1", ""),
        ("ssh-copy-id user@host", "authorized_keys"),
        (
            "sudo tee /root/.ssh/authorized_keys",
            "authorized_keys sudo",
        ),
        ("x=$(sudo cat /etc/shadow)", "sudo"),
        ("echo `rm -rf /srv`", "rm_rf"),
        ("(cd /srv; rm -rf data)", "rm_rf"),
        ("ls # sudo rm -rf /", ""),
        ("timeout 5 sudo reboot", "sudo"),
        ("\"unterminated rm -rf", ""),
        ("", ""),
    ];

    #[test]
    fn table() {
        let mut wrong = Vec::new();
        for (line, want) in TABLE {
            let got = classify_command(line)
                .tags
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            let mut want: Vec<&str> = want.split_whitespace().collect();
            want.sort();
            let mut got_sorted: Vec<&str> = got.split_whitespace().collect();
            got_sorted.sort();
            if got_sorted != want {
                wrong.push(format!("{line:?}: got [{got}], want [{}]", want.join(" ")));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }

    #[test]
    fn long_and_deep_lines_are_bounded() {
        let long = "a ".repeat(COMMAND_LEN_MAX);
        assert!(classify_command(&long).normalised.len() <= COMMAND_LEN_MAX);
        let deep = format!("{}rm -rf x{}", "$(".repeat(100), ")".repeat(100));
        // Deeper than NESTING_MAX is not looked into, and does not recurse without end.
        assert!(classify_command(&deep).tags.is_empty());
        let shallow = format!("{}rm -rf x{}", "$(".repeat(3), ")".repeat(3));
        assert_eq!(classify_command(&shallow).tags, vec![Tag::RmRf]);
        assert_eq!(cut("ééé", 3), "é");
    }
}
