//! Whether two configured directories overlap (one is the other or lies inside it), judged on
//! the paths as written and, where they exist, on the file system through symbolic links.

use std::path::{Component, Path, PathBuf};

/// How directory `a` relates to directory `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Overlap {
    Same,
    /// `a` lies inside `b`.
    Inside,
    /// `b` lies inside `a`.
    Contains,
}

/// How the absolute directories `a` and `b` overlap, if they do. The second element tells
/// whether only resolving symbolic links showed it.
pub(super) fn overlap(a: &Path, b: &Path) -> Option<(Overlap, bool)> {
    if let Some(found) = relation(&normalize(a), &normalize(b)) {
        return Some((found, false));
    }
    let found = relation(&resolve_links(a)?, &resolve_links(b)?)?;
    Some((found, true))
}

fn relation(a: &Path, b: &Path) -> Option<Overlap> {
    if a == b {
        Some(Overlap::Same)
    } else if a.starts_with(b) {
        Some(Overlap::Inside)
    } else if b.starts_with(a) {
        Some(Overlap::Contains)
    } else {
        None
    }
}

/// `path` with `.` and `..` worked out on the text alone (`/a/b/../c` is `/a/c`).
pub(super) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => (),
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `path` with every symbolic link resolved, as far as it exists: the longest existing
/// ancestor is canonicalized and the rest appended. `None` when nothing of it exists.
fn resolve_links(path: &Path) -> Option<PathBuf> {
    let path = normalize(path);
    let mut existing = path.as_path();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            let rest = path.strip_prefix(existing).ok()?;
            return Some(canonical.join(rest));
        }
        existing = existing.parent()?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use super::*;

    #[test]
    fn paths_are_compared_by_whole_components_after_normalizing() {
        let cases = [
            ("/d/src", "/d/src", Some(Overlap::Same)),
            ("/d/src/", "/d/./src", Some(Overlap::Same)),
            ("/d/stage/x", "/d/stage", Some(Overlap::Inside)),
            ("/d", "/d/stage", Some(Overlap::Contains)),
            ("/d/x/../stage/in", "/d/stage", Some(Overlap::Inside)),
            ("/d/stage2", "/d/stage", None),
            ("/d/src", "/d/stage", None),
        ];
        for (a, b, expected) in cases {
            let found = overlap(Path::new(a), Path::new(b)).map(|(o, _)| o);
            assert_eq!(found, expected, "{a} and {b}");
        }
    }

    #[test]
    fn symbolic_links_are_followed_where_the_paths_exist() {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("stage");
        std::fs::create_dir(&stage).unwrap();
        std::os::unix::fs::symlink(&stage, dir.path().join("incoming")).unwrap();
        // `incoming/new` does not exist yet: its existing ancestor is resolved.
        let found = overlap(&dir.path().join("incoming/new"), &stage);
        assert_eq!(found, Some((Overlap::Inside, true)));
        assert_eq!(overlap(&dir.path().join("other"), &stage), None);
    }
}
