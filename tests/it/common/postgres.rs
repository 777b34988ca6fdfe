//! A throw-away PostgreSQL database per test, on the server at `WORKERS_TEST_POSTGRES_URL`
//! (by default `postgres://postgres@127.0.0.1:5432/postgres`, the server `scripts/services.sh`
//! uses: trust authentication): created by the test, dropped with `WITH (FORCE)` when the value
//! is dropped (also when the test fails).

use std::time::Duration;

use workers::sql::postgres::{PgConfig, PgDb};

/// The server's maintenance database, from which test databases are created and dropped.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct TestPostgres {
    /// The URL of the test's own database.
    pub url: String,
    pub name: String,
    admin_url: String,
}

impl TestPostgres {
    /// `None`, with a note, when the server cannot be reached; under CI (`CI=true`) that is a
    /// failure.
    pub fn new() -> Option<TestPostgres> {
        let admin_url = std::env::var("WORKERS_TEST_POSTGRES_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let name = format!("workers_test_{}", uuid::Uuid::new_v4().simple());
        if let Err(err) = run(&admin_url, &format!("CREATE DATABASE {name}")) {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "cannot create a database at {admin_url}: {err}; CI runs every test: \
                 eval \"$(scripts/services.sh)\""
            );
            eprintln!(
                "note: cannot create a database at {admin_url} ({err}); skipping \
                 (eval \"$(scripts/services.sh)\")"
            );
            return None;
        }
        let url = database_url(&admin_url, &name);
        Some(TestPostgres {
            url,
            name,
            admin_url,
        })
    }

    pub fn config(&self) -> PgConfig {
        PgConfig {
            url: self.url.clone(),
            password: None,
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(30),
            display: format!("test database {}", self.name),
        }
    }

    /// The database, connected and migrated.
    pub async fn db(&self) -> PgDb {
        PgDb::connect(self.config()).await.unwrap()
    }

    /// Runs `sql` on the test's database from a connection of its own (to change what the
    /// backends wrote behind their backs).
    pub fn execute(&self, sql: &str) {
        run(&self.url, sql).unwrap();
    }
}

/// Runs `sql` on a connection of its own, on a thread of its own: the sync client runs a
/// runtime of its own, which cannot start inside a test's.
fn run(url: &str, sql: &str) -> Result<(), postgres::Error> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let mut config: postgres::Config = url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        let mut client = config.connect(postgres::NoTls)?;
        client.batch_execute(&sql)
    })
    .join()
    .expect("the statement's thread panicked")
}

/// `admin_url` with its database replaced by `name`.
pub fn database_url(admin_url: &str, name: &str) -> String {
    let mut url = url::Url::parse(admin_url).unwrap();
    url.set_path(&format!("/{name}"));
    url.to_string()
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let dropped = run(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
        if let Err(err) = dropped {
            eprintln!(
                "note: could not drop the test database {}: {err}",
                self.name
            );
        }
    }
}

/// A PostgreSQL server of the test's own, in a temporary directory, for what the shared server
/// cannot be changed to do (authenticate by client certificate): made with the machine's
/// `initdb` (Debian's `/usr/lib/postgresql/<version>/bin`, or `WORKERS_TEST_PG_BINDIR`), run as
/// the `postgres` user when the test runs as root, stopped when dropped.
pub struct PrivateServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bindir: std::path::PathBuf,
}

impl PrivateServer {
    /// `None`, with a note, where the server's programs are not installed; under CI that is a
    /// failure. `configure` writes into the data directory (certificates, `pg_hba.conf`) and
    /// returns lines for `postgresql.conf`, before the server starts.
    pub fn start(configure: impl FnOnce(&std::path::Path) -> String) -> Option<PrivateServer> {
        let Some(bindir) = server_bindir() else {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "no initdb found (/usr/lib/postgresql/*/bin, WORKERS_TEST_PG_BINDIR); CI runs \
                 every test"
            );
            eprintln!("note: no initdb found (/usr/lib/postgresql/*/bin); skipping");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = PrivateServer { dir, port, bindir };
        server.chown_to_server();
        server.server_command("initdb", |c| {
            c.args(["--auth=trust", "--no-sync", "--username=postgres", "-D"])
                .arg(&data);
        });
        let mut conf = configure(&data);
        conf.push_str(&format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = off\n",
            server.dir.path().display()
        ));
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut file, conf.as_bytes()).unwrap();
        server.chown_to_server();
        let log = server.dir.path().join("server.log");
        server.server_command("pg_ctl", |c| {
            c.args(["-w", "-t", "30", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .arg("start");
        });
        Some(server)
    }

    /// Runs one of the server's programs, as `postgres` when this process is root.
    fn server_command(&self, program: &str, args: impl FnOnce(&mut std::process::Command)) {
        let mut command = as_server(&self.bindir.join(program));
        args(&mut command);
        let out = command.output().unwrap();
        if !out.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "{program}: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Gives the server's directory, and what was written into it, to the server's user (only
    /// when this process is root: otherwise it is this process's already).
    fn chown_to_server(&self) {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let status = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "chown -R postgres:postgres {}",
            self.dir.path().display()
        );
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_server(&self.bindir.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(&data)
            .arg("stop")
            .output();
    }
}

/// `program` run as the server's user: `postgres` when this process is root (the server
/// refuses to run as root), else this process's.
fn as_server(program: &std::path::Path) -> std::process::Command {
    if rustix::process::geteuid().is_root() {
        let mut command = std::process::Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        std::process::Command::new(program)
    }
}

/// Where `initdb` and `pg_ctl` are: `WORKERS_TEST_PG_BINDIR`, or the newest of Debian's.
fn server_bindir() -> Option<std::path::PathBuf> {
    if let Ok(dir) = std::env::var("WORKERS_TEST_PG_BINDIR") {
        return Some(dir.into());
    }
    let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}
