//! The HPSS archive over `hsi`, against the stand-in `tests/support/hsi` (a Python program
//! that keeps "HPSS" in a local directory, with hsi's command words, quoting, checksums and
//! injected failures): round trips of hostile names, checksum checks, the preflight, missing
//! files, failing hsi runs, deletes, progress, and the archive, stage and delete steps end to
//! end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use chrono::Datelike;
use workers::archive::hsi::{HsiArchive, HsiConfig, HsiFailure};
use workers::archive::{Archive, ArchiveError};
use workers::cancel::CancellationToken;
use workers::compute::Pool;
use workers::compute::md5::{Md5Digest, md5_bytes};
use workers::model::DatasetType;
use workers::progress::Progress;
use workers::store::TaskStatus;
use workers::workflow::engine;

/// One stand-in HPSS: a home directory, a command log, and the `hsi` the archive runs (a
/// copy of the stand-in, which reads its settings from `hsi.env` beside the copy, so tests
/// running at once never share settings through the process environment).
struct Hpss {
    dir: tempfile::TempDir,
}

impl Hpss {
    fn new() -> Hpss {
        let dir = tempfile::Builder::new()
            .prefix("workers-hsi-")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::fs::create_dir_all(dir.path().join("local")).unwrap();
        install_hsi_stand_in(&dir.path().join("bin"));
        let hpss = Hpss { dir };
        hpss.inject(&[]);
        hpss
    }

    /// Replaces the stand-in's settings: the home and log, plus `vars`.
    fn inject(&self, vars: &[(&str, &str)]) {
        let mut text = format!(
            "HSI_STANDIN_HOME={}\nHSI_STANDIN_LOG={}\n",
            self.home().display(),
            self.dir.path().join("log").display()
        );
        for (key, value) in vars {
            text.push_str(&format!("{key}={value}\n"));
        }
        std::fs::write(self.dir.path().join("bin/hsi.env"), text).unwrap();
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// A directory for local files.
    fn local(&self) -> PathBuf {
        self.dir.path().join("local")
    }

    /// The local file holding an HPSS path.
    fn file(&self, archive_path: &str) -> PathBuf {
        self.home().join(archive_path)
    }

    fn config(&self, verify: bool) -> HsiConfig {
        HsiConfig {
            command: self.dir.path().join("bin/hsi"),
            verify,
            progress_interval: Duration::from_millis(100),
            command_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
        }
    }

    fn archive(&self) -> HsiArchive {
        HsiArchive::new(self.config(true), Pool::new(2).unwrap())
    }

    /// Every command string hsi received, in order.
    fn log(&self) -> Vec<String> {
        match std::fs::read_to_string(self.dir.path().join("log")) {
            Ok(text) => text
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn clear_log(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("log"));
    }

    /// The checksum HPSS keeps for a path, as `hashlist` would print it.
    fn stored_hash(&self, archive_path: &str) -> Option<String> {
        let path = format!("{}.hashes.json", self.home().display());
        let hashes: serde_json::Value = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).unwrap(),
            Err(_) => return None,
        };
        hashes[archive_path].as_str().map(str::to_owned)
    }

