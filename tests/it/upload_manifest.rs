//! Upload integrity (spec C.5.3): our BLAKE3 manifest equals the UI's algorithm run by the
//! `blake3` package from PyPI (`tests/interop/upload_manifest.py`, `WORKERS_TEST_PYTHON`) on
//! trees with awkward names, and `workers uploads manifest|verify` answer with the right exit
//! codes without a configuration and without writing anything.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::services::service_var;
use crate::common::{describe, pseudo_random, stderr, stdout, write_file};
use serde_json::Value;
use workers::cancel::CancellationToken;
use workers::compute::Pool;
use workers::compute::manifest::{
    Blake3Manifest, blake3_manifest, blake3_manifest_text, size_manifest_of,
};

/// Names where the three orders (UTF-16 units, bytes, path components) disagree, and names a
/// browser can send: spaces, punctuation, accents, CJK, an emoji (a surrogate pair) beside
/// private-use and specials characters (U+E000-U+FFFF), empty files, deep nesting.
const FILES: &[(&str, usize)] = &[
    ("a.txt", 5),
    ("a/b", 3),
    ("a b.txt", 0),
    ("a-b", 1),
    ("A", 2),
    ("with space/and more spaces.dat", 64),
    ("ñandú/ß straße.csv", 10),
    ("日本語/ファイル.txt", 7),
    ("emoji 😀 file.txt", 11),
    ("\u{E000} private.txt", 4),
    ("\u{FFFD}replacement", 6),
    ("𝄞 music/score", 9),
    ("empty/nothing", 0),
    ("deep/1/2/3/4/5/6/7/leaf.bin", 33),
    ("quote's \"name\" #%&.txt", 8),
    ("big/large.bin", 3 * 1024 * 1024 + 17),
    ("z", 1),
];

fn awkward_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, (rel, len)) in FILES.iter().enumerate() {
        write_file(&dir.path().join(rel), &pseudo_random(*len, i as u64 + 1));
    }
    // Neither side lists links nor enters linked directories.
    symlink("a.txt", dir.path().join("link to a")).unwrap();
    symlink("deep", dir.path().join("linked deep")).unwrap();
    std::fs::create_dir_all(dir.path().join("empty dir/inner")).unwrap();
    dir
}

/// The Python reference's answer for `root`, or `None` when the interop Python is not set up
/// (outside CI).
fn python_manifest(root: &Path) -> Option<Value> {
    let python = service_var("WORKERS_TEST_PYTHON")?;
    let has_blake3 = Command::new(&python)
        .args(["-c", "import blake3"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_blake3 {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the interop Python lacks the blake3 package: run scripts/services.sh again"
        );
        eprintln!("note: {python} has no blake3 package; skipping (scripts/services.sh)");
        return None;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/upload_manifest.py"
    );
    let out = Command::new(&python)
        .arg(script)
        .arg(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "python: {}", describe(&out));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn ours(root: &Path, threads: usize) -> Blake3Manifest {
    let pool = Pool::new(threads).unwrap();
    pool.install(|| blake3_manifest(root, &CancellationToken::new(), None))
        .unwrap()
}

fn manifest_paths(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .map(|line| line.split('\t').next().unwrap().to_owned())
        .collect()
}

#[test]
fn the_manifest_is_the_uis_byte_for_byte() {
    let dir = awkward_tree();
    let root = dir.path();
    let text = blake3_manifest_text(root, &CancellationToken::new()).unwrap();
    let paths = manifest_paths(&text);
    assert_eq!(paths.len(), FILES.len());

    // The tree does tell the orders apart, so agreeing below means the UTF-16 order was used.
    let mut by_bytes = paths.clone();
    by_bytes.sort();
    assert_ne!(by_bytes, paths, "byte order and UTF-16 order differ here");
    let pos = |p: &str| paths.iter().position(|x| x == p).unwrap();
    assert!(pos("emoji 😀 file.txt") < pos("\u{E000} private.txt"));
    assert!(pos("𝄞 music/score") < pos("\u{FFFD}replacement"));
    assert!(pos("a.txt") < pos("a/b"), "as strings, not by components");
    assert!(pos("a b.txt") < pos("a-b") && pos("a-b") < pos("a.txt"));

    let expected_bytes: u64 = FILES.iter().map(|(_, len)| *len as u64).sum();
    for threads in [1, 2, 4] {
        let summary = ours(root, threads);
        assert_eq!(
            summary.hash,
            blake3::hash(text.as_bytes()).to_hex().as_str()
        );
        assert_eq!(summary.files, FILES.len() as u64);
        assert_eq!(summary.bytes, expected_bytes);
    }

    let Some(python) = python_manifest(root) else {
        return;
    };
    assert_eq!(python["text"].as_str().unwrap(), text, "manifest texts");
    assert_eq!(python["hash"].as_str().unwrap(), ours(root, 2).hash);
    assert_eq!(python["files"], FILES.len());
    assert_eq!(python["bytes"], expected_bytes);
}

#[test]
fn single_files_and_tiny_trees_match_python() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    write_file(&one.join("only.txt"), b"just this");
    let empty = dir.path().join("empty");
    write_file(&empty.join("zero"), b"");
    let roots = [one, empty];
    let mut answers = Vec::new();
    for root in &roots {
        let Some(python) = python_manifest(root) else {
            return;
        };
        answers.push(python["hash"].as_str().unwrap().to_owned());
        assert_eq!(python["hash"].as_str().unwrap(), ours(root, 2).hash);
    }
    assert_ne!(answers[0], answers[1]);
}

// --- the command line ------------------------------------------------------------------------

/// The binary in a directory of its own, with no configuration anywhere (none in the working
/// directory, none named by the environment).
fn workers(cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_workers"));
    cmd.current_dir(cwd).args(args);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("WORKERS") || name == "APP_ENV" {
            cmd.env_remove(&key);
        }
    }
    cmd.output().unwrap()
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .collect();
    all.sort();
    all
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap()
}

