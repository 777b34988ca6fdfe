//! `setup_dataset_download` (spec B.6): publishes the staged copy through two symbolic links
//! in the download directory and opens read permissions for the web server.
//!
//! Links are replaced atomically (a new link renamed over the old one), and a staged path
//! outside `paths.root` is an error instead of the original's endless loop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::info;

use super::{StepContext, StepError, StepResult, returns_dataset, staged_bundle_path};
use crate::cancel::{CancellationToken, check};
use crate::compute::{attempt_sibling, blocking, remove_leftover_partials, remove_tree};

pub async fn run(ctx: &StepContext) -> StepResult {
    let env = &ctx.env;
    let dataset = ctx.dataset().await?;
    let Some(alias) = dataset.stage_alias().map(str::to_owned) else {
        return Err(StepError::validation(anyhow::format_err!(
            "dataset {} (`{}`) has no stage alias",
            dataset.id,
            dataset.name
        )));
    };
    let staged = dataset.staged_path.as_deref().map(PathBuf::from);
    let root_setting = env.settings.paths.root.clone();
    let download_setting = env.settings.paths.download_dir.clone();
    // Resolving paths touches the file system: off the runtime threads.
    let resolved = blocking(move || -> Result<(PathBuf, PathBuf, PathBuf), StepError> {
        let staged = staged.filter(|p| p.is_dir()).ok_or_else(|| {
            StepError::validation(anyhow::format_err!("the dataset has no staged copy"))
        })?;
        let root = std::fs::canonicalize(&root_setting)
            .with_context(|| format!("cannot resolve paths.root `{}`", root_setting.display()))?;
        let staged = std::fs::canonicalize(&staged)
            .with_context(|| format!("cannot resolve `{}`", staged.display()))?;
        std::fs::create_dir_all(&download_setting)
            .with_context(|| format!("cannot create `{}`", download_setting.display()))?;
        let download_dir = std::fs::canonicalize(&download_setting)
            .with_context(|| format!("cannot resolve `{}`", download_setting.display()))?;
        Ok((root, staged, download_dir))
    })
    .await
    .map_err(|err| {
        if err.is_retryable() {
            err
        } else {
            StepError::validation(anyhow::format_err!(
                "dataset {} (`{}`): {:#}",
                dataset.id,
                dataset.name,
                err.error()
            ))
        }
    })?;
    let (root, staged, download_dir) = resolved;
    if !staged.starts_with(&root) {
        return Err(StepError::validation(anyhow::format_err!(
            "staged path `{}` is outside paths.root `{}`; downloads can only be published below it",
            staged.display(),
            root.display()
        )));
    }
    let bundle = staged_bundle_path(env, &dataset);

    let alias_link = download_dir.join(&alias);
    let bundle_link = download_dir.join(dataset.name.staged_bundle_file_name(dataset.dataset_type));
    let (tree, bundle_path, root_dir) = (staged.clone(), bundle.clone(), root.clone());
    // Replacing a link may mean removing a whole tree, and opening permissions walks the staged
    // copy: disk work, on the pool.
    ctx.compute(move |cancel| -> anyhow::Result<()> {
        replace_with_symlink(&alias_link, &tree, cancel)?;
        replace_with_symlink(&bundle_link, &bundle_path, cancel)?;
        open_tree_for_reading(&tree, cancel)?;
        if bundle_path.exists() {
            add_mode(&bundle_path, 0o004)?;
        }
        // Every directory between the root and the staged tree must be searchable.
        for ancestor in tree.ancestors().skip(1) {
            if ancestor == root_dir || !ancestor.starts_with(&root_dir) {
                break;
            }
            add_mode(ancestor, 0o001)?;
        }
        Ok(())
    })
    .await??;
    info!(alias = %alias, download_dir = %download_dir.display(), "Published the download links.");
    Ok(returns_dataset(dataset.id))
}

/// Points `link` at `target`, whatever `link` was before (link, file or directory tree): a new
/// link made under a name unique to this attempt is renamed over it.
fn replace_with_symlink(
    link: &Path,
    target: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    remove_leftover_partials(link)
        .with_context(|| format!("cannot remove leftovers next to `{}`", link.display()))?;
    let temp = attempt_sibling(link);
    std::os::unix::fs::symlink(target, &temp)
        .with_context(|| format!("cannot create `{}`", temp.display()))?;
    let replaced = (|| -> anyhow::Result<()> {
        if let Ok(meta) = link.symlink_metadata()
            && meta.is_dir()
        {
            // rename(2) cannot replace a directory with a link.
            remove_tree(link, cancel)
                .with_context(|| format!("cannot remove `{}`", link.display()))?;
        }
        std::fs::rename(&temp, link).with_context(|| format!("cannot replace `{}`", link.display()))
    })();
    if replaced.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    replaced
}

fn add_mode(path: &Path, bits: u32) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & bits != bits {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | bits))
            .with_context(|| format!("cannot change the permissions of `{}`", path.display()))?;
    }
    Ok(())
}

/// `o+r` on files and `o+rx` on directories, without following links.
fn open_tree_for_reading(root: &Path, cancel: &CancellationToken) -> anyhow::Result<()> {
    for entry in walkdir::WalkDir::new(root) {
        check(cancel)?;
        let entry = entry.with_context(|| format!("cannot walk `{}`", root.display()))?;
        let file_type = entry.file_type();
        if file_type.is_dir() {
            add_mode(entry.path(), 0o005)?;
        } else if file_type.is_file() {
            add_mode(entry.path(), 0o004)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process killed between making its new link and renaming it leaves the link under a
    /// partial name; the next replacement of the same link removes it.
    #[test]
    fn replacing_a_link_removes_what_a_dead_attempt_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("alias");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let gone = child.id();
        child.wait().expect("wait");
        let ours = attempt_sibling(&link);
        let name = ours
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let (prefix, _) = name.split_at(name.find('-').expect("pid part"));
        let leftover = dir.path().join(format!("{prefix}-{gone}-deadbeef.partial"));
        std::os::unix::fs::symlink("/nowhere", &leftover).expect("symlink");
        let target = dir.path().join("tree");
        std::fs::create_dir(&target).expect("mkdir");
        replace_with_symlink(&link, &target, &CancellationToken::new()).expect("replace");
        assert_eq!(std::fs::read_link(&link).expect("link"), target);
        assert!(
            std::fs::symlink_metadata(&leftover).is_err(),
            "leftover removed"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