    /// Names in an HPSS directory, sorted: shows leftovers such as partial copies.
    fn listing(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.home().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn write_local(path: &Path, bytes: &[u8]) -> Md5Digest {
    write_file(path, bytes);
    md5_bytes(bytes)
}

/// What a progress counter said at one moment: phase name, done, total.
type Sample = (String, u64, Option<u64>);

/// Samples a progress counter until the returned flag is set.
fn sample(progress: &Progress) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<Sample>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (progress, flag) = (progress.clone(), Arc::clone(&stop));
    let handle = tokio::spawn(async move {
        let mut seen = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let snap = progress.snapshot();
            seen.push((snap.name, snap.done, snap.total));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    });
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_blanks_quotes_wildcards_and_separators_round_trip_intact() {
    let hpss = Hpss::new();
    let archive = hpss.archive();
    let dir = "dir with space/[brackets] {braces} ^caret $HOME";
    // What an unquoted name would hit: a `;` would run `rm sentinel.tar` in the home, and a
    // `*` would also match the decoy.
    write_file(&hpss.file("sentinel.tar"), b"keep me");
    write_file(&hpss.file(&format!("{dir}/star-decoy.tar")), b"decoy");
    let names = [
        "with space.tar",
        "it's.tar",
        "say \"hi\".tar",
        "$HOME and `id`.tar",
        "x; rm sentinel.tar",
        "star*.tar",
        "données µ 日本.tar",
        "back\\slash.tar",
    ];
    let local_dir = hpss.local().join("local dir $x; *");
    for (i, name) in names.iter().enumerate() {
        let bytes = pseudo_random(10_000 + i * 777, i as u64);
        let local = local_dir.join(name);
        let md5 = write_local(&local, &bytes);
        let archive_path = format!("{dir}/{name}");
        archive
            .put(
                &local,
                &archive_path,
                md5,
                &Progress::new(),
                &CancellationToken::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("put {name}: {e:#}"));
        assert!(
            std::fs::read(hpss.file(&archive_path)).unwrap() == bytes,
            "stored bytes of {name}"
        );
        assert_eq!(
            hpss.stored_hash(&archive_path),
            Some(md5.to_string()),
            "{name}"
        );

        let fetched = local_dir.join(format!("fetched {name}"));
        let got = archive
            .get(
                &archive_path,
                &fetched,
                &Progress::new(),
                &CancellationToken::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("get {name}: {e:#}"));
        assert_eq!(got, md5, "{name}");
        assert!(
            std::fs::read(&fetched).unwrap() == bytes,
            "fetched bytes of {name}"
        );
    }
    assert_eq!(
        std::fs::read(hpss.file("sentinel.tar")).unwrap(),
        b"keep me"
    );
    let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    expected.push("star-decoy.tar".into());
    expected.sort();
    assert_eq!(hpss.listing(dir), expected, "no partial copies are left");
    assert_eq!(
        std::fs::read(hpss.file(&format!("{dir}/star-decoy.tar"))).unwrap(),
        b"decoy"
    );
    let local_names = std::fs::read_dir(&local_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .count();
    assert_eq!(local_names, 0, "no partial local files are left");

    // The words hsi received: single quotes, double quotes around a single quote.
    let log = hpss.log();
    assert!(log.contains(&format!("mkdir -p '{dir}'")), "{log:#?}");
    assert!(
        log.contains(&format!("hashlist '{dir}/with space.tar'")),
        "{log:#?}"
    );
    assert!(
        log.contains(&format!("hashlist \"{dir}/it's.tar\"")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|c| c.starts_with("put -c on '")
            && c.contains("/local dir $x; */x; rm sentinel.tar' : '")),
        "{log:#?}"
    );
}

#[tokio::test]
async fn paths_hsi_cannot_take_are_refused_by_name_before_hsi_runs() {
    let hpss = Hpss::new();
    let archive = hpss.archive();
    let local = hpss.local().join("bundle.tar");
    let md5 = write_local(&local, b"bytes");
    for bad in ["a\nrm -r x/b.tar", "both ' and \".tar", "-r.tar"] {
        let err = archive
            .put(
                &local,
                bad,
                md5,
                &Progress::new(),
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ArchiveError::Invalid(_)), "{err:#}");
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        let err = archive.delete(bad).await.unwrap_err();
        assert!(matches!(err, ArchiveError::Invalid(_)), "{err:#}");
        let err = archive
            .get(
                bad,
                &hpss.local().join("out"),
                &Progress::new(),
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ArchiveError::Invalid(_)), "{err:#}");
    }
    // A local path that cannot be quoted either.
    let odd_local = hpss.local().join("it's \"quoted\".tar");
    let md5 = write_local(&odd_local, b"bytes");
    let err = archive
        .put(
            &odd_local,
            "fine.tar",
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ArchiveError::Invalid(_)), "{err:#}");
    assert!(hpss.log().is_empty(), "hsi never ran: {:?}", hpss.log());
}

