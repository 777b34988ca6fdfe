//! Configuration loading: `config/default.toml`, the `APP_ENV` overlay and `WORKERS__...`
//! environment variables merged into validated [`Settings`], with every problem reported at once.
//!
//! Operators edit these files by hand and read the errors in a systemd journal, so each error
//! names the key, the file (with line and column) or environment variable it came from, and what
//! was expected. Loading never writes anything and never touches the network.

pub mod settings;

mod layers;
mod overlap;
mod schema;
mod secrets;
mod validate;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

pub use secrets::redact_uri;
pub use settings::*;

use layers::{Layer, Origins};

/// Where to look and what to merge. Built by the CLI; tests build it directly.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The folder holding `default.toml` and the `APP_ENV` overlays. Relative paths in the
    /// configuration are resolved against its parent.
    pub config_dir: PathBuf,
    /// Selects `<config_dir>/<APP_ENV>.toml`.
    pub app_env: Option<String>,
    /// The process environment, after `.env`.
    pub env: BTreeMap<String, String>,
    /// Problems met while gathering the options themselves (a malformed `.env`), reported by
    /// [`load`] together with the configuration's own.
    pub problems: Vec<ConfigError>,
    /// Keys set by command-line options (`--log-level`): the highest layer, checked like the
    /// others.
    pub flags: Vec<FlagValue>,
}

/// A key set by a command-line option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagValue {
    /// The option as typed, e.g. `--log-level`; errors name it.
    pub flag: String,
    /// The dotted key it sets, e.g. `log.level`.
    pub key: String,
    pub value: String,
}

impl LoadOptions {
    /// Reads `.env` from the current directory if there is one (the real environment wins over
    /// it), `APP_ENV` and the environment. The configuration folder is `config_dir`, else
    /// `$WORKERS_CONFIG_DIR`, else `./config`; `flags` are the command line's keys.
    pub fn from_process(config_dir: Option<PathBuf>, flags: Vec<FlagValue>) -> LoadOptions {
        let mut env = BTreeMap::new();
        let mut problems = Vec::new();
        read_dotenv(Path::new(".env"), &mut env, &mut problems);
        // Names that are not UTF-8 cannot be configuration keys; values are kept lossily so a
        // secret with a stray byte is reported as wrong rather than silently missing.
        for (name, value) in std::env::vars_os() {
            if let Ok(name) = name.into_string() {
                env.insert(name, value.to_string_lossy().into_owned());
            }
        }
        let app_env = env.get("APP_ENV").filter(|v| !v.is_empty()).cloned();
        let config_dir = config_dir
            .or_else(|| {
                env.get("WORKERS_CONFIG_DIR")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("config"));
        LoadOptions {
            config_dir,
            app_env,
            env,
            problems,
            flags,
        }
    }
}

/// Adds the variables of the `.env` file at `path`, if it exists, to `env`.
///
/// A line that does not parse is reported by file, line number and variable name only: the
/// file holds secrets, and the parser's own message quotes the line.
fn read_dotenv(path: &Path, env: &mut BTreeMap<String, String>, problems: &mut Vec<ConfigError>) {
    let source = path.display().to_string();
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
        Err(err) => {
            problems.push(ConfigError::new("", source, format!("cannot read: {err}")));
            return;
        }
    };
    let lines = Rc::new(RefCell::new(LinesRead::default()));
    let reader = OneLineAtATime {
        text: &text,
        lines: Rc::clone(&lines),
    };
    for item in dotenvy::from_read_iter(reader) {
        match item {
            Ok((name, value)) => {
                env.insert(name, value);
            }
            Err(dotenvy::Error::LineParse(rest, _)) => {
                // The parser read the whole entry, up to the line it ends on; it started as
                // many lines before as the unparsed rest spans.
                let lines = lines.borrow();
                let spanned = rest.trim_end_matches(['\n', '\r']).matches('\n').count();
                let number = lines.count.saturating_sub(spanned).max(1);
                let what = match lines.name_on(number) {
                    Some(name) => format!("the value of {name}"),
                    None => "a line without a variable name".to_string(),
                };
                problems.push(ConfigError::new(
                    "",
                    format!("{source}:{number}"),
                    format!("cannot parse {what} (check its quoting; values are not shown)"),
                ));
            }
            Err(err) => {
                // An I/O error mid-file would repeat on every further read.
                problems.push(ConfigError::new(
                    "",
                    source.clone(),
                    format!("cannot read: {err}"),
                ));
                break;
            }
        }
    }
}

