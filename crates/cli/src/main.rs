//! `breakglass`: runs the service (`serve`) and is its command-line client.
//!
//! This file is the flag definitions (DESIGN §7, contract) and the dispatch;
//! [`cmd`] is the glue per verb, [`client`] talks HTTP, [`render`] writes text
//! for people, [`exit`] holds the exit codes. The work itself happens in
//! `breakglass-server` and `breakglass-core`.

mod client;
mod cmd;
mod exit;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use breakglass_core::State;
use breakglass_core::time::parse_duration;
use clap::{Args, Parser, Subcommand, ValueEnum};

const DEFAULT_URL: &str = "http://127.0.0.1:8080";
const GLOBAL_HEADING: &str = "Global options";
/// What `--wait` without a value waits for.
const WAIT_DEFAULT: &str = "15m";
/// Request ids are short opaque strings; anything else is a typo (or an
/// attempt to reach another route through the path).
const ID_LEN_MAX: usize = 128;
/// The most requests `list --limit` shows.
pub const LIST_LIMIT_MAX: u32 = 1000;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  error (bad input from the server's view, I/O, server unreachable, internal)
  2  usage
  3  refused by policy or authorization (HTTP 401/403, including self-approval)
  4  --wait ran out of time before the request was decided";

#[derive(Debug, Parser)]
#[command(
    name = "breakglass",
    version,
    about = "Emergency break-glass access: time-bound, multi-party approved, fully audited",
    after_help = EXIT_CODES_HELP,
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// The breakglass server.
    #[arg(
        long,
        global = true,
        env = "BREAKGLASS_URL",
        default_value = DEFAULT_URL,
        value_name = "URL",
        help_heading = GLOBAL_HEADING
    )]
    url: String,
    /// Your API token. Prefer the environment variable: arguments show up in
    /// process lists and shell history.
    #[arg(
        long,
        global = true,
        env = "BREAKGLASS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = GLOBAL_HEADING
    )]
    token: Option<String>,
    /// `text` for people, `json` for scripts.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = Output::Text,
        value_name = "FORMAT",
        help_heading = GLOBAL_HEADING
    )]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// One variant per verb; a new verb (`connect`, `sessions`, `recording` with
/// the gateways) is one variant here and one function in `cmd`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// Ask for access to a target.
    Request(RequestArgs),
    /// Approve a pending request, or countersign an active emergency grant.
    Approve(ApproveArgs),
    /// Deny (veto) a pending request.
    Deny(ReasonArgs),
    /// Withdraw your own pending request.
    Cancel(IdArgs),
    /// End an active grant now.
    Revoke(ReasonArgs),
    /// Record the post-incident review of an ended grant.
    Review(ReviewArgs),
    /// List requests you can see.
    List(ListArgs),
    /// Show one request in full.
    Show(IdArgs),
    /// Get the token (and connection details) of an active grant; shown once.
    Credentials(IdArgs),
    /// Connect to the target through its gateway (runs psql with the grant's
    /// credentials; arguments after -- go to psql).
    Connect(ConnectArgs),
    /// List the gateway sessions of a request.
    Sessions(IdArgs),
    /// Show what happened in a session (JSON lines with --output json).
    Recording(IdArgs),
    /// Verify or export the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Validate policies and explain decisions.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show who the server thinks you are.
    Whoami,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The TOML config file.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "dev",
        conflicts_with = "dev"
    )]
    config: Option<PathBuf>,
    /// Quick start: embedded store, demo principals and policy; prints tokens.
    #[arg(long)]
    dev: bool,
    /// With --dev: where to keep the data (default: a new temporary directory).
    #[arg(long, value_name = "DIR", requires = "dev")]
    data_dir: Option<PathBuf>,
    /// With --dev: the API's loopback address (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR", requires = "dev")]
    listen: Option<std::net::SocketAddr>,
    /// With --dev: keep the temporary directory and the demo database's
    /// files on exit (the path is printed).
    #[arg(long, requires = "dev")]
    keep: bool,
    /// How to write logs.
    #[arg(long, value_enum, default_value_t = LogFormatArg::Text, value_name = "FORMAT")]
    log_format: LogFormatArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct RequestArgs {
    /// The target, as named in the server's config.
    #[arg(value_name = "TARGET")]
    target: String,
    /// The role on the target.
    #[arg(long, value_name = "ROLE")]
    role: String,
    /// How long the grant lasts once active: 90s, 15m, 1h.
    #[arg(long, value_parser = parse_duration_arg, value_name = "DURATION")]
    duration: DurationArg,
    /// Why you need access; recorded in the audit log.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// The incident or change ticket, where a policy asks for one.
    #[arg(long, value_name = "T")]
    ticket: Option<String>,
    /// Self-activate now under an emergency policy; loud, must be
    /// countersigned, always reviewed.
    #[arg(long)]
    emergency: bool,
    /// Wait until the request is decided, at most TIMEOUT (default 15m).
    /// Exit 0 if active, 3 if denied, 1 if it ended otherwise, 4 if still
    /// pending when the wait ran out.
    #[arg(
        long,
        value_name = "TIMEOUT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = WAIT_DEFAULT,
        value_parser = parse_duration_arg
    )]
    wait: Option<DurationArg>,
}

