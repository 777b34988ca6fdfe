//! Tests of the configuration loader: layering, environment mapping, paths, secrets and the
//! error reports, on temporary configuration folders with explicit environments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The real base file, so the tests exercise the defaults operators get.
const DEFAULT: &str = include_str!("../../config/default.toml");

/// A temporary project: `<dir>/config/default.toml` plus whatever a test adds.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        Project::with_default(DEFAULT)
    }

    fn with_default(default: &str) -> Project {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::create_dir(dir.path().join("config")).expect("config folder");
        let project = Project { dir };
        project.write("default.toml", default);
        project
    }

    fn write(&self, file: &str, text: &str) -> &Project {
        std::fs::write(self.config_dir().join(file), text).expect("write config file");
        self
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn opts(&self, app_env: Option<&str>, env: &[(&str, &str)]) -> LoadOptions {
        LoadOptions {
            config_dir: self.config_dir(),
            app_env: app_env.map(str::to_string),
            env: env_map(env),
            problems: Vec::new(),
            flags: Vec::new(),
        }
    }

    /// Loads with `production.toml` = `overlay` and the given environment.
    fn load_production(
        &self,
        overlay: &str,
        env: &[(&str, &str)],
    ) -> Result<Settings, ConfigErrors> {
        self.write("production.toml", overlay);
        load(&self.opts(Some("production"), env))
    }
}

fn env_map(env: &[(&str, &str)]) -> BTreeMap<String, String> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ok(result: Result<Settings, ConfigErrors>) -> Settings {
    match result {
        Ok(settings) => settings,
        Err(errors) => panic!("expected the configuration to load, got:\n{errors}"),
    }
}

fn expect_errors(result: Result<Settings, ConfigErrors>) -> Vec<ConfigError> {
    match result {
        Ok(_) => panic!("expected configuration errors"),
        Err(errors) => errors.0,
    }
}

/// The error about `key`, failing with the whole list when there is none.
fn error_for<'a>(errors: &'a [ConfigError], key: &str) -> &'a ConfigError {
    errors.iter().find(|e| e.key == key).unwrap_or_else(|| {
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("no error about `{key}` in:\n{}", all.join("\n"))
    })
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// --- the shipped files ---

#[test]
fn the_shipped_default_loads() {
    let opts = LoadOptions {
        config_dir: manifest_dir().join("config"),
        ..LoadOptions::default()
    };
    let settings = ok(load(&opts));
    let root = manifest_dir();
    assert_eq!(settings.app_id, "bioloop-dev.sca.iu.edu");
    assert!(settings.parallelism >= 1, "0 means one thread per core");
    assert_eq!(settings.paths.root, root.join("var"));
    assert_eq!(
        settings.paths.raw_data.stage,
        root.join("var/stage/raw_data")
    );
    assert_eq!(
        settings.paths.raw_data.archive,
        root.join("var/archive/{year}/raw_data")
            .to_str()
            .expect("UTF-8 path")
    );
    assert_eq!(
        settings.paths.raw_data.qc,
        Some(root.join("var/qc/raw_data"))
    );
    assert_eq!(settings.paths.data_product.qc, None);
    assert_eq!(
        settings.paths.data_product.bundle_stage,
        root.join("var/bundle/data_products/staging")
    );
    assert_eq!(
        settings.registration.raw_data.source_dir,
        root.join("examples/raw_data")
    );
    assert!(
        settings
            .registration
            .raw_data
            .rejects
            .is_match(".snapshots")
    );
    assert!(!settings.registration.raw_data.rejects.is_match("run_1"));
    assert_eq!(
        settings.registration.recency_threshold,
        Duration::from_secs(2)
    );
    assert_eq!(
        settings.registration.wait_between_stability_checks,
        Duration::from_secs(1)
    );
    assert_eq!(settings.genome_file_types.len(), 10);
    assert_eq!(settings.stage.days_to_live, 20);
    assert_eq!(settings.inspect.file_metadata_batch_size, 25000);
    assert_eq!(settings.workflows_dir, root.join("jobs"));
    assert_eq!(settings.retry.default.max_retries, 3);
    assert_eq!(
        settings.retry.steps.keys().collect::<Vec<_>>(),
        ["verify_upload_integrity"]
    );
    assert_eq!(
        settings.retry.steps["verify_upload_integrity"].delay_seconds,
        60
    );
    assert_eq!(settings.uploads.max_retries, 3);
    assert_eq!(settings.uploads.verification_timeout_seconds, 4 * 3600);
    assert_eq!(settings.worker.concurrency, 2);
    assert_eq!(settings.progress_interval, Duration::from_secs(1));
    assert_eq!(settings.backends.registry, RegistryKind::Sqlite);
    assert_eq!(settings.backends.broker, BrokerKind::Embedded);
    assert_eq!(settings.backends.archive, ArchiveKind::Local);
    assert_eq!(settings.sqlite.path, root.join("var/workers.db"));
    assert_eq!(settings.log.format, "human");
    assert_eq!(
        settings.stage.alias_salt.expose(),
        "development-only-alias-salt"
    );
    assert!(
        settings
            .warnings
            .iter()
            .any(|w| w.contains("ALIAS_SALT is not set")),
        "{:?}",
        settings.warnings
    );
}

#[test]
fn the_shipped_production_overlay_loads_with_its_secrets() {
    let opts = LoadOptions {
        config_dir: manifest_dir().join("config"),
        app_env: Some("production".to_string()),
        env: env_map(&[
            ("ALIAS_SALT", "s3cret"),
            ("APP_API_TOKEN", "jwt"),
            ("QUEUE_PASS", "pw"),
        ]),
        problems: Vec::new(),
        flags: Vec::new(),
    };
    let settings = ok(load(&opts));
    assert_eq!(
        settings.registration.recency_threshold,
        Duration::from_secs(3600)
    );
    assert_eq!(
        settings.registration.wait_between_stability_checks,
        Duration::from_secs(300)
    );
    assert_eq!(settings.registration.minimum_dataset_size, 0);
    assert_eq!(settings.paths.root, PathBuf::from("/opt/sca/data"));
    assert_eq!(settings.backends.registry, RegistryKind::Http);
    assert_eq!(settings.backends.store, StoreKind::Mongo);
    assert_eq!(settings.backends.broker, BrokerKind::Amqp);
    assert_eq!(settings.backends.archive, ArchiveKind::Hsi);
    // HPSS paths stay relative to the HPSS home.
    assert_eq!(settings.paths.raw_data.archive, "archive/{year}/raw_data");
    assert_eq!(
        settings.paths.raw_data.stage,
        PathBuf::from("/opt/sca/data/staged/raw_data")
    );
    assert_eq!(
        settings.paths.data_product.bundle_generate,
        PathBuf::from("/opt/sca/data/bundle/data_products/generation")
    );
    assert_eq!(
        settings.registration.data_product.source_dir,
        PathBuf::from("/opt/sca/data/origin/data_products")
    );
    assert_eq!(
        settings.sqlite.path,
        PathBuf::from("/var/lib/workers/workers.db")
    );
    assert_eq!(settings.log.format, "json");
    // Not in the overlay: still the default's.
    assert_eq!(settings.retry.default.delay_seconds, 5);
    assert!(
        settings
            .registration
            .raw_data
            .rejects
            .is_match(".snapshots")
    );
    assert_eq!(settings.stage.alias_salt.expose(), "s3cret");
    assert!(settings.warnings.is_empty(), "{:?}", settings.warnings);
}

