//! Celery task messages, protocol v2 in JSON (spec G.2): the bytes and AMQP properties of a
//! step message, so that Python producers and consumers (celery 5.2 with sca-rhythm) and this
//! program read each other's messages.
//!
//! Headers are written with the AMQP field types py-amqp gives the same Python values
//! (strings as long strings, small integers as 32-bit integers, `None` as void), so a message
//! from here is indistinguishable from one Celery sends.

use chrono::{DateTime, NaiveDateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{ArgsRepr, TaskMessage, TimeLimits, saferepr};

pub const CONTENT_TYPE: &str = "application/json";
pub const CONTENT_ENCODING: &str = "utf-8";
/// AMQP `delivery_mode` of a message written to disk by the broker.
pub const PERSISTENT: u8 = 2;

/// Namespace of the `reply_to` ids this program writes.
const REPLY_TO_NAMESPACE: Uuid = Uuid::from_u128(0x0c7d_51a2_93e4_4b6f_8a10_6d2e_f4b3_9c58);

/// The sender's marks on each message: `origin` (`gen<pid>@<host>`, as Celery writes it) and
/// `reply_to` (the sender's id; unused with a result backend, but always present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub origin: String,
    pub reply_to: String,
}

impl Sender {
    pub fn new(hostname: &str, pid: u32) -> Sender {
        Sender {
            origin: format!("gen{pid}@{hostname}"),
            reply_to: Uuid::new_v5(&REPLY_TO_NAMESPACE, format!("{hostname}/{pid}").as_bytes())
                .to_string(),
        }
    }
}

/// The AMQP properties and body of `message`.
pub fn encode(message: &TaskMessage, sender: &Sender) -> (BasicProperties, Vec<u8>) {
    let headers = json!({
        "lang": "py",
        "task": message.task,
        "id": message.id,
        "shadow": null,
        "eta": message.eta.map(format_eta),
        "expires": null,
        "group": null,
        "group_index": null,
        "retries": message.retries,
        "timelimit": [message.time_limits.hard, message.time_limits.soft],
        "root_id": message.root_id,
        "parent_id": message.parent_id,
        "argsrepr": saferepr::args(&message.args),
        "kwargsrepr": saferepr::value(&Value::Object(message.kwargs.clone())),
        "origin": sender.origin,
        "ignore_result": false,
    });
    let table = match to_amqp(&headers) {
        AMQPValue::FieldTable(table) => table,
        _ => FieldTable::default(),
    };
    let body = json!([
        message.args,
        message.kwargs,
        {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
    ]);
    let properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_content_encoding(CONTENT_ENCODING.into())
        .with_headers(table)
        .with_delivery_mode(PERSISTENT)
        .with_priority(message.priority.min(9))
        .with_correlation_id(short(&message.id))
        .with_reply_to(short(&sender.reply_to));
    (properties, body.to_string().into_bytes())
}

/// The `argsrepr` and `kwargsrepr` headers of a message, when it has both.
pub fn header_reprs(properties: &BasicProperties) -> Option<ArgsRepr> {
    let headers = properties.headers().as_ref()?.inner();
    let text = |key: &str| match from_amqp(headers.get(&ShortString::from(key))?) {
        Value::String(text) => Some(text),
        _ => None,
    };
    Some(ArgsRepr {
        args: text("argsrepr")?,
        kwargs: text("kwargsrepr")?,
    })
}

/// Reads a message consumed from `queue`. Fails, saying why, for anything that is not a
/// protocol v2 JSON task message.
pub fn decode(
    properties: &BasicProperties,
    body: &[u8],
    queue: &str,
) -> anyhow::Result<TaskMessage> {
    let content_type = properties.content_type().as_ref().map(ShortString::as_str);
    if content_type != Some(CONTENT_TYPE) {
        anyhow::bail!(
            "content type {content_type:?} is not {CONTENT_TYPE} (only JSON messages are read)"
        );
    }
    if let Some(encoding) = properties.content_encoding() {
        let encoding = encoding.as_str().to_ascii_lowercase();
        if encoding != "utf-8" && encoding != "utf8" {
            anyhow::bail!("content encoding `{encoding}` is not utf-8");
        }
    }
    let headers = properties
        .headers()
        .as_ref()
        .map(headers_json)
        .unwrap_or_default();
    let text = |key: &str| -> anyhow::Result<String> {
        headers
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                anyhow::format_err!(
                    "header `{key}` is missing or not a string (protocol v2 messages carry it)"
                )
            })
    };
    let id = text("id")?;
    let task = text("task")?;
    let eta = match headers.get("eta") {
        None | Some(Value::Null) => None,
        Some(Value::String(eta)) => Some(
            parse_eta(eta).map_err(|err| anyhow::format_err!("task {id}: header `eta`: {err}"))?,
        ),
        Some(other) => anyhow::bail!("task {id}: header `eta` is not a date: {other}"),
    };
    let retries = match headers.get("retries") {
        None | Some(Value::Null) => 0,
        Some(value) => value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                anyhow::format_err!("task {id}: header `retries` is not a count: {value}")
            })?,
    };
    let root_id = headers
        .get("root_id")
        .and_then(Value::as_str)
        .map_or_else(|| id.clone(), str::to_owned);
    let parent_id = headers
        .get("parent_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // `[hard, soft]`, each a number of seconds or null; anything else means no limit.
    let limit = |i: usize| {
        headers
            .get("timelimit")
            .and_then(|t| t.get(i))
            .and_then(Value::as_f64)
    };
    let time_limits = TimeLimits {
        hard: limit(0),
        soft: limit(1),
    };
    let body: Value = serde_json::from_slice(body)
        .map_err(|err| anyhow::format_err!("task {id}: the body is not JSON: {err}"))?;
    let (args, kwargs) = match body {
        Value::Array(mut parts) if parts.len() >= 2 => {
            let kwargs = parts.swap_remove(1);
            let args = parts.swap_remove(0);
            match (args, kwargs) {
                (Value::Array(args), Value::Object(kwargs)) => (args, kwargs),
                _ => anyhow::bail!("task {id}: the body is not `[args, kwargs, embed]`"),
            }
        }
        _ => anyhow::bail!("task {id}: the body is not `[args, kwargs, embed]`"),
    };
    Ok(TaskMessage {
        id,
        task,
        args,
        kwargs,
        priority: properties.priority().unwrap_or(0).min(9),
        eta,
        retries,
        root_id,
        parent_id,
        queue: queue.to_owned(),
        time_limits,
    })
}