#[derive(Debug, Args)]
struct IdArgs {
    /// The request id.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// The request id of an active grant.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    /// The client program to run (default: psql from PATH).
    #[arg(long, value_name = "PROGRAM", default_value = "psql")]
    client: String,
    /// Arguments passed to the client, after --.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(Debug, Args)]
struct ApproveArgs {
    /// The request id.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    /// A note recorded with the approval.
    #[arg(long, value_name = "TEXT")]
    comment: Option<String>,
}

#[derive(Debug, Args)]
struct ReasonArgs {
    /// The request id.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    /// Why; recorded in the audit log and shown to the requester.
    #[arg(long, value_name = "TEXT")]
    reason: String,
}

#[derive(Debug, Args)]
struct ReviewArgs {
    /// The request id.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    /// Was the access justified and used as stated?
    #[arg(long, value_enum, value_name = "OUTCOME")]
    outcome: OutcomeArg,
    /// What was checked and found.
    #[arg(long, value_name = "TEXT")]
    notes: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutcomeArg {
    Ok,
    Misuse,
}

impl OutcomeArg {
    fn as_str(self) -> &'static str {
        match self {
            OutcomeArg::Ok => "ok",
            OutcomeArg::Misuse => "misuse",
        }
    }
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only requests in this state: pending, active, denied, cancelled,
    /// timed_out, expired, revoked.
    #[arg(long, value_parser = parse_state, value_name = "STATE")]
    state: Option<State>,
    /// Only requests you made.
    #[arg(long)]
    mine: bool,
    /// Show at most N requests.
    #[arg(
        long,
        default_value_t = 50,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(LIST_LIMIT_MAX)),
        value_name = "N"
    )]
    limit: u32,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every link and signature of the audit chain, offline, reading
    /// the store named by the config. Exit 0 only if it all holds.
    Verify {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print audit events as JSON lines, from the server.
    Export {
        /// Start after this sequence number (default: from the first event).
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate the config and its policies, offline; with a sample request,
    /// explain which policy governs it (exit 3 if the sample is refused).
    Check(PolicyCheckArgs),
}

#[derive(Debug, Args)]
struct PolicyCheckArgs {
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Sample: who asks.
    #[arg(long, value_name = "P", requires_all = ["target", "role", "duration"])]
    principal: Option<String>,
    /// Sample: the target.
    #[arg(long, value_name = "T", requires = "principal")]
    target: Option<String>,
    /// Sample: the role.
    #[arg(long, value_name = "R", requires = "principal")]
    role: Option<String>,
    /// Sample: the duration.
    #[arg(long, value_name = "D", value_parser = parse_duration_arg, requires = "principal")]
    duration: Option<DurationArg>,
    /// Sample: as an emergency request.
    #[arg(long, requires = "principal")]
    emergency: bool,
    /// Sample: the ticket.
    #[arg(long, value_name = "T", requires = "principal")]
    ticket: Option<String>,
}

/// A duration as typed, checked locally with the same parser the server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationArg {
    pub text: String,
    pub secs: u64,
}