#[test]
fn the_shipped_production_overlay_requires_its_secrets() {
    let opts = LoadOptions {
        config_dir: manifest_dir().join("config"),
        app_env: Some("production".to_string()),
        ..LoadOptions::default()
    };
    let errors = expect_errors(load(&opts));
    for (key, variable) in [
        ("secrets.alias_salt", "ALIAS_SALT"),
        ("secrets.api_token", "APP_API_TOKEN"),
        ("secrets.queue_password", "QUEUE_PASS"),
    ] {
        let error = error_for(&errors, key);
        assert!(error.message.contains(variable), "{error}");
        assert!(error.message.contains("production.toml"), "{error}");
    }
    assert_eq!(errors.len(), 3, "{errors:?}");
}

// --- layering ---

#[test]
fn tables_merge_and_arrays_replace() {
    let project = Project::new();
    let settings = ok(project.load_production(
        r#"
genome_file_types = [".bam"]

[registration]
poll_interval_seconds = 30

[registration.RAW_DATA]
rejects = ["*.tmp"]
"#,
        &[],
    ));
    assert_eq!(settings.registration.poll_interval, Duration::from_secs(30));
    // The rest of [registration] and [registration.RAW_DATA] still comes from default.toml.
    assert_eq!(
        settings.registration.recency_threshold,
        Duration::from_secs(2)
    );
    assert_eq!(
        settings.registration.raw_data.source_dir,
        project.root().join("examples/raw_data")
    );
    // Arrays replace rather than append.
    assert_eq!(
        settings.registration.raw_data.reject_patterns,
        vec!["*.tmp"]
    );
    assert!(
        !settings
            .registration
            .raw_data
            .rejects
            .is_match(".snapshots")
    );
    assert_eq!(settings.genome_file_types, vec![".bam"]);
    assert_eq!(
        settings.registration.data_product.reject_patterns,
        vec![".snapshots"]
    );
}

#[test]
fn environment_overrides_files() {
    let project = Project::new();
    let settings = ok(project.load_production(
        "[registration]\npoll_interval_seconds = 30\n",
        &[("WORKERS__REGISTRATION__POLL_INTERVAL_SECONDS", "45")],
    ));
    assert_eq!(settings.registration.poll_interval, Duration::from_secs(45));
    assert!(
        settings
            .sources
            .iter()
            .any(|s| s == "environment variable WORKERS__REGISTRATION__POLL_INTERVAL_SECONDS"),
        "{:?}",
        settings.sources
    );
}

#[test]
fn environment_names_match_keys_case_insensitively() {
    let project = Project::new();
    let settings = ok(load(&project.opts(
        None,
        &[
            ("WORKERS__PATHS__RAW_DATA__STAGE", "/srv/stage/raw"),
            (
                "WORKERS__paths__data_product__Bundle__GENERATE",
                "/srv/bundle",
            ),
            ("WORKERS__PATHS__DATA_PRODUCT__QC", "/srv/qc"),
        ],
    )));
    assert_eq!(
        settings.paths.raw_data.stage,
        PathBuf::from("/srv/stage/raw")
    );
    assert_eq!(
        settings.paths.data_product.bundle_generate,
        PathBuf::from("/srv/bundle")
    );
    assert_eq!(
        settings.paths.data_product.qc,
        Some(PathBuf::from("/srv/qc"))
    );
}

