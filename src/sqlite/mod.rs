//! The embedded database: one SQLite file shared by the registry, the workflow store and the
//! step queue, safe for several processes on one host (WAL journal, busy timeout, immediate
//! write transactions).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use rusqlite_migration::{M, Migrations};

/// A shared handle on the database file. Cloning is cheap; all clones use one connection,
/// so statements of one process never contend with each other for the write lock.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl Db {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path, busy_timeout: Duration) -> anyhow::Result<Db> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| {
                format!(
                    "cannot create the directory of the database `{}`",
                    parent.display()
                )
            })?;
        }
        let mut conn = Connection::open(path)
            .with_context(|| format!("cannot open the database `{}`", path.display()))?;
        conn.busy_timeout(busy_timeout)?;
        // WAL lets readers in other processes proceed while one process writes; NORMAL
        // synchronous is durable across process crashes (the only crash WAL+NORMAL can lose
        // is a power cut, and then only the last transactions, never consistency).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, path)?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// Opens the existing database at `path` for reading only, for commands that only look
    /// things up: nothing is created (not the file, its directory or the migration lock) and
    /// nothing is migrated. `None` when there is no database yet. SQLite itself may add the
    /// `-wal` and `-shm` files beside the database, as for any reader of a WAL database; the
    /// next writer uses and removes them.
    pub fn open_read_only(path: &Path, busy_timeout: Duration) -> anyhow::Result<Option<Db>> {
        match std::fs::metadata(path) {
            Ok(_) => (),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(anyhow::Error::new(err)
                    .context(format!("cannot open the database `{}`", path.display())));
            }
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open the database `{}`", path.display()))?;
        conn.busy_timeout(busy_timeout)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let pending = migrations()
            .pending_migrations(&conn)
            .with_context(|| format!("cannot read the schema of `{}`", path.display()))?;
        if pending > 0 {
            anyhow::bail!(
                "the database `{}` has an older schema; a command that writes (such as \
                 `workers jobs run watch`) brings it up to date",
                path.display()
            );
        }
        if pending < 0 {
            anyhow::bail!(
                "the database `{}` was written by a newer version of workers",
                path.display()
            );
        }
        Ok(Some(Db {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path.to_path_buf()),
        }))
    }

    /// An empty database in memory with the current schema: what a look-up finds where no
    /// database exists yet. `path` is where the real one would be.
    pub fn empty(path: &Path) -> anyhow::Result<Db> {
        let mut conn = Connection::open_in_memory()?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations()
            .to_latest(&mut conn)
            .context("cannot create the schema of an empty database")?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path.to_path_buf()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on a blocking thread, never on an async runtime thread.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .context("database task panicked")?
    }

    /// Runs `f` inside an immediate (write-locking) transaction, committed when `f` succeeds.
    /// Taking the write lock up front avoids the deadlock of two readers upgrading at once.
    pub async fn write<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Synchronous access for code that already runs on a blocking thread.
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }
}

/// Brings the schema up to date. Processes starting together must not both migrate (the
/// second would find the tables it creates), so migration holds an exclusive lock on a file
/// beside the database; the second process then finds the schema current.
fn migrate(conn: &mut Connection, path: &Path) -> anyhow::Result<()> {
    let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
    lock_name.push(".migrate-lock");
    let lock_path = path.with_file_name(lock_name);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open `{}`", lock_path.display()))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("cannot lock `{}`", lock_path.display()))?;
    migrations()
        .to_latest(conn)
        .with_context(|| format!("cannot migrate the database `{}`", path.display()))
}

/// The schema, one migration per file, oldest first: SQLite's, and PostgreSQL's through
/// `sql::postgres::schema_of`.
pub const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_initial.sql"),
    include_str!("migrations/0002_scheduler.sql"),
    include_str!("migrations/0003_dead_letters.sql"),
    include_str!("migrations/0004_task_starts.sql"),
    include_str!("migrations/0005_uploads.sql"),
    include_str!("migrations/0006_control.sql"),
    include_str!("migrations/0007_queue_published_at.sql"),
    include_str!("migrations/0008_fixity.sql"),
    include_str!("migrations/0009_space.sql"),
    include_str!("migrations/0010_lease_since.sql"),
];

fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
}

/// Milliseconds since the Unix epoch, the time unit of every column.
pub fn to_millis(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

pub fn from_millis(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[test]
    fn read_only_opening_creates_nothing_and_reads_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/w.db");
        assert!(
            Db::open_read_only(&path, Duration::from_secs(1))
                .unwrap()
                .is_none()
        );
        assert!(!dir.path().join("sub").exists(), "nothing may be created");

        let db = Db::open(&path, Duration::from_secs(1)).unwrap();
        db.with_conn(|c| {
            c.execute_batch("CREATE TABLE probe (x INTEGER); INSERT INTO probe VALUES (7);")?;
            Ok(())
        })
        .unwrap();
        drop(db);
        let db = Db::open_read_only(&path, Duration::from_secs(1))
            .unwrap()
            .unwrap();
        let x: i64 = db
            .with_conn(|c| Ok(c.query_row("SELECT x FROM probe", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(x, 7);
        let write = db.with_conn(|c| Ok(c.execute("INSERT INTO probe VALUES (8)", [])?));
        assert!(write.is_err(), "a read-only database refuses writes");
    }

    #[test]
    fn a_database_with_an_older_schema_is_not_read_only_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x INTEGER);")
            .unwrap();
        let err = Db::open_read_only(&path, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(err.to_string().contains("older schema"), "{err:#}");
    }

    #[test]
    fn reopening_keeps_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/w.db");
        Db::open(&path, Duration::from_secs(1)).unwrap();
        let db = Db::open(&path, Duration::from_secs(1)).unwrap();
        let mode: String = db
            .with_conn(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
