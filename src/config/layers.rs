//! The layers of the configuration (files, environment variables), their merge, and the record
//! of which layer set each key, so every later error can name where a value came from.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::{Table, Value};

use super::schema::{ANY_KEY, KNOWN_KEYS};
use super::secrets::SECRETS;
use super::{ConfigError, FlagValue};

/// Prefix of the environment variables that override configuration keys.
pub(super) const ENV_PREFIX: &str = "WORKERS__";

/// Tables whose keys are free-form names (task names), with the key whose value shows what one
/// entry looks like; environment variables may create entries there.
const OPEN_MAPS: &[(&[&str], &[&str])] = &[
    (&["retry", "steps"], &["retry", "default"]),
    (
        &["worker", "time_limits"],
        &["worker", "time_limit_seconds"],
    ),
];

/// Optional keys that `default.toml` cannot spell out (TOML has no null); all take strings.
const OPTIONAL_KEYS: &[&[&str]] = &[
    &["paths", "RAW_DATA", "qc"],
    &["paths", "DATA_PRODUCT", "qc"],
];

/// A layer holding one value at `keys`, named after where it came from (an environment
/// variable, an option), with no file positions.
fn one_value_layer(keys: &[String], value: Value, name: String) -> (Table, Layer) {
    let mut table = Table::new();
    set(&mut table, keys, value);
    (
        table,
        Layer {
            name,
            positions: BTreeMap::new(),
        },
    )
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// `a.b[2].c`, the form errors use.
pub(super) fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(index) => {
                let _ = write!(out, "[{index}]");
            }
        }
    }
    out
}

/// The table keys of `path` up to its first array index: the part origins are recorded for.
pub(super) fn key_prefix(path: &[Seg]) -> Vec<String> {
    path.iter()
        .map_while(|seg| match seg {
            Seg::Key(key) => Some(key.clone()),
            Seg::Index(_) => None,
        })
        .collect()
}

pub(super) fn key_path(keys: &[String]) -> Vec<Seg> {
    keys.iter().cloned().map(Seg::Key).collect()
}

/// One configuration file or one environment variable.
#[derive(Debug)]
pub(super) struct Layer {
    /// How errors name it: the file's path or `environment variable NAME`.
    pub(super) name: String,
    /// 1-based line and column of each key and array element (files only).
    positions: BTreeMap<Vec<Seg>, (usize, usize)>,
}

impl Layer {
    /// The layer's name with the position of `path` (or its nearest ancestor) when known.
    pub(super) fn describe(&self, path: &[Seg]) -> String {
        for len in (1..=path.len()).rev() {
            if let Some((line, column)) = self.positions.get(&path[..len]) {
                return format!("{}:{line}:{column}", self.name);
            }
        }
        self.name.clone()
    }
}

/// Which layers set each key, in order: the last one is the value in effect.
#[derive(Debug, Default)]
pub(super) struct Origins {
    map: BTreeMap<Vec<String>, Vec<usize>>,
}

impl Origins {
    fn record(&mut self, path: &[String], layer: usize) {
        let layers = self.map.entry(path.to_vec()).or_default();
        if layers.last() != Some(&layer) {
            layers.push(layer);
        }
    }

    /// Forgets everything below `path` (not `path` itself): its value was replaced whole.
    fn clear_below(&mut self, path: &[String]) {
        self.map
            .retain(|key, _| !(key.len() > path.len() && key.starts_with(path)));
    }

    /// The layers that set `path`, or its nearest recorded ancestor, in order.
    pub(super) fn of(&self, path: &[String]) -> &[usize] {
        for len in (0..=path.len()).rev() {
            if let Some(layers) = self.map.get(&path[..len]) {
                return layers;
            }
        }
        &[]
    }

    /// After `path` was put back to `layer`'s value: only `layer` set it and what is below it.
    pub(super) fn reset_to(&mut self, path: &[String], layer: usize) {
        self.map.retain(|key, layers| {
            if key.starts_with(path) {
                layers.retain(|l| *l == layer);
                !layers.is_empty()
            } else {
                true
            }
        });
        if !self.map.contains_key(path) {
            self.map.insert(path.to_vec(), vec![layer]);
        }
    }
}