#[test]
fn environment_values_are_toml_values_for_non_string_keys() {
    let project = Project::new();
    let settings = ok(load(&project.opts(
        None,
        &[
            ("WORKERS__PARALLELISM", "4"),
            ("WORKERS__GENOME_FILE_TYPES", r#"[".x", ".y"]"#),
            ("WORKERS__PROGRESS__INTERVAL_SECONDS", "0.5"),
            (
                "WORKERS__RETRY__STEPS__ARCHIVE_DATASET",
                "{ max_retries = 5, delay_seconds = 60 }",
            ),
            ("WORKERS__RETRY__DEFAULT__MAX_RETRIES", "7"),
        ],
    )));
    assert_eq!(settings.parallelism, 4);
    assert_eq!(settings.genome_file_types, vec![".x", ".y"]);
    assert_eq!(settings.progress_interval, Duration::from_millis(500));
    assert_eq!(
        settings.retry.steps.get("archive_dataset"),
        Some(&RetryPolicy {
            max_retries: 5,
            delay_seconds: 60
        })
    );
    assert_eq!(
        settings.retry.default,
        RetryPolicy {
            max_retries: 7,
            delay_seconds: 5
        }
    );

    // `true` is read as a boolean, not the string "true": the integer key rejects it as such.
    let errors = expect_errors(load(
        &project.opts(None, &[("WORKERS__WORKER__CONCURRENCY", "true")]),
    ));
    let error = error_for(&errors, "worker.concurrency");
    assert_eq!(
        error.source,
        "environment variable WORKERS__WORKER__CONCURRENCY"
    );
    assert!(error.message.contains("found boolean `true`"), "{error}");

    // Not TOML at all.
    let errors = errors_of_env(&project, &[("WORKERS__PARALLELISM", "four")]);
    let error = error_for(&errors, "parallelism");
    assert_eq!(error.message, "`four` is not an integer");

    // Structured values keep the parser's explanation.
    let errors = errors_of_env(&project, &[("WORKERS__GENOME_FILE_TYPES", "[\".x\"")]);
    let error = error_for(&errors, "genome_file_types");
    assert!(
        error.message.starts_with("`[\".x\"` is not an array"),
        "{error}"
    );
}

fn errors_of_env(project: &Project, env: &[(&str, &str)]) -> Vec<ConfigError> {
    expect_errors(load(&project.opts(None, env)))
}

#[test]
fn string_keys_take_environment_values_verbatim() {
    let project = Project::new();
    let settings = ok(load(&project.opts(
        None,
        &[
            ("WORKERS__APP_ID", "123"),
            ("WORKERS__SERVICE_USER", "true"),
            ("WORKERS__SECRETS__ALIAS_SALT", "123"),
        ],
    )));
    assert_eq!(settings.app_id, "123");
    assert_eq!(settings.service_user, "true");
    assert_eq!(settings.stage.alias_salt.expose(), "123");
    assert!(settings.warnings.is_empty(), "{:?}", settings.warnings);
}

#[test]
fn a_partial_step_override_from_the_environment_names_the_missing_key() {
    let project = Project::new();
    let errors = errors_of_env(
        &project,
        &[("WORKERS__RETRY__STEPS__INSPECT_DATASET__MAX_RETRIES", "5")],
    );
    let error = error_for(&errors, "retry.steps.inspect_dataset.delay_seconds");
    assert_eq!(
        error.source,
        "environment variable WORKERS__RETRY__STEPS__INSPECT_DATASET__MAX_RETRIES"
    );
    assert!(error.message.contains("missing key"), "{error}");
}

#[test]
fn the_two_salt_variables_must_agree() {
    let project = Project::new();
    let errors = errors_of_env(
        &project,
        &[
            ("ALIAS_SALT", "one"),
            ("WORKERS__SECRETS__ALIAS_SALT", "two"),
        ],
    );
    let error = error_for(&errors, "secrets.alias_salt");
    assert!(error.message.contains("different values"), "{error}");
    // The same value twice is fine.
    ok(load(&project.opts(
        None,
        &[
            ("ALIAS_SALT", "one"),
            ("WORKERS__SECRETS__ALIAS_SALT", "one"),
        ],
    )));
}

// --- paths ---

#[test]
fn relative_paths_resolve_against_the_parent_of_the_config_folder() {
    let project = Project::new();
    let settings = ok(project.load_production(
        r#"
[paths]
root = "data"
scratch = "/abs/scratch"

[paths.RAW_DATA]
archive = "archive/{year}/raw"
"#,
        &[("WORKERS__SQLITE__PATH", "db/w.db")],
    ));
    let root = project.root();
    assert_eq!(settings.paths.root, root.join("data"));
    assert_eq!(settings.paths.scratch, PathBuf::from("/abs/scratch"));
    assert_eq!(settings.paths.download_dir, root.join("var/downloads"));
    assert_eq!(
        settings.paths.raw_data.archive,
        root.join("archive/{year}/raw")
            .to_str()
            .expect("UTF-8 path")
    );
    assert_eq!(settings.sqlite.path, root.join("db/w.db"));
    assert_eq!(settings.workflows_dir, root.join("jobs"));
}

#[test]
fn a_relative_config_folder_resolves_against_the_current_directory() {
    let cwd = std::env::current_dir().expect("current directory");
    assert_eq!(project_root(Path::new("config")).expect("absolute"), cwd);
    assert_eq!(project_root(Path::new("./config")).expect("absolute"), cwd);
    assert_eq!(
        project_root(Path::new("/etc/workers/config")).expect("absolute"),
        PathBuf::from("/etc/workers")
    );
}

#[test]
fn paths_that_would_mean_something_else_are_refused() {
    let project = Project::new();
    let errors =
        expect_errors(project.load_production("[paths]\nroot = \"~/data\"\nscratch = \"\"\n", &[]));
    assert!(error_for(&errors, "paths.root").message.contains("`~`"));
    assert!(
        error_for(&errors, "paths.scratch")
            .message
            .contains("empty")
    );
}

// --- errors ---

#[test]
fn an_unknown_key_in_a_file_names_the_key_and_the_file() {
    let project = Project::new();
    let errors =
        expect_errors(project.load_production("[registration]\npoll_intervall = 5\n", &[]));
    let error = error_for(&errors, "registration.poll_intervall");
    assert!(error.source.ends_with("production.toml:2:1"), "{error}");
    assert!(error.message.contains("unknown key"), "{error}");
    assert!(
        error
            .message
            .contains("did you mean `poll_interval_seconds`?"),
        "{error}"
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn an_invalid_log_level_is_an_error_wherever_it_is_set() {
    let project = Project::new();
    let errors = expect_errors(project.load_production("[log]\nlevel = \"loud\"\n", &[]));
    let error = error_for(&errors, "log.level");
    assert!(error.source.ends_with("production.toml:2:1"), "{error}");
    assert!(error.message.contains("`loud`"), "{error}");
    assert_eq!(errors.len(), 1, "{errors:?}");

    let errors = errors_of_env(&project, &[("WORKERS__LOG__LEVEL", "info,workers=shout")]);
    assert_eq!(
        error_for(&errors, "log.level").source,
        "environment variable WORKERS__LOG__LEVEL"
    );

    // The command line's level is checked with the rest, and every problem is reported.
    let mut opts = project.opts(None, &[("WORKERS__WORKER__CONCURRENCY", "two")]);
    opts.flags.push(FlagValue {
        flag: "--log-level".to_string(),
        key: "log.level".to_string(),
        value: "verbose".to_string(),
    });
    let errors = expect_errors(load(&opts));
    assert_eq!(errors.len(), 2, "{errors:?}");
    let error = error_for(&errors, "log.level");
    assert_eq!(error.source, "command-line option --log-level");
    assert!(error.message.contains("`verbose`"), "{error}");
    error_for(&errors, "worker.concurrency");
}

#[test]
fn the_metrics_endpoint_is_off_unless_an_address_is_set() {
    let project = Project::new();
    assert_eq!(ok(load(&project.opts(None, &[]))).prometheus_listen, None);
    let settings = ok(project.load_production("[prometheus]\nlisten = \"[::1]:9900\"\n", &[]));
    assert_eq!(
        settings.prometheus_listen,
        Some("[::1]:9900".parse().unwrap())
    );
    for (text, expected) in [
        ("127.0.0.1:9808", Some("127.0.0.1:9808")),
        (" 0.0.0.0:9808 ", Some("0.0.0.0:9808")),
        ("", None),
        ("  ", None),
    ] {
        let settings = ok(load(
            &project.opts(None, &[("WORKERS__PROMETHEUS__LISTEN", text)]),
        ));
        assert_eq!(
            settings.prometheus_listen,
            expected.map(|addr| addr.parse().unwrap()),
            "{text:?}"
        );
    }
}

#[test]
fn a_bad_metrics_address_names_the_key_and_where_it_was_set() {
    let project = Project::new();
    let errors =
        expect_errors(project.load_production("[prometheus]\nlisten = \"localhost:9808\"\n", &[]));
    let error = error_for(&errors, "prometheus.listen");
    assert!(error.source.ends_with("production.toml:2:1"), "{error}");
    assert!(error.message.contains("`localhost:9808`"), "{error}");
    assert!(error.message.contains("127.0.0.1:9808"), "{error}");
    assert_eq!(errors.len(), 1, "{errors:?}");

    for (text, says) in [
        ("127.0.0.1", "not an IP address and port"),
        ("127.0.0.1:99999", "not an IP address and port"),
        (
            "http://127.0.0.1:9808/metrics",
            "not an IP address and port",
        ),
        ("127.0.0.1:0", "port other than 0"),
    ] {
        let errors = errors_of_env(&project, &[("WORKERS__PROMETHEUS__LISTEN", text)]);
        let error = error_for(&errors, "prometheus.listen");
        assert_eq!(
            error.source, "environment variable WORKERS__PROMETHEUS__LISTEN",
            "{text}"
        );
        assert!(error.message.contains(says), "{text}: {error}");
    }

    let errors = expect_errors(project.load_production("[prometheus]\nlisten = 9808\n", &[]));
    let error = error_for(&errors, "prometheus.listen");
    assert!(error.message.contains("expected a string"), "{error}");
}

#[test]
fn log_filters_and_the_command_line_level_load() {
    let project = Project::new();
    for level in [
        "debug",
        "warn,workers=trace",
        "workers::jobs=debug,info",
        "off",
    ] {
        let settings = ok(load(&project.opts(None, &[("WORKERS__LOG__LEVEL", level)])));
        assert_eq!(settings.log.level, level);
    }
    // The option wins over the environment.
    let mut opts = project.opts(None, &[("WORKERS__LOG__LEVEL", "debug")]);
    opts.flags.push(FlagValue {
        flag: "--log-level".to_string(),
        key: "log.level".to_string(),
        value: "trace".to_string(),
    });
    let settings = ok(load(&opts));
    assert_eq!(settings.log.level, "trace");
    assert_eq!(settings.log.filter(), "warn,workers=trace");
}

#[test]
fn did_you_mean_suggests_a_valid_key_even_for_a_typo_in_default_toml() {
    let default = DEFAULT.replace("poll_interval_seconds = 10", "poll_intervall = 10");
    assert_ne!(default, DEFAULT, "the base file changed: update this test");
    let project = Project::with_default(&default);
    let errors = expect_errors(load(&project.opts(None, &[])));
    let error = error_for(&errors, "registration.poll_intervall");
    assert!(error.source.contains("default.toml"), "{error}");
    assert!(
        error
            .message
            .ends_with("unknown key (did you mean `poll_interval_seconds`?)"),
        "{error}"
    );
    error_for(&errors, "registration.poll_interval_seconds");

    // The same typo set through the environment gets the same answer.
    let errors = errors_of_env(&project, &[("WORKERS__REGISTRATION__POLL_INTERVALL", "5")]);
    for error in errors
        .iter()
        .filter(|e| e.key == "registration.poll_intervall")
    {
        assert!(
            error
                .message
                .contains("did you mean `poll_interval_seconds`?"),
            "{error}"
        );
    }
}

#[test]
fn did_you_mean_looks_inside_free_form_tables_and_stays_quiet_when_nothing_is_close() {
    let project = Project::new();
    let errors = expect_errors(project.load_production(
        "[schedules.watch]\ncronn = \"\"\n\
         [retry.steps.inspect_dataset]\nmax_retries = 1\ndelay_second = 2\n\
         [registration]\nzzz = 1\n",
        &[],
    ));
    assert!(
        error_for(&errors, "schedules.watch.cronn")
            .message
            .contains("did you mean `cron`?")
    );
    assert!(
        error_for(&errors, "retry.steps.inspect_dataset.delay_second")
            .message
            .contains("did you mean `delay_seconds`?")
    );
    assert_eq!(
        error_for(&errors, "registration.zzz").message,
        "unknown key"
    );
}

#[test]
fn the_known_keys_are_those_of_the_settings_types() {
    let known = &*schema::KNOWN_KEYS;
    let keys = |path: &[&str]| {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        layers::get(known, &path).cloned()
    };
    assert!(keys(&["registration", "poll_interval_seconds"]).is_some());
    assert!(keys(&["registration", "RAW_DATA", "rejects"]).is_some());
    assert!(keys(&["paths", "RAW_DATA", "qc"]).is_some());
    assert!(keys(&["schedules", schema::ANY_KEY, "misfire"]).is_some());
    assert!(keys(&["retry", "steps", schema::ANY_KEY, "max_retries"]).is_some());
    assert!(keys(&["metrics", "lfs_path"]).is_some());
    assert!(keys(&["registration", "poll_intervall"]).is_none());
    // Every key of the shipped base file is a known key.
    let default: toml::Table = toml::from_str(DEFAULT).expect("default.toml");
    fn check(table: &toml::Table, known: &toml::Table, at: &str) {
        for (key, value) in table {
            let below = known
                .get(key)
                .or_else(|| known.get(schema::ANY_KEY))
                .unwrap_or_else(|| panic!("{at}.{key} is not a known key"));
            if let (toml::Value::Table(table), toml::Value::Table(known)) = (value, below) {
                check(table, known, &format!("{at}.{key}"));
            }
        }
    }
    check(&default, known, "");
}

#[test]
fn an_unknown_section_is_reported_once_per_file() {
    let project = Project::new();
    let errors = expect_errors(project.load_production("[apis]\nbase_url = \"http://x\"\n", &[]));
    let error = error_for(&errors, "apis");
    assert!(error.source.ends_with("production.toml:1:2"), "{error}");
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn an_unknown_workers_variable_is_an_error() {
    let project = Project::new();
    let errors = errors_of_env(
        &project,
        &[
            ("WORKERS__REGISTRATION__POLL_INTERVALL", "5"),
            ("WORKERS__NOPE", "1"),
        ],
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    let error = error_for(&errors, "nope");
    assert_eq!(error.source, "environment variable WORKERS__NOPE");
    assert!(error.message.starts_with("unknown key"), "{error}");
    let error = error_for(&errors, "registration.poll_intervall");
    assert_eq!(
        error.source,
        "environment variable WORKERS__REGISTRATION__POLL_INTERVALL"
    );
    assert!(
        error
            .message
            .contains("did you mean `poll_interval_seconds`?"),
        "{error}"
    );
}

#[test]
fn a_wrong_type_names_the_key_the_file_and_what_was_expected() {
    let project = Project::new();
    let errors = expect_errors(
        project.load_production("[registration]\npoll_interval_seconds = \"ten\"\n", &[]),
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = error_for(&errors, "registration.poll_interval_seconds");
    assert!(error.source.ends_with("production.toml:2:1"), "{error}");
    assert_eq!(
        error.message,
        "expected a non-negative integer, found string \"ten\""
    );
}

#[test]
fn two_wrong_types_in_one_section_are_both_reported() {
    let project = Project::new();
    let errors = expect_errors(project.load_production(
        "[registration]\npoll_interval_seconds = \"ten\"\nfull_scan_every_n_scans = -1\n",
        &[],
    ));
    assert_eq!(errors.len(), 2, "{errors:?}");
    error_for(&errors, "registration.poll_interval_seconds");
    let error = error_for(&errors, "registration.full_scan_every_n_scans");
    assert!(error.source.ends_with("production.toml:3:1"), "{error}");
    assert!(error.message.contains("found integer `-1`"), "{error}");
}

#[test]
fn a_wrong_array_element_is_located() {
    let project = Project::new();
    let errors = expect_errors(project.load_production("genome_file_types = [\".bam\", 7]\n", &[]));
    let error = error_for(&errors, "genome_file_types[1]");
    assert!(error.source.ends_with("production.toml:1:30"), "{error}");
}

#[test]
fn a_missing_required_secret_names_the_variables_and_the_requirement() {
    let project = Project::new();
    let errors =
        expect_errors(project.load_production("[secrets]\nrequired = [\"alias_salt\"]\n", &[]));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = error_for(&errors, "secrets.alias_salt");
    assert_eq!(error.source, "environment");
    assert!(
        error
            .message
            .contains("ALIAS_SALT or WORKERS__SECRETS__ALIAS_SALT"),
        "{error}"
    );
    assert!(
        error.message.contains("required by secrets.required in"),
        "{error}"
    );
    assert!(error.message.contains("production.toml:2:1"), "{error}");

    // Set but empty counts as missing.
    let errors = expect_errors(load(
        &project.opts(Some("production"), &[("ALIAS_SALT", "")]),
    ));
    assert!(
        error_for(&errors, "secrets.alias_salt")
            .message
            .contains("empty")
    );
}

#[test]
fn an_unknown_required_secret_is_an_error() {
    let project = Project::new();
    let errors =
        expect_errors(project.load_production("[secrets]\nrequired = [\"api_key\"]\n", &[]));
    let error = error_for(&errors, "secrets.required[0]");
    assert!(
        error.message.contains("unknown secret `api_key`"),
        "{error}"
    );
}

#[test]
fn a_secret_in_a_file_is_an_error() {
    let project = Project::new();
    let errors = expect_errors(project.load_production(
        "[secrets]\nalias_salt = \"x\"\n\n[stage]\nalias_salt = \"y\"\n",
        &[("ALIAS_SALT", "fine")],
    ));
    assert_eq!(errors.len(), 2, "{errors:?}");
    for key in ["secrets.alias_salt", "stage.alias_salt"] {
        let error = error_for(&errors, key);
        assert!(error.source.contains("production.toml"), "{error}");
        assert!(
            error
                .message
                .contains("secrets are read from the environment only"),
            "{error}"
        );
        assert!(
            !error.to_string().contains("\"x\""),
            "the value must not be echoed: {error}"
        );
    }
}

#[test]
fn a_bad_glob_is_reported_with_its_index() {
    let project = Project::new();
    let errors = expect_errors(project.load_production(
        "[registration.RAW_DATA]\nrejects = [\"ok*\", \"[abc\"]\n",
        &[],
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = error_for(&errors, "registration.RAW_DATA.rejects[1]");
    assert!(error.message.contains("invalid glob `[abc`"), "{error}");
    assert!(error.source.ends_with("production.toml:2:19"), "{error}");
}

#[test]
fn an_unknown_backend_kind_lists_the_known_ones() {
    let project = Project::new();
    let errors = expect_errors(project.load_production("[registry]\nkind = \"mysql\"\n", &[]));
    let error = error_for(&errors, "registry.kind");
    assert_eq!(
        error.message,
        "unknown registry backend `mysql` (known: sqlite, postgres, http)"
    );
}

#[test]
fn a_postgres_backend_needs_a_valid_url() {
    let project = Project::new();
    let errors = expect_errors(project.load_production("[store]\nkind = \"postgres\"\n", &[]));
    let error = error_for(&errors, "postgres.url");
    assert!(error.message.contains("must be set"), "{error}");

    let errors = expect_errors(project.load_production(
        "[broker]\nkind = \"postgres\"\n[postgres]\nurl = \"postgres://u:secret@h:notaport/db\"\n",
        &[],
    ));
    let error = error_for(&errors, "postgres.url");
    assert!(error.message.contains("not a PostgreSQL URL"), "{error}");
    assert!(
        !error.message.contains("secret"),
        "the password is never shown: {error}"
    );
}

#[test]
fn every_semantic_problem_is_reported() {
    let project = Project::new();
    let errors = expect_errors(project.load_production(
        r#"
genome_file_types = [".bam", "vcf"]
[paths.RAW_DATA]
archive = "var/archive/{month}/raw_data"
[inspect]
file_metadata_batch_size = 0
[retry.steps]
archive = { max_retries = 1, delay_seconds = 1 }
[worker]
concurrency = 0
[progress]
interval_seconds = 0.0
[broker]
kind = "rabbitmq"
[log]
format = "xml"
"#,
        &[],
    ));
    for key in [
        "genome_file_types[1]",
        "paths.RAW_DATA.archive",
        "inspect.file_metadata_batch_size",
        "retry.steps.archive",
        "worker.concurrency",
        "progress.interval_seconds",
        "broker.kind",
        "log.format",
    ] {
        let error = error_for(&errors, key);
        assert!(error.source.contains("production.toml"), "{error}");
    }
    assert_eq!(errors.len(), 8, "{errors:?}");
    assert!(
        error_for(&errors, "paths.RAW_DATA.archive")
            .message
            .contains("`{month}`")
    );
}

#[test]
fn a_missing_app_env_file_is_named() {
    let project = Project::new();
    let errors = expect_errors(load(&project.opts(Some("staging"), &[])));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].source.ends_with("config/staging.toml"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].message.contains("APP_ENV=staging"),
        "{}",
        errors[0]
    );

    let errors = expect_errors(load(&project.opts(Some("../etc/passwd"), &[])));
    assert_eq!(errors[0].source, "environment variable APP_ENV");
}

#[test]
fn a_missing_default_file_is_named() {
    let project = Project::new();
    std::fs::remove_file(project.config_dir().join("default.toml")).expect("remove");
    let errors = expect_errors(load(&project.opts(None, &[])));
    assert!(
        errors[0].source.ends_with("config/default.toml"),
        "{}",
        errors[0]
    );
    assert!(errors[0].message.contains("not found"), "{}", errors[0]);
}

#[test]
fn a_syntax_error_gives_file_line_and_column() {
    let project = Project::new();
    let errors = expect_errors(
        project.load_production("[registration]\npoll_interval_seconds = = 5\n", &[]),
    );
    assert!(!errors.is_empty());
    let error = &errors[0];
    assert!(error.source.ends_with("production.toml:2:25"), "{error}");
    assert!(error.message.starts_with("TOML syntax error"), "{error}");
    assert!(error.key.is_empty());
}

#[test]
fn a_key_missing_from_default_is_reported() {
    let default = DEFAULT.replace("app_id = \"bioloop-dev.sca.iu.edu\"", "");
    let project = Project::with_default(&default);
    let errors = expect_errors(load(&project.opts(None, &[])));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = error_for(&errors, "app_id");
    assert!(error.source.ends_with("default.toml"), "{error}");
    assert!(error.message.contains("missing key"), "{error}");
}

#[test]
fn a_wrong_type_in_default_itself_is_reported_without_looping() {
    let default = DEFAULT.replace("parallelism = 0", "parallelism = \"all\"");
    let project = Project::with_default(&default);
    let errors = expect_errors(load(&project.opts(None, &[])));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = error_for(&errors, "parallelism");
    assert!(error.source.contains("default.toml:"), "{error}");
}

#[test]
fn an_unknown_key_a_wrong_type_and_a_missing_secret_are_reported_together() {
    let project = Project::new();
    let errors = expect_errors(project.load_production(
        r#"
[registration]
poll_intervall = 5

[worker]
concurrency = "two"

[secrets]
required = ["alias_salt"]
"#,
        &[],
    ));
    assert_eq!(errors.len(), 3, "{errors:?}");
    error_for(&errors, "registration.poll_intervall");
    error_for(&errors, "worker.concurrency");
    error_for(&errors, "secrets.alias_salt");
}

#[test]
fn display_is_one_line_per_problem() {
    let project = Project::new();
    let errors = match project.load_production(
        "[registration]\npoll_intervall = 5\n[worker]\nconcurrency = \"two\"\n[secrets]\nrequired = [\"alias_salt\"]\n",
        &[],
    ) {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors,
    };
    let shown = errors.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), errors.0.len());
    for (line, error) in lines.iter().zip(&errors.0) {
        assert_eq!(
            *line,
            format!("{}: {}: {}", error.source, error.key, error.message)
        );
    }
    let without_key = ConfigError::new(
        "",
        "config/x.toml:1:1",
        "TOML syntax error:\n  expected `=`",
    );
    assert_eq!(
        without_key.to_string(),
        "config/x.toml:1:1: TOML syntax error: expected `=`"
    );
}

// --- effective configuration and .env ---

#[test]
fn effective_redacts_secrets_and_shows_resolved_values() {
    let project = Project::new();
    let opts = project.opts(None, &[("ALIAS_SALT", "very-secret-salt")]);
    let (settings, tree) = match effective(&opts) {
        Ok(shown) => shown,
        Err(errors) => panic!("{errors}"),
    };
    let secrets = tree["secrets"].as_table().expect("secrets table");
    assert_eq!(secrets["alias_salt"].as_str(), Some("<redacted>"));
    assert!(
        !toml::to_string(&tree)
            .expect("serializable")
            .contains("very-secret-salt")
    );
    assert_eq!(
        tree["paths"]["root"].as_str(),
        Some(project.root().join("var").to_str().expect("UTF-8 path"))
    );
    assert_eq!(
        tree["parallelism"].as_integer(),
        i64::try_from(settings.parallelism).ok()
    );

    let (_, tree) = match effective(&project.opts(None, &[])) {
        Ok(shown) => shown,
        Err(errors) => panic!("{errors}"),
    };
    assert_eq!(tree["secrets"]["alias_salt"].as_str(), Some("<unset>"));
}

#[test]
fn dotenv_files_are_read_and_their_problems_reported() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(".env");
    std::fs::write(
        &path,
        "# comment\nAPP_ENV=production\nWORKERS__GENOME_FILE_TYPES='[\".a\", \".b\"]'\nNOT VALID\n",
    )
    .expect("write .env");
    let mut env = BTreeMap::new();
    let mut problems = Vec::new();
    read_dotenv(&path, &mut env, &mut problems);
    assert_eq!(env.get("APP_ENV").map(String::as_str), Some("production"));
    assert_eq!(
        env.get("WORKERS__GENOME_FILE_TYPES").map(String::as_str),
        Some("[\".a\", \".b\"]")
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].source.ends_with(".env:4"), "{:?}", problems[0]);
    assert!(
        !problems[0].message.contains("NOT VALID"),
        "{:?}",
        problems[0]
    );

    // A missing .env is not a problem.
    read_dotenv(&dir.path().join("absent"), &mut env, &mut problems);
    assert_eq!(problems.len(), 1);

    // Problems gathered with the options are reported with the configuration's.
    let project = Project::new();
    let mut opts = project.opts(None, &[]);
    opts.problems = problems;
    let errors = expect_errors(load(&opts));
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn a_malformed_dotenv_line_names_its_line_and_variable_but_never_its_value() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(".env");
    std::fs::write(
        &path,
        "# comment\n\
         GOOD=1\n\
         QUEUE_PASS=hunter2 x\n\
         \n\
         export APP_API_TOKEN='tok' en\n\
         NOT VALID\n\
         MULTI=\"first\nsecond\"\n\
         ALIAS_SALT=\"pepper\n\
         and salt\n",
    )
    .expect("write .env");
    let mut env = BTreeMap::new();
    let mut problems = Vec::new();
    read_dotenv(&path, &mut env, &mut problems);
    assert_eq!(env.get("GOOD").map(String::as_str), Some("1"));
    assert_eq!(env.get("MULTI").map(String::as_str), Some("first\nsecond"));
    let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let source = path.display().to_string();
    let expected = [
        (3, "the value of QUEUE_PASS"),
        (5, "the value of APP_API_TOKEN"),
        (6, "a line without a variable name"),
        (9, "the value of ALIAS_SALT"),
    ];
    assert_eq!(shown.len(), expected.len(), "{shown:#?}");
    for (problem, (line, what)) in shown.iter().zip(expected) {
        assert!(
            problem.starts_with(&format!("{source}:{line}: cannot parse {what} ")),
            "{problem}"
        );
        for secret in ["hunter2", "tok", "NOT VALID", "pepper", "and salt"] {
            assert!(!problem.contains(secret), "{problem}");
        }
    }
}

#[test]
fn the_env_example_parses_and_its_overrides_load() {
    // Uncomment the example assignments, as an operator would.
    let example =
        std::fs::read_to_string(manifest_dir().join(".env.example")).expect(".env.example");
    let uncommented: String = example
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| {
            line.split('=').next().is_some_and(|name| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(".env");
    std::fs::write(&path, uncommented).expect("write .env");
    let mut env = BTreeMap::new();
    let mut problems = Vec::new();
    read_dotenv(&path, &mut env, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    assert!(env.contains_key("ALIAS_SALT"), "{env:?}");
    assert!(
        env.keys().filter(|k| k.starts_with("WORKERS__")).count() >= 5,
        "{env:?}"
    );

    let project = Project::new();
    let opts = LoadOptions {
        config_dir: project.config_dir(),
        env,
        ..LoadOptions::default()
    };
    let settings = ok(load(&opts));
    assert_eq!(settings.parallelism, 4);
    assert!(settings.retry.steps.contains_key("archive_dataset"));
}

#[test]
fn the_original_environment_variables_configure_the_production_backends() {
    let project = Project::new();
    let settings = ok(project.load_production(
        "[registry]\nkind = \"http\"\n[store]\nkind = \"mongo\"\n[broker]\nkind = \"amqp\"\n",
        &[
            ("API_BASE_URL", "http://api:3030/prefix"),
            ("APP_API_TOKEN", "token-value"),
            ("QUEUE_URL", "queue:5672/bioloop"),
            ("QUEUE_USER", "worker"),
            ("QUEUE_PASS", "p@ss/word"),
            ("MONGO_HOST", "mongo"),
            ("MONGO_PORT", "27018"),
            ("MONGO_DB", "celery"),
            ("MONGO_USER", "root"),
            ("MONGO_PASS", "m:pw"),
            ("MONGO_AUTH_SOURCE", "admin"),
        ],
    ));
    // The base gets a trailing slash so that relative paths join below it (spec E.1).
    assert_eq!(settings.api.base_url.as_str(), "http://api:3030/prefix/");
    assert_eq!(
        settings.api.token.as_ref().map(SecretString::expose),
        Some("token-value")
    );
    assert_eq!(
        settings.amqp.uri.expose(),
        "amqp://worker:p%40ss%2Fword@queue:5672/bioloop"
    );
    assert_eq!(
        settings.amqp.display,
        "amqp://worker:<redacted>@queue:5672/bioloop"
    );
    assert_eq!(settings.amqp.queues, [format!("{}.q", settings.app_id)]);
    assert_eq!(
        settings.mongo.uri.expose(),
        "mongodb://root:m%3Apw@mongo:27018/celery?authSource=admin"
    );
    assert_eq!(settings.mongo.database, "celery");
    assert_eq!(
        settings.mongo.display,
        "mongodb://root:<redacted>@mongo:27018/celery?authSource=admin"
    );
    // Debug output never shows a secret.
    let debug = format!("{settings:?}");
    assert!(
        !debug.contains("token-value") && !debug.contains("p%40ss"),
        "{debug}"
    );
}

#[test]
fn workers_variables_override_the_original_ones() {
    let project = Project::new();
    let settings = ok(project.load_production(
        "",
        &[
            ("API_BASE_URL", "http://old:3030/"),
            ("WORKERS__API__BASE_URL", "http://new:3030/"),
        ],
    ));
    assert_eq!(settings.api.base_url.as_str(), "http://new:3030/");
}

#[test]
fn the_api_registry_needs_its_token_and_a_valid_url() {
    let project = Project::new();
    let errors = expect_errors(project.load_production(
        "[registry]\nkind = \"http\"\n[api]\nbase_url = \"api:3030\"\n",
        &[("MONGO_PORT", "huge")],
    ));
    assert!(
        error_for(&errors, "secrets.api_token")
            .message
            .contains("APP_API_TOKEN")
    );
    assert!(
        error_for(&errors, "api.base_url")
            .message
            .contains("not an http")
    );
    let port = error_for(&errors, "mongo.port");
    assert_eq!(port.source, "environment variable MONGO_PORT");
}

#[test]
fn a_full_amqp_url_and_mongo_uri_are_used_as_given() {
    let project = Project::new();
    let settings = ok(project.load_production(
        "[amqp]\nurl = \"amqp://u:p@rabbit:5672/%2f\"\nqueues = [\"a.q\", \"b.q\"]\n\
         [mongo]\nuri = \"mongodb://127.0.0.1:27017/?directConnection=true\"\ndatabase = \"t1\"\n",
        &[],
    ));
    assert_eq!(settings.amqp.uri.expose(), "amqp://u:p@rabbit:5672/%2f");
    assert_eq!(settings.amqp.queues, ["a.q", "b.q"]);
    assert_eq!(
        settings.mongo.uri.expose(),
        "mongodb://127.0.0.1:27017/?directConnection=true"
    );
    assert_eq!(settings.mongo.database, "t1");
}

#[test]
fn a_replica_set_uri_is_accepted_as_the_driver_reads_it() {
    let project = Project::new();
    let uri = "mongodb://user:pa%3Ass@h1:27017,h2:27017,h3/?replicaSet=rs0&authSource=admin";
    let settings = ok(project.load_production(
        &format!("[store]\nkind = \"mongo\"\n[mongo]\nuri = \"{uri}\"\n"),
        &[("APP_API_TOKEN", "t"), ("QUEUE_PASS", "q")],
    ));
    assert_eq!(settings.mongo.uri.expose(), uri);
    assert_eq!(
        settings.mongo.display,
        "mongodb://user:<redacted>@h1:27017,h2:27017,h3/?replicaSet=rs0&authSource=admin"
    );
}

#[test]
fn a_password_built_into_the_mongo_uri_is_encoded_as_the_driver_decodes_it() {
    let project = Project::new();
    let settings = ok(load(&project.opts(
        None,
        &[("MONGO_USER", "root"), ("MONGO_PASS", "50%41 off/@:?")],
    )));
    let parsed =
        mongodb::options::ConnectionString::parse(settings.mongo.uri.expose()).expect("parses");
    let credential = parsed.credential.expect("credential");
    assert_eq!(credential.username.as_deref(), Some("root"));
    assert_eq!(credential.password.as_deref(), Some("50%41 off/@:?"));
    assert_eq!(credential.source.as_deref(), Some("admin"));
}

#[test]
fn a_bad_mongo_uri_is_reported_without_its_password() {
    let project = Project::new();
    let cases = [
        // A password with characters the connection string reserves.
        (
            "mongodb://user:hunter2/x@h1:27017/",
            "the password cannot be read",
        ),
        (
            "mongodb://user:hunter2@h1:notaport/",
            "not a MongoDB connection string",
        ),
        (
            "mongodb://user:hunter2@h1/?connectTimeoutMS=soon",
            "not a MongoDB connection string",
        ),
        ("http://user:hunter2@h1/", "not a MongoDB connection string"),
    ];
    for (uri, expected) in cases {
        let errors = expect_errors(load(&project.opts(None, &[("WORKERS__MONGO__URI", uri)])));
        let error = error_for(&errors, "mongo.uri");
        assert_eq!(error.source, "environment variable WORKERS__MONGO__URI");
        assert!(error.message.contains(expected), "{uri}: {error}");
        assert!(error.message.contains("user:<redacted>@"), "{uri}: {error}");
        assert!(!error.to_string().contains("hunter2"), "{uri}: {error}");
    }
}

#[test]
fn config_show_redacts_the_passwords_of_connection_strings() {
    let project = Project::new();
    let opts = project.opts(
        None,
        &[
            (
                "WORKERS__MONGO__URI",
                "mongodb://u:m0ngo-pw@h1,h2/?replicaSet=rs0",
            ),
            ("WORKERS__AMQP__URL", "amqp://u:rabb1t-pw@rabbit:5672/%2f"),
        ],
    );
    let (_, tree) = match effective(&opts) {
        Ok(shown) => shown,
        Err(errors) => panic!("{errors}"),
    };
    assert_eq!(
        tree["mongo"]["uri"].as_str(),
        Some("mongodb://u:<redacted>@h1,h2/?replicaSet=rs0")
    );
    assert_eq!(
        tree["amqp"]["url"].as_str(),
        Some("amqp://u:<redacted>@rabbit:5672/%2f")
    );
    for text in [
        toml::to_string(&tree).expect("TOML"),
        serde_json::to_string(&tree).expect("JSON"),
    ] {
        assert!(
            !text.contains("m0ngo-pw") && !text.contains("rabb1t-pw"),
            "{text}"
        );
    }
}

#[test]
fn a_bad_amqp_url_is_reported_without_its_password() {
    let project = Project::new();
    let errors = errors_of_env(&project, &[("WORKERS__AMQP__URL", "amqp://u:s3cret@:5672")]);
    let error = error_for(&errors, "amqp.url");
    assert!(!error.to_string().contains("s3cret"), "{error}");
    assert!(error.message.contains("u:<redacted>@"), "{error}");
}

#[test]
fn redaction_hides_the_whole_password_even_in_text_that_does_not_parse() {
    for (uri, shown) in [
        ("mongodb://u:p@h/db", "mongodb://u:<redacted>@h/db"),
        (
            "mongodb://u:p@ss/w?rd@h1,h2/",
            "mongodb://u:<redacted>@h1,h2/",
        ),
        ("amqp://guest@rabbit/", "amqp://guest@rabbit/"),
        ("u:pw@host:5672/vhost", "u:<redacted>@host:5672/vhost"),
        ("mongodb://h1:27017/?w=1", "mongodb://h1:27017/?w=1"),
        ("", ""),
    ] {
        assert_eq!(redact_uri(uri), shown, "{uri}");
    }
}

// --- source directories ---

#[test]
fn a_source_directory_inside_a_written_directory_is_an_error_naming_both() {
    let project = Project::new();
    let errors = expect_errors(project.load_production(
        "[registration.RAW_DATA]\nsource_dir = \"var/stage/raw_data/incoming\"\n",
        &[],
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = error_for(&errors, "registration.RAW_DATA.source_dir");
    assert!(error.source.ends_with("production.toml:2:1"), "{error}");
    let source = project.root().join("var/stage/raw_data/incoming");
    let stage = project.root().join("var/stage/raw_data");
    let expected = format!(
        "`{}` is inside paths.RAW_DATA.stage (`{}`, set in {}:",
        source.display(),
        stage.display(),
        project.config_dir().join("default.toml").display()
    );
    assert!(error.message.starts_with(&expected), "{error}");
}

#[test]
fn a_source_directory_holding_written_directories_is_an_error_for_each() {
    let project = Project::new();
    let errors = errors_of_env(
        &project,
        &[
            ("WORKERS__REGISTRATION__DATA_PRODUCT__SOURCE_DIR", "var"),
            // The same directory as the downloads, spelled another way.
            (
                "WORKERS__REGISTRATION__RAW_DATA__SOURCE_DIR",
                "examples/../var/./downloads/",
            ),
        ],
    );
    let raw: Vec<&ConfigError> = errors
        .iter()
        .filter(|e| e.key == "registration.RAW_DATA.source_dir")
        .collect();
    assert_eq!(raw.len(), 1, "{errors:?}");
    assert!(
        raw[0].message.contains(" is paths.download_dir ("),
        "{}",
        raw[0]
    );
    assert_eq!(
        raw[0].source,
        "environment variable WORKERS__REGISTRATION__RAW_DATA__SOURCE_DIR"
    );
    let product: Vec<&ConfigError> = errors
        .iter()
        .filter(|e| e.key == "registration.DATA_PRODUCT.source_dir")
        .collect();
    // scratch, download_dir, and per type stage, bundle.generate, bundle.stage and archive,
    // and the QC reports of RAW_DATA.
    assert_eq!(product.len(), 11, "{product:#?}");
    assert!(
        product
            .iter()
            .any(|e| e.message.contains("contains paths.RAW_DATA.qc"))
    );
    assert!(
        product
            .iter()
            .all(|e| e.message.contains(" contains paths."))
    );
    assert!(
        product
            .iter()
            .any(|e| e.message.contains("contains paths.DATA_PRODUCT.archive"))
    );
}

#[test]
fn a_source_directory_reaching_a_written_directory_through_a_link_is_an_error() {
    let project = Project::new();
    let generate = project.root().join("var/bundle/raw_data/generation");
    std::fs::create_dir_all(&generate).expect("bundle directory");
    std::os::unix::fs::symlink(&generate, project.root().join("drop")).expect("link");
    let errors = errors_of_env(
        &project,
        &[("WORKERS__REGISTRATION__RAW_DATA__SOURCE_DIR", "drop")],
    );
    let error = error_for(&errors, "registration.RAW_DATA.source_dir");
    assert!(
        error
            .message
            .contains("is paths.RAW_DATA.bundle.generate (`")
            && error.message.contains("once symbolic links are resolved"),
        "{error}"
    );
}

#[test]
fn an_hsi_archive_path_is_not_a_local_directory_to_keep_apart() {
    let project = Project::new();
    // With HPSS, paths.<TYPE>.archive are relative to the HPSS home, not to the project.
    ok(project.load_production(
        "[archive]\nkind = \"hsi\"\n[paths.RAW_DATA]\narchive = \"examples/raw_data\"\n",
        &[],
    ));
    let errors = expect_errors(project.load_production(
        "[paths.RAW_DATA]\narchive = \"examples/raw_data/{year}\"\n",
        &[],
    ));
    assert!(
        error_for(&errors, "registration.RAW_DATA.source_dir")
            .message
            .contains(" is paths.RAW_DATA.archive ("),
        "{errors:?}"
    );
}

#[test]
fn fixity_settings_take_sizes_with_units_and_name_each_bad_value() {
    let project = Project::new();
    let settings = ok(load(&project.opts(None, &[])));
    assert_eq!(settings.fixity.copies, [crate::model::CopyKind::Archive]);
    assert_eq!(settings.fixity.bytes_per_run, Some(2_000_000_000_000));
    assert_eq!(
        settings.fixity.period,
        Some(std::time::Duration::from_secs(90 * 86_400))
    );
    assert_eq!(settings.fixity.recall, RecallPolicy::Never);

    let settings = ok(project.load_production(
        "[fixity]\ncopies = [\"staged\", \"archive\", \"staged\"]\nbytes_per_run = \"500 GiB\"\nrecall = \"always\"\n",
        &[],
    ));
    assert_eq!(
        settings.fixity.copies,
        [
            crate::model::CopyKind::Staged,
            crate::model::CopyKind::Archive
        ]
    );
    assert_eq!(settings.fixity.bytes_per_run, Some(500 << 30));
    assert_eq!(settings.fixity.recall, RecallPolicy::Always);
    let settings = ok(load(
        &project.opts(None, &[("WORKERS__FIXITY__BYTES_PER_RUN", "0")]),
    ));
    assert_eq!(settings.fixity.bytes_per_run, None, "0 means no limit");
    let settings = ok(load(
        &project.opts(None, &[("WORKERS__FIXITY__PERIOD_DAYS", "0")]),
    ));
    assert_eq!(settings.fixity.period, None, "0: a continuous rotation");

    let errors = expect_errors(project.load_production(
        "[fixity]\ncopies = [\"tape\"]\nbytes_per_run = \"lots\"\nrecall = \"sometimes\"\n",
        &[],
    ));
    assert!(
        error_for(&errors, "fixity.copies[0]")
            .message
            .contains("unknown copy `tape`")
    );
    assert!(
        error_for(&errors, "fixity.bytes_per_run")
            .message
            .contains("`lots` is not a size")
    );
    assert!(
        error_for(&errors, "fixity.recall")
            .message
            .contains("never, missing, always")
    );
}

#[test]
fn capacity_and_purge_by_fill_settings_are_checked() {
    let project = Project::new();
    let settings = ok(load(&project.opts(None, &[])));
    assert_eq!(settings.capacity.headroom, 1 << 30);
    assert_eq!(settings.capacity.wait, Duration::from_secs(60));
    assert_eq!(settings.stage.watermarks, Some((85, 75)));
    assert_eq!(settings.stage.min_age, Duration::from_secs(24 * 3600));
    let settings = ok(load(&project.opts(
        None,
        &[("WORKERS__STAGE__PURGE__HIGH_WATERMARK_PERCENT", "0")],
    )));
    assert_eq!(
        settings.stage.watermarks, None,
        "0 turns purging by fill off"
    );

    let errors = expect_errors(project.load_production(
        "[capacity]\nheadroom = \"plenty\"\nwait_seconds = 0\n[stage.purge]\nhigh_watermark_percent = 70\nlow_watermark_percent = 80\n",
        &[],
    ));
    assert!(
        error_for(&errors, "capacity.headroom")
            .message
            .contains("`plenty` is not a size")
    );
    error_for(&errors, "capacity.wait_seconds");
    assert!(
        error_for(&errors, "stage.purge.low_watermark_percent")
            .message
            .contains("must be below high_watermark_percent (70)")
    );
}
