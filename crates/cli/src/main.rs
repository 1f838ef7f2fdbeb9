//! `breakglass`: runs the service (`serve`) and is its command-line client.
//!
//! This file is the flag definitions (DESIGN §7, contract) and the dispatch;
//! [`cmd`] is the glue per verb, [`client`] talks HTTP, [`render`] writes text
//! for people, [`exit`] holds the exit codes. The work itself happens in
//! `breakglass-server` and `breakglass-core`.

mod client;
mod cmd;
mod credentials;
mod drill;
mod evidence;
mod exit;
mod login;
mod notify;
mod prompt;
mod render;
mod review;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use breakglass_core::State;
use breakglass_core::time::parse_duration;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

const DEFAULT_URL: &str = "http://127.0.0.1:8080";
const GLOBAL_HEADING: &str = "Global options";
const SERVER_HEADING: &str = "Server options";
/// What `--wait` without a value waits for.
const WAIT_DEFAULT: &str = "15m";
/// Request ids are short opaque strings; anything else is a typo (or an
/// attempt to reach another route through the path).
const ID_LEN_MAX: usize = 128;
/// The most requests `list --limit` shows.
pub const LIST_LIMIT_MAX: u32 = 1000;

const MAIN_AFTER_HELP: &str = "\
Examples:
  export BREAKGLASS_URL=https://breakglass.example.com BREAKGLASS_TOKEN=...
  breakglass targets                  # what you may request
  breakglass request prod-db --role read --duration 15m --reason \"disk full\" --wait
  breakglass approve 01a2             # as an approver; any unique prefix of the id
  breakglass connect 01a2 -- -c \"select 1\"

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
    after_help = MAIN_AFTER_HELP,
    propagate_version = true
)]
struct Cli {
    /// `text` for people, `json` for scripts (errors too: a JSON object on
    /// stderr).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = Output::Text,
        value_name = "FORMAT",
        help_heading = GLOBAL_HEADING
    )]
    output: Output,
    // Server options given before the command, like `breakglass --url URL
    // whoami`; the same flags after the command take precedence.
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the server, for the commands that talk to it. The
/// environment is read by [`ServerArgs::resolve`], so that a flag given
/// before the command still beats the variable.
#[derive(Debug, Clone, Default, Args)]
struct ServerArgs {
    /// The breakglass API [env: BREAKGLASS_URL] [default: http://127.0.0.1:8080].
    /// https:// with the system's CA certificates (and --ca-file); plain
    /// http:// only to a loopback address unless --insecure-http.
    #[arg(long, value_name = "URL", help_heading = SERVER_HEADING)]
    url: Option<String>,
    /// Your API token [env: BREAKGLASS_TOKEN]. Prefer the environment
    /// variable: arguments show up in process lists and shell history.
    #[arg(long, value_name = "TOKEN", help_heading = SERVER_HEADING)]
    token: Option<String>,
    /// A PEM file of CA certificates to trust besides the system's, for an
    /// API whose certificate comes from a private CA [env: BREAKGLASS_CA_FILE].
    #[arg(long, value_name = "FILE", help_heading = SERVER_HEADING)]
    ca_file: Option<PathBuf>,
    /// Allow plain http to a non-loopback address. The token and every
    /// request cross the network unencrypted: only on a trusted network.
    #[arg(long, help_heading = SERVER_HEADING)]
    insecure_http: bool,
    /// The current one-time (TOTP) code, for a local principal with TOTP
    /// [env: BREAKGLASS_OTP]. Sent as X-Breakglass-OTP; each code is
    /// accepted once. Without it, a terminal prompts for it.
    #[arg(long, value_name = "CODE", help_heading = SERVER_HEADING)]
    otp: Option<String>,
}