/// Reads and parses one configuration file. Problems go to `errors`; `why` explains a missing
/// file.
pub(super) fn read_file(
    path: &Path,
    name: &str,
    why: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<(Table, Layer)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            errors.push(ConfigError::new(
                "",
                name,
                format!("file not found ({why})"),
            ));
            return None;
        }
        Err(err) => {
            errors.push(ConfigError::new("", name, format!("cannot read: {err}")));
            return None;
        }
    };
    // The recovering parser reports every syntax error of the file, not only the first.
    let (document, syntax_errors) = DeTable::parse_recoverable(&text);
    if !syntax_errors.is_empty() {
        for err in syntax_errors {
            errors.push(syntax_error(name, &text, &err));
        }
        return None;
    }
    let table = match toml::from_str::<Table>(&text) {
        Ok(table) => table,
        Err(err) => {
            errors.push(syntax_error(name, &text, &err));
            return None;
        }
    };
    let mut positions = BTreeMap::new();
    table_positions(document.get_ref(), &text, &mut Vec::new(), &mut positions);
    Some((
        table,
        Layer {
            name: name.to_string(),
            positions,
        },
    ))
}

fn syntax_error(name: &str, text: &str, err: &toml::de::Error) -> ConfigError {
    let source = match err.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("{name}:{line}:{column}")
        }
        None => name.to_string(),
    };
    ConfigError::new("", source, format!("TOML syntax error: {}", err.message()))
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn table_positions(
    table: &DeTable<'_>,
    text: &str,
    prefix: &mut Vec<Seg>,
    out: &mut BTreeMap<Vec<Seg>, (usize, usize)>,
) {
    for (key, value) in table.iter() {
        prefix.push(Seg::Key(key.get_ref().to_string()));
        out.entry(prefix.clone())
            .or_insert_with(|| line_column(text, key.span().start));
        value_positions(value.get_ref(), text, prefix, out);
        prefix.pop();
    }
}

