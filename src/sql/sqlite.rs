//! [`Conn`] on a SQLite connection (the embedded file, `crate::sqlite::Db`).

use rusqlite::types::{ToSqlOutput, ValueRef};

use super::{Conn, Engine, Row, Value, render};

/// A SQLite connection or transaction seen as a [`Conn`]. Statements are prepared once per
/// connection and kept (rusqlite's statement cache).
pub struct SqliteConn<'a>(pub &'a rusqlite::Connection);

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Real(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
        })
    }
}

fn value_of(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(v) => Value::Int(v),
        ValueRef::Real(v) => Value::Real(v),
        ValueRef::Text(v) | ValueRef::Blob(v) => Value::Text(String::from_utf8_lossy(v).into()),
    }
}

impl Conn for SqliteConn<'_> {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<u64> {
        let sql = render(Engine::Sqlite, sql);
        let mut statement = self.0.prepare_cached(&sql)?;
        Ok(statement.execute(rusqlite::params_from_iter(args))? as u64)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Vec<Row>> {
        let sql = render(Engine::Sqlite, sql);
        let mut statement = self.0.prepare_cached(&sql)?;
        let columns = statement.column_count();
        let mut rows = statement.query(rusqlite::params_from_iter(args))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(value_of(row.get_ref(i)?));
            }
            out.push(Row(values));
        }
        Ok(out)
    }

    fn query_opt(&mut self, sql: &str, args: &[Value]) -> anyhow::Result<Option<Row>> {
        let sql = render(Engine::Sqlite, sql);
        let mut statement = self.0.prepare_cached(&sql)?;
        let columns = statement.column_count();
        let mut rows = statement.query(rusqlite::params_from_iter(args))?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(value_of(row.get_ref(i)?));
        }
        Ok(Some(Row(values)))
    }
}