#[tokio::test]
async fn a_corrupted_upload_is_an_error_naming_both_sums_and_leaves_nothing_at_the_target() {
    let hpss = Hpss::new();
    let archive = hpss.archive();
    let bytes = pseudo_random(50_000, 3);
    let local = hpss.local().join("bundle.tar");
    let md5 = write_local(&local, &bytes);
    hpss.inject(&[("HSI_STANDIN_CORRUPT", "1")]);
    let err = archive
        .put(
            &local,
            "2026/raw_data/bundle.tar",
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    let ArchiveError::Transient(inner) = &err else {
        panic!("expected a transient error, got {err:#}");
    };
    let mut corrupted = bytes.clone();
    corrupted[0] ^= 0xFF;
    let message = format!("{inner:#}");
    assert!(message.contains("2026/raw_data/bundle.tar"), "{message}");
    assert!(message.contains(&md5.to_string()), "{message}");
    assert!(
        message.contains(&md5_bytes(&corrupted).to_string()),
        "{message}"
    );
    assert!(!hpss.file("2026/raw_data/bundle.tar").exists());
    assert!(
        hpss.listing("2026/raw_data").is_empty(),
        "the partial copy was removed: {:?}",
        hpss.listing("2026/raw_data")
    );
    assert!(
        !hpss.log().iter().any(|c| c.starts_with("mv ")),
        "nothing was moved into place: {:?}",
        hpss.log()
    );

    // Once the transfer is sound again, the next attempt stores the bundle.
    hpss.inject(&[]);
    archive
        .put(
            &local,
            "2026/raw_data/bundle.tar",
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(std::fs::read(hpss.file("2026/raw_data/bundle.tar")).unwrap() == bytes);
}

#[tokio::test]
async fn the_same_bytes_are_not_transferred_again_and_other_bytes_replace_the_copy() {
    let hpss = Hpss::new();
    let archive = hpss.archive();
    let local = hpss.local().join("bundle.tar");
    let target = "arch/bundle.tar";
    let md5 = write_local(&local, b"first version");
    archive
        .put(
            &local,
            target,
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();

    hpss.clear_log();
    let progress = Progress::new();
    archive
        .put(&local, target, md5, &progress, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        hpss.log(),
        vec!["mkdir -p 'arch'".to_owned(), format!("hashlist '{target}'")],
        "only the preflight ran"
    );
    assert_eq!(progress.snapshot().done, b"first version".len() as u64);

    // Different bytes under the same name: the checked copy replaces the old one.
    let md5 = write_local(&local, b"second, longer version");
    hpss.clear_log();
    archive
        .put(
            &local,
            target,
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(hpss.file(target)).unwrap(),
        b"second, longer version"
    );
    assert_eq!(hpss.stored_hash(target), Some(md5.to_string()));
    let log = hpss.log();
    assert!(log.contains(&format!("rm '{target}'")), "{log:#?}");
    assert!(log.iter().any(|c| c.starts_with("mv '")), "{log:#?}");
    assert_eq!(hpss.listing("arch"), vec!["bundle.tar"]);

    // A copy stored without a checksum cannot be trusted to be these bytes: it is replaced,
    // and the new copy carries one.
    let plain = "arch/plain.tar";
    HsiArchive::new(hpss.config(false), Pool::new(1).unwrap())
        .put(
            &local,
            plain,
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(hpss.stored_hash(plain), None);
    hpss.clear_log();
    archive
        .put(
            &local,
            plain,
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let log = hpss.log();
    assert!(log.iter().any(|c| c.starts_with("put -c on")), "{log:#?}");
    assert!(log.contains(&format!("rm '{plain}'")), "{log:#?}");
    assert_eq!(hpss.stored_hash(plain), Some(md5.to_string()));
    assert_eq!(hpss.listing("arch"), vec!["bundle.tar", "plain.tar"]);
}

#[tokio::test]
async fn getting_a_missing_path_is_not_found() {
    let hpss = Hpss::new();
    let archive = hpss.archive();
    let local = hpss.local().join("fetched.tar");
    let err = archive
        .get(
            "nowhere/bundle.tar",
            &local,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ArchiveError::NotFound(p) if p == "nowhere/bundle.tar"),
        "{err:#}"
    );
    assert!(!local.exists());

    // A file HPSS reports as missing (injected) is not found either.
    let source = hpss.local().join("bundle.tar");
    let md5 = write_local(&source, b"bytes");
    archive
        .put(
            &source,
            "here/bundle.tar",
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    hpss.inject(&[("HSI_STANDIN_MISSING", "here/bundle.tar")]);
    let err = archive
        .get(
            "here/bundle.tar",
            &local,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ArchiveError::NotFound(_)), "{err:#}");
}

#[tokio::test]
async fn a_failing_hsi_is_transient_and_carries_its_exit_code_and_stderr() {
    let hpss = Hpss::new();
    let archive = hpss.archive();
    let source = hpss.local().join("bundle.tar");
    let md5 = write_local(&source, b"bytes");
    archive
        .put(
            &source,
            "a/bundle.tar",
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let message = "*** hpss_Open: Connection timed out [-110: HPSS_ETIMEDOUT]";
    hpss.inject(&[
        ("HSI_STANDIN_FAIL", "get"),
        ("HSI_STANDIN_FAIL_CODE", "71"),
        ("HSI_STANDIN_FAIL_MESSAGE", message),
    ]);
    let local = hpss.local().join("fetched.tar");
    let err = archive
        .get(
            "a/bundle.tar",
            &local,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    let ArchiveError::Transient(inner) = &err else {
        panic!("expected a transient error, got {err:#}");
    };
    let failure = inner.downcast_ref::<HsiFailure>().expect("an hsi failure");
    assert_eq!(failure.code, Some(71));
    assert_eq!(failure.stderr, message);
    assert!(
        failure.command.starts_with("get -c on '"),
        "{}",
        failure.command
    );
    assert!(
        failure.command.ends_with(" : 'a/bundle.tar'"),
        "{}",
        failure.command
    );
    assert!(format!("{inner:#}").contains(message));
    assert!(!local.exists());
    assert_eq!(
        std::fs::read_dir(hpss.local()).unwrap().count(),
        1,
        "no partial local file is left"
    );

    // An hsi that cannot be started at all names the program.
    let missing = HsiArchive::new(
        HsiConfig {
            command: hpss.dir.path().join("no-such-hsi"),
            verify: true,
            progress_interval: Duration::from_secs(1),
            command_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
        },
        Pool::new(1).unwrap(),
    );
    let err = missing.delete("a/bundle.tar").await.unwrap_err();
    assert!(matches!(err, ArchiveError::Transient(_)), "{err:#}");
    assert!(format!("{err:#}").contains("no-such-hsi"), "{err:#}");
}

#[tokio::test]
async fn delete_removes_what_is_there_and_says_when_nothing_was() {
    let hpss = Hpss::new();
    let archive = hpss.archive();
    let source = hpss.local().join("bundle.tar");
    let md5 = write_local(&source, b"bytes");
    let target = "old data/bundle; rm *.tar";
    write_file(&hpss.file("old data/other.tar"), b"other");
    archive
        .put(
            &source,
            target,
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    hpss.clear_log();
    assert!(archive.delete(target).await.unwrap());
    assert_eq!(
        hpss.log(),
        vec![format!("ls '{target}'"), format!("rm '{target}'")]
    );
    assert!(!hpss.file(target).exists());
    assert_eq!(hpss.stored_hash(target), None);
    assert!(
        hpss.file("old data/other.tar").exists(),
        "only the one file went"
    );
    assert!(
        !archive.delete(target).await.unwrap(),
        "nothing left to remove"
    );

    // When HPSS cannot say whether the file is there, that is an error, not "absent".
    archive
        .put(
            &source,
            target,
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    hpss.inject(&[("HSI_STANDIN_FAIL", "ls")]);
    let err = archive.delete(target).await.unwrap_err();
    assert!(matches!(err, ArchiveError::Transient(_)), "{err:#}");
    assert!(format!("{err:#}").contains("HPSS_EIO"), "{err:#}");
    assert!(hpss.file(target).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_counts_bytes_during_slow_transfers() {
    let hpss = Hpss::new();
    let archive = hpss.archive();
    let size = 1_500_000u64;
    let bytes = pseudo_random(size as usize, 9);
    let local = hpss.local().join("bundle.tar");
    let md5 = write_local(&local, &bytes);
    hpss.inject(&[("HSI_STANDIN_RATE", "1000000")]);

    let progress = Progress::new();
    let (stop, sampler) = sample(&progress);
    archive
        .put(
            &local,
            "slow/bundle.tar",
            md5,
            &progress,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = sampler.await.unwrap();
    let during: Vec<_> = seen
        .iter()
        .filter(|(name, done, total)| {
            name == "sda put" && *done > 0 && *done < size && *total == Some(size)
        })
        .collect();
    assert!(!during.is_empty(), "no partial progress seen: {seen:?}");
    let snap = progress.snapshot();
    assert_eq!((snap.name.as_str(), snap.done), ("sda put", size));

    let progress = Progress::new();
    let (stop, sampler) = sample(&progress);
    let fetched = hpss.local().join("fetched.tar");
    let got = archive
        .get(
            "slow/bundle.tar",
            &fetched,
            &progress,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(got, md5);
    let seen = sampler.await.unwrap();
    assert!(
        seen.iter().any(|(name, done, total)| name == "sda get"
            && *done > 0
            && *done < size
            && *total == Some(size)),
        "no partial progress seen: {seen:?}"
    );
    // Hashing the fetched copy is the last phase, and it reads every byte.
    let snap = progress.snapshot();
    assert_eq!((snap.name.as_str(), snap.done), ("md5", size));
}

#[tokio::test]
async fn without_verification_transfers_are_plain_and_checked_by_size() {
    let hpss = Hpss::new();
    let archive = HsiArchive::new(hpss.config(false), Pool::new(1).unwrap());
    let bytes = pseudo_random(20_000, 5);
    let local = hpss.local().join("bundle.tar");
    let md5 = write_local(&local, &bytes);
    archive
        .put(
            &local,
            "plain/bundle.tar",
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(hpss.stored_hash("plain/bundle.tar"), None);
    let fetched = hpss.local().join("fetched.tar");
    let got = archive
        .get(
            "plain/bundle.tar",
            &fetched,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(got, md5);
    let log = hpss.log();
    assert!(log.iter().any(|c| c.starts_with("put '")), "{log:#?}");
    assert!(log.iter().any(|c| c.starts_with("ls -s1 '")), "{log:#?}");
    assert!(log.iter().any(|c| c.starts_with("get '")), "{log:#?}");
    assert!(!log.iter().any(|c| c.contains("-c on")), "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_stage_and_delete_steps_run_end_to_end_over_hsi() {
    let hpss = Hpss::new();
    let project = Project::new();
    let origin = project.dataset(
        DatasetType::RawData,
        "hsi_run",
        &[
            ("a.txt", b"alpha"),
            ("d/b.bin", &pseudo_random(300_000, 11)),
            ("d/e/c.txt", b"gamma"),
        ],
    );
    let mut app = Arc::try_unwrap(project.app().await)
        .ok()
        .expect("the app is not shared yet");
    // An HPSS path relative to the HPSS home, as the original's SDA defaults are; the blanks,
    // quote and separators in it must survive every command.
    Arc::make_mut(&mut app.settings).paths.raw_data.archive =
        "bioloop's archive/{year}/raw data; *".into();
    app.archive = Arc::new(HsiArchive::new(hpss.config(true), app.pool.clone()));
    let app = Arc::new(app);

    let id = register_without_workflow(&app, "hsi_run", &origin).await;
    let workflow_id = engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    run_until_idle(&app, 1, Duration::from_secs(120)).await;
    let workflow = app.store.workflow(&workflow_id).await.unwrap().unwrap();
    let view = engine::view(&app, workflow).await.unwrap();
    assert_eq!(view.derived.status, TaskStatus::Success, "{:?}", view.metas);

    let dataset = app.registry.get(id).await.unwrap();
    let year = chrono::Local::now().year();
    let archive_path = format!("bioloop's archive/{year}/raw data; */hsi_run.tar");
    assert_eq!(dataset.archive_path.as_deref(), Some(archive_path.as_str()));
    let bundle = dataset.bundle.clone().unwrap();
    assert_eq!(md5sum(&hpss.file(&archive_path)), bundle.md5.to_string());
    assert_eq!(
        hpss.stored_hash(&archive_path),
        Some(bundle.md5.to_string())
    );
    assert_eq!(
        hpss.listing(&format!("bioloop's archive/{year}/raw data; *")),
        vec!["hsi_run.tar"]
    );
    let states = state_names(&dataset);
    for state in ["ARCHIVED", "FETCHED", "STAGED"] {
        assert!(states.iter().any(|s| s == state), "{states:?}");
    }
    let staged = PathBuf::from(dataset.staged_path.clone().unwrap());
    assert_eq!(tree_files(&staged), tree_files(&origin));
    assert_eq!(
        std::fs::read(staged.join("d/b.bin")).unwrap(),
        std::fs::read(origin.join("d/b.bin")).unwrap()
    );

    let workflow_id = engine::start(&app, "delete", id, Default::default())
        .await
        .unwrap();
    run_until_idle(&app, 1, Duration::from_secs(120)).await;
    let workflow = app.store.workflow(&workflow_id).await.unwrap().unwrap();
    let view = engine::view(&app, workflow).await.unwrap();
    assert_eq!(view.derived.status, TaskStatus::Success, "{:?}", view.metas);
    assert!(!hpss.file(&archive_path).exists());
    let dataset = app.registry.get(id).await.unwrap();
    assert!(dataset.is_deleted);
    assert_eq!(dataset.archive_path, None);
    let log = hpss.log();
    assert!(log.contains(&format!("ls \"{archive_path}\"")), "{log:#?}");
    assert!(log.contains(&format!("rm \"{archive_path}\"")), "{log:#?}");
}

/// A command that hangs (an HPSS that does not answer) fails after the command timeout, and a
/// transfer that stops moving fails after the stall timeout: neither holds a step for ever.
#[tokio::test(flavor = "multi_thread")]
async fn hung_commands_and_stalled_transfers_time_out() {
    let hpss = Hpss::new();
    let local = hpss.local().join("bundle.tar");
    let md5 = write_local(&local, &pseudo_random(3_000_000, 4));
    let archive = HsiArchive::new(
        HsiConfig {
            command_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(2),
            ..hpss.config(true)
        },
        Pool::new(1).unwrap(),
    );
    hpss.inject(&[("HSI_STANDIN_HANG", "hashlist")]);
    let started = std::time::Instant::now();
    let err = archive
        .put(
            &local,
            "hung/bundle.tar",
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let message = format!("{err:#}");
    assert!(message.contains("hsi.command_timeout_seconds"), "{message}");
    assert!(matches!(err, ArchiveError::Transient(_)), "{err:?}");

    // One chunk, then nothing for a very long time.
    hpss.inject(&[("HSI_STANDIN_HANG", ""), ("HSI_STANDIN_RATE", "1")]);
    let started = std::time::Instant::now();
    let err = archive
        .put(
            &local,
            "stalled/bundle.tar",
            md5,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let message = format!("{err:#}");
    assert!(message.contains("hsi.stall_timeout_seconds"), "{message}");
    assert!(!hpss.file("stalled/bundle.tar").exists());
}

/// A cancelled transfer stops at once: hsi is killed and no copy is left in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_transfer_kills_hsi_and_leaves_nothing() {
    let hpss = Hpss::new();
    let local = hpss.local().join("bundle.tar");
    let md5 = write_local(&local, &pseudo_random(3_000_000, 5));
    hpss.inject(&[("HSI_STANDIN_RATE", "100000")]);
    let archive = hpss.archive();
    let cancel = CancellationToken::new();
    let stopper = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            cancel.cancel();
        })
    };
    let started = std::time::Instant::now();
    let err = archive
        .put(
            &local,
            "cancelled/bundle.tar",
            md5,
            &Progress::new(),
            &cancel,
        )
        .await
        .unwrap_err();
    stopper.await.unwrap();
    assert!(matches!(err, ArchiveError::Cancelled), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!hpss.file("cancelled/bundle.tar").exists());
}

/// A fixity check over hsi trusts the checksum HPSS holds unless told to recall: a bit flipped
/// on the medium is invisible to `hashlist` and found by a recall, which reads the bundle and
/// leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixity_over_hsi_reads_the_tape_only_when_told_to_recall() {
    use workers::config::RecallPolicy;
    use workers::fixity::{CheckOutcome, CopyKind, verify};

    let hpss = Hpss::new();
    let project = Project::new();
    let origin = project.dataset(
        DatasetType::RawData,
        "tape_run",
        &[
            ("a.txt", b"alpha"),
            ("d/b.bin", &pseudo_random(200_000, 12)),
        ],
    );
    let mut app = Arc::try_unwrap(project.app().await)
        .ok()
        .expect("the app is not shared yet");
    Arc::make_mut(&mut app.settings).paths.raw_data.archive = "fixity/{year}".into();
    app.archive = Arc::new(HsiArchive::new(hpss.config(true), app.pool.clone()));
    let app = Arc::new(app);
    let id = register_without_workflow(&app, "tape_run", &origin).await;
    engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    run_until_idle(&app, 1, Duration::from_secs(120)).await;
    let dataset = app.registry.get(id).await.unwrap();
    let archive_path = dataset.archive_path.clone().unwrap();
    let bundle = dataset.bundle.clone().unwrap();
    let env = app.step_env();
    let cancel = CancellationToken::new();
    let check = |recall| {
        let (env, dataset, cancel) = (Arc::clone(&env), dataset.clone(), cancel.clone());
        async move {
            verify(&env, &dataset, &[CopyKind::Archive], recall, &cancel)
                .await
                .unwrap()
                .remove(0)
        }
    };

    hpss.clear_log();
    let trusted = check(RecallPolicy::Never).await;
    assert!(trusted.is_intact(), "{trusted:?}");
    assert_eq!(trusted.bytes_read, None, "HPSS answered with its checksum");
    assert!(!hpss.log().iter().any(|c| c.starts_with("get ")));
    // HPSS holds a checksum, so `missing` recalls nothing either.
    assert_eq!(check(RecallPolicy::Missing).await.bytes_read, None);

    // A bit flipped on the medium: HPSS still answers with the checksum it stored.
    let stored = hpss.file(&archive_path);
    let mut bytes = std::fs::read(&stored).unwrap();
    let third = bytes.len() / 3;
    bytes[third] ^= 0x01;
    std::fs::set_permissions(&stored, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&stored, &bytes).unwrap();
    assert!(check(RecallPolicy::Never).await.is_intact());

    let recalled = check(RecallPolicy::Always).await;
    assert_eq!(recalled.bytes_read, Some(bundle.size));
    match &recalled.outcome {
        CheckOutcome::Differences {
            count: 1,
            differences,
        } => {
            assert!(differences[0].describe().contains("MD5"), "{differences:?}");
        }
        other => panic!("the recall must find the flipped bit: {other:?}"),
    }
    assert!(hpss.log().iter().any(|c| c.starts_with("get ")));
    let scratch = &app.settings.paths.raw_data.bundle_stage;
    let leftovers: Vec<_> = std::fs::read_dir(scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with(".fixity-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `workers doctor` asks HPSS for its working directory: an hsi that answers passes, one that
/// is refused is named with what to check.
#[test]
fn doctor_checks_that_hsi_runs_and_is_let_in() {
    let hpss = Hpss::new();
    let mut project = Project::new();
    project.set_env("WORKERS__ARCHIVE__KIND", "hsi");
    project.set_env(
        "WORKERS__HSI__COMMAND",
        hpss.dir.path().join("bin/hsi").to_str().unwrap(),
    );
    project.set_env("WORKERS__SERVICE_USER", "root");
    project.set_env("WORKERS__CAPACITY__HEADROOM", "0");
    project.run_ok(&["paths", "check", "--create"]);
    let checks = |project: &Project| -> (Option<i32>, Vec<serde_json::Value>) {
        let out = project.run(&["doctor", "--format", "json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
        let archive = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["check"] == "archive")
            .cloned()
            .collect();
        (out.status.code(), archive)
    };
    let (code, archive) = checks(&project);
    assert_eq!(archive.len(), 1, "{archive:?}");
    assert_eq!(archive[0]["ok"], true, "{archive:?}");
    assert!(
        archive[0]["detail"]
            .as_str()
            .unwrap()
            .contains("pwd0: /home/workers"),
        "{archive:?}"
    );
    if rustix::process::geteuid().is_root() {
        assert_eq!(code, Some(0), "{archive:?}");
    }
    assert!(hpss.log().contains(&"pwd".to_owned()), "{:?}", hpss.log());

    hpss.inject(&[
        ("HSI_STANDIN_FAIL", "pwd"),
        (
            "HSI_STANDIN_FAIL_MESSAGE",
            "*** HPSS authentication failed [-11000]",
        ),
    ]);
    let (code, archive) = checks(&project);
    assert_eq!(code, Some(1));
    assert_eq!(archive[0]["ok"], false);
    assert!(
        archive[0]["detail"]
            .as_str()
            .unwrap()
            .contains("HPSS authentication failed"),
        "{archive:?}"
    );
    assert!(archive[0]["fix"].as_str().unwrap().contains("keytab"));
}
