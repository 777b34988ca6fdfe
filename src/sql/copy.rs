//! Copying the embedded SQLite database into PostgreSQL (`workers migrate`): every table that
//! holds records, row by row through [`Value`], ids kept, in batches that can be interrupted and
//! run again.
//!
//! Both databases have the same tables and columns (PostgreSQL's schema is the SQLite
//! migrations, `postgres::schema_of`), so a table is copied by the column names SQLite reports.
//! Rows go in primary-key order, one PostgreSQL transaction per batch, with `ON CONFLICT DO
//! NOTHING`: what a killed run committed is a prefix of each table, and a run finds where the
//! target stands (the greatest key there, and whether the source has exactly as many rows up to
//! it) and goes on from there without reading the prefix again. A row the target already holds
//! is compared with the source's: one that differs means the target holds another database's
//! data, or rows that changed after they were copied, and the copy stops ([`Mismatch`]) rather
//! than mix the two.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use super::{Conn, Database, Db, PgDb, Row, Value};
use crate::args;

/// The tables copied, parents before the tables whose foreign keys point at them.
pub const COPIED: &[&str] = &[
    "datasets",
    "dataset_states",
    "dataset_files",
    "bundles",
    "dataset_workflows",
    "workflows",
    "workflow_steps",
    "task_runs",
    "task_meta",
    "queue",
    "dead_letters",
    "watch_state",
    "job_runs",
    "job_slots",
    "metrics",
    "upload_logs",
    "worker_processes",
    "worker_logs",
    "revoked_tasks",
    "fixity_checks",
];

/// The tables not copied: what only the processes running now care about, which lapses or is
/// answered within seconds, and would name processes of the old site on the new one. Their id
/// sequences are still set past the source's ids.
pub const SKIPPED: &[&str] = &[
    "leases",
    "space_reservations",
    "control_requests",
    "control_replies",
];

/// Columns emptied as rows are copied: a queue row's claim belongs to a worker of the source
/// site; copied, it would keep the step from any worker of the target until it lapsed.
const CLEARED: &[(&str, &[&str])] = &[("queue", &["lease_owner", "lease_until"])];

/// Bind parameters PostgreSQL takes in one statement at most.
const MAX_PARAMS: usize = 65_535;

/// A row of the target that differs from the source's row with the same key (or a row of the
/// target that keeps the source's row out through another unique column).
#[derive(Debug, thiserror::Error)]
#[error(
    "table `{table}`: {detail}. The target holds another database's data, or rows that changed \
     after they were copied (the workers ran on it or on the source in between); nothing of \
     this batch was written. Copy into a new, empty database (createdb), with the workers and \
     the scheduler stopped"
)]
pub struct Mismatch {
    pub table: String,
    pub detail: String,
}

/// What happened to one table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableReport {
    pub table: &'static str,
    /// Rows in the source.
    pub source_rows: u64,
    /// Rows this run wrote.
    pub copied: u64,
    /// Rows of the source the target already held (a run before this one copied them).
    pub present: u64,
    /// Rows of the target that are not the source's: it held other data before the copy.
    pub other: u64,
    pub seconds: f64,
}

/// A column as SQLite describes it.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    /// Declared TEXT: compared byte by byte in PostgreSQL too (`COLLATE "C"`), as SQLite does.
    text: bool,
}

/// How a table is read and written.
#[derive(Debug, Clone)]
struct Shape {
    table: &'static str,
    columns: Vec<Column>,
    /// Indexes into `columns` of the primary key, in key order.
    key: Vec<usize>,
    /// Indexes into `columns` set to NULL when copied.
    cleared: Vec<usize>,
}