fn value_positions(
    value: &DeValue<'_>,
    text: &str,
    prefix: &mut Vec<Seg>,
    out: &mut BTreeMap<Vec<Seg>, (usize, usize)>,
) {
    match value {
        DeValue::Table(table) => table_positions(table, text, prefix, out),
        DeValue::Array(array) => {
            for (index, element) in array.iter().enumerate() {
                prefix.push(Seg::Index(index));
                out.insert(prefix.clone(), line_column(text, element.span().start));
                value_positions(element.get_ref(), text, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// Merges `src` (layer number `layer`) into `dst`: tables merge key by key, any other value
/// (arrays included) replaces.
pub(super) fn merge(dst: &mut Table, src: Table, layer: usize, origins: &mut Origins) {
    origins.record(&[], layer);
    merge_at(dst, src, &mut Vec::new(), layer, origins);
}

fn merge_at(
    dst: &mut Table,
    src: Table,
    prefix: &mut Vec<String>,
    layer: usize,
    origins: &mut Origins,
) {
    for (key, value) in src {
        prefix.push(key.clone());
        match (dst.get_mut(&key), value) {
            (Some(Value::Table(existing)), Value::Table(incoming)) => {
                origins.record(prefix, layer);
                merge_at(existing, incoming, prefix, layer, origins);
            }
            (_, value) => {
                origins.clear_below(prefix);
                origins.record(prefix, layer);
                record_all(&value, prefix, layer, origins);
                dst.insert(key, value);
            }
        }
        prefix.pop();
    }
}

fn record_all(value: &Value, prefix: &mut Vec<String>, layer: usize, origins: &mut Origins) {
    if let Value::Table(table) = value {
        for (key, value) in table {
            prefix.push(key.clone());
            origins.record(prefix, layer);
            record_all(value, prefix, layer, origins);
            prefix.pop();
        }
    }
}

/// The keys environment variables may set: those of `default.toml` plus the optional ones it
/// cannot spell out.
pub(super) fn env_template(default: &Table) -> Table {
    let mut template = default.clone();
    for path in OPTIONAL_KEYS {
        let keys: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        if get(&template, &keys).is_none() {
            set(&mut template, &keys, Value::String(String::new()));
        }
    }
    template
}

/// The variables of the original workers' environment (spec H.1) that set a key, so that an
/// existing deployment's `.env` works unchanged. `WORKERS__...` variables override them.
pub(super) const LEGACY_VARS: &[(&str, &[&str])] = &[
    ("API_BASE_URL", &["api", "base_url"]),
    ("MONGO_HOST", &["mongo", "host"]),
    ("MONGO_PORT", &["mongo", "port"]),
    ("MONGO_DB", &["mongo", "database"]),
    ("MONGO_AUTH_SOURCE", &["mongo", "auth_source"]),
    ("MONGO_USER", &["mongo", "user"]),
    ("QUEUE_URL", &["amqp", "url"]),
    ("QUEUE_USER", &["amqp", "user"]),
];

/// What the `WORKERS__...` variables contribute.
pub(super) struct EnvLayers {
    /// One layer per variable, in name order.
    pub(super) layers: Vec<(Table, Layer)>,
    /// Variables that carry a secret (`WORKERS__SECRETS__<NAME>`, any case), by secret name.
    pub(super) secret_vars: Vec<(&'static str, String)>,
}

/// Turns the `WORKERS__...` variables of `env` into layers, matching their names
/// case-insensitively against `template`.
pub(super) fn env_layers(
    env: &BTreeMap<String, String>,
    template: &Table,
    errors: &mut Vec<ConfigError>,
) -> EnvLayers {
    let mut layers = Vec::new();
    let mut secret_vars = Vec::new();
    let mut claimed: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for (var, path) in LEGACY_VARS {
        let Some(raw) = env.get(*var) else { continue };
        let keys: Vec<String> = path.iter().map(|k| k.to_string()).collect();
        let Some(template_value) = get(template, &keys) else {
            continue;
        };
        let source = format!("environment variable {var}");
        let key = display_path(&key_path(&keys));
        match env_value(raw, template_value) {
            Ok(value) => {
                layers.push(one_value_layer(&keys, value, source));
            }
            Err(message) => errors.push(ConfigError::new(key, source, message)),
        }
    }
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let source = format!("environment variable {var}");
        let segments: Vec<&str> = rest.split("__").collect();
        if segments.iter().any(|s| s.is_empty()) {
            errors.push(ConfigError::new(
                "",
                source,
                "empty level in the name (levels are separated by exactly two underscores)",
            ));
            continue;
        }
        if let [section, name] = segments.as_slice()
            && section.eq_ignore_ascii_case("secrets")
            && let Some(spec) = SECRETS.iter().find(|s| s.name.eq_ignore_ascii_case(name))
        {
            secret_vars.push((spec.name, var.clone()));
            continue;
        }
        let (keys, template_value) = match lookup(template, &segments) {
            Ok(found) => found,
            Err(keys) => {
                let mut message = "unknown key".to_string();
                if let Some(suggestion) = suggest(&keys) {
                    message.push_str(&format!(" (did you mean `{suggestion}`?)"));
                }
                message.push_str(
                    "; WORKERS__SECTION__KEY must name a key of config/default.toml or a secret",
                );
                errors.push(ConfigError::new(
                    display_path(&key_path(&keys)),
                    source,
                    message,
                ));
                continue;
            }
        };
        let key = display_path(&key_path(&keys));
        if let Some(other) = claimed.get(&keys) {
            errors.push(ConfigError::new(
                key,
                source,
                format!("{other} sets the same key; set only one of them"),
            ));
            continue;
        }
        let value = match env_value(raw, template_value) {
            Ok(value) => value,
            Err(message) => {
                errors.push(ConfigError::new(key, source, message));
                continue;
            }
        };
        claimed.insert(keys.clone(), var.clone());
        layers.push(one_value_layer(&keys, value, source));
    }
    EnvLayers {
        layers,
        secret_vars,
    }
}

/// One layer per command-line option that sets a key, above the environment.
pub(super) fn flag_layers(
    flags: &[FlagValue],
    template: &Table,
    errors: &mut Vec<ConfigError>,
) -> Vec<(Table, Layer)> {
    let mut layers = Vec::new();
    for flag in flags {
        let source = format!("command-line option {}", flag.flag);
        let keys: Vec<String> = flag.key.split('.').map(str::to_string).collect();
        let Some(template_value) = get(template, &keys) else {
            errors.push(ConfigError::new(
                &flag.key,
                source,
                "sets a key config/default.toml does not define",
            ));
            continue;
        };
        match env_value(&flag.value, template_value) {
            Ok(value) => {
                layers.push(one_value_layer(&keys, value, source));
            }
            Err(message) => errors.push(ConfigError::new(&flag.key, source, message)),
        }
    }
    layers
}

/// The value a variable gives a key whose default is `template_value`.
fn env_value(raw: &str, template_value: &Value) -> Result<Value, String> {
    // Strings (and paths) are taken verbatim so a salt `123` or a path stays a string;
    // every other key takes a TOML value, so `4`, `true` and `[".x"]` mean what they say.
    if template_value.is_str() {
        return Ok(Value::String(raw.to_string()));
    }
    raw.parse::<Value>().map_err(|err| {
        // The parser's own words only help for structured values: for `four` it complains
        // about an invalid boolean.
        if template_value.is_array() || template_value.is_table() {
            format!(
                "`{raw}` is not {} ({})",
                describe_kind(template_value),
                err.message().trim()
            )
        } else {
            format!("`{raw}` is not {}", describe_kind(template_value))
        }
    })
}

/// The key path (spelled as in `template`) that `segments` name, and the template's value there;
/// when there is none, the path as far as it could be matched followed by the rest in lower case.
fn lookup<'a>(
    template: &'a Table,
    segments: &[&str],
) -> Result<(Vec<String>, &'a Value), Vec<String>> {
    let mut table = Some(template);
    let mut keys: Vec<String> = Vec::new();
    let mut found_value = None;
    for (i, segment) in segments.iter().enumerate() {
        let found = table.and_then(|table| {
            let exact = table
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(segment))
                .map(|(key, value)| (key.clone(), value));
            exact.or_else(|| {
                let (_, entry) = OPEN_MAPS
                    .iter()
                    .find(|(map, _)| map.iter().copied().eq(keys.iter().map(String::as_str)))?;
                let entry_keys: Vec<String> = entry.iter().map(|s| s.to_string()).collect();
                // Task names are lower case.
                Some((segment.to_ascii_lowercase(), get(template, &entry_keys)?))
            })
        });
        let Some((key, value)) = found else {
            keys.extend(segments[i..].iter().map(|s| s.to_ascii_lowercase()));
            return Err(keys);
        };
        keys.push(key);
        table = value.as_table();
        found_value = Some(value);
    }
    match found_value {
        Some(value) => Ok((keys, value)),
        None => Err(keys),
    }
}

/// The valid key of the same table closest to the unknown `keys`' last one, for "did you
/// mean". The candidates come from the program's own definition of the configuration, not
/// from `default.toml`, which may hold the very typo being reported.
pub(super) fn suggest(keys: &[String]) -> Option<String> {
    let (last, parents) = keys.split_last()?;
    let mut siblings: &Table = &KNOWN_KEYS;
    for parent in parents {
        let below = siblings.get(parent).or_else(|| siblings.get(ANY_KEY));
        siblings = below?.as_table()?;
    }
    let typed = last.to_ascii_lowercase();
    siblings
        .keys()
        .filter(|key| *key != ANY_KEY)
        .map(|key| {
            let candidate = key.to_ascii_lowercase();
            let mut distance = edit_distance(&typed, &candidate);
            // A key typed short (`poll_intervall` for `poll_interval_seconds`) is close to the
            // start of the real one even when far from all of it.
            if typed.len() >= 4 {
                let start: String = candidate.chars().take(typed.chars().count()).collect();
                distance = distance.min(edit_distance(&typed, &start) + 1);
            }
            (distance, key)
        })
        .filter(|(distance, _)| *distance <= 2.max(typed.len() / 5))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, key)| key.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// "an integer", "an array", ... for messages.
pub(super) fn describe_kind(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "a boolean (true or false)",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array such as [\"a\", \"b\"]",
        Value::Table(_) => "a table such as { key = value }",
    }
}

pub(super) fn get<'a>(table: &'a Table, keys: &[String]) -> Option<&'a Value> {
    let (last, parents) = keys.split_last()?;
    let mut table = table;
    for key in parents {
        table = table.get(key)?.as_table()?;
    }
    table.get(last)
}

/// Sets `keys` to `value`, creating (or replacing non-table values with) tables on the way.
pub(super) fn set(table: &mut Table, keys: &[String], value: Value) {
    let Some((last, parents)) = keys.split_last() else {
        return;
    };
    let mut table = table;
    for key in parents {
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(next) = entry else {
            return;
        };
        table = next;
    }
    table.insert(last.clone(), value);
}

pub(super) fn remove(table: &mut Table, keys: &[String]) -> Option<Value> {
    let (last, parents) = keys.split_last()?;
    let mut table = table;
    for key in parents {
        table = table.get_mut(key)?.as_table_mut()?;
    }
    table.remove(last)
}
