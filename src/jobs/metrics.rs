//! `metrics` (spec C.4): usage and capacity of the file systems that hold the configured
//! paths, and optionally the `quota` and `lfs quota` figures the original parsed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::{info, warn};

use crate::app::App;
use crate::model::DatasetType;
use crate::registry::Metric;

#[derive(Debug, Clone, Default)]
pub struct MetricsReport {
    pub metrics: Vec<Metric>,
    /// Configured paths that do not exist (yet), so nothing was measured for them.
    pub missing: Vec<String>,
}

/// Measures and records. A dry run measures and records nothing.
pub async fn run(app: &App, dry_run: bool) -> anyhow::Result<MetricsReport> {
    let subject = app.identity.hostname.clone();
    let paths = configured_paths(app);
    let quota = app.settings.metrics.clone();
    let user = app.settings.service_user.clone();
    let report = app
        .pool
        .run(move || -> anyhow::Result<MetricsReport> {
            let mut report = file_system_metrics(&paths, &subject);
            if quota.quota {
                report.metrics.extend(quota_metrics(&subject)?);
                report
                    .metrics
                    .extend(lfs_quota_metrics(&user, &quota.lfs_path, &subject)?);
            }
            Ok(report)
        })
        .await?;
    if !dry_run && !report.metrics.is_empty() {
        app.registry.add_metrics(&report.metrics).await?;
        info!(metrics = report.metrics.len(), "Recorded metrics.");
    }
    Ok(report)
}

/// Every configured data path, by its configuration key.
fn configured_paths(app: &App) -> Vec<(String, PathBuf)> {
    let p = &app.settings.paths;
    let database_dir = app
        .settings
        .sqlite
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut out = vec![
        ("paths.root".to_owned(), p.root.clone()),
        ("paths.scratch".to_owned(), p.scratch.clone()),
        ("paths.download_dir".to_owned(), p.download_dir.clone()),
        ("sqlite.path".to_owned(), database_dir),
    ];
    for t in DatasetType::ALL {
        let paths = p.for_type(t);
        // The archive directory below the year, which exists whatever the year.
        let archive = PathBuf::from(paths.archive.split("{year}").next().unwrap_or_default());
        for (key, path) in [
            ("stage", paths.stage.clone()),
            ("upload", paths.upload.clone()),
            ("bundle.generate", paths.bundle_generate.clone()),
            ("bundle.stage", paths.bundle_stage.clone()),
            ("archive", archive),
        ] {
            out.push((format!("paths.{t}.{key}"), path));
        }
        out.push((
            format!("registration.{t}.source_dir"),
            app.settings.registration.for_type(t).source_dir.clone(),
        ));
    }
    out
}

/// One size and one files metric per file system holding a configured path; the tags name
/// the configuration keys on it.
fn file_system_metrics(paths: &[(String, PathBuf)], subject: &str) -> MetricsReport {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map(|t| parse_mounts(&t))
        .unwrap_or_default();
    // By mount point: the statvfs figures and the keys.
    let mut by_fs: BTreeMap<String, (rustix::fs::StatVfs, Vec<String>)> = BTreeMap::new();
    let mut report = MetricsReport::default();
    for (key, path) in paths {
        let Ok(resolved) = std::fs::canonicalize(path) else {
            report.missing.push(format!("{key} ({})", path.display()));
            continue;
        };
        let mount = mount_point(&mounts, &resolved);
        match rustix::fs::statvfs(&resolved) {
            Ok(stat) => by_fs
                .entry(mount)
                .or_insert_with(|| (stat, Vec::new()))
                .1
                .push(key.clone()),
            Err(err) => {
                warn!(path = %resolved.display(), error = %err, "Cannot measure the file system.")
            }
        }
    }
    for (mount, (stat, keys)) in by_fs {
        let block = stat.f_frsize;
        report.metrics.push(Metric {
            measurement: mount.clone(),
            subject: subject.to_owned(),
            usage: stat.f_blocks.saturating_sub(stat.f_bfree) * block,
            limit: stat.f_blocks * block,
            tags: keys.clone(),
        });
        report.metrics.push(Metric {
            measurement: format!("{mount} files"),
            subject: subject.to_owned(),
            usage: stat.f_files.saturating_sub(stat.f_ffree),
            limit: stat.f_files,
            tags: keys,
        });
    }
    report
}