impl ServerArgs {
    /// This command's flags, then the flags before the command, then the
    /// environment, then the default. An empty variable counts as unset.
    fn resolve(&self, before: &ServerArgs) -> cmd::ServerConn {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let url = self
            .url
            .clone()
            .or_else(|| before.url.clone())
            .filter(|u| !u.trim().is_empty())
            .or_else(|| env("BREAKGLASS_URL"))
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        let flag_token = self.token.clone().or_else(|| before.token.clone());
        let env_token = env("BREAKGLASS_TOKEN");
        let token_from_env = flag_token.is_none() && env_token.is_some();
        cmd::ServerConn {
            url,
            token: flag_token.or(env_token),
            token_from_env,
            ca_file: self
                .ca_file
                .clone()
                .or_else(|| before.ca_file.clone())
                .or_else(|| env("BREAKGLASS_CA_FILE").map(PathBuf::from)),
            insecure_http: self.insecure_http || before.insecure_http,
            otp: self
                .otp
                .clone()
                .or_else(|| before.otp.clone())
                .filter(|c| !c.trim().is_empty())
                .or_else(|| env("BREAKGLASS_OTP")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
    /// CSV tables (`report`); other commands print text.
    Csv,
}

/// One variant per verb; a new verb is one variant here and one function
/// in `cmd`. Verbs that talk to the server flatten [`ServerArgs`]; offline
/// ones (`serve`, `audit verify`, `policy check`, `completion`) do not, so
/// their help shows no `--url` or `--token`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    #[command(
        after_help = "Examples:\n  breakglass serve --dev\n  breakglass serve --config /etc/breakglass/config.toml --log-format json"
    )]
    Serve(ServeArgs),
    /// Ask for access to a target (see `breakglass targets`).
    #[command(
        after_help = "Examples:\n  breakglass request prod-db --role read --duration 15m --reason \"disk full\" --wait\n  breakglass request prod-db --role admin --duration 10m --reason \"outage\" --ticket INC-42 --wait=5m\n  breakglass request prod-db --role admin --duration 10m --reason \"primary down\" --emergency"
    )]
    Request(RequestArgs),
    /// Approve a pending request, or countersign an active emergency grant.
    #[command(
        after_help = "Examples:\n  breakglass approve 01a2250c --comment \"looked at the graphs\""
    )]
    Approve(ApproveArgs),
    /// Deny (veto) a pending request.
    #[command(after_help = "Examples:\n  breakglass deny 01a2250c --reason \"use the replica\"")]
    Deny(ReasonArgs),
    /// Withdraw your own pending request.
    Cancel(IdArgs),
    /// End an active grant now.
    #[command(after_help = "Examples:\n  breakglass revoke 01a2250c --reason \"fixed\"")]
    Revoke(ReasonArgs),
    /// Record the post-incident review of an ended grant.
    #[command(
        after_help = "Examples:\n  breakglass review 01a2250c --outcome ok --notes \"matches INC-42\""
    )]
    Review(ReviewArgs),
    /// List requests you can see.
    #[command(
        after_help = "Examples:\n  breakglass list --state pending\n  breakglass list --mine --output json"
    )]
    List(ListArgs),
    /// Show one request in full.
    Show(IdArgs),
    /// Get the token (and connection details) of an active grant; shown once.
    Credentials(IdArgs),
    /// Connect to the target through its gateway (runs psql or ssh with the
    /// grant's credentials; arguments after -- go to psql, or are the
    /// command ssh runs).
    #[command(
        after_help = "Examples:\n  breakglass connect 01a2250c\n  breakglass connect 01a2250c -- -c \"select count(*) from orders\"\n  breakglass connect 01a2250c -- uptime"
    )]
    Connect(ConnectArgs),
    /// List the gateway sessions of a request.
    Sessions(IdArgs),
    /// Show what happened in a session (JSON lines with --output json).
    Recording(RecordingArgs),
    /// Verify or export the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print a request's evidence bundle (its events with Merkle inclusion
    /// proofs up to a signed checkpoint, and its recordings), or verify one
    /// offline.
    #[command(
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true,
        after_help = "Examples:\n  breakglass evidence 01a2250c > bundle.json\n  breakglass evidence verify bundle.json --key audit-signing.pub"
    )]
    Evidence(EvidenceArgs),
    /// Validate policies and explain decisions.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Move the store: copy an embedded store into PostgreSQL.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Run a drill now, or show the history of drill runs (admins).
    #[command(subcommand)]
    Drill(DrillCommand),
    /// List the ended grants waiting for a person's review, oldest first.
    #[command(
        after_help = "Examples:\n  breakglass reviews\n  breakglass reviews --overdue --output json"
    )]
    Reviews(ReviewsArgs),
    /// Report on grants: per team, target and policy (admins).
    #[command(
        after_help = "Examples:\n  breakglass report --since 30d\n  breakglass report --since 7d --output csv > grants.csv"
    )]
    Report(ReportArgs),
    /// Notification sinks: send a test message, show delivery status
    /// (admins).
    #[command(subcommand)]
    Notify(NotifyCommand),
    /// Show who the server thinks you are, and how you signed in.
    Whoami(ServerOnly),
    /// Sign in with the organisation's identity provider (device flow by
    /// default); the tokens are kept for this server and renewed.
    #[command(
        after_help = "Examples:\n  breakglass login                  # shows a URL and a code to enter on any device\n  breakglass login --browser        # a browser on this machine\n  breakglass login --fresh          # sign in again, for approvals that need a recent sign-in\n  breakglass login --github-actions --audience breakglass   # in a GitHub Actions job"
    )]
    Login(LoginArgs),
    /// Remove the stored login for this server.
    Logout(ServerOnly),
    /// List the targets and roles you may request, with their limits.
    Targets(ServerOnly),
    /// Print shell completions: breakglass completion bash > /etc/bash_completion.d/breakglass
    Completion(CompletionArgs),
}

