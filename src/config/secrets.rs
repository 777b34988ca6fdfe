//! Secrets: read from the environment only, never from a configuration file, so the files can be
//! committed and shown (`workers config show`) without leaking anything.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::ConfigError;
use super::layers::{Layer, Seg, display_path};

/// A secret the program knows.
#[derive(Debug)]
pub(super) struct SecretSpec {
    /// Its name in `secrets.required` and `WORKERS__SECRETS__<NAME>`.
    pub(super) name: &'static str,
    /// The variable the original workers read it from, accepted as well.
    pub(super) legacy_var: Option<&'static str>,
}

pub(super) const SECRETS: &[SecretSpec] = &[
    SecretSpec {
        name: "alias_salt",
        legacy_var: Some("ALIAS_SALT"),
    },
    // The bearer token of the Bioloop API (registry.kind = "http").
    SecretSpec {
        name: "api_token",
        legacy_var: Some("APP_API_TOKEN"),
    },
    // RabbitMQ's password (broker.kind = "amqp").
    SecretSpec {
        name: "queue_password",
        legacy_var: Some("QUEUE_PASS"),
    },
    // MongoDB's password (store.kind = "mongo").
    SecretSpec {
        name: "mongo_password",
        legacy_var: Some("MONGO_PASS"),
    },
    // PostgreSQL's password (a backend of kind "postgres"); libpq's own variable.
    SecretSpec {
        name: "postgres_password",
        legacy_var: Some("PGPASSWORD"),
    },
];

/// Salt of the stage aliases when none is configured outside production.
pub(super) const DEVELOPMENT_ALIAS_SALT: &str = "development-only-alias-salt";

impl SecretSpec {
    /// `ALIAS_SALT or WORKERS__SECRETS__ALIAS_SALT`, for messages.
    pub(super) fn variables(&self) -> String {
        let canonical = format!("WORKERS__SECRETS__{}", self.name.to_ascii_uppercase());
        match self.legacy_var {
            Some(legacy) => format!("{legacy} or {canonical}"),
            None => canonical,
        }
    }
}

/// A secret as found in the environment.
#[derive(Debug)]
pub(super) struct SecretValue {
    pub(super) spec: &'static SecretSpec,
    /// The value, when set and not empty.
    pub(super) value: Option<String>,
    /// Set, but to the empty string (a common systemd `Environment=` slip).
    pub(super) empty: bool,
}

/// Removes every key named like a secret from a file's table, reporting each: a secret in a
/// file would end up in version control and in `config show`.
pub(super) fn strip_from_file(table: &mut Table, layer: &Layer, errors: &mut Vec<ConfigError>) {
    strip_at(table, &mut Vec::new(), layer, errors);
}

fn strip_at(
    table: &mut Table,
    prefix: &mut Vec<Seg>,
    layer: &Layer,
    errors: &mut Vec<ConfigError>,
) {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        prefix.push(Seg::Key(key.clone()));
        if let Some(spec) = SECRETS.iter().find(|s| s.name.eq_ignore_ascii_case(&key)) {
            table.remove(&key);
            errors.push(ConfigError::new(
                display_path(prefix),
                layer.describe(prefix),
                format!(
                    "secrets are read from the environment only: remove this key and set {} \
                     (in the environment or .env)",
                    spec.variables()
                ),
            ));
        } else if let Some(Value::Table(inner)) = table.get_mut(&key) {
            strip_at(inner, prefix, layer, errors);
        }
        prefix.pop();
    }
}

/// Reads every known secret from `env`: the legacy variable and any `WORKERS__SECRETS__<NAME>`
/// spelling in `secret_vars`. Different values under different names are an error.
pub(super) fn resolve(
    env: &BTreeMap<String, String>,
    secret_vars: &[(&'static str, String)],
    errors: &mut Vec<ConfigError>,
) -> Vec<SecretValue> {
    SECRETS
        .iter()
        .map(|spec| {
            let mut vars: Vec<&str> = spec.legacy_var.into_iter().collect();
            vars.extend(
                secret_vars
                    .iter()
                    .filter(|(name, _)| *name == spec.name)
                    .map(|(_, var)| var.as_str()),
            );
            let found: Vec<(&str, &String)> = vars
                .iter()
                .filter_map(|var| env.get(*var).map(|value| (*var, value)))
                .collect();
            let set: Vec<&(&str, &String)> = found.iter().filter(|(_, v)| !v.is_empty()).collect();
            if let Some((first_var, first)) = set.first()
                && let Some((other_var, _)) = set.iter().find(|(_, v)| v != first)
            {
                errors.push(ConfigError::new(
                    format!("secrets.{}", spec.name),
                    "environment",
                    format!("{first_var} and {other_var} are both set, to different values; set only one"),
                ));
            }
            SecretValue {
                spec,
                value: set.first().map(|(_, v)| (*v).clone()),
                empty: set.is_empty() && !found.is_empty(),
            }
        })
        .collect()
}

/// `uri` with the password of its user information replaced by `<redacted>`, for messages and
/// `config show`: `mongodb://user:<redacted>@h1:27017,h2:27017/?replicaSet=rs0`.
///
/// It works on text that does not parse as well (an error message about a malformed URI
/// must not show the password either), so the user information is taken generously: from the
/// scheme, or the start, to the last `@`. A password with a stray `@`, `/` or `?` is hidden
/// whole; at worst a little more than the password is hidden.
pub fn redact_uri(uri: &str) -> String {
    let (scheme, rest) = match uri.split_once("://") {
        Some((scheme, rest)) => (&uri[..scheme.len() + 3], rest),
        None => ("", uri),
    };
    let Some((userinfo, hosts)) = rest.rsplit_once('@') else {
        return uri.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}{user}:<redacted>@{hosts}"),
        None => uri.to_string(),
    }
}
