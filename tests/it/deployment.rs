//! The deployment files: systemd units and timers, and the pm2 ecosystem file, checked by the
//! tools that read them and against the commands the binary has.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use workers::jobs::JobName;

use crate::common::{describe, stdout};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `section -> key -> values` of a unit file (keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
    }
    out
}

fn units() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(repo().join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "service" || e == "timer")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The `workers` arguments of every Exec line.
fn workers_commands(unit: &BTreeMap<String, BTreeMap<String, Vec<String>>>) -> Vec<Vec<String>> {
    let service = unit.get("Service").cloned().unwrap_or_default();
    ["ExecStartPre", "ExecStart"]
        .iter()
        .flat_map(|key| service.get(*key).cloned().unwrap_or_default())
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("/usr/bin/workers")).then(|| words.map(str::to_owned).collect())
        })
        .collect()
}

fn assert_help_works(args: &[String]) {
    let mut args: Vec<String> = args
        .iter()
        .filter(|a| a.as_str() != "%i")
        .cloned()
        .collect();
    args.push("--help".into());
    let out = Command::new(env!("CARGO_BIN_EXE_workers"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "workers {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn services_are_hardened_and_run_commands_the_binary_has() {
    for (name, text) in units().into_iter().filter(|(n, _)| n.ends_with(".service")) {
        let unit = parse_unit(&text);
        let service = &unit["Service"];
        let one = |key: &str| service.get(key).and_then(|v| v.last()).map(String::as_str);
        for (key, value) in [
            ("User", "workers"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("Environment", "WORKERS_CONFIG_DIR=/etc/workers/config"),
        ] {
            let values = service.get(key).cloned().unwrap_or_default();
            assert!(
                values.iter().any(|v| v == value),
                "{name}: {key}={value} missing ({values:?})"
            );
        }
        assert!(
            one("ReadWritePaths").is_some_and(|p| p.contains("/opt/sca/data")),
            "{name}"
        );
        assert!(
            one("EnvironmentFile").is_some(),
            "{name}: secrets come from an environment file"
        );
        let commands = workers_commands(&unit);
        assert!(!commands.is_empty(), "{name}");
        for args in &commands {
            assert_help_works(args);
        }
        if name.starts_with("workers-scheduler") || name.starts_with("workers-worker") {
            assert_eq!(one("Restart"), Some("on-failure"), "{name}");
            assert!(
                commands.iter().any(|c| c == &["config", "check"]),
                "{name}: ExecStartPre checks the configuration"
            );
        }
    }
    let scheduler = parse_unit(
        &std::fs::read_to_string(repo().join("systemd/workers-scheduler.service")).unwrap(),
    );
    assert_eq!(scheduler["Service"]["Type"], ["notify"]);
    assert!(scheduler["Service"].contains_key("WatchdogSec"));
    assert!(scheduler["Service"]["ExecReload"][0].contains("-HUP"));
}

#[test]
fn timers_run_jobs_that_exist() {
    let timers: Vec<String> = units()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".timer"))
        .collect();
    let mut jobs: Vec<&str> = timers
        .iter()
        .map(|n| {
            n.strip_prefix("workers-job@")
                .unwrap()
                .strip_suffix(".timer")
                .unwrap()
        })
        .collect();
    jobs.sort();
    let mut all: Vec<&str> = JobName::ALL.iter().map(|j| j.name()).collect();
    all.sort();
    assert_eq!(jobs, all, "a timer for every job, and only for jobs");
}

/// `systemd-analyze verify` on every unit, with the binary at the path of this build. Its
/// warnings (unknown keys, bad values) fail the test, not only its errors.
#[test]
fn systemd_accepts_the_units() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        // Without systemd the structural checks above are what is left.
        eprintln!("systemd-analyze is not installed; the units were only checked structurally");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in units() {
        let text = text.replace("/usr/bin/workers", env!("CARGO_BIN_EXE_workers"));
        std::fs::write(dir.path().join(&name), text).unwrap();
    }
    let mut instances: Vec<String> = units()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.contains("@.") || n.ends_with(".timer"))
        .collect();
    instances.push("workers-worker@1.service".into());
    instances.push("workers-job@watch.service".into());
    for unit in instances {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(&unit))
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
    }
}