impl Command {
    /// The server options of a command that talks to the server.
    fn server(&self) -> Option<&ServerArgs> {
        Some(match self {
            Command::Request(a) => &a.server,
            Command::Approve(a) => &a.server,
            Command::Deny(a) | Command::Revoke(a) => &a.server,
            Command::Cancel(a)
            | Command::Show(a)
            | Command::Credentials(a)
            | Command::Sessions(a) => &a.server,
            Command::Review(a) => &a.server,
            Command::List(a) => &a.server,
            Command::Connect(a) => &a.server,
            Command::Recording(a) => &a.server,
            Command::Audit(AuditCommand::Export { server, .. }) => server,
            Command::Evidence(a) if a.command.is_none() => &a.server,
            Command::Evidence(_) => return None,
            Command::Drill(DrillCommand::Run { server, .. })
            | Command::Drill(DrillCommand::Report { server, .. }) => server,
            Command::Notify(NotifyCommand::Test { server, .. }) => server,
            Command::Notify(NotifyCommand::Status(a)) => &a.server,
            Command::Whoami(a) | Command::Targets(a) | Command::Logout(a) => &a.server,
            Command::Reviews(a) => &a.server,
            Command::Report(a) => &a.server,
            Command::Login(a) => &a.server,
            Command::Serve(_)
            | Command::Audit(AuditCommand::Verify { .. })
            | Command::Policy(_)
            | Command::Store(_)
            | Command::Completion(_) => return None,
        })
    }
}