/// Mount points from `/proc/self/mounts` (octal escapes such as `\040` decoded).
fn parse_mounts(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(|field| {
            let mut out = String::new();
            let mut chars = field.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    let code: String = chars.by_ref().take(3).collect();
                    if let Ok(byte) = u8::from_str_radix(&code, 8) {
                        out.push(byte as char);
                        continue;
                    }
                    out.push('\\');
                    out.push_str(&code);
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect()
}

/// The longest mount point that contains `path`.
fn mount_point(mounts: &[String], path: &Path) -> String {
    mounts
        .iter()
        .filter(|m| path.starts_with(m.as_str()))
        .max_by_key(|m| m.len())
        .cloned()
        .unwrap_or_else(|| "/".to_owned())
}

/// Bytes from a figure such as `512`, `1.5K`, `20G` (powers of 1024).
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim().trim_end_matches('*');
    if text == "-" || text.is_empty() {
        return Some(0);
    }
    let (number, unit) = match text.chars().last()? {
        c if c.is_ascii_alphabetic() => (&text[..text.len() - 1], c.to_ascii_uppercase()),
        _ => (text, ' '),
    };
    let factor: f64 = match unit {
        ' ' => 1.0,
        'K' => 1024.0,
        'M' => 1024f64.powi(2),
        'G' => 1024f64.powi(3),
        'T' => 1024f64.powi(4),
        _ => return None,
    };
    number
        .parse::<f64>()
        .ok()
        .map(|n| (n * factor).round() as u64)
}

/// Runs a command and returns its standard output.
fn command_output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{program}`"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{program} {}` exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn quota_metrics(subject: &str) -> anyhow::Result<Vec<Metric>> {
    Ok(parse_quota(&command_output("quota", &[])?, subject))
}

fn lfs_quota_metrics(user: &str, path: &Path, subject: &str) -> anyhow::Result<Vec<Metric>> {
    let path = path.to_string_lossy();
    parse_lfs_quota(
        &command_output("lfs", &["quota", "-u", user, &path])?,
        subject,
    )
    .with_context(|| format!("cannot read the output of `lfs quota -u {user} {path}`"))
}

/// The `quota` table: a header line containing `Filesystem`, then rows split on runs of two
/// or more spaces; only the `sda` rows are kept, as `{measurement: sda, usage, limit: quota}`.
fn parse_quota(text: &str, subject: &str) -> Vec<Metric> {
    let split = |line: &str| -> Vec<String> {
        line.split("  ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut lines = text.lines().skip_while(|l| !l.contains("Filesystem"));
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let columns = split(header);
    let index = |name: &str| columns.iter().position(|c| c.eq_ignore_ascii_case(name));
    let (Some(fs), Some(usage), Some(quota)) =
        (index("Filesystem"), index("usage"), index("quota"))
    else {
        return Vec::new();
    };
    lines
        .filter(|line| !line.contains("Projects"))
        .map(split)
        .filter(|cells| cells.get(fs).is_some_and(|f| f == "sda"))
        .filter_map(|cells| {
            Some(Metric {
                measurement: "sda".to_owned(),
                subject: subject.to_owned(),
                usage: parse_size(cells.get(usage)?)?,
                limit: parse_size(cells.get(quota)?)?,
                tags: Vec::new(),
            })
        })
        .collect()
}

/// `lfs quota -u USER PATH`: after the title line, a header of nine columns
/// (`Filesystem kbytes quota limit grace files quota limit grace`) and the figures; `-` is 0
/// and a trailing `*` (over quota) is dropped. Gives a size and a files metric, whose subject
/// is this host, as the original's (its measurement names the file system).
fn parse_lfs_quota(text: &str, subject: &str) -> anyhow::Result<Vec<Metric>> {
    let mut lines = text.lines().skip(1).filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .context("no header line")?
        .split_whitespace()
        .collect();
    anyhow::ensure!(
        header.len() == 9 && header[0] == "Filesystem",
        "unexpected header {header:?}"
    );
    // A long file system name may sit alone on its line, with the figures on the next.
    let mut cells: Vec<&str> = lines
        .next()
        .context("no figures")?
        .split_whitespace()
        .collect();
    if cells.len() == 1 {
        cells.extend(lines.next().context("no figures")?.split_whitespace());
    }
    anyhow::ensure!(cells.len() == 9, "unexpected figures {cells:?}");
    let num =
        |i: usize| parse_size(cells[i]).with_context(|| format!("`{}` is not a number", cells[i]));
    let fs = cells[0].to_owned();
    Ok(vec![
        Metric {
            measurement: fs.clone(),
            subject: subject.to_owned(),
            usage: num(1)? * 1024,
            limit: num(3)? * 1024,
            tags: Vec::new(),
        },
        Metric {
            measurement: format!("{fs} files"),
            subject: subject.to_owned(),
            usage: num(5)?,
            limit: num(7)?,
            tags: Vec::new(),
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_powers_of_1024() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1.5K"), Some(1536));
        assert_eq!(parse_size("20G"), Some(20 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("2T"), Some(2 * 1024u64.pow(4)));
        assert_eq!(parse_size("-"), Some(0));
        assert_eq!(parse_size("100*"), Some(100));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn quota_keeps_the_sda_rows() {
        let text = "Disk quotas for bioloopuser:\n\
                    Filesystem        usage       quota       limit\n\
                    home              1.2G        100G        110G\n\
                    sda               3.5T        20T         22T\n\
                    Projects          1K          2K          3K\n";
        let metrics = parse_quota(text, "host");
        assert_eq!(
            metrics,
            [Metric {
                measurement: "sda".into(),
                subject: "host".into(),
                usage: (3.5 * 1024f64.powi(4)) as u64,
                limit: 20 * 1024u64.pow(4),
                tags: vec![]
            }]
        );
        assert!(parse_quota("no table here", "host").is_empty());
    }

    #[test]
    fn lfs_quota_gives_size_and_files() {
        let text = "Disk quotas for usr bioloopuser (uid 1234):\n\
                    \x20    Filesystem  kbytes   quota   limit   grace   files   quota   limit   grace\n\
                    \x20    /N/scratch  12345*       0  100000       -      42       0 1000000       -\n";
        let metrics = parse_lfs_quota(text, "host").unwrap();
        assert_eq!(metrics[0].measurement, "/N/scratch");
        assert_eq!(metrics[0].subject, "host");
        assert_eq!(
            (metrics[0].usage, metrics[0].limit),
            (12345 * 1024, 100000 * 1024)
        );
        assert_eq!(metrics[1].measurement, "/N/scratch files");
        assert_eq!((metrics[1].usage, metrics[1].limit), (42, 1_000_000));
        let wrapped = "title\nFilesystem kbytes quota limit grace files quota limit grace\n/very/long/name\n 1 0 2 - 3 0 4 -\n";
        assert_eq!(parse_lfs_quota(wrapped, "host").unwrap()[1].limit, 4);
        assert!(parse_lfs_quota("title\nsomething else\n", "host").is_err());
    }

    #[test]
    fn mount_points_are_decoded_and_the_longest_wins() {
        let mounts = parse_mounts(
            "/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n/dev/x /mnt/with\\040space ext4 rw 0 0\n",
        );
        assert_eq!(mounts, ["/", "/dev/shm", "/mnt/with space"]);
        assert_eq!(mount_point(&mounts, Path::new("/dev/shm/x/y")), "/dev/shm");
        assert_eq!(
            mount_point(&mounts, Path::new("/mnt/with space/d")),
            "/mnt/with space"
        );
        assert_eq!(mount_point(&mounts, Path::new("/home")), "/");
    }
}