/// The lines of a `.env` file handed to the parser so far.
#[derive(Default)]
struct LinesRead {
    count: usize,
    /// The variable each line assigns, where it starts with one.
    names: Vec<Option<String>>,
}

impl LinesRead {
    fn name_on(&self, number: usize) -> Option<&str> {
        self.names.get(number.checked_sub(1)?)?.as_deref()
    }
}

/// Hands the parser one line per read, so that the lines read tell where it is: it asks for
/// more only once it has used up what it got.
struct OneLineAtATime<'a> {
    text: &'a [u8],
    lines: Rc<RefCell<LinesRead>>,
}

impl std::io::Read for OneLineAtATime<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let line_end = self
            .text
            .iter()
            .position(|b| *b == b'\n')
            .map_or(self.text.len(), |i| i + 1);
        let n = line_end.min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let (chunk, rest) = self.text.split_at(n);
        buf[..n].copy_from_slice(chunk);
        // A line longer than the parser's buffer arrives in pieces; it is counted once.
        let starts_line = self.lines.borrow().names.len() == self.lines.borrow().count;
        let mut lines = self.lines.borrow_mut();
        if starts_line {
            lines
                .names
                .push(assigned_name(&String::from_utf8_lossy(chunk)));
        }
        if chunk.ends_with(b"\n") || rest.is_empty() {
            lines.count += 1;
        }
        self.text = rest;
        Ok(n)
    }
}

/// The variable a `.env` line assigns (`NAME=...` or `export NAME=...`), if it starts with a
/// valid name followed by `=`.
fn assigned_name(line: &str) -> Option<String> {
    let line = line.trim_start();
    let line = line
        .strip_prefix("export")
        .filter(|rest| rest.starts_with([' ', '\t']))
        .map_or(line, str::trim_start);
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(line.len());
    let name = &line[..end];
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    let assigns = line[end..].trim_start().starts_with('=');
    (valid && assigns).then(|| name.to_string())
}