#[test]
fn the_pm2_ecosystem_runs_the_scheduler_and_a_worker() {
    let file = repo().join("ecosystem.config.js");
    let Ok(out) = Command::new("node")
        .arg("-e")
        .arg(format!(
            "process.stdout.write(JSON.stringify(require({:?}).apps))",
            file.display()
        ))
        .env("WORKERS_BIN", env!("CARGO_BIN_EXE_workers"))
        .output()
    else {
        // Without Node.js (which pm2 needs anyway) only the text can be checked.
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("args: 'scheduler'") && text.contains("args: 'worker'"));
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let apps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = apps.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["workers_scheduler", "workers_worker"]);
    for app in &apps {
        assert_eq!(
            Path::new(app["script"].as_str().unwrap()),
            Path::new(env!("CARGO_BIN_EXE_workers"))
        );
        assert_eq!(app["interpreter"], "none");
        let args: Vec<String> = app["args"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_help_works(&args);
    }
}

/// The Debian package, built from this build's binary (`scripts/deb.sh`): what it installs,
/// its conffiles and maintainer scripts, and that the packaged binary and configuration work
/// together (extracted, not installed: installing would change the machine the tests run on).
#[test]
fn the_debian_package_holds_the_binary_configuration_units_man_pages_and_completions() {
    let tools = ["cargo-deb", "dpkg-deb"].map(|tool| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if tools != [true, true] {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "cargo-deb and dpkg-deb are needed (cargo install --locked cargo-deb)"
        );
        eprintln!("skipped: cargo-deb or dpkg-deb is missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("workers.deb");
    let built = std::process::Command::new(repo().join("scripts/deb.sh"))
        .env("BINARY", env!("CARGO_BIN_EXE_workers"))
        .env("OUTPUT", &deb)
        .env("FAST", "1")
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", describe(&built));

    let dpkg = |args: &[&str]| {
        let out = std::process::Command::new("dpkg-deb")
            .args(args)
            .arg(&deb)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        stdout(&out)
    };
    let listing = dpkg(&["--contents"]);
    for path in [
        "./usr/bin/workers",
        "./etc/workers/config/default.toml",
        "./etc/workers/config/production.toml",
        "./etc/workers/jobs/integrated.toml",
        "./lib/systemd/system/workers-scheduler.service",
        "./lib/systemd/system/workers-worker@.service",
        "./lib/systemd/system/workers-job@.service",
        "./lib/systemd/system/workers-job@fixity.timer",
        "./usr/lib/sysusers.d/workers.conf",
        "./usr/share/man/man1/workers.1.gz",
        "./usr/share/man/man1/workers-jobs-run.1.gz",
        "./usr/share/man/man1/workers-doctor.1.gz",
        "./usr/share/bash-completion/completions/workers",
        "./usr/share/zsh/vendor-completions/_workers",
        "./usr/share/fish/vendor_completions.d/workers.fish",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} is packaged:\n{listing}"
        );
    }
    let timers = listing.lines().filter(|l| l.ends_with(".timer")).count();
    assert_eq!(timers, JobName::ALL.len(), "a timer per job:\n{listing}");
    assert_eq!(dpkg(&["--field"]).lines().next(), Some("Package: workers"));

    let control = dir.path().join("control");
    let out = std::process::Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&control)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/workers/config/default.toml"),
        "{conffiles}"
    );
    assert!(
        conffiles.contains("/etc/workers/jobs/integrated.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysusers workers.conf"),
        "{postinst}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(control.join(script)).unwrap();
        assert!(
            !text.contains("systemctl enable")
                && !text.contains("deb-systemd-helper enable")
                && !text.contains("systemctl start"),
            "{script} leaves the services disabled:\n{text}"
        );
        let mode = std::fs::metadata(control.join(script))
            .unwrap()
            .permissions();
        assert!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0);
    }
    // The units run the packaged binary.
    let units = dir.path().join("root");
    let out = std::process::Command::new("dpkg-deb")
        .arg("--extract")
        .arg(&deb)
        .arg(&units)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let worker_unit =
        std::fs::read_to_string(units.join("lib/systemd/system/workers-worker@.service")).unwrap();
    assert!(
        worker_unit.contains("ExecStart=/usr/bin/workers worker"),
        "{worker_unit}"
    );

    // The packaged binary with the packaged configuration: the directories made, then every
    // check of doctor passes.
    let binary = units.join("usr/bin/workers");
    let config = units.join("etc/workers/config");
    let run = |args: &[&str]| {
        std::process::Command::new(&binary)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WORKERS_CONFIG_DIR", &config)
            .env("ALIAS_SALT", "package-test")
            .env("WORKERS__SERVICE_USER", "root")
            .env("WORKERS__CAPACITY__HEADROOM", "0")
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let made = run(&["paths", "check", "--create"]);
    assert!(made.status.success(), "{}", describe(&made));
    let doctor = run(&["doctor"]);
    assert!(doctor.status.success(), "{}", describe(&doctor));
    assert!(stdout(&doctor).contains("✔ store"), "{}", describe(&doctor));
}
