//! `breakglass serve --dev`: a throwaway setup on the embedded store with
//! demo principals, targets and policy, and (when PostgreSQL is installed) a
//! demo database behind the PostgreSQL gateway, loopback only. Not for
//! production, and it says so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use breakglass_core::token::sha256_hex;
use breakglass_localpg::{AuthMethod, PgCluster};
use rand::RngCore;

use crate::config::Config;

/// The demo database's name in the cluster.
const DEMO_DB: &str = "app";

/// The upstream roles of the demo targets: breakglass role, PostgreSQL
/// role.
const DEMO_ROLES: [(&str, &str); 2] = [("read", "bg_read"), ("admin", "bg_admin")];

/// Demo rows in `orders`.
const DEMO_ORDERS: u32 = 50;

/// The command that installs PostgreSQL's server, shown when it is missing.
pub const INSTALL_POSTGRES: &str = "sudo apt-get install -y postgresql";

/// The demo schema and rows, run as the superuser in the demo database:
/// `bg_admin` owns them, `bg_read` may only read.
fn demo_sql() -> String {
    format!(
        "CREATE TABLE orders (\n\
           id bigint PRIMARY KEY,\n\
           customer text NOT NULL,\n\
           total_cents bigint NOT NULL,\n\
           status text NOT NULL,\n\
           created_at timestamptz NOT NULL DEFAULT now());\n\
         INSERT INTO orders (id, customer, total_cents, status)\n\
           SELECT g, 'customer-' || (g % 17), 100 + (g * 37) % 9900,\n\
                  (ARRAY['paid', 'shipped', 'refunded', 'pending'])[1 + g % 4]\n\
           FROM generate_series(1, {DEMO_ORDERS}) AS g;\n\
         ALTER TABLE orders OWNER TO bg_admin;\n\
         GRANT USAGE ON SCHEMA public TO bg_read;\n\
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO bg_read;\n\
         ALTER DEFAULT PRIVILEGES FOR ROLE bg_admin IN SCHEMA public GRANT SELECT ON TABLES TO bg_read;\n"
    )
}

pub const DEMO_POLICY: &str = r#"// Demo policy of `breakglass serve --dev`.

@id("oncall-db-read")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "read" };

@id("oncall-db-admin")
@approvals("2")
@approvers("sre-leads,security")
@max_duration("15m")
@require_ticket("^INC-[0-9]+$")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "admin" };

@id("ic-emergency")
@approvals("0")
@approvers("sre-leads")
@countersign_within("5m")
@max_duration("10m")
permit (principal in Group::"incident-commanders", action == Action::"emergency",
        resource in TargetGroup::"production");

@id("staging-self-service")
@approvals("0")
@max_duration("1h")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"staging");

@id("one-hour-cap")
forbid (principal, action, resource) when { context.duration_s > 3600 };
"#;

/// Demo principals: name, groups, what they show.
pub const DEMO_PRINCIPALS: [(&str, &[&str], &str); 5] = [
    ("alice", &["oncall"], "on-call engineer: requests access"),
    ("bob", &["sre-leads"], "SRE lead: approves"),
    (
        "carol",
        &["sre-leads", "security"],
        "SRE lead and security (admin): approves, revokes, reads the audit log",
    ),
    (
        "dave",
        &["security"],
        "security (admin): second approver for admin access",
    ),
    (
        "erin",
        &["incident-commanders", "oncall"],
        "incident commander: emergency self-activation",
    ),
];

/// Options of the dev setup.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Where to keep the data; a new temp dir when `None`.
    pub data_dir: Option<PathBuf>,
    /// The API's address (loopback only).
    pub listen: SocketAddr,
    /// Keep the directory and the demo database's files on exit.
    pub keep: bool,
}

/// The demo database behind `prod-db` and `staging-db`.
pub struct DemoDb {
    /// Address of the cluster itself (the gateway logs in there).
    pub addr: SocketAddr,
    /// Where the gateway listens.
    pub gateway: SocketAddr,
    cluster: PgCluster,
}

/// A running dev setup: the config written into its directory and the
/// tokens of the demo principals.
pub struct DevSetup {
    pub config_path: PathBuf,
    pub config: Config,
    pub tokens: Vec<(String, String)>,
    pub files: DevFiles,
}

/// What a dev setup leaves on the machine: its directory and the demo
/// database's server.
///
/// INVARIANT: dropping it stops the demo database's server and then removes
/// the directory (unless kept), so every exit path, errors included, cleans
/// up after itself.
pub struct DevFiles {
    /// The directory holding config, store, secrets and the demo cluster.
    pub dir: PathBuf,
    /// Whether the directory stays after exit.
    pub keep: bool,
    /// `None` when PostgreSQL is not installed.
    pub demo_db: Option<DemoDb>,
    /// Whether this setup created the directory (and so may remove it).
    created: bool,
}