/// An AMQP table as JSON: how headers are read, and how tests and logs show them.
pub fn headers_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), from_amqp(value)))
        .collect()
}

/// The properties Celery sets, as JSON (the shape of the captured fixtures' `properties`).
pub fn properties_json(properties: &BasicProperties) -> Map<String, Value> {
    let mut out = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            out.insert(key.to_owned(), value);
        }
    };
    let string = |s: &Option<ShortString>| s.as_ref().map(|s| json!(s.as_str()));
    put("content_type", string(properties.content_type()));
    put("content_encoding", string(properties.content_encoding()));
    put(
        "application_headers",
        properties
            .headers()
            .as_ref()
            .map(|h| Value::Object(headers_json(h))),
    );
    put(
        "delivery_mode",
        properties.delivery_mode().map(|m| json!(m)),
    );
    put("priority", properties.priority().map(|p| json!(p)));
    put("correlation_id", string(properties.correlation_id()));
    put("reply_to", string(properties.reply_to()));
    out
}

/// `eta` as Celery writes it: ISO 8601 with microseconds and the UTC offset.
pub fn format_eta(eta: DateTime<Utc>) -> String {
    eta.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

/// Reads an `eta` in the forms Celery writes: ISO 8601 with an offset (or `Z`), or without
/// one (naive, meaning UTC, as Celery with `enable_utc` means it); fraction optional.
pub fn parse_eta(text: &str) -> anyhow::Result<DateTime<Utc>> {
    let text = text.trim();
    let iso = text.replacen(' ', "T", 1);
    if let Ok(at) = DateTime::parse_from_rfc3339(&iso) {
        return Ok(at.with_timezone(&Utc));
    }
    if let Ok(at) = NaiveDateTime::parse_from_str(&iso, "%Y-%m-%dT%H:%M:%S%.f") {
        return Ok(at.and_utc());
    }
    anyhow::bail!("`{text}` is not an ISO 8601 date and time")
}

/// A JSON value as Python's `repr` shows the value `json.loads` makes of it (an exception's
/// message in Celery's events is its `repr`).
pub fn py_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => float_repr(f),
            _ => n.to_string(),
        },
        Value::String(s) => str_repr(s),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(py_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", str_repr(k), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn float_repr(f: f64) -> String {
    if f.is_nan() {
        "nan".to_owned()
    } else if f.is_infinite() {
        if f > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else if f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        // Rust's shortest round-trip form, with Python's exponent sign.
        let s = format!("{f:?}");
        match s.split_once('e') {
            Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
            _ => s,
        }
    }
}

/// Python's `repr` of a string: single quotes unless the text has one and no double quote.
fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if ('\u{80}'..='\u{a0}').contains(&c) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn short(s: &str) -> ShortString {
    // Task ids are uuids; a longer value is cut rather than refused (AMQP short strings hold
    // 255 bytes).
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

/// JSON headers as the AMQP table py-amqp writes for the same Python dict.
pub fn headers_table(headers: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in headers {
        table.insert(short(key), to_amqp(value));
    }
    table
}

/// A JSON value in the AMQP field type py-amqp writes for the same Python value.
fn to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i32::try_from(i) {
                    Ok(small) => AMQPValue::LongInt(small),
                    Err(_) => AMQPValue::LongLongInt(i),
                }
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (key, value) in map {
                table.insert(short(key), to_amqp(value));
            }
            AMQPValue::FieldTable(table)
        }
    }
}