#[test]
fn uploads_commands_exit_0_1_2_without_configuration_and_write_nothing() {
    let cwd = tempfile::tempdir().unwrap();
    let data = awkward_tree();
    let root = data.path().to_str().unwrap();
    let sizes_file = cwd.path().join("sizes.json");
    let before = (listing(cwd.path()), listing(data.path()));

    // manifest: the hash, as JSON and as a table.
    let out = workers(
        cwd.path(),
        &["uploads", "manifest", root, "--format", "json"],
    );
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = ours(data.path(), 2);
    assert_eq!(shown["hash"], expected.hash);
    assert_eq!(shown["files"], expected.files);
    assert_eq!(shown["bytes"], expected.bytes);
    let out = workers(cwd.path(), &["uploads", "manifest", root]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(stdout(&out).contains(&expected.hash), "{}", describe(&out));

    // manifest --size-manifest: what a sender passes, in the same order.
    let out = workers(
        cwd.path(),
        &["uploads", "manifest", root, "--size-manifest"],
    );
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let sizes: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sizes["mode"], "path-size-v1");
    assert_eq!(sizes["file_count"], FILES.len());
    assert_eq!(
        sizes,
        serde_json::to_value(size_manifest_of(data.path()).unwrap()).unwrap()
    );
    assert_eq!(before, (listing(cwd.path()), listing(data.path())));

    // verify: both kinds hold.
    let out = workers(
        cwd.path(),
        &["uploads", "verify", root, "--manifest-hash", &expected.hash],
    );
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(stdout(&out).contains("holds"), "{}", describe(&out));
    std::fs::write(&sizes_file, out_json(&sizes)).unwrap();
    let sizes_arg = sizes_file.to_str().unwrap();
    let out = workers(
        cwd.path(),
        &["uploads", "verify", root, "--size-manifest", sizes_arg],
    );
    assert_eq!(code(&out), 0, "{}", describe(&out));

    // Usage errors (2): neither or both, a bad hash, a manifest file that is not JSON, is not
    // a size manifest, or cannot be read.
    for args in [
        vec!["uploads", "verify", root],
        vec![
            "uploads",
            "verify",
            root,
            "--manifest-hash",
            &expected.hash,
            "--size-manifest",
            sizes_arg,
        ],
    ] {
        let out = workers(cwd.path(), &args);
        assert_eq!(code(&out), 2, "{args:?}: {}", describe(&out));
    }
    let out = workers(
        cwd.path(),
        &["uploads", "verify", root, "--manifest-hash", "abc123"],
    );
    assert_eq!(code(&out), 2, "{}", describe(&out));
    assert!(stderr(&out).contains("abc123"), "{}", describe(&out));
    let bad = cwd.path().join("bad.json");
    for (text, says) in [
        (
            "{\"mode\": \"path-size-v1\",\n \"files\": [}",
            "line 2 column",
        ),
        (
            r#"{"mode": "path-size-v1", "files": [{"path": "a.txt"}]}"#,
            "files[0]",
        ),
        (
            r#"{"mode": "path-size-v9", "files": [{"path": "a.txt", "size": 5}]}"#,
            "path-size-v9",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = workers(
            cwd.path(),
            &[
                "uploads",
                "verify",
                root,
                "--size-manifest",
                bad.to_str().unwrap(),
            ],
        );
        assert_eq!(code(&out), 2, "{text}: {}", describe(&out));
        let err = stderr(&out);
        assert!(
            err.contains("bad.json") && err.contains(says),
            "{text}: {err}"
        );
    }
    let out = workers(
        cwd.path(),
        &["uploads", "verify", root, "--size-manifest", "no-such.json"],
    );
    assert_eq!(code(&out), 2, "{}", describe(&out));
    assert!(stderr(&out).contains("no-such.json"), "{}", describe(&out));

    // Failures (1): the files differ, naming what differs.
    let out = workers(
        cwd.path(),
        &[
            "uploads",
            "verify",
            "/nonexistent/upload",
            "--manifest-hash",
            &expected.hash,
        ],
    );
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stderr(&out).contains("origin `/nonexistent/upload` does not exist"),
        "{}",
        describe(&out)
    );
    write_file(&data.path().join("a/b"), b"changed");
    let out = workers(
        cwd.path(),
        &["uploads", "verify", root, "--manifest-hash", &expected.hash],
    );
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stderr(&out).contains("Manifest hash mismatch"),
        "{}",
        describe(&out)
    );
    let out = workers(
        cwd.path(),
        &["uploads", "verify", root, "--size-manifest", sizes_arg],
    );
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stderr(&out).contains("`a/b`"), "{}", describe(&out));
    write_file(&data.path().join("a/b"), &pseudo_random(3, 2));
    write_file(&data.path().join("a/unlisted"), b"");
    let out = workers(
        cwd.path(),
        &["uploads", "verify", root, "--size-manifest", sizes_arg],
    );
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stderr(&out).contains("`a/unlisted`"), "{}", describe(&out));
}

fn out_json(value: &Value) -> String {
    serde_json::to_string(value).unwrap()
}