impl Shape {
    /// The table's columns from `PRAGMA table_info`.
    fn read(conn: &mut dyn Conn, table: &'static str) -> anyhow::Result<Shape> {
        let info = conn.query(&format!("PRAGMA table_info({})", quote(table)), args![])?;
        let mut columns = Vec::new();
        let mut key: Vec<(i64, usize)> = Vec::new();
        for row in &info {
            let name: String = row.get(1)?;
            let declared: String = row.get::<Option<String>>(2)?.unwrap_or_default();
            let pk: i64 = row.get(5)?;
            if pk > 0 {
                key.push((pk, columns.len()));
            }
            columns.push(Column {
                name,
                text: declared.eq_ignore_ascii_case("TEXT"),
            });
        }
        anyhow::ensure!(!columns.is_empty(), "the source has no table `{table}`");
        anyhow::ensure!(
            !key.is_empty(),
            "table `{table}` has no primary key to copy it in order by"
        );
        key.sort_unstable();
        let clear: &[&str] = CLEARED
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(&[], |(_, c)| c);
        let cleared = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| clear.contains(&c.name.as_str()))
            .map(|(i, _)| i)
            .collect();
        Ok(Shape {
            table,
            columns,
            key: key.into_iter().map(|(_, i)| i).collect(),
            cleared,
        })
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_list(&self) -> String {
        self.key
            .iter()
            .map(|&i| quote(&self.columns[i].name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `ORDER BY` the key in PostgreSQL, text in byte order as SQLite sorts it.
    fn pg_order(&self, direction: &str) -> String {
        self.key
            .iter()
            .map(|&i| {
                let column = &self.columns[i];
                let collate = if column.text { " COLLATE \"C\"" } else { "" };
                format!("{}{collate} {direction}", quote(&column.name))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `(k1, k2) > (?1, ?2)`, or `>=`, `<=`: a comparison of the key with bound values.
    fn key_compare(&self, op: &str) -> String {
        let params: Vec<String> = (1..=self.key.len()).map(|n| format!("?{n}")).collect();
        format!("({}) {op} ({})", self.key_list(), params.join(", "))
    }

    fn key_of(&self, row: &Row) -> Vec<Value> {
        self.key.iter().map(|&i| row.0[i].clone()).collect()
    }

    /// The row as it is written to the target.
    fn prepare(&self, mut row: Row) -> Row {
        for &i in &self.cleared {
            row.0[i] = Value::Null;
        }
        row
    }

    /// `id = 3`, `(dataset_id, path) = (3, 'a.txt')`: a key for messages.
    fn describe_key(&self, key: &[Value]) -> String {
        let values: Vec<String> = key.iter().map(show).collect();
        if key.len() == 1 {
            format!("{} = {}", self.columns[self.key[0]].name, values[0])
        } else {
            let names: Vec<&str> = self
                .key
                .iter()
                .map(|&i| self.columns[i].name.as_str())
                .collect();
            format!("({}) = ({})", names.join(", "), values.join(", "))
        }
    }

    /// Why `target` is not `source` (rows of the same key), or `None` when they are equal.
    fn difference(&self, source: &Row, target: &Row) -> Option<String> {
        let (name, s, t) = self
            .columns
            .iter()
            .zip(source.0.iter().zip(&target.0))
            .find(|(_, (s, t))| !same(s, t))
            .map(|(c, (s, t))| (&c.name, s, t))?;
        Some(format!(
            "the target's row {} differs from the source's: its column `{name}` holds {} where \
             the source's holds {}",
            self.describe_key(&self.key_of(source)),
            show(t),
            show(s)
        ))
    }
}

/// An identifier quoted for both engines (`metrics` has a column named `limit`).
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(i), Value::Real(r)) | (Value::Real(r), Value::Int(i)) => *i as f64 == *r,
        _ => a == b,
    }
}

/// A value for messages, long text cut short.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "NULL".to_owned(),
        Value::Int(v) => v.to_string(),
        Value::Real(v) => v.to_string(),
        Value::Text(v) if v.chars().count() > 60 => {
            format!("'{}...'", v.chars().take(60).collect::<String>())
        }
        Value::Text(v) => format!("'{v}'"),
    }
}

/// Checks that every table of the source is either copied or knowingly skipped, so that a
/// table added by a later migration is not left behind without anyone noticing.
pub async fn check_tables(source: &Db) -> anyhow::Result<()> {
    let tables = source_tables(source).await?;
    let unknown: Vec<&String> = tables
        .iter()
        .filter(|t| !COPIED.contains(&t.as_str()) && !SKIPPED.contains(&t.as_str()))
        .collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "the source has tables this version of workers does not know how to copy: {}",
        unknown
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn source_tables(source: &Db) -> anyhow::Result<Vec<String>> {
    Database::Sqlite(source.clone())
        .read(|conn| {
            conn.query(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
                args![],
            )?
            .iter()
            .map(|row| row.get(0))
            .collect()
        })
        .await
}

/// How many rows `table` holds in the source.
pub async fn source_count(source: &Db, table: &'static str) -> anyhow::Result<u64> {
    Database::Sqlite(source.clone())
        .read(move |conn| count(conn, table))
        .await
}

fn count(conn: &mut dyn Conn, table: &str) -> anyhow::Result<u64> {
    conn.query_one(&format!("SELECT COUNT(*) FROM {}", quote(table)), args![])?
        .get(0)
}

/// Where a run starts in a table: after the rows the target already holds, when they are
/// exactly the source's first rows by key.
struct Start {
    /// The greatest key the target holds; `None`: from the first row.
    after: Option<Vec<Value>>,
    /// Rows of the source up to `after`, all in the target.
    present: u64,
}

/// Finds where the target stands in `shape`'s table. Batches commit in key order, so what a
/// killed run leaves is the source's first rows: then the source has exactly as many rows up to
/// the target's greatest key as the target holds. While the target holds only rows of the
/// source, equal counts mean equal sets, and the run goes on after that key without reading
/// the prefix again; the first and last rows are compared all the same, which catches another
/// database's rows cheaply (both sites number from 1). Anything else (rows missing in the
/// middle, rows the workers added to the target, rows added to the source since) reads the
/// table from its first row, and each row the target holds is then compared.
async fn start_of(source: &Db, target: &PgDb, shape: &Arc<Shape>) -> anyhow::Result<Start> {
    let from_first = Start {
        after: None,
        present: 0,
    };
    let (held, ends) = {
        let shape = Arc::clone(shape);
        Database::Postgres(target.clone())
            .read(move |conn| {
                let held = count(conn, shape.table)?;
                if held == 0 {
                    return Ok((0, None));
                }
                let ends = ["ASC", "DESC"].map(|direction| {
                    conn.query_one(
                        &format!(
                            "SELECT {} FROM {} ORDER BY {} LIMIT 1",
                            shape.column_list(),
                            quote(shape.table),
                            shape.pg_order(direction)
                        ),
                        args![],
                    )
                });
                let [first, last] = ends;
                Ok((held, Some((first?, last?))))
            })
            .await?
    };
    let Some((first, last)) = ends else {
        return Ok(from_first);
    };
    let reader = Arc::clone(shape);
    let (first_key, last_key) = (shape.key_of(&first), shape.key_of(&last));
    let (up_to_last, source_first, source_last) = Database::Sqlite(source.clone())
        .read(move |conn| {
            let up_to: u64 = conn
                .query_one(
                    &format!(
                        "SELECT COUNT(*) FROM {} WHERE {}",
                        quote(reader.table),
                        reader.key_compare("<=")
                    ),
                    &last_key,
                )?
                .get(0)?;
            let by_key = |conn: &mut dyn Conn, key: &[Value]| {
                conn.query_opt(
                    &format!(
                        "SELECT {} FROM {} WHERE {}",
                        reader.column_list(),
                        quote(reader.table),
                        reader.key_compare("=")
                    ),
                    key,
                )
            };
            let source_first = by_key(conn, &first_key)?;
            let source_last = by_key(conn, &last_key)?;
            Ok((up_to, source_first, source_last))
        })
        .await?;
    if up_to_last != held {
        return Ok(from_first);
    }
    let after = shape.key_of(&last);
    for (source_row, target_row) in [(source_first, first), (source_last, last)] {
        let Some(source_row) = source_row else {
            // Not in the source at all: counts that agree by chance. The full pass finds it.
            return Ok(from_first);
        };
        if let Some(detail) = shape.difference(&shape.prepare(source_row), &target_row) {
            return Err(Mismatch {
                table: shape.table.to_owned(),
                detail,
            }
            .into());
        }
    }
    Ok(Start {
        after: Some(after),
        present: held,
    })
}

/// Copies one table in batches of `batch_size` rows; `progress` is told the rows done (copied
/// or already there) and the source's rows after each batch.
pub async fn copy_table(
    source: &Db,
    target: &PgDb,
    table: &'static str,
    batch_size: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<TableReport> {
    let started = Instant::now();
    let shape = Arc::new(
        Database::Sqlite(source.clone())
            .read(move |conn| Shape::read(conn, table))
            .await?,
    );
    let source_rows = source_count(source, table).await?;
    let start = start_of(source, target, &shape).await?;
    let mut after = start.after;
    let mut report = TableReport {
        table,
        source_rows,
        copied: 0,
        present: start.present,
        other: 0,
        seconds: 0.0,
    };
    progress(report.present, source_rows);
    let batch_size = batch_size.max(1);
    loop {
        let rows = {
            let (shape, after) = (Arc::clone(&shape), after.clone());
            Database::Sqlite(source.clone())
                .read(move |conn| read_batch(conn, &shape, after.as_deref(), batch_size))
                .await?
        };
        let Some(last) = rows.last() else {
            break;
        };
        let next = shape.key_of(last);
        let read = rows.len() as u64;
        let rows = Arc::new(rows);
        let copied = {
            let writer = Arc::clone(&shape);
            target
                .write(move |tx| write_batch(tx, &writer, &rows))
                .await
                .with_context(|| match &after {
                    Some(key) => format!(
                        "cannot copy the rows of `{table}` after {}",
                        shape.describe_key(key)
                    ),
                    None => format!("cannot copy the first rows of `{table}`"),
                })?
        };
        report.copied += copied;
        report.present += read - copied;
        progress(report.copied + report.present, source_rows);
        after = Some(next);
        if read < batch_size as u64 {
            break;
        }
    }
    // Rows whose keys no source row has were never compared with anything: counted, so that
    // a target that held other data does not pass for a clean copy.
    let held = Database::Postgres(target.clone())
        .read(move |conn| count(conn, table))
        .await?;
    report.other = held.saturating_sub(report.copied + report.present);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The next `limit` rows of the table after key `after`, in key order, as they are written.
fn read_batch(
    conn: &mut dyn Conn,
    shape: &Shape,
    after: Option<&[Value]>,
    limit: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut sql = format!("SELECT {} FROM {}", shape.column_list(), quote(shape.table));
    let mut args: Vec<Value> = Vec::new();
    if let Some(after) = after {
        write!(sql, " WHERE {}", shape.key_compare(">"))?;
        args.extend_from_slice(after);
    }
    write!(
        sql,
        " ORDER BY {} LIMIT ?{}",
        shape.key_list(),
        args.len() + 1
    )?;
    args.push(Value::Int(i64::try_from(limit).unwrap_or(i64::MAX)));
    Ok(conn
        .query(&sql, &args)?
        .into_iter()
        .map(|row| shape.prepare(row))
        .collect())
}

/// Inserts the rows the target does not hold yet and compares those it does; returns how many
/// were inserted. Runs in one transaction: a row that differs writes nothing of the batch.
fn write_batch(tx: &mut dyn Conn, shape: &Shape, rows: &[Row]) -> anyhow::Result<u64> {
    let width = shape.columns.len();
    let per_statement = (MAX_PARAMS / width).max(1);
    let mut inserted: HashSet<Vec<KeyPart>> = HashSet::new();
    for chunk in rows.chunks(per_statement) {
        let mut sql = format!(
            "INSERT INTO {} ({}) VALUES ",
            quote(shape.table),
            shape.column_list()
        );
        for (r, _) in chunk.iter().enumerate() {
            sql.push_str(if r == 0 { "(" } else { ", (" });
            for c in 0..width {
                if c > 0 {
                    sql.push_str(", ");
                }
                write!(sql, "?{}", r * width + c + 1)?;
            }
            sql.push(')');
        }
        write!(
            sql,
            " ON CONFLICT DO NOTHING RETURNING {}",
            shape.key_list()
        )?;
        let args: Vec<Value> = chunk.iter().flat_map(|row| row.0.iter().cloned()).collect();
        for row in tx.query(&sql, &args)? {
            inserted.insert(key_parts(row.0));
        }
    }
    let held: Vec<&Row> = rows
        .iter()
        .filter(|row| !inserted.contains(&key_parts(shape.key_of(row))))
        .collect();
    compare_held(tx, shape, &held)?;
    Ok((rows.len() - held.len()) as u64)
}

/// A key as a set member (`Value` holds floats, so it is not `Hash`; keys are integers and
/// text).
#[derive(PartialEq, Eq, Hash)]
enum KeyPart {
    Null,
    Int(i64),
    Real(u64),
    Text(String),
}

fn key_parts(key: Vec<Value>) -> Vec<KeyPart> {
    key.into_iter()
        .map(|value| match value {
            Value::Null => KeyPart::Null,
            Value::Int(v) => KeyPart::Int(v),
            Value::Real(v) => KeyPart::Real(v.to_bits()),
            Value::Text(v) => KeyPart::Text(v),
        })
        .collect()
}

/// Checks that the target's rows with the keys of `rows` are `rows`. The keys go as one JSON
/// argument joined with the table, which PostgreSQL answers from the primary key's index (a
/// list of row values in `IN (...)` is read against the whole table, once per batch).
fn compare_held(tx: &mut dyn Conn, shape: &Shape, rows: &[&Row]) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let key_columns: Vec<&Column> = shape.key.iter().map(|&i| &shape.columns[i]).collect();
    let keys: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            key_columns
                .iter()
                .zip(shape.key_of(row))
                .map(|(column, value)| (column.name.clone(), json_of(value)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        })
        .collect();
    let record = key_columns
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                quote(&c.name),
                if c.text { "TEXT" } else { "BIGINT" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let join = key_columns
        .iter()
        .map(|c| format!("t.{name} = k.{name}", name = quote(&c.name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let columns = shape
        .columns
        .iter()
        .map(|c| format!("t.{}", quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {columns} FROM {} AS t \
         JOIN json_to_recordset(CAST(?1 AS json)) AS k({record}) ON {join}",
        quote(shape.table)
    );
    let found: std::collections::HashMap<Vec<KeyPart>, Row> = tx
        .query(&sql, args![serde_json::Value::Array(keys).to_string()])?
        .into_iter()
        .map(|row| (key_parts(shape.key_of(&row)), row))
        .collect();
    for row in rows {
        let key = shape.key_of(row);
        let Some(target) = found.get(&key_parts(key.clone())) else {
            return Err(Mismatch {
                table: shape.table.to_owned(),
                detail: format!(
                    "the source's row {} cannot be written: a row of the target with another \
                     key holds the same value in a column that must be unique",
                    shape.describe_key(&key)
                ),
            }
            .into());
        };
        if let Some(detail) = shape.difference(row, target) {
            return Err(Mismatch {
                table: shape.table.to_owned(),
                detail,
            }
            .into());
        }
    }
    Ok(())
}

fn json_of(value: Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Int(v) => v.into(),
        Value::Real(v) => v.into(),
        Value::Text(v) => v.into(),
    }
}

/// Sets the id sequence of each identity column of `table` in the target past every id the
/// table holds there and every id SQLite has handed out for it (`sqlite_sequence`, which
/// AUTOINCREMENT never goes back on, so ids of deleted rows are not reused either), and never
/// back: the next row the backends insert gets a new id.
pub async fn set_sequences(source: &Db, target: &PgDb, table: &'static str) -> anyhow::Result<()> {
    let columns: Vec<String> = Database::Postgres(target.clone())
        .read(move |conn| {
            conn.query(
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = ?1 \
                 AND is_identity = 'YES'",
                args![table],
            )?
            .iter()
            .map(|row| row.get(0))
            .collect()
        })
        .await?;
    for column in columns {
        let source_floor = {
            let column = column.clone();
            Database::Sqlite(source.clone())
                .read(move |conn| {
                    let handed_out: Option<i64> = conn
                        .query_opt(
                            "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                            args![table],
                        )?
                        .map(|row| row.get(0))
                        .transpose()?;
                    let max: Option<i64> = conn
                        .query_one(
                            &format!("SELECT MAX({}) FROM {}", quote(&column), quote(table)),
                            args![],
                        )?
                        .get(0)?;
                    Ok(handed_out.unwrap_or(0).max(max.unwrap_or(0)))
                })
                .await?
        };
        target
            .write(move |tx| {
                let sequence = "CAST(pg_get_serial_sequence(?1, ?2) AS regclass)";
                tx.query_one(
                    &format!(
                        "SELECT setval({sequence}, GREATEST( \
                             (SELECT COALESCE(MAX({column}), 0) FROM {table}), \
                             CAST(?3 AS BIGINT), \
                             COALESCE(pg_sequence_last_value({sequence}), 0)) + 1, false)",
                        column = quote(&column),
                        table = quote(table),
                    ),
                    args![table, column, source_floor],
                )?;
                Ok(())
            })
            .await
            .with_context(|| format!("cannot set the id sequence of `{table}`"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_source() -> Db {
        Db::empty(std::path::Path::new("test.db")).unwrap()
    }

    #[tokio::test]
    async fn every_table_of_the_schema_is_copied_or_skipped() {
        let source = empty_source();
        check_tables(&source).await.unwrap();
        let tables = source_tables(&source).await.unwrap();
        for table in COPIED.iter().chain(SKIPPED) {
            assert!(tables.iter().any(|t| t == table), "no table `{table}`");
        }
    }

    #[tokio::test]
    async fn tables_are_copied_after_the_tables_they_refer_to() {
        let source = empty_source();
        for (position, table) in COPIED.iter().enumerate() {
            let parents: Vec<String> = Database::Sqlite(source.clone())
                .read(move |conn| {
                    conn.query(&format!("PRAGMA foreign_key_list({table})"), args![])?
                        .iter()
                        .map(|row| row.get(2))
                        .collect()
                })
                .await
                .unwrap();
            for parent in parents {
                let at = COPIED.iter().position(|t| *t == parent);
                assert!(
                    at.is_some_and(|at| at < position),
                    "`{table}` refers to `{parent}`, which is not copied before it"
                );
            }
        }
    }

    #[tokio::test]
    async fn every_copied_table_has_a_key_and_the_queue_loses_its_leases() {
        let source = empty_source();
        for table in COPIED {
            let shape = Database::Sqlite(source.clone())
                .read(move |conn| Shape::read(conn, table))
                .await
                .unwrap();
            assert!(!shape.key.is_empty(), "{table}");
            if *table == "queue" {
                let cleared: Vec<&str> = shape
                    .cleared
                    .iter()
                    .map(|&i| shape.columns[i].name.as_str())
                    .collect();
                assert_eq!(cleared, ["lease_owner", "lease_until"]);
            }
        }
    }

    #[test]
    fn keys_and_differences_are_named() {
        let shape = Shape {
            table: "dataset_files",
            columns: vec![
                Column {
                    name: "dataset_id".into(),
                    text: false,
                },
                Column {
                    name: "path".into(),
                    text: true,
                },
                Column {
                    name: "md5".into(),
                    text: true,
                },
            ],
            key: vec![0, 1],
            cleared: vec![],
        };
        assert_eq!(
            shape.key_compare(">"),
            "(\"dataset_id\", \"path\") > (?1, ?2)"
        );
        assert_eq!(
            shape.pg_order("DESC"),
            "\"dataset_id\" DESC, \"path\" COLLATE \"C\" DESC"
        );
        let source = Row(vec![
            Value::Int(3),
            Value::Text("a.txt".into()),
            Value::Text("x".into()),
        ]);
        let mut target = source.clone();
        assert_eq!(shape.difference(&source, &target), None);
        target.0[2] = Value::Null;
        let detail = shape.difference(&source, &target).unwrap();
        assert!(
            detail.contains("(dataset_id, path) = (3, 'a.txt')")
                && detail.contains("`md5` holds NULL where the source's holds 'x'"),
            "{detail}"
        );
    }
}