fn from_amqp(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::DecimalValue(d) => json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(from_amqp).collect())
        }
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(table) => Value::Object(headers_json(table)),
        AMQPValue::ByteArray(bytes) => json!(String::from_utf8_lossy(bytes.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/celery-sca-rhythm/amqp_message_first_step.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The fixture's properties as the AMQP values py-amqp sent.
    fn fixture_properties(fixture: &Value) -> BasicProperties {
        let p = &fixture["properties"];
        let headers = match to_amqp(&p["application_headers"]) {
            AMQPValue::FieldTable(table) => table,
            other => panic!("headers are not a table: {other:?}"),
        };
        BasicProperties::default()
            .with_content_type(p["content_type"].as_str().unwrap().into())
            .with_content_encoding(p["content_encoding"].as_str().unwrap().into())
            .with_headers(headers)
            .with_delivery_mode(p["delivery_mode"].as_u64().unwrap() as u8)
            .with_priority(p["priority"].as_u64().unwrap() as u8)
            .with_correlation_id(p["correlation_id"].as_str().unwrap().into())
            .with_reply_to(p["reply_to"].as_str().unwrap().into())
    }

    fn decoded_fixture() -> (Value, TaskMessage) {
        let fixture = fixture();
        let body = serde_json::to_vec(&fixture["body"]).unwrap();
        let queue = fixture["delivery_info"]["routing_key"].as_str().unwrap();
        let message = decode(&fixture_properties(&fixture), &body, queue).unwrap();
        (fixture, message)
    }

    #[test]
    fn decodes_the_message_celery_sent() {
        let (_, message) = decoded_fixture();
        assert_eq!(message.id, "0bdebbcc-1fdf-401d-900e-73c3018368ec");
        assert_eq!(message.task, "noop");
        assert_eq!(message.args, vec![json!(7)]);
        assert_eq!(message.kwargs["recency_threshold"], json!(5));
        assert_eq!(message.kwargs["wait_seconds"], json!(2));
        assert_eq!(
            message.workflow_id(),
            Some("0e1412df-b846-4d3b-9402-a10f96f520d7")
        );
        assert_eq!(message.step_name(), Some("await stability"));
        assert_eq!(message.kwargs["app_id"], json!("bioloop-dev.sca.iu.edu"));
        assert_eq!(message.priority, 1);
        assert_eq!(message.eta, None);
        assert_eq!(message.retries, 0);
        assert_eq!(message.root_id, message.id);
        assert_eq!(message.parent_id, None);
        assert_eq!(message.queue, "bioloop-dev.sca.iu.edu.q");
    }

    /// The JSON type of a value, for shape comparisons.
    fn kind(value: &Value) -> &'static str {
        match value {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    /// Same keys, and at each key the same JSON type (recursively for tables and lists).
    fn assert_same_shape(ours: &Value, theirs: &Value, at: &str) {
        assert_eq!(kind(ours), kind(theirs), "type at {at}: {ours} vs {theirs}");
        match (ours, theirs) {
            (Value::Object(a), Value::Object(b)) => {
                let (ka, kb): (Vec<_>, Vec<_>) = (a.keys().collect(), b.keys().collect());
                let (mut ka, mut kb) = (ka, kb);
                ka.sort();
                kb.sort();
                assert_eq!(ka, kb, "keys at {at}");
                for (key, value) in a {
                    assert_same_shape(value, &b[key], &format!("{at}.{key}"));
                }
            }
            (Value::Array(a), Value::Array(b)) => {
                assert_eq!(a.len(), b.len(), "length at {at}");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert_same_shape(x, y, &format!("{at}[{i}]"));
                }
            }
            _ => {}
        }
    }

    #[test]
    fn encodes_what_celery_sends_for_the_same_task() {
        let (fixture, message) = decoded_fixture();
        let sender = Sender::new("producer-host", 6946);
        let (properties, body) = encode(&message, &sender);
        let ours = Value::Object(properties_json(&properties));
        assert_same_shape(&ours, &fixture["properties"], "properties");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_same_shape(&body, &fixture["body"], "body");
        // Everything Celery derives from the task is the same, byte for byte.
        assert_eq!(body, fixture["body"]);
        let (h, theirs) = (&ours["application_headers"], &fixture["headers"]);
        for key in theirs.as_object().unwrap().keys() {
            assert_eq!(h[key], theirs[key], "header {key}");
        }
        assert_eq!(
            ours["correlation_id"],
            fixture["properties"]["correlation_id"]
        );
        assert_eq!(ours["priority"], json!(1));
        assert_eq!(ours["delivery_mode"], json!(2));
        // The header types py-amqp uses: `retries` a 32-bit integer, strings long strings.
        let table = properties.headers().as_ref().unwrap().inner();
        assert!(matches!(table.get("retries"), Some(AMQPValue::LongInt(0))));
        assert!(matches!(table.get("id"), Some(AMQPValue::LongString(_))));
        assert!(matches!(table.get("eta"), Some(AMQPValue::Void)));
        assert!(matches!(
            table.get("ignore_result"),
            Some(AMQPValue::Boolean(false))
        ));
        // And it reads back as the same message.
        let body = serde_json::to_vec(&body).unwrap();
        assert_eq!(decode(&properties, &body, &message.queue).unwrap(), message);
    }

    #[test]
    fn eta_and_retries_survive_the_round_trip() {
        let (_, mut message) = decoded_fixture();
        message.eta = Some(parse_eta("2026-01-14T10:20:30.123456+00:00").unwrap());
        message.retries = 3;
        message.parent_id = Some("parent".into());
        message.priority = 6;
        let (properties, body) = encode(&message, &Sender::new("h", 1));
        let headers = headers_json(properties.headers().as_ref().unwrap());
        assert_eq!(headers["eta"], json!("2026-01-14T10:20:30.123456+00:00"));
        assert_eq!(decode(&properties, &body, &message.queue).unwrap(), message);
    }

    #[test]
    fn time_limits_survive_the_round_trip_and_the_earlier_one_applies() {
        let (_, mut message) = decoded_fixture();
        assert_eq!(
            message.time_limits,
            TimeLimits::default(),
            "Celery sent none"
        );
        message.time_limits = TimeLimits {
            hard: Some(86_400.0),
            soft: Some(30.5),
        };
        let (properties, body) = encode(&message, &Sender::new("h", 1));
        let headers = headers_json(properties.headers().as_ref().unwrap());
        assert_eq!(headers["timelimit"], json!([86_400.0, 30.5]));
        let decoded = decode(&properties, &body, &message.queue).unwrap();
        assert_eq!(decoded.time_limits, message.time_limits);
        assert_eq!(
            decoded.time_limits.earliest(),
            Some(std::time::Duration::from_secs_f64(30.5))
        );
        let none_usable = TimeLimits {
            hard: Some(0.0),
            soft: None,
        };
        assert_eq!(none_usable.earliest(), None);
    }

    #[test]
    fn reads_every_eta_form_celery_writes() {
        let at = |s: &str| parse_eta(s).unwrap().to_rfc3339();
        assert_eq!(
            at("2026-01-14T10:20:30.5+00:00"),
            "2026-01-14T10:20:30.500+00:00"
        );
        assert_eq!(
            at("2026-01-14T12:20:30.5+02:00"),
            "2026-01-14T10:20:30.500+00:00"
        );
        assert_eq!(at("2026-01-14T10:20:30Z"), "2026-01-14T10:20:30+00:00");
        assert_eq!(
            at("2026-01-14T10:20:30.123456"),
            "2026-01-14T10:20:30.123456+00:00"
        );
        assert_eq!(at("2026-01-14T10:20:30"), "2026-01-14T10:20:30+00:00");
        assert_eq!(at("2026-01-14 10:20:30+00:00"), "2026-01-14T10:20:30+00:00");
        assert!(parse_eta("tomorrow").is_err());
    }

    #[test]
    fn refuses_what_is_not_a_v2_json_task_message() {
        let (fixture, _) = decoded_fixture();
        let properties = fixture_properties(&fixture);
        let body = serde_json::to_vec(&fixture["body"]).unwrap();
        let pickle = properties
            .clone()
            .with_content_type("application/x-python-serialize".into());
        assert!(decode(&pickle, &body, "q").is_err());
        assert!(decode(&properties, b"not json", "q").is_err());
        assert!(decode(&properties, b"{\"task\": \"v1\"}", "q").is_err());
        let no_headers = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_content_encoding(CONTENT_ENCODING.into());
        let err = decode(&no_headers, &body, "q").unwrap_err().to_string();
        assert!(err.contains("`id`"), "{err}");
    }

    #[test]
    fn reprs_read_like_python() {
        assert_eq!(
            py_repr(&json!({"a": null, "b": true, "c": [1.5, 2.0], "d": "it's", "e": "x\"'y\n"})),
            r#"{'a': None, 'b': True, 'c': [1.5, 2.0], 'd': "it's", 'e': 'x"\'y\n'}"#
        );
        assert_eq!(py_repr(&json!(1e100)), "1e+100");
    }
}
