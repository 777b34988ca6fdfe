//! One SQL code path for two engines: the embedded SQLite file and a shared PostgreSQL database.
//!
//! The registry, the workflow store, the step queue and the mailbox are written once, against
//! [`Conn`], in the SQL both engines agree on (`ON CONFLICT`, `RETURNING`, row values,
//! `FILTER`). The schema is written once too: PostgreSQL runs the SQLite migrations through
//! [`postgres::schema_of`]. Where the dialects part, a statement names the difference with a
//! token that [`render`] replaces per engine:
//!
//! | token | SQLite | PostgreSQL |
//! |---|---|---|
//! | `?1`, `?2`, ... | as is | `$1`, `$2`, ... |
//! | `{now_ms}` | `unixepoch('subsec')` in ms | `clock_timestamp()` in ms |
//! | `{text_list ?N}` | `(SELECT value FROM json_each(?N))` | the elements of `?N` as text |
//! | `{int_list ?N}` | `(SELECT value FROM json_each(?N))` | the elements of `?N` as bigint |
//! | `{skip_locked}` | nothing (one writer at a time) | `FOR UPDATE SKIP LOCKED` |
//! | `{unflushed_commit}` | true | true, and the commit does not wait for its flush |
//!
//! `{now_ms}` is the database's clock: on PostgreSQL the server's, so that hosts whose clocks
//! disagree still agree on leases and claims.
//!
//! `{unflushed_commit}` is a condition that holds, and on PostgreSQL lets the statement's own
//! commit return before the write-ahead log is flushed to disk (`synchronous_commit` off for
//! that one transaction), saving a disk flush; SQLite's commits (WAL, `synchronous=NORMAL`)
//! never wait for one. A statement may carry it only if a later statement of the same piece of
//! work commits with a flush before anything outside the database acts on it: the log is
//! written in order, so that flush makes this commit durable too, and a database crash before
//! it loses this commit only as it loses the unfinished work.
//!
//! Values cross the seam as [`Value`]s: integers (times are milliseconds since the epoch,
//! booleans 0 and 1, as in the SQLite schema), reals, text (JSON is stored as text) and NULL.

pub mod copy;
pub mod postgres;
pub mod sqlite;
pub mod tls;

use std::borrow::Cow;

use anyhow::Context;

pub use self::postgres::PgDb;
pub use crate::sqlite::Db;

/// Which engine a connection talks to, for the few statements that differ beyond the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A value bound to a statement or read from a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

/// Converts a Rust value to a bound [`Value`]; see [`args!`](crate::args).
pub trait ToValue {
    fn to_value(&self) -> Value;
}

macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(*self as i64)
            }
        }
    )*};
}
int_to_value!(i64, i32, u32, u16, u8, usize, u64);

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        match self {
            Some(value) => value.to_value(),
            None => Value::Null,
        }
    }
}

/// The arguments of a statement: `args![id, name, None::<i64>]`.
#[macro_export]
macro_rules! args {
    () => { &[] as &[$crate::sql::Value] };
    ($($arg:expr),+ $(,)?) => {
        &[$($crate::sql::ToValue::to_value(&$arg)),+] as &[$crate::sql::Value]
    };
}