#[derive(Debug, Args)]
struct EvidenceArgs {
    #[command(subcommand)]
    command: Option<EvidenceCommand>,
    /// The request id, or any unique prefix of it.
    #[arg(value_name = "ID", value_parser = parse_id, required = true)]
    id: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Check a bundle offline, with no store and no server: the
    /// checkpoint's signature, every event's inclusion proof, every
    /// recording against its session.ended event.
    Verify {
        /// The bundle (`-` for stdin).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// A trusted public key: 64 hex digits as a node's
        /// `audit-signing.pub` holds them, or a copy of that file. Repeat
        /// for several nodes.
        #[arg(long, value_name = "PUBKEY", required = true)]
        key: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct ServerOnly {
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct LoginArgs {
    /// Sign in with a browser on this machine (authorization code flow with
    /// PKCE and a redirect to 127.0.0.1) instead of the device flow.
    #[arg(long, conflicts_with = "github_actions")]
    browser: bool,
    /// Make the identity provider ask for your password again (max_age=0),
    /// for approvals that need a recent sign-in (step_up_required).
    #[arg(long, conflicts_with = "github_actions")]
    fresh: bool,
    /// In a GitHub Actions job: use the job's OIDC token (from
    /// ACTIONS_ID_TOKEN_REQUEST_URL; needs `permissions: id-token: write`).
    #[arg(long)]
    github_actions: bool,
    /// The audience of the job's token, as the server's workload entry
    /// wants it [default: the server's URL].
    #[arg(long, value_name = "AUDIENCE", requires = "github_actions")]
    audience: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct CompletionArgs {
    /// The shell.
    #[arg(value_enum, value_name = "SHELL")]
    shell: ShellArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The TOML config file (see README: "Running it for real").
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
    #[arg(long, value_name = "DIR", requires = "dev", conflicts_with = "config")]
    data_dir: Option<PathBuf>,
    /// With --dev: the API's loopback address (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR", requires = "dev", conflicts_with = "config")]
    listen: Option<std::net::SocketAddr>,
    /// With --dev: keep the temporary directory and the demo database's
    /// files on exit (the path is printed).
    #[arg(long, requires = "dev", conflicts_with = "config")]
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
    /// Wait until the request is decided, at most TIMEOUT (default 15m;
    /// `--wait 5m` and `--wait=5m` both work). Exit 0 if active, 3 if
    /// denied, 1 if it ended otherwise, 4 if still pending when the wait ran
    /// out.
    #[arg(
        long,
        value_name = "TIMEOUT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = WAIT_DEFAULT,
        value_parser = parse_duration_arg
    )]
    wait: Option<DurationArg>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct IdArgs {
    /// The request id, or any unique prefix of it.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct RecordingArgs {
    /// The session id (from `breakglass sessions ID`).
    #[arg(value_name = "SESSION_ID", value_parser = parse_id)]
    id: String,
    /// `entries` (the verified entries, as text or with `--output json`
    /// as JSON lines) or `asciicast` (an SSH session as an asciicast v2
    /// file for `asciinema play`).
    #[arg(long, value_enum, default_value_t = RecordingFormat::Entries)]
    format: RecordingFormat,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordingFormat {
    Entries,
    Asciicast,
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// The request id of an active grant, or any unique prefix of it.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    #[command(flatten)]
    server: ServerArgs,
    /// The client program to run (default: psql for PostgreSQL targets,
    /// ssh for SSH targets, from PATH).
    #[arg(long, value_name = "PROGRAM")]
    client: Option<String>,
    /// Arguments passed to the client, after -- (for an SSH target: the
    /// command to run; the exit status is the command's).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(Debug, Args)]
struct ApproveArgs {
    /// The request id, or any unique prefix of it.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    /// A note recorded with the approval.
    #[arg(long, value_name = "TEXT")]
    comment: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct ReasonArgs {
    /// The request id, or any unique prefix of it.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    /// Why; recorded in the audit log and shown to the requester.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct ReviewsArgs {
    /// Only the reviews past their due time (`review.due_within` after the
    /// grant ended).
    #[arg(long)]
    overdue: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// How far back: requests created within this duration (`30d`, `12h`).
    #[arg(long, value_name = "DURATION", default_value = "30d")]
    since: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct ReviewArgs {
    /// The request id, or any unique prefix of it.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    /// Was the access justified and used as stated?
    #[arg(long, value_enum, value_name = "OUTCOME")]
    outcome: OutcomeArg,
    /// What was checked and found.
    #[arg(long, value_name = "TEXT")]
    notes: String,
    #[command(flatten)]
    server: ServerArgs,
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
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every link and signature of the audit chain, offline, reading
    /// the store named by the config. Exit 0 only if it all holds.
    Verify {
        /// The TOML config file of the service whose store to read.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// A trusted public key, kept outside the data dir: 64 hex digits
        /// as a node's `audit-signing.pub` holds them, or a copy of that
        /// file. Repeat for several nodes. Default: `audit.verify_keys`.
        #[arg(long, value_name = "PUBKEY")]
        key: Vec<String>,
        /// An earlier checkpoint (a witness's `checkpoints.jsonl`, whose
        /// last line is used, or one checkpoint as JSON): prove with a
        /// Merkle consistency proof that the log only grew since.
        #[arg(long, value_name = "CHECKPOINT")]
        since: Option<PathBuf>,
    },
    /// Print audit events as JSON lines, from the server.
    Export {
        /// Start after this sequence number (default: from the first event).
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum DrillCommand {
    /// Run a [[drills]] entry now through the real path and print each step
    /// with its time; exit 0 when it passes. With --load, the built-in load
    /// generator drives drill-labelled lifecycles meanwhile, and the drill's
    /// figures are shown beside those of a run without load.
    #[command(
        after_help = "Examples:\n  breakglass drill run canary-read\n  breakglass drill run canary-read --load 500 --for 10s"
    )]
    Run {
        /// The drill's name.
        name: String,
        /// Synthetic lifecycles per second (create, approve, credentials,
        /// revoke), at most 2000.
        #[arg(long, value_name = "RATE", requires = "for_")]
        load: Option<u32>,
        /// How long the load runs (at most 20s).
        #[arg(long = "for", id = "for_", value_name = "DURATION", value_parser = parse_duration_arg, requires = "load")]
        for_: Option<DurationArg>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// p50, p99 and max per step, the pass rate, and the failures.
    #[command(
        after_help = "Examples:\n  breakglass drill report\n  breakglass drill report --since 7d --output json"
    )]
    Report {
        /// How far back, like 30d (the default), 12h.
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        since: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum NotifyCommand {
    /// Send a test message to one sink now and report its answer (exit 1
    /// when it was not delivered).
    #[command(after_help = "Examples:\n  breakglass notify test oncall-slack")]
    Test {
        /// The sink's `name` in `[[notify]]`.
        #[arg(value_name = "SINK")]
        sink: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show each sink's cursor in the audit log, its lag and last error.
    Status(ServerOnly),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy the embedded store of a stopped node into an empty PostgreSQL
    /// database, with seq, hashes and checkpoints unchanged (then point
    /// every node at the database with server.database_url_env).
    #[command(
        after_help = "Example:\n  BREAKGLASS_DATABASE_URL=postgres://breakglass:...@db:5432/breakglass \\\n    breakglass store copy --from /var/lib/breakglass --to-env BREAKGLASS_DATABASE_URL"
    )]
    Copy {
        /// The data_dir of the node whose embedded store to copy.
        #[arg(long, value_name = "DATA_DIR")]
        from: PathBuf,
        /// The environment variable holding the target database's URL.
        #[arg(long, value_name = "VAR")]
        to_env: String,
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
    /// The TOML config file; its policy file is checked.
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

/// `--wait 5m` means `--wait=5m` when the word after `--wait` is a
/// duration: the value is optional, so clap alone would take `5m` for the
/// target. Anything after `--` is left alone (it belongs to psql).
fn join_wait_values(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter().peekable();
    while let Some(arg) = it.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(it);
            break;
        }
        if arg == "--wait"
            && let Some(value) = it.peek().and_then(|v| v.to_str())
            && parse_duration(value).is_ok()
        {
            let joined = format!("--wait={value}");
            it.next();
            out.push(joined.into());
            continue;
        }
        out.push(arg);
    }
    out
}

/// `--output json` (or `--output=json`) anywhere before `--`.
fn wants_json(args: &[OsString]) -> bool {
    let args: Vec<&str> = args
        .iter()
        .map(|a| a.to_str().unwrap_or(""))
        .take_while(|a| *a != "--")
        .collect();
    args.windows(2)
        .any(|w| w[0] == "--output" && w[1] == "json")
        || args.contains(&"--output=json")
}

/// A clap usage error, said safely: tokens are redacted (a token pasted in
/// the wrong place must not be echoed), no suggestion to put the token on
/// the command line when `BREAKGLASS_TOKEN` is set, a hint for `--wait`
/// values, and JSON with `--output json`.
fn usage_error(e: &clap::Error, args: &[OsString]) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let env_token = std::env::var("BREAKGLASS_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let words: Vec<&str> = args.iter().map(|a| a.to_str().unwrap_or("")).collect();
    let mut secrets: Vec<String> = env_token.iter().map(|t| t.trim().to_string()).collect();
    for w in words.windows(2) {
        if w[0] == "--token" {
            secrets.push(w[1].to_string());
        }
    }
    for w in &words {
        if let Some(t) = w.strip_prefix("--token=") {
            secrets.push(t.to_string());
        }
        if w.starts_with("bgt_") || w.starts_with(breakglass_core::token::GRANT_TOKEN_PREFIX) {
            secrets.push(w.to_string());
        }
    }
    secrets.retain(|s| s.len() >= 4);
    let mut text = e.render().to_string();
    for secret in &secrets {
        text = text.replace(secret.as_str(), "<redacted>");
    }
    let mut lines: Vec<&str> = text.lines().collect();
    if env_token.is_some() {
        lines.retain(|l| !l.contains("--token"));
    }
    let mut text = lines.join("\n");
    let wait_word = words
        .windows(2)
        .find(|w| w[0] == "--wait" && !w[1].starts_with('-'))
        .map(|w| w[1]);
    let hint = match wait_word {
        Some(v) => Some(format!(
            "--wait takes its value after '=': write --wait=DURATION (like --wait=5m); {:?} \
             is not a duration (a number and a unit: 90s, 15m, 1h)",
            render::clean(v)
        )),
        None if matches!(e.kind(), ErrorKind::InvalidSubcommand) => {
            Some("see the commands with: breakglass --help".to_string())
        }
        None => None,
    };
    if wants_json(args) {
        let detail = text
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ")
            .to_string();
        let mut doc = serde_json::json!({
            "type": "urn:breakglass:problem:usage",
            "title": "Usage error",
            "detail": detail,
            "code": "usage",
            "exit_code": exit::Exit::Usage.code(),
            "usage": text,
        });
        if let Some(h) = &hint {
            doc["hint"] = h.clone().into();
        }
        eprintln!("{doc}");
    } else {
        if let Some(h) = &hint {
            text.push_str(&format!("\nhint: {h}"));
        }
        eprintln!("{text}");
    }
    exit::Exit::Usage.into()
}

fn main() -> ExitCode {
    // `connect` on an SSH target runs ssh with this binary as its
    // SSH_ASKPASS: the grant credential goes from the environment to ssh
    // on a pipe, never on a command line or a terminal.
    if let Some(code) = cmd::ssh_askpass() {
        return code;
    }
    let args = join_wait_values(std::env::args_os().collect());
    // Usage errors exit 2, --help and --version exit 0.
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e, &args),
    };
    // Offline commands ignore server options given before the command.
    let conn = match cli.command.server() {
        Some(own) => own.resolve(&cli.server),
        None => cmd::ServerConn::default(),
    };
    let ctx = cmd::Ctx::new(conn, cli.output);
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
                drill: None,
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
        Command::Connect(a) => cmd::connect(&ctx, &a.id, a.client.as_deref(), &a.args),
        Command::Sessions(a) => cmd::sessions(&ctx, &a.id),
        Command::Reviews(a) => review::reviews(&ctx, a.overdue),
        Command::Report(a) => review::report(&ctx, &a.since),
        Command::Recording(a) => {
            cmd::recording(&ctx, &a.id, a.format == RecordingFormat::Asciicast)
        }
        Command::Audit(AuditCommand::Verify { config, key, since }) => {
            cmd::audit_verify(&ctx, &config, &key, since.as_deref())
        }
        Command::Audit(AuditCommand::Export { after, .. }) => cmd::audit_export(&ctx, after),
        Command::Evidence(EvidenceArgs {
            command: Some(EvidenceCommand::Verify { file, key }),
            ..
        }) => evidence::verify(&ctx, &file, &key),
        Command::Evidence(EvidenceArgs { id, .. }) => {
            evidence::fetch(&ctx, id.as_deref().unwrap_or_default())
        }
        Command::Drill(DrillCommand::Run {
            name, load, for_, ..
        }) => drill::run(&ctx, &name, load.zip(for_.map(|f| f.text))),
        Command::Drill(DrillCommand::Report { since, .. }) => drill::report(&ctx, &since),
        Command::Notify(NotifyCommand::Test { sink, .. }) => notify::test(&ctx, &sink),
        Command::Notify(NotifyCommand::Status(_)) => notify::status(&ctx),
        Command::Store(StoreCommand::Copy { from, to_env }) => {
            cmd::store_copy(&ctx, &from, &to_env)
        }
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
        Command::Whoami(_) => cmd::whoami(&ctx),
        Command::Login(a) => cmd::login(
            &ctx,
            &cmd::LoginOptions {
                browser: a.browser,
                fresh: a.fresh,
                github_actions: a.github_actions,
                audience: a.audience,
            },
        ),
        Command::Logout(_) => cmd::logout(&ctx),
        Command::Targets(_) => cmd::targets(&ctx),
        Command::Completion(a) => cmd::completion(
            &mut Cli::command(),
            match a.shell {
                ShellArg::Bash => clap_complete::Shell::Bash,
                ShellArg::Zsh => clap_complete::Shell::Zsh,
                ShellArg::Fish => clap_complete::Shell::Fish,
            },
        ),
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
    fn server_flags_go_before_or_after_the_command() {
        let cli =
            parse(&["show", "abc-123", "--output", "json", "--url", "http://h:1"]).expect("valid");
        assert_eq!(cli.output, Output::Json);
        let own = cli.command.server().expect("show talks to the server");
        assert_eq!(own.url.as_deref(), Some("http://h:1"));
        let cli =
            parse(&["--output", "json", "--url", "http://before:1", "whoami"]).expect("valid");
        assert_eq!(cli.output, Output::Json);
        let own = cli.command.server().expect("whoami talks to the server");
        assert_eq!(own.resolve(&cli.server).url, "http://before:1");
        // After the command beats before it.
        let cli = parse(&[
            "--url",
            "http://before:1",
            "whoami",
            "--url",
            "http://after:1",
        ])
        .expect("valid");
        let own = cli.command.server().expect("server args");
        assert_eq!(own.resolve(&cli.server).url, "http://after:1");
        assert!(parse(&["serve", "--dev", "--url", "http://h:1"]).is_err());
        assert!(parse(&["policy", "check", "--config", "c", "--token", "t"]).is_err());
    }

    #[test]
    fn offline_commands_show_no_server_options_and_describe_config() {
        let mut cmd = Cli::command();
        cmd.build();
        for path in [
            &["serve"][..],
            &["audit", "verify"],
            &["policy", "check"],
            &["completion"],
        ] {
            let mut sub = &mut cmd;
            for name in path {
                sub = sub.find_subcommand_mut(name).expect("subcommand");
            }
            let help = sub.render_long_help().to_string();
            for flag in ["--url", "--token", "--ca-file", "--insecure-http"] {
                assert!(!help.contains(flag), "{path:?} shows {flag}:\n{help}");
            }
            if let Some(config) = sub.get_arguments().find(|a| a.get_id() == "config") {
                assert!(
                    config.get_help().is_some(),
                    "{path:?}: --config has no description"
                );
            }
        }
        let mut sub = cmd.find_subcommand_mut("request").expect("request").clone();
        let help = sub.render_long_help().to_string();
        assert!(
            help.contains("--url") && help.contains("--ca-file"),
            "{help}"
        );
        assert!(help.contains("Examples:"), "{help}");
    }

    #[test]
    fn wait_takes_its_value_with_or_without_equals() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            join_wait_values(os(&[
                "breakglass",
                "request",
                "db",
                "--wait",
                "3s",
                "--role",
                "r"
            ])),
            os(&["breakglass", "request", "db", "--wait=3s", "--role", "r"])
        );
        // Not a duration: left for clap (and the hint) to handle.
        assert_eq!(
            join_wait_values(os(&["breakglass", "request", "--wait", "db"])),
            os(&["breakglass", "request", "--wait", "db"])
        );
        // After `--` everything belongs to the client program.
        assert_eq!(
            join_wait_values(os(&["breakglass", "connect", "x", "--", "--wait", "3s"])),
            os(&["breakglass", "connect", "x", "--", "--wait", "3s"])
        );
        let args = join_wait_values(os(&[
            "breakglass",
            "request",
            "--wait",
            "90s",
            "prod-db",
            "--role",
            "r",
            "--duration",
            "1h",
            "--reason",
            "x",
        ]));
        let cli = Cli::try_parse_from(&args).expect("valid");
        let Command::Request(a) = cli.command else {
            panic!("not a request");
        };
        assert_eq!(a.target, "prod-db");
        assert_eq!(a.wait.map(|w| w.secs), Some(90));
        assert!(wants_json(&os(&["b", "whoami", "--output", "json"])));
        assert!(wants_json(&os(&["b", "--output=json", "whoami"])));
        assert!(!wants_json(&os(&[
            "b", "connect", "x", "--", "--output", "json"
        ])));
    }

    #[test]
    fn help_never_shows_the_token() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("BREAKGLASS_TOKEN"));
        assert!(help.contains("Exit codes:"));
        assert!(help.contains("Examples:"));
    }
}