/// Every problem found in the configuration.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `registration.poll_interval_seconds` (`[i]` for array
    /// elements); empty when the problem is not about one key (a syntax error, a missing file).
    pub key: String,
    /// Where the offending value came from: `config/production.toml:12:1`,
    /// `environment variable WORKERS__X__Y`, `environment`, ...
    pub source: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(
        key: impl Into<String>,
        source: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            key: key.into(),
            source: source.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    /// `<source>: <key>: <message>` on one line (`<source>: <message>` without a key).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One problem per line, even when a parser's message spans several.
        let message = self
            .message
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if self.key.is_empty() {
            write!(f, "{}: {message}", self.source)
        } else {
            write!(f, "{}: {}: {message}", self.source, self.key)
        }
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads, merges and validates the configuration.
pub fn load(opts: &LoadOptions) -> Result<Settings, ConfigErrors> {
    load_all(opts).map(|loaded| loaded.settings)
}

/// The effective merged configuration as a TOML/JSON-serializable tree, secrets redacted (for
/// `workers config show`).
///
/// Paths appear resolved, `parallelism` as the thread count in effect, and `[secrets]` lists
/// each known secret as `"<redacted>"` when set or `"<unset>"`.
pub fn effective(opts: &LoadOptions) -> Result<(Settings, toml::Table), ConfigErrors> {
    let mut loaded = load_all(opts)?;
    // The connection strings may carry a password; `config show` output ends up in tickets.
    loaded.resolved.mongo.uri = redact_uri(&loaded.resolved.mongo.uri);
    loaded.resolved.amqp.url = redact_uri(&loaded.resolved.amqp.url);
    loaded.resolved.postgres.url = redact_uri(&loaded.resolved.postgres.url);
    let mut tree = toml::Table::try_from(&loaded.resolved).map_err(|err| {
        ConfigErrors(vec![ConfigError::new(
            "",
            "effective configuration",
            format!("cannot be shown as TOML: {err}"),
        )])
    })?;
    let mut secrets = toml::Table::new();
    secrets.insert(
        "required".to_string(),
        toml::Value::Array(
            loaded
                .resolved
                .secrets
                .required
                .iter()
                .map(|name| toml::Value::String(name.clone()))
                .collect(),
        ),
    );
    for (name, set) in loaded.secrets_set {
        let shown = if set { "<redacted>" } else { "<unset>" };
        secrets.insert(name.to_string(), toml::Value::String(shown.to_string()));
    }
    tree.insert("secrets".to_string(), toml::Value::Table(secrets));
    Ok((loaded.settings, tree))
}

/// What one successful load produces.
struct Loaded {
    settings: Settings,
    /// The validated files and environment with paths resolved, for [`effective`].
    resolved: RawSettings,
    /// Whether each known secret is set.
    secrets_set: Vec<(&'static str, bool)>,
}

fn load_all(opts: &LoadOptions) -> Result<Loaded, ConfigErrors> {
    let mut errors = opts.problems.clone();

    let mut file_layers: Vec<(toml::Table, Layer)> = Vec::new();
    let default_name = file_source(&opts.config_dir, "default.toml");
    let default = layers::read_file(
        &opts.config_dir.join("default.toml"),
        &default_name,
        "the base configuration is required",
        &mut errors,
    );
    let default_ok = default.is_some();
    file_layers.extend(default);

    if let Some(app_env) = &opts.app_env {
        if let Some(problem) = app_env_problem(app_env) {
            errors.push(ConfigError::new(
                "",
                "environment variable APP_ENV",
                problem,
            ));
        } else {
            let file = format!("{app_env}.toml");
            let name = file_source(&opts.config_dir, &file);
            let why = format!("APP_ENV={app_env} selects it");
            file_layers.extend(layers::read_file(
                &opts.config_dir.join(&file),
                &name,
                &why,
                &mut errors,
            ));
        }
    }
    // Without the base file there is nothing to check the other layers against.
    if !default_ok {
        return Err(ConfigErrors(errors));
    }

    for (table, layer) in &mut file_layers {
        secrets::strip_from_file(table, layer, &mut errors);
    }
    let default_table = file_layers[0].0.clone();
    let template = layers::env_template(&default_table);
    let env = layers::env_layers(&opts.env, &template, &mut errors);
    let flags = layers::flag_layers(&opts.flags, &template, &mut errors);

    let mut merged = toml::Table::new();
    let mut origins = Origins::default();
    let mut all_layers = Vec::new();
    let every_layer = file_layers.into_iter().chain(env.layers).chain(flags);
    for (index, (table, layer)) in every_layer.enumerate() {
        layers::merge(&mut merged, table, index, &mut origins);
        all_layers.push(layer);
    }

    let project_root = match project_root(&opts.config_dir) {
        Ok(root) => root,
        Err(err) => {
            errors.push(ConfigError::new(
                "",
                opts.config_dir.display().to_string(),
                format!("cannot make the configuration folder absolute: {err}"),
            ));
            return Err(ConfigErrors(errors));
        }
    };

    let mut ctx = validate::Context {
        layers: &all_layers,
        origins,
        default: &default_table,
    };
    let raw = validate::deserialize(&merged, &mut ctx, &mut errors);
    let Some(raw) = raw else {
        return Err(ConfigErrors(errors));
    };
    let secret_values = secrets::resolve(&opts.env, &env.secret_vars, &mut errors);
    let built = validate::build(raw, &ctx, &project_root, &secret_values, &mut errors);
    match built {
        Some((settings, resolved)) if errors.is_empty() => Ok(Loaded {
            settings,
            resolved,
            secrets_set: secret_values
                .iter()
                .map(|s| (s.spec.name, s.value.is_some()))
                .collect(),
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

/// How errors name a file of the configuration folder.
fn file_source(config_dir: &Path, file: &str) -> String {
    config_dir.join(file).display().to_string()
}

/// Why `APP_ENV` cannot name an overlay file, if it cannot.
fn app_env_problem(app_env: &str) -> Option<String> {
    let bad = app_env.is_empty()
        || app_env.starts_with('.')
        || app_env.contains(['/', '\\', '\0'])
        || app_env.ends_with(".toml");
    bad.then(|| {
        format!(
            "`{app_env}` is not an environment name: use a plain name such as `production` \
             (it selects config/<name>.toml)"
        )
    })
}

/// The directory holding the configuration folder: relative paths are resolved against it.
fn project_root(config_dir: &Path) -> std::io::Result<PathBuf> {
    // No canonicalization: the folder need not be reachable through symlinks the same way, and
    // loading must work before the data directories exist.
    let absolute = std::path::absolute(config_dir)?;
    let cleaned: PathBuf = absolute
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    Ok(cleaned
        .parent()
        .map_or_else(|| cleaned.clone(), Path::to_path_buf))
}