/// Converts a column of a [`Row`] to a Rust value.
pub trait FromValue: Sized {
    /// What the type is called in an error.
    const NAME: &'static str;
    fn from_value(value: &Value) -> Option<Self>;
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            const NAME: &'static str = stringify!($t);
            fn from_value(value: &Value) -> Option<Self> {
                match value {
                    Value::Int(v) => <$t>::try_from(*v).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
int_from_value!(i64, i32, u32, u64, usize);

impl FromValue for bool {
    const NAME: &'static str = "bool";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(v) => Some(*v != 0),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    const NAME: &'static str = "f64";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Real(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
}

impl FromValue for String {
    const NAME: &'static str = "text";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    const NAME: &'static str = T::NAME;
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One row of a result, its columns in the order the statement selects them.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `index` as a `T`; an error names the column and what it held.
    pub fn get<T: FromValue>(&self, index: usize) -> anyhow::Result<T> {
        let value = self
            .0
            .get(index)
            .with_context(|| format!("the result has no column {index}"))?;
        T::from_value(value)
            .with_context(|| format!("column {index} holds {value:?}, which is not a {}", T::NAME))
    }
}

/// A connection, inside a transaction for writes: what the backends are written against.
pub trait Conn {
    fn engine(&self) -> Engine;

    /// Runs a statement; returns how many rows it changed.
    fn execute(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<u64>;

    /// Runs a query; returns every row.
    fn query(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Vec<Row>>;

    /// The first row of a query, if any.
    fn query_opt(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row of a query that always returns one (an aggregate, `RETURNING`).
    fn query_one(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Row> {
        self.query_opt(sql, args)?
            .with_context(|| format!("the statement returned no row: {}", first_line(sql)))
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or_default()
}

/// A database the backends share: the embedded SQLite file or a PostgreSQL pool. Cloning is
/// cheap.
#[derive(Clone)]
pub enum Database {
    Sqlite(Db),
    Postgres(PgDb),
}

impl From<Db> for Database {
    fn from(db: Db) -> Database {
        Database::Sqlite(db)
    }
}

impl From<PgDb> for Database {
    fn from(db: PgDb) -> Database {
        Database::Postgres(db)
    }
}

impl Database {
    pub fn engine(&self) -> Engine {
        match self {
            Database::Sqlite(_) => Engine::Sqlite,
            Database::Postgres(_) => Engine::Postgres,
        }
    }

    /// Runs `f` outside a transaction, on a blocking thread: for reads.
    pub async fn read<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(&mut dyn Conn) -> anyhow::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        match self {
            Database::Sqlite(db) => db.call(move |conn| f(&mut sqlite::SqliteConn(conn))).await,
            Database::Postgres(db) => db.read(f).await,
        }
    }

    /// Runs `f` in a transaction that sees and writes as if it were alone, committed when `f`
    /// succeeds, on a blocking thread. On PostgreSQL `f` may run more than once: a transaction
    /// that conflicts with another, or whose connection broke before it committed, is run
    /// again; so `f` decides from what it reads, never from what an earlier call of it did.
    pub async fn write<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(&mut dyn Conn) -> anyhow::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        match self {
            Database::Sqlite(db) => db.write(move |tx| f(&mut sqlite::SqliteConn(tx))).await,
            Database::Postgres(db) => db.write(f).await,
        }
    }

    /// `write` for a closure that runs one statement: on PostgreSQL it is its own transaction
    /// (no BEGIN and COMMIT round trips), at the server's default isolation, READ COMMITTED,
    /// which a single statement's atomicity makes enough; it is not run again once sent.
    pub async fn write_alone<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(&mut dyn Conn) -> anyhow::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        match self {
            Database::Sqlite(db) => db.write(move |tx| f(&mut sqlite::SqliteConn(tx))).await,
            Database::Postgres(db) => db.write_alone(f).await,
        }
    }
}

/// The statement `sql` in `engine`'s dialect (see the module documentation for the tokens).
pub fn render(engine: Engine, sql: &str) -> Cow<'_, str> {
    if engine == Engine::Sqlite && !sql.contains('{') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len() + 32);
    let mut rest = sql;
    while let Some(at) = rest.find(['{', '?', '\'']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if rest.starts_with('\'') {
            // A string literal is copied as it is.
            let end = rest[1..].find('\'').map_or(rest.len(), |e| e + 2);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
        } else if rest.starts_with('?') {
            let digits = rest[1..].bytes().take_while(u8::is_ascii_digit).count();
            out.push(if engine == Engine::Postgres { '$' } else { '?' });
            out.push_str(&rest[1..1 + digits]);
            rest = &rest[1 + digits..];
        } else if let Some((token, len)) = token_at(rest) {
            out.push_str(&token.render(engine));
            rest = &rest[len..];
        } else {
            out.push('{');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

enum Token<'a> {
    NowMs,
    TextList(&'a str),
    IntList(&'a str),
    SkipLocked,
    UnflushedCommit,
}

/// The token at the start of `s`, and its length.
fn token_at(s: &str) -> Option<(Token<'_>, usize)> {
    let end = s.find('}')?;
    let inner = &s[1..end];
    let token = match inner.split_once(' ') {
        None if inner == "now_ms" => Token::NowMs,
        None if inner == "skip_locked" => Token::SkipLocked,
        None if inner == "unflushed_commit" => Token::UnflushedCommit,
        Some(("text_list", param)) => Token::TextList(param),
        Some(("int_list", param)) => Token::IntList(param),
        _ => return None,
    };
    Some((token, end + 1))
}

impl Token<'_> {
    fn render(&self, engine: Engine) -> String {
        let param = |p: &str| match engine {
            Engine::Sqlite => p.to_owned(),
            Engine::Postgres => p.replacen('?', "$", 1),
        };
        match (self, engine) {
            (Token::NowMs, Engine::Sqlite) => {
                "CAST(unixepoch('subsec') * 1000 AS BIGINT)".to_owned()
            }
            (Token::NowMs, Engine::Postgres) => {
                "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)".to_owned()
            }
            (Token::TextList(p) | Token::IntList(p), Engine::Sqlite) => {
                format!("(SELECT value FROM json_each({p}))")
            }
            (Token::TextList(p), Engine::Postgres) => format!(
                "(SELECT json_array_elements_text(CAST({} AS json)))",
                param(p)
            ),
            (Token::IntList(p), Engine::Postgres) => format!(
                "(SELECT CAST(json_array_elements_text(CAST({} AS json)) AS BIGINT))",
                param(p)
            ),
            (Token::SkipLocked, Engine::Sqlite) => String::new(),
            (Token::SkipLocked, Engine::Postgres) => "FOR UPDATE SKIP LOCKED".to_owned(),
            (Token::UnflushedCommit, Engine::Sqlite) => "1 = 1".to_owned(),
            (Token::UnflushedCommit, Engine::Postgres) => {
                "(SELECT set_config('synchronous_commit', 'off', true)) = 'off'".to_owned()
            }
        }
    }
}

/// A JSON list of `items`, for a `{text_list ?N}` or `{int_list ?N}` argument.
pub fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_statements_without_tokens_are_not_copied() {
        let sql = "SELECT a FROM t WHERE b = ?1";
        assert!(matches!(render(Engine::Sqlite, sql), Cow::Borrowed(_)));
    }

    #[test]
    fn placeholders_and_tokens_are_rendered_per_engine() {
        let sql = "SELECT a FROM t WHERE b = ?1 AND c IN {text_list ?12} AND d < {now_ms} \
                   AND e = '?3 {now_ms}' {skip_locked}";
        assert_eq!(
            render(Engine::Sqlite, sql),
            "SELECT a FROM t WHERE b = ?1 AND c IN (SELECT value FROM json_each(?12)) AND d < \
             CAST(unixepoch('subsec') * 1000 AS BIGINT) AND e = '?3 {now_ms}' "
        );
        assert_eq!(
            render(Engine::Postgres, sql),
            "SELECT a FROM t WHERE b = $1 AND c IN (SELECT json_array_elements_text(CAST($12 \
             AS json))) AND d < CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) \
             AND e = '?3 {now_ms}' FOR UPDATE SKIP LOCKED"
        );
    }

    #[test]
    fn a_commit_that_need_not_wait_for_its_flush_says_so_only_on_postgres() {
        let sql = "UPDATE t SET a = 1 WHERE b = ?1 AND {unflushed_commit}";
        assert_eq!(
            render(Engine::Sqlite, sql),
            "UPDATE t SET a = 1 WHERE b = ?1 AND 1 = 1"
        );
        assert_eq!(
            render(Engine::Postgres, sql),
            "UPDATE t SET a = 1 WHERE b = $1 AND \
             (SELECT set_config('synchronous_commit', 'off', true)) = 'off'"
        );
    }

    #[test]
    fn braces_that_are_not_tokens_stay() {
        assert_eq!(
            render(Engine::Postgres, "SELECT '{}' || ?1, {x}"),
            "SELECT '{}' || $1, {x}"
        );
    }

    #[test]
    fn a_column_of_the_wrong_type_is_named() {
        let row = Row(vec![Value::Text("x".into()), Value::Null]);
        let err = row.get::<i64>(0).unwrap_err().to_string();
        assert!(err.contains("column 0") && err.contains("i64"), "{err}");
        assert_eq!(row.get::<Option<i64>>(1).unwrap(), None);
        assert!(row.get::<String>(2).is_err());
    }
}
