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