impl Drop for DevFiles {
    fn drop(&mut self) {
        // The cluster lives inside `dir`: stop it before removing the files.
        if let Some(mut db) = self.demo_db.take() {
            if self.keep {
                db.cluster.keep_files();
            }
            drop(db);
        }
        if self.created
            && !self.keep
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            eprintln!("breakglass: cannot remove {}: {e}", self.dir.display());
        }
    }
}

fn new_token() -> String {
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("bgt_{}", hex::encode(b))
}

fn new_password() -> String {
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Writes a secret readable by its owner only (mode 0600), replacing any
/// earlier file.
fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(secret.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Starts the demo cluster under `dir`: roles `bg_read` (SELECT only) and
/// `bg_admin` with random SCRAM passwords written to `dir/secrets/ROLE`, and
/// the `app` database with the `orders` table.
fn start_demo_db(dir: &Path) -> anyhow::Result<(PgCluster, Vec<(String, PathBuf)>)> {
    let cluster = PgCluster::start_under(dir)?;
    let secrets = dir.join("secrets");
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(&secrets)
        .with_context(|| format!("cannot create {}", secrets.display()))?;
    let mut files = Vec::new();
    for (_, user) in DEMO_ROLES {
        let password = new_password();
        cluster.create_role(user, &password, AuthMethod::Scram)?;
        let file = secrets.join(user);
        write_secret(&file, &password)?;
        files.push((user.to_string(), file));
    }
    cluster.create_db(DEMO_DB, "bg_admin")?;
    cluster
        .psql(DEMO_DB, &demo_sql())
        .context("cannot fill the demo database")?;
    Ok((cluster, files))
}

/// Writes a demo config and policy into the data dir (a new temp dir when
/// none is given) with fresh random tokens, and starts the demo database
/// when PostgreSQL is installed.
pub fn prepare(opts: &DevOptions) -> anyhow::Result<DevSetup> {
    let (dir, created) = match &opts.data_dir {
        Some(d) => (d.clone(), false),
        None => {
            let mut b = [0u8; 6];
            rand::rngs::OsRng.fill_bytes(&mut b);
            let dir = std::env::temp_dir().join(format!("breakglass-dev-{}", hex::encode(b)));
            (dir, true)
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // From here on `files` owns the directory: an error below still stops
    // the cluster and removes what was written.
    let mut files = DevFiles {
        dir: dir.clone(),
        keep: opts.keep,
        demo_db: None,
        created,
    };
    let config_path = dir.join("config.toml");
    let mut tokens = Vec::new();
    let listen = opts.listen;
    let mut toml = format!(
        "# Written by `breakglass serve --dev`. Demo only: not for production.\n\
         [server]\nlisten = \"{listen}\"\ndata_dir = \"data\"\npending_timeout = \"30m\"\nadmin_groups = [\"security\"]\n\n\
         [policy]\nfile = \"policy.cedar\"\n\n\
         [console]\nenabled = true\n\n"
    );
    for (name, groups, _) in DEMO_PRINCIPALS {
        let token = new_token();
        let groups: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
        toml.push_str(&format!(
            "[[principals]]\nname = \"{name}\"\ngroups = [{}]\ntoken_sha256 = \"{}\"\n\n",
            groups.join(", "),
            sha256_hex(token.as_bytes())
        ));
        tokens.push((name.to_string(), token));
    }
    let demo = if breakglass_localpg::pg_bin_dir().is_ok() {
        let (cluster, secrets) = start_demo_db(&dir).context(
            "cannot start the demo PostgreSQL database (PostgreSQL is installed but did not start; \
             the error below says why)",
        )?;
        let gateway = SocketAddr::from(([127, 0, 0, 1], breakglass_localpg::free_port()));
        let addr = SocketAddr::from(([127, 0, 0, 1], cluster.port));
        let db = DemoDb {
            addr,
            gateway,
            cluster,
        };
        let db = files.demo_db.insert(db);
        Some((db.addr, db.gateway, secrets))
    } else {
        None
    };
    match &demo {
        Some((addr, gateway, secrets)) => {
            toml.push_str(&format!("[gateway.postgres]\nlisten = \"{gateway}\"\n\n"));
            for (target, group, roles) in [
                ("prod-db", "production", &DEMO_ROLES[..]),
                ("staging-db", "staging", &DEMO_ROLES[..1]),
            ] {
                toml.push_str(&format!(
                    "[[targets]]\nname = \"{target}\"\nkind = \"postgres\"\ngroups = [\"{group}\"]\n\
                     upstream = \"postgres://{addr}/{DEMO_DB}\"\n"
                ));
                for (role, user) in roles {
                    let file = secrets
                        .iter()
                        .find(|(u, _)| u == user)
                        .map(|(_, f)| f.clone())
                        .context("demo role without a password file")?;
                    toml.push_str(&format!(
                        "[targets.roles.{role}]\nuser = \"{user}\"\npassword_file = {}\n",
                        toml_string(&file.display().to_string())
                    ));
                }
                toml.push('\n');
            }
        }
        None => {
            // No database to reach: the targets exist for requests and
            // approvals, and no gateway runs.
            toml.push_str(
                "[[targets]]\nname = \"prod-db\"\nkind = \"postgres\"\ngroups = [\"production\"]\nupstream = \"postgres://127.0.0.1:5432/app\"\n\
                 [targets.roles.read]\nuser = \"bg_read\"\n\
                 [targets.roles.admin]\nuser = \"bg_admin\"\n\n\
                 [[targets]]\nname = \"staging-db\"\nkind = \"postgres\"\ngroups = [\"staging\"]\nupstream = \"postgres://127.0.0.1:5433/app\"\n\
                 [targets.roles.read]\nuser = \"bg_read\"\n",
            );
        }
    }
    std::fs::write(&config_path, toml)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    std::fs::write(dir.join("policy.cedar"), DEMO_POLICY)
        .with_context(|| format!("cannot write the demo policy in {}", dir.display()))?;
    let config = Config::load(&config_path)?;
    Ok(DevSetup {
        config_path,
        config,
        tokens,
        files,
    })
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The loud banner with tokens and the next three commands.
pub fn banner(setup: &DevSetup, url: &str) -> String {
    let mut s = String::new();
    s.push_str("\n==================================================================\n");
    s.push_str("  breakglass DEV MODE: demo principals, demo policy, throwaway data.\n");
    s.push_str("  NOT FOR PRODUCTION. Tokens below are printed in clear on purpose.\n");
    s.push_str("==================================================================\n\n");
    s.push_str(&format!(
        "API:       {url}\nConsole:   {url}/ (sign in with a token below)\nConfig:    {}\n",
        setup.config_path.display()
    ));
    match &setup.files.demo_db {
        Some(db) => s.push_str(&format!(
            "Database:  prod-db is a demo PostgreSQL on {} (database {DEMO_DB}, table orders),\n\
             \x20          reached through the gateway on {}; its passwords stay with the server.\n",
            db.addr, db.gateway
        )),
        None => s.push_str(&format!(
            "Database:  none. PostgreSQL is not installed, so prod-db has no database and\n\
             \x20          `breakglass connect` will fail. Install it, then restart serve --dev:\n\
             \x20            {INSTALL_POSTGRES}\n"
        )),
    }
    if setup.files.keep {
        s.push_str(&format!(
            "Files:     kept on exit in {}\n",
            setup.files.dir.display()
        ));
    } else if setup.files.created {
        s.push_str("Files:     removed on exit (serve --dev --keep keeps them)\n");
    }
    s.push_str("\nDemo principals:\n");
    for ((name, token), (_, _, what)) in setup.tokens.iter().zip(DEMO_PRINCIPALS) {
        s.push_str(&format!("  {name:<6} {token}   # {what}\n"));
    }
    let exports: Vec<String> = setup
        .tokens
        .iter()
        .map(|(name, token)| format!("{}={token}", name.to_uppercase()))
        .collect();
    s.push_str(&format!(
        "\nPaste into each shell:\n\
         \x20 export BREAKGLASS_URL={url}\n\
         \x20 export {}\n\n\
         Then, with `export BREAKGLASS_TOKEN=$ALICE` (or $BOB for the approval):\n\
         \x20 breakglass request prod-db --role read --duration 15m --reason \"disk full on primary\" --wait\n\
         \x20 breakglass approve ID     (as bob)\n\
         \x20 breakglass connect ID\n\n\
         Nobody is notified in dev mode: tell the approver the `breakglass approve` line the request prints.\n\
         Afterwards: `breakglass sessions ID`, `breakglass recording SESSION_ID`,\n\
         `BREAKGLASS_TOKEN=$CAROL breakglass audit export`, `breakglass audit verify --config {}`.\n",
        exports.join(" "),
        setup.config_path.display()
    ));
    s
}
