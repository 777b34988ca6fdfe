//! Bad input gets a clear error that names the object, and leaves no partial state:
//! unreadable files, checksum mismatches, hostile bundles, escaping links, bad configuration.

use std::path::{Path, PathBuf};

use crate::common::*;
use workers::model::DatasetType;
use workers::registry::{Dataset, DatasetPatch};
use workers::store::TaskStatus;
use workers::workflow::engine;

/// The error recorded for the failed step of the dataset's latest workflow.
async fn failure_of(app: &workers::app::App, d: &Dataset) -> (String, String) {
    let workflow = app
        .store
        .workflow(d.workflows.last().unwrap())
        .await
        .unwrap()
        .unwrap();
    let view = engine::view(app, workflow).await.unwrap();
    assert_eq!(
        view.derived.status,
        TaskStatus::Failure,
        "workflow should have failed"
    );
    let idx = view.derived.pending.unwrap();
    let step = &view.workflow.steps[idx];
    let meta = &view.metas[&step.last_run().unwrap().task_id];
    (
        step.spec.name.clone(),
        meta.result["exc_message"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Ingests one small dataset completely and returns it.
async fn ingested(project: &Project, name: &str) -> Dataset {
    project.dataset(
        DatasetType::RawData,
        name,
        &[
            ("a.txt", b"alpha\n"),
            ("dir/b.bin", &pseudo_random(50_000, 3)),
            ("dir/c.txt", b"gamma\n"),
        ],
    );
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    dataset_named(&*project.app().await, DatasetType::RawData, name).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_file_fails_inspect_naming_it_and_stores_nothing() {
    let project = Project::new();
    let root = project.dataset(
        DatasetType::RawData,
        "locked",
        &[("ok.txt", b"fine"), ("sub/secret.txt", b"no")],
    );
    let secret = root.join("sub/secret.txt");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let cmd = without_dac_override(project.command(&["jobs", "run", "watch", "--wait"]));
    let out = { cmd }.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    let app = project.app().await;
    let d = dataset_named(&app, DatasetType::RawData, "locked").await;
    let (step, message) = failure_of(&app, &d).await;
    assert_eq!(step, "inspect");
    assert!(message.contains("sub/secret.txt"), "{message}");
    assert!(
        message.to_lowercase().contains("permission denied"),
        "{message}"
    );
    // Nothing half-recorded: no rows, no sizes, no bundle, no state past READY.
    assert!(file_rows(&app, d.id).await.is_empty());
    assert_eq!(d.num_files, None);
    assert!(d.bundle.is_none());
    assert_eq!(state_names(&d), ["REGISTERED", "READY"]);
    assert_eq!(
        std::fs::read_dir(project.path("var/scratch"))
            .unwrap()
            .count(),
        0,
        "spool removed"
    );

    // Fixed by the operator, the workflow resumes where it failed and finishes.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let id = d.workflows[0].clone();
    project.run_ok(&["workflows", "resume", &id, "--wait"]);
    let d = dataset_named(&app, DatasetType::RawData, "locked").await;
    assert_eq!(
        state_names(&d),
        ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"]
    );
    assert_eq!(file_rows(&app, d.id).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_directory_fails_inspect_naming_it() {
    let project = Project::new();
    let root = project.dataset(
        DatasetType::RawData,
        "closed",
        &[("ok.txt", b"fine"), ("deep/er/sub/inside.txt", b"hidden")],
    );
    let closed = root.join("deep/er/sub");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o000)).unwrap();
    let cmd = without_dac_override(project.command(&["jobs", "run", "watch", "--wait"]));
    let out = { cmd }.output().unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    let app = project.app().await;
    let d = dataset_named(&app, DatasetType::RawData, "closed").await;
    let (step, message) = failure_of(&app, &d).await;
    assert_eq!(step, "inspect");
    assert!(message.contains("`deep/er/sub`"), "{message}");
    assert!(
        message.to_lowercase().contains("permission denied"),
        "{message}"
    );
    assert!(file_rows(&app, d.id).await.is_empty());
    assert_eq!(d.num_files, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_leaving_the_dataset_fails_inspect() {
    let project = Project::new();
    let root = project.dataset(DatasetType::RawData, "escaping", &[("a.txt", b"a")]);
    std::os::unix::fs::symlink("../../../../etc/passwd", root.join("evil")).unwrap();
    let out = project.run(&["jobs", "run", "watch", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let app = project.app().await;
    let d = dataset_named(&app, DatasetType::RawData, "escaping").await;
    let (step, message) = failure_of(&app, &d).await;
    assert_eq!(step, "inspect");
    assert!(
        message.contains("evil") && message.contains("outside"),
        "{message}"
    );
    assert!(file_rows(&app, d.id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_archive_fails_stage_with_a_checksum_mismatch() {
    let project = Project::new();
    let d = ingested(&project, "corrupt_archive").await;
    let app = project.app().await;
    let staged = PathBuf::from(d.staged_path.clone().unwrap());
    std::fs::remove_dir_all(&staged).unwrap();
    // Flip one byte of the archived bundle: same size, different content.
    let archive = PathBuf::from(d.archive_path.clone().unwrap());
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes[700] ^= 0xff;
    std::fs::write(&archive, &bytes).unwrap();

    let out = project.run(&["workflows", "start", "stage", "corrupt_archive", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let d = dataset_named(&app, DatasetType::RawData, "corrupt_archive").await;
    let (step, message) = failure_of(&app, &d).await;
    assert_eq!(step, "stage");
    assert!(
        message.contains("checksum mismatch") && message.contains(archive.to_str().unwrap()),
        "{message}"
    );
    // Failed at once (the original retried), and nothing was staged.
    let workflow = app
        .store
        .workflow(d.workflows.last().unwrap())
        .await
        .unwrap()
        .unwrap();
    let view = engine::view(&app, workflow).await.unwrap();
    assert_eq!(
        view.metas[&view.workflow.steps[0].runs[0].task_id].retries,
        0
    );
    assert!(!staged.exists());
    let staged_bundle = app
        .settings
        .paths
        .raw_data
        .bundle_stage
        .join("corrupt_archive.RAW_DATA.tar");
    assert!(
        !staged_bundle.exists(),
        "a bundle that failed its checksum is not left for download"
    );
}

/// Rewrites the dataset's file rows with `sql` and makes its inspection record agree with them,
/// as if inspect had recorded those checksums: validate then checks the staged copy against them.
fn record_checksums(app: &workers::app::App, id: i64, sql: &[&str]) {
    let db =
        workers::sqlite::Db::open(&app.settings.sqlite.path, std::time::Duration::from_secs(5))
            .unwrap();
    db.with_conn(|conn| {
        for statement in sql {
            conn.execute(statement, [id])?;
        }
        let mut stmt =
            conn.prepare("SELECT path, md5 FROM dataset_files WHERE dataset_id = ?1")?;
        let rows: Vec<(String, Option<String>)> = stmt
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let fingerprint = rows.iter().fold(0u64, |acc, (path, md5)| {
            let md5 = md5.as_ref().map(|m| m.parse().unwrap());
            workers::compute::walk::checksum_fingerprint_add(acc, path, md5.as_ref())
        });
        conn.execute(
            "UPDATE datasets SET metadata = json_set(metadata, '$.inspection.checksums_fingerprint', ?2, '$.inspection.files', ?3) WHERE id = ?1",
            rusqlite::params![id, format!("{fingerprint:016x}"), rows.len() as i64],
        )?;
        Ok(())
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_lists_every_mismatched_and_missing_file_and_withdraws_the_copy() {
    let project = Project::new();
    let d = ingested(&project, "mismatch").await;
    let app = project.app().await;
    // Record other checksums for two files and a row for a file that does not exist.
    record_checksums(
        &app,
        d.id,
        &[
            "UPDATE dataset_files SET md5 = '00000000000000000000000000000000' WHERE dataset_id = ?1 AND path IN ('a.txt', 'dir/c.txt')",
            "INSERT INTO dataset_files (dataset_id, path, md5, size, filetype) VALUES (?1, 'gone.txt', '00000000000000000000000000000001', 1, 'file')",
        ],
    );
    let out = project.run(&["workflows", "start", "stage", "mismatch", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let after = dataset_named(&app, DatasetType::RawData, "mismatch").await;
    let (step, message) = failure_of(&app, &after).await;
    assert_eq!(step, "validate");
    for expected in [
        "a.txt`: checksum mismatch",
        "dir/c.txt`: checksum mismatch",
        "gone.txt`: file does not exist",
    ] {
        assert!(message.contains(expected), "{expected:?} not in {message}");
    }
    assert!(message.starts_with("3 of 4 files"), "{message}");
    assert!(!message.contains("b.bin"), "{message}");
    // No STAGED state for the failed validation, and the copy that failed is not left in place.
    assert_eq!(
        state_names(&after).last().map(String::as_str),
        Some("FETCHED")
    );
    assert!(
        message.contains("the staged copy and its download links were removed"),
        "{message}"
    );
    assert!(!after.is_staged);
    assert_eq!(after.staged_path, None);
    let staged = PathBuf::from(d.staged_path.clone().unwrap());
    assert!(!staged.exists(), "{}", staged.display());
    let alias = app
        .settings
        .paths
        .download_dir
        .join(d.stage_alias().unwrap());
    assert!(
        std::fs::symlink_metadata(&alias).is_err(),
        "no dangling link"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_restores_lost_file_rows_from_the_staged_bundle() {
    let project = Project::new();
    let d = ingested(&project, "lost_rows").await;
    let app = project.app().await;
    let db =
        workers::sqlite::Db::open(&app.settings.sqlite.path, std::time::Duration::from_secs(5))
            .unwrap();
    db.with_conn(|conn| {
        conn.execute(
            "DELETE FROM dataset_files WHERE dataset_id = ?1 AND path = 'dir/b.bin'",
            [d.id],
        )?;
        Ok(())
    })
    .unwrap();
    project.run_ok(&["workflows", "start", "stage", "lost_rows", "--wait"]);
    let rows = app.registry.files_page(d.id, None, 100).await.unwrap();
    let paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["a.txt", "dir/b.bin", "dir/c.txt"]);
    let after = dataset_named(&app, DatasetType::RawData, "lost_rows").await;
    assert!(after.is_staged);
    assert_eq!(
        state_names(&after).last().map(String::as_str),
        Some("STAGED")
    );
}

/// Replaces the dataset's archived bundle with `tar_bytes` and records its MD5, as if the
/// archive had been tampered with, then runs the stage workflow, which must fail.
async fn stage_hostile(project: &Project, d: &Dataset, tar_bytes: Vec<u8>) -> String {
    let app = project.app().await;
    let archive = PathBuf::from(d.archive_path.clone().unwrap());
    std::fs::write(&archive, &tar_bytes).unwrap();
    let md5 = md5sum(&archive).parse().unwrap();
    let bundle = workers::model::Bundle {
        name: format!("{}.tar", d.name),
        size: tar_bytes.len() as u64,
        md5,
    };
    app.registry
        .update(
            d.id,
            &DatasetPatch {
                bundle: Some(bundle),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let staged = PathBuf::from(d.staged_path.clone().unwrap());
    let before = tree_listing(&staged);

    let out = project.run(&["workflows", "start", "stage", d.name.as_str(), "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let after = dataset_named(&app, DatasetType::RawData, d.name.as_str()).await;
    let (step, message) = failure_of(&app, &after).await;
    assert_eq!(step, "stage");
    // The previous staged copy, its record and its links are exactly as they were; no partial
    // tree is left beside it.
    assert_eq!(
        tree_listing(&staged),
        before,
        "the staged copy is untouched"
    );
    assert!(after.is_staged, "still recorded as staged");
    assert_eq!(after.staged_path, d.staged_path);
    assert_eq!(
        state_names(&after).last().map(String::as_str),
        Some("STAGED")
    );
    let alias = app
        .settings
        .paths
        .download_dir
        .join(d.stage_alias().unwrap());
    assert_eq!(
        std::fs::canonicalize(&alias).unwrap(),
        staged,
        "the link still works"
    );
    let alias_dir = staged.parent().unwrap();
    let entries: Vec<_> = std::fs::read_dir(alias_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries,
        [staged.file_name().unwrap().to_owned()],
        "left in {}",
        alias_dir.display()
    );
    message
}

/// Every entry below `root` with its content, for comparing a tree before and after.
fn tree_listing(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap())
        .map(|e| {
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let data = if e.file_type().is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            (rel, data)
        })
        .collect();
    out.sort();
    out
}

fn raw_header(path: &[u8], kind: tar::EntryType, size: u64, link: Option<&[u8]>) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    // Written into the raw name field: the tar crate's own setters refuse `..` and absolute paths.
    let name = &mut header.as_old_mut().name;
    name[..path.len()].copy_from_slice(path);
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    if let Some(link) = link {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    }
    header.set_cksum();
    header
}

/// A member: raw path, entry type, data and link target.
type Member<'a> = (&'a [u8], tar::EntryType, &'a [u8], Option<&'a [u8]>);

fn hostile_tar(members: &[Member<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, data, link) in members {
        let header = raw_header(path, *kind, data.len() as u64, *link);
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bundles_are_refused_by_stage_and_leave_nothing() {
    use tar::EntryType::{Regular, Symlink};
    let project = Project::new();
    let outside = project.path("var/stage/raw_data/evil");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            hostile_tar(&[
                (b"./ok.txt", Regular, b"ok", None),
                (b"../evil", Regular, b"x", None),
            ]),
            "../evil",
        ),
        (
            "absolute",
            hostile_tar(&[(b"/tmp/workers-test-evil", Regular, b"x", None)]),
            "/tmp/workers-test-evil",
        ),
        (
            "symlink",
            hostile_tar(&[(b"./link", Symlink, b"", Some(b"../../../../../../etc"))]),
            "link",
        ),
    ];
    for (name, tar_bytes, member) in cases {
        let d = ingested(&project, name).await;
        let message = stage_hostile(&project, &d, tar_bytes).await;
        assert!(
            message.contains("unsafe") && message.contains(member),
            "{name}: {message}"
        );
    }
    assert!(!outside.exists());
    assert!(!Path::new("/tmp/workers-test-evil").exists());
}

#[test]
fn bad_configuration_is_reported_all_at_once_with_exit_code_2() {
    let mut project = Project::new();
    std::fs::write(
        project.path("config/production.toml"),
        "[registration]\npoll_intervall = 5\n\n[worker]\nconcurrency = \"two\"\n\n[secrets]\nrequired = [\"alias_salt\"]\n",
    )
    .unwrap();
    project.set_env("APP_ENV", "production");
    project.remove_env("ALIAS_SALT");
    for args in [&["config", "check"][..], &["jobs", "run", "watch"][..]] {
        let out = project.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        let err = stderr(&out);
        for expected in [
            "production.toml:2:1: registration.poll_intervall: unknown key",
            "production.toml:5:1: worker.concurrency: expected a non-negative integer",
            "ALIAS_SALT",
        ] {
            assert!(
                err.contains(expected),
                "{args:?}: {expected:?} missing from:\n{err}"
            );
        }
    }
}

#[test]
fn usage_errors_exit_with_code_2() {
    let project = Project::new();
    let missing = project.path("nope");
    let cases: Vec<Vec<&str>> = vec![
        vec!["register", missing.to_str().unwrap(), "--type", "RAW_DATA"],
        vec!["register", ".", "--type", "RAW"],
        vec!["register", "."],
        vec!["datasets", "show", "no_such_dataset"],
        vec!["workflows", "show", "no-such-workflow"],
        vec!["no-such-command"],
    ];
    for args in cases {
        let out = project.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
}