fn parse_duration_arg(s: &str) -> Result<DurationArg, String> {
    let secs = parse_duration(s).map_err(|e| e.to_string())?;
    Ok(DurationArg {
        text: s.trim().to_string(),
        secs,
    })
}

fn parse_state(s: &str) -> Result<State, String> {
    State::parse(s).ok_or_else(|| {
        let all: Vec<&str> = State::ALL.iter().map(|st| st.as_str()).collect();
        format!("unknown state {s:?}: expected one of {}", all.join(", "))
    })
}

fn parse_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= ID_LEN_MAX
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid request id {:?}: expected up to {ID_LEN_MAX} letters, digits, '-' or '_'",
            render::clean(s)
        ))
    }
}

fn main() -> ExitCode {
    // Usage errors exit 2 here (clap's default), --help and --version exit 0.
    let cli = Cli::parse();
    // `BREAKGLASS_URL=` (set but empty) means the default, like an unset one.
    let url = match cli.global.url.trim() {
        "" => DEFAULT_URL.to_string(),
        _ => cli.global.url,
    };
    let ctx = cmd::Ctx::new(url, cli.global.token.as_deref(), cli.global.output);
    let result = match cli.command {
        Command::Serve(a) => cmd::serve(breakglass_server::ServeOptions {
            config: a.config,
            dev: a.dev,
            data_dir: a.data_dir,
            listen: a.listen,
            keep: a.keep,
            log_format: match a.log_format {
                LogFormatArg::Text => breakglass_server::LogFormat::Text,
                LogFormatArg::Json => breakglass_server::LogFormat::Json,
            },
        }),
        Command::Request(a) => cmd::request(
            &ctx,
            breakglass_server::dto::CreateRequest {
                target: a.target,
                role: a.role,
                duration: a.duration.text,
                reason: a.reason,
                ticket: a.ticket,
                emergency: a.emergency,
            },
            a.wait.map(|w| w.secs),
        ),
        Command::Approve(a) => cmd::approve(&ctx, &a.id, a.comment),
        Command::Deny(a) => cmd::deny(&ctx, &a.id, a.reason),
        Command::Cancel(a) => cmd::cancel(&ctx, &a.id),
        Command::Revoke(a) => cmd::revoke(&ctx, &a.id, a.reason),
        Command::Review(a) => cmd::review(&ctx, &a.id, a.outcome.as_str(), a.notes),
        Command::List(a) => cmd::list(&ctx, a.state, a.mine, a.limit),
        Command::Show(a) => cmd::show(&ctx, &a.id),
        Command::Credentials(a) => cmd::credentials(&ctx, &a.id),
        Command::Connect(a) => cmd::connect(&ctx, &a.id, &a.client, &a.args),
        Command::Sessions(a) => cmd::sessions(&ctx, &a.id),
        Command::Recording(a) => cmd::recording(&ctx, &a.id),
        Command::Audit(AuditCommand::Verify { config }) => cmd::audit_verify(&ctx, &config),
        Command::Audit(AuditCommand::Export { after }) => cmd::audit_export(&ctx, after),
        Command::Policy(PolicyCommand::Check(a)) => {
            let sample = match (a.principal, a.target, a.role, a.duration) {
                (Some(principal), Some(target), Some(role), Some(duration)) => {
                    Some(breakglass_server::offline::Sample {
                        principal,
                        target,
                        role,
                        duration: duration.text,
                        emergency: a.emergency,
                        ticket: a.ticket,
                    })
                }
                // clap's `requires` rules make a partial sample a usage error.
                _ => None,
            };
            cmd::policy_check(&ctx, &a.config, sample.as_ref())
        }
        Command::Whoami => cmd::whoami(&ctx),
    };
    match result {
        Ok(exit) => exit.into(),
        Err(err) => cmd::report_error(&ctx, &err).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("breakglass").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn request_flags() {
        let cli = parse(&[
            "request",
            "prod-db",
            "--role",
            "admin",
            "--duration",
            "15m",
            "--reason",
            "disk",
            "--ticket",
            "INC-1",
            "--emergency",
            "--wait",
        ])
        .expect("valid");
        let Command::Request(a) = cli.command else {
            panic!("not a request");
        };
        assert_eq!(a.target, "prod-db");
        assert_eq!(a.duration.secs, 900);
        assert!(a.emergency);
        assert_eq!(a.wait.map(|w| w.secs), Some(900));

        let cli = parse(&[
            "request",
            "--wait=90s",
            "prod-db",
            "--role",
            "r",
            "--duration",
            "1h",
            "--reason",
            "x",
        ])
        .expect("valid");
        let Command::Request(a) = cli.command else {
            panic!("not a request");
        };
        assert_eq!(a.target, "prod-db");
        assert_eq!(a.wait.map(|w| w.secs), Some(90));
    }

    #[test]
    fn bad_values_are_usage_errors_with_a_clear_message() {
        let err = parse(&[
            "request",
            "db",
            "--role",
            "r",
            "--duration",
            "15",
            "--reason",
            "x",
        ])
        .expect_err("a bare number is not a duration");
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("expected a number and a unit"),
            "{err}"
        );

        let err = parse(&["list", "--state", "done"]).expect_err("bad state");
        assert!(
            err.to_string().contains("expected one of pending, active"),
            "{err}"
        );

        let err = parse(&["show", "../audit"]).expect_err("path in an id");
        assert_eq!(err.exit_code(), 2);

        assert!(parse(&["review", "x", "--outcome", "great", "--notes", "n"]).is_err());
        assert!(parse(&["list", "--limit", "0"]).is_err());
        assert!(parse(&["serve"]).is_err(), "serve needs --config or --dev");
        assert!(parse(&["serve", "--config", "c.toml", "--dev"]).is_err());
        assert!(parse(&["serve", "--data-dir", "d"]).is_err());
        assert!(parse(&["serve", "--dev", "--data-dir", "d", "--log-format", "json"]).is_ok());
        assert!(parse(&["serve", "--dev", "--listen", "127.0.0.1:9000", "--keep"]).is_ok());
        assert!(parse(&["serve", "--config", "c.toml", "--listen", "127.0.0.1:9000"]).is_err());
        assert!(parse(&["serve", "--config", "c.toml", "--keep"]).is_err());
        assert!(
            parse(&["policy", "check", "--config", "c", "--principal", "alice"]).is_err(),
            "a partial sample"
        );
        assert!(
            parse(&[
                "policy",
                "check",
                "--config",
                "c",
                "--principal",
                "alice",
                "--target",
                "db",
                "--role",
                "r",
                "--duration",
                "5m",
                "--emergency",
            ])
            .is_ok()
        );
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli =
            parse(&["show", "abc-123", "--output", "json", "--url", "http://h:1"]).expect("valid");
        assert_eq!(cli.global.output, Output::Json);
        assert_eq!(cli.global.url, "http://h:1");
        let cli = parse(&["--output", "json", "whoami"]).expect("valid");
        assert_eq!(cli.global.output, Output::Json);
    }

    #[test]
    fn help_never_shows_the_token() {
        let cmd = Cli::command();
        let token = cmd
            .get_arguments()
            .find(|a| a.get_id() == "token")
            .expect("a --token flag");
        assert!(token.is_hide_env_values_set());
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("BREAKGLASS_TOKEN"));
        assert!(help.contains("Exit codes:"));
    }
}
