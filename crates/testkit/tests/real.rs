//! Starts real PostgreSQL clusters and pgbouncers and talks to them with the
//! real `psql` and `pgbench`: the testkit is only useful if these work.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use breakglass_testkit::{AuthMethod, PgBouncer, PgCluster, client_command, psql_at};

fn current_user(port: u16, user: &str, password: Option<&str>, db: &str) -> String {
    psql_at(port, user, password, db, "SELECT current_user")
        .expect("psql as the role")
        .trim()
        .to_owned()
}

#[test]
fn roles_authenticate_with_their_method() {
    let started = Instant::now();
    let pg = PgCluster::start().expect("start cluster");
    eprintln!(
        "cluster started on port {} in {:?}",
        pg.port,
        started.elapsed()
    );
    assert_eq!(pg.host(), "127.0.0.1");
    assert_eq!(
        pg.url("alice", "app"),
        format!("postgres://alice@127.0.0.1:{}/app", pg.port)
    );

    pg.create_role("scram_user", "s3cret scram", AuthMethod::Scram)
        .expect("scram role");
    pg.create_role("md5_user", "it's md5", AuthMethod::Md5)
        .expect("md5 role");
    pg.create_role("trust_user", "unused", AuthMethod::Trust)
        .expect("trust role");

    let stored = pg
        .psql(
            "postgres",
            "SELECT rolname || ' ' || CASE WHEN rolpassword LIKE 'md5%' THEN 'md5' \
             WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram' END \
             FROM pg_authid WHERE rolname LIKE '%\\_user' ORDER BY rolname",
        )
        .expect("read pg_authid");
    let stored: Vec<&str> = stored.lines().collect();
    assert_eq!(
        stored,
        ["md5_user md5", "scram_user scram", "trust_user scram"]
    );

    assert_eq!(
        current_user(pg.port, "scram_user", Some("s3cret scram"), "postgres"),
        "scram_user"
    );
    assert_eq!(
        current_user(pg.port, "md5_user", Some("it's md5"), "postgres"),
        "md5_user"
    );
    assert_eq!(
        current_user(pg.port, "trust_user", None, "postgres"),
        "trust_user"
    );

    // Passwords are really checked, and the superuser line still applies.
    let wrong = psql_at(pg.port, "scram_user", Some("wrong"), "postgres", "SELECT 1")
        .expect_err("wrong password must fail");
    assert!(
        format!("{wrong:#}").contains("password authentication failed"),
        "{wrong:#}"
    );
    psql_at(pg.port, "md5_user", Some("wrong"), "postgres", "SELECT 1")
        .expect_err("wrong md5 password must fail");
    assert_eq!(
        pg.psql("postgres", "SELECT current_user")
            .expect("superuser")
            .trim(),
        "postgres"
    );

    // Backends leave pg_stat_activity a moment after psql disconnects.
    pg.wait_for_backends("scram_user", 0, Duration::from_secs(10))
        .expect("scram_user sessions gone");
    // The superuser's own psql session is counted, its background workers not.
    assert!(pg.backends_of("postgres").expect("count") >= 1);

    pg.create_db("app", "scram_user").expect("create db");
    assert_eq!(
        current_user(pg.port, "scram_user", Some("s3cret scram"), "app"),
        "scram_user"
    );
}

#[test]
fn pgbench_runs_against_the_cluster() {
    let pg = PgCluster::start().expect("start cluster");
    pg.create_db("bench", "postgres").expect("create db");
    pg.pgbench_init("bench", 1).expect("pgbench -i");
    assert_eq!(
        pg.psql("bench", "SELECT count(*) FROM pgbench_accounts")
            .expect("count")
            .trim(),
        "100000"
    );
    let out = client_command(
        &pg.bin_dir().join("pgbench"),
        pg.port,
        "postgres",
        Some(&pg.superuser_password),
    )
    .args(["-S", "-T", "1", "-c", "2", "bench"])
    .output()
    .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tps = "), "{stdout}");
}

#[test]
fn pgbouncer_pools_scram_and_md5_roles() {
    let pg = PgCluster::start().expect("start cluster");
    pg.create_role("app", "app pw", AuthMethod::Scram)
        .expect("role");
    pg.create_role("legacy", "legacy pw", AuthMethod::Md5)
        .expect("role");
    pg.create_db("appdb", "app").expect("db");

    let started = Instant::now();
    let bouncer = PgBouncer::start(&pg, "appdb", "app", "app pw").expect("start pgbouncer");
    eprintln!(
        "pgbouncer started on port {} in {:?}",
        bouncer.port,
        started.elapsed()
    );
    assert_ne!(bouncer.port, pg.port);
    assert_eq!(
        current_user(bouncer.port, "app", Some("app pw"), "appdb"),
        "app"
    );
    psql_at(bouncer.port, "app", Some("wrong"), "appdb", "SELECT 1")
        .expect_err("wrong password must fail at pgbouncer");

    // pgbench with 8 clients through session pooling, as the benchmarks do.
    let pgbench = pg.bin_dir().join("pgbench");
    let init = client_command(&pgbench, bouncer.port, "app", Some("app pw"))
        .args(["-i", "-s", "1", "-q", "appdb"])
        .output()
        .expect("run pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = client_command(&pgbench, bouncer.port, "app", Some("app pw"))
        .args(["-S", "-T", "1", "-c", "8", "appdb"])
        .output()
        .expect("run pgbench");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // pgbouncer logs in to the cluster with MD5 when the role needs it.
    let md5 = PgBouncer::start(&pg, "postgres", "legacy", "legacy pw").expect("start pgbouncer");
    assert_eq!(
        current_user(md5.port, "legacy", Some("legacy pw"), "postgres"),
        "legacy"
    );
}

#[test]
fn drop_stops_servers_and_removes_their_directories() {
    let pg = PgCluster::start().expect("start cluster");
    pg.create_role("app", "pw", AuthMethod::Scram)
        .expect("role");
    let bouncer = PgBouncer::start(&pg, "postgres", "app", "pw").expect("start pgbouncer");
    let (pg_port, bouncer_port) = (pg.port, bouncer.port);
    let socket_dir = pg.socket_dir().to_owned();
    assert!(socket_dir.join(format!(".s.PGSQL.{pg_port}")).exists());

    drop(bouncer);
    assert!(TcpStream::connect(("127.0.0.1", bouncer_port)).is_err());
    drop(pg);
    assert!(TcpStream::connect(("127.0.0.1", pg_port)).is_err());
    assert!(!socket_dir.exists(), "{} left behind", socket_dir.display());
}
