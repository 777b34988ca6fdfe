//! `watch` (spec C.1): registers every new directory of the configured source directories as
//! a dataset and starts its `integrated` workflow.
//!
//! What the original got wrong is fixed here (spec J.1, J.2): the set of handled names only
//! grows by names that were registered or found registered, so a batch that failed is tried
//! again on the next run; and every run ends with a repair pass that starts the workflow of
//! any scanned dataset left without one.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::{info, warn};

use super::{Interrupted, Registered, check_interrupted, register_and_start};
use crate::app::App;
use crate::cancel::CancellationToken;
use crate::compute::walk::regular_file_bytes;
use crate::model::{CreateMethod, DatasetName, DatasetType};
use crate::registry::{DatasetQuery, MAX_BULK, NewDataset};
use crate::store::WatchState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanKind {
    /// Only directories not seen before.
    Incremental,
    /// Every directory (registered ones come back as conflicts and are skipped).
    Full,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct WatchOptions {
    /// Scan everything, whatever the scan counter says.
    pub full: bool,
    /// Report what would be registered; change nothing.
    pub dry_run: bool,
}

#[derive(Debug, Clone)]
pub struct SourceReport {
    pub dataset_type: DatasetType,
    pub source_dir: PathBuf,
    pub missing: bool,
    pub scan: ScanKind,
    /// Subdirectories found (rejects excluded).
    pub seen: usize,
    pub registered: Vec<Registered>,
    /// Names a dry run would register.
    pub would_register: Vec<String>,
    pub already_registered: usize,
    /// Directories that cannot become datasets, with the reason.
    pub rejected: Vec<(String, String)>,
    /// Directories smaller than `registration.minimum_dataset_size`, for now.
    pub held_back: Vec<String>,
    /// Directories whose registration failed this time; tried again next run.
    pub failed: Vec<(String, String)>,
    /// Directories whose name normalizes to the name of a dataset registered from another
    /// directory (`with space` and `with-space`): (this directory, the other one). They are
    /// never archived under that name, and reported on every scan that sees them.
    pub conflicts: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct WatchReport {
    pub sources: Vec<SourceReport>,
    /// Datasets found without a workflow, and the workflow started for them.
    pub repaired: Vec<Registered>,
}

impl WatchReport {
    /// Every workflow this run started.
    pub fn started_workflows(&self) -> Vec<String> {
        self.sources
            .iter()
            .flat_map(|s| s.registered.iter())
            .chain(self.repaired.iter())
            .filter_map(|r| r.workflow_id.clone())
            .collect()
    }

    pub fn failed(&self) -> usize {
        self.sources.iter().map(|s| s.failed.len()).sum()
    }
}

/// Whether this scan is full and the scan counter after it (spec C.1: every n-th scan is
/// full and resets the counter).
pub fn decide_scan(scan_count: u32, full_every_n: u32, force_full: bool) -> (ScanKind, u32) {
    let count = scan_count.saturating_add(1);
    if force_full || (full_every_n > 0 && count >= full_every_n) {
        (ScanKind::Full, 0)
    } else {
        (ScanKind::Incremental, count)
    }
}

/// The immediate subdirectories of `dir` (links to directories count), minus the names that
/// match a reject pattern, sorted by name, each with its path with links resolved (what is
/// recorded as the dataset's origin). Entries are told apart by the type the directory
/// listing gives, so only links cost a look-up: a listing of 100,000 directories is one pass.
pub fn list_candidates(
    dir: &Path,
    rejects: &globset::GlobSet,
) -> std::io::Result<Vec<(OsString, PathBuf)>> {
    let base = std::fs::canonicalize(dir)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if rejects.is_match(Path::new(&name)) {
            continue;
        }
        let file_type = entry.file_type()?;
        let path = if file_type.is_dir() {
            base.join(&name)
        } else if file_type.is_symlink() {
            match std::fs::canonicalize(entry.path()) {
                Ok(target) if target.is_dir() => target,
                _ => continue,
            }
        } else {
            continue;
        };
        out.push((name, path));
    }
    out.sort();
    Ok(out)
}

pub async fn run(
    app: &App,
    opts: WatchOptions,
    cancel: &CancellationToken,
) -> anyhow::Result<WatchReport> {
    let mut report = WatchReport::default();
    for dataset_type in DatasetType::ALL {
        check_interrupted(cancel)?;
        report
            .sources
            .push(scan_source(app, dataset_type, opts, cancel).await?);
    }
    check_interrupted(cancel)?;
    if !opts.dry_run {
        report.repaired =
            super::reconcile::start_missing_workflows(app, &[CreateMethod::Scan], false, cancel)
                .await?;
    }
    Ok(report)
}

async fn scan_source(
    app: &App,
    dataset_type: DatasetType,
    opts: WatchOptions,
    cancel: &CancellationToken,
) -> anyhow::Result<SourceReport> {
    let source = app.settings.registration.for_type(dataset_type);
    let source_dir = source.source_dir.clone();
    let key = source_dir.to_string_lossy().into_owned();
    let state = app.store.watch_state(&key).await?;
    let (scan, next_count) = decide_scan(
        state.scan_count,
        app.settings.registration.full_scan_every_n_scans,
        opts.full,
    );
    let mut report = SourceReport {
        dataset_type,
        source_dir: source_dir.clone(),
        missing: false,
        scan,
        seen: 0,
        registered: Vec::new(),
        would_register: Vec::new(),
        already_registered: 0,
        rejected: Vec::new(),
        held_back: Vec::new(),
        failed: Vec::new(),
        conflicts: Vec::new(),
    };
    let probe = source_dir.clone();
    if !crate::compute::blocking(move || probe.is_dir()).await {
        warn!(source_dir = %source_dir.display(), dataset_type = %dataset_type, "Source directory does not exist; nothing to scan.");
        report.missing = true;
        return Ok(report);
    }
    // Listing stats every entry: disk work (network file systems make it slow), on the pool.
    let (dir, rejects) = (source_dir.clone(), source.rejects.clone());
    let current = app
        .pool
        .run(move || list_candidates(&dir, &rejects))
        .await
        .with_context(|| {
            format!(
                "cannot list the source directory `{}`",
                source_dir.display()
            )
        })?;
    report.seen = current.len();
    let mut handled: BTreeSet<String> = BTreeSet::new();
    let mut new: Vec<(String, DatasetName, PathBuf)> = Vec::new();
    for (dir_name, path) in &current {
        let Some(dir_name) = dir_name.to_str() else {
            let shown = dir_name.to_string_lossy().into_owned();
            report
                .rejected
                .push((shown, "the directory name is not valid UTF-8".to_owned()));
            continue;
        };
        if scan == ScanKind::Incremental && state.known.contains(dir_name) {
            handled.insert(dir_name.to_owned());
            continue;
        }
        let name = match DatasetName::normalize(dir_name) {
            Ok(name) => name,
            Err(err) => {
                // Permanent: remembered, so it is reported again only by full scans.
                warn!(directory = %path.display(), error = %err, "Directory cannot be registered.");
                report.rejected.push((dir_name.to_owned(), err.to_string()));
                handled.insert(dir_name.to_owned());
                continue;
            }
        };
        let min_size = app.settings.registration.minimum_dataset_size;
        if min_size > 0 {
            let root = path.clone();
            let Ok(size) = app
                .pool
                .run_job(cancel, move |cancel| regular_file_bytes(&root, cancel))
                .await
            else {
                return Err(Interrupted.into());
            };
            if size < min_size {
                info!(directory = %path.display(), bytes = size, minimum = min_size,
                    "Directory held back: smaller than registration.minimum_dataset_size.");
                report.held_back.push(dir_name.to_owned());
                continue;
            }
        }
        new.push((dir_name.to_owned(), name, path.clone()));
    }
    // Paths come resolved from the listing: the origin is recorded with links resolved.
    let items: Vec<(String, NewDataset)> = new
        .into_iter()
        .map(|(dir_name, name, origin)| {
            let item = NewDataset {
                name,
                dataset_type,
                origin_path: origin.to_string_lossy().into_owned(),
                create_method: CreateMethod::Scan,
                description: None,
                metadata: None,
            };
            (dir_name, item)
        })
        .collect();
    // Names already taken are told apart from new ones by one listing of the registry (the
    // original's set difference), not by one look-up per name: a full scan of a directory of
    // 100,000 registered datasets stays a matter of a second. Small incremental scans skip it.
    let items = if scan == ScanKind::Full || items.len() > MAX_BULK {
        let taken = app.registry.origins(dataset_type).await?;
        let mut fresh = Vec::with_capacity(items.len());
        for (dir_name, item) in items {
            match taken.get(item.name.as_str()) {
                None => fresh.push((dir_name, item)),
                Some(origin) => {
                    let origin = origin.clone().unwrap_or_default();
                    if origin == item.origin_path {
                        report.already_registered += 1;
                        handled.insert(dir_name);
                    } else {
                        report_conflict(&mut report, &item, &origin);
                    }
                }
            }
        }
        fresh
    } else {
        items
    };
    if opts.dry_run {
        report.would_register = items
            .iter()
            .map(|(_, item)| item.name.to_string())
            .collect();
        return Ok(report);
    }
    let (dir_names, new_items): (Vec<String>, Vec<NewDataset>) = items.into_iter().unzip();
    let (registered, outcome, failed) = register_and_start(app, &new_items, cancel).await;
    // Names whose registration failed are not remembered, so the next run tries them again.
    let retry_names: BTreeSet<&str> = failed
        .iter()
        .map(|(name, _)| name.as_str())
        .chain(outcome.errored.iter().map(|(name, _, _)| name.as_str()))
        .collect();
    for (dir_name, item) in dir_names.iter().zip(&new_items) {
        if !retry_names.contains(item.name.as_str()) {
            handled.insert(dir_name.clone());
        }
    }
    // A conflict is a name already taken. Where the dataset holding it came from another
    // directory (normalization maps `a b` and `a-b` onto one name, spec J.5), this directory is
    // not that dataset: it is reported, and not remembered, so that every scan reports it again.
    let conflicted: BTreeSet<&str> = outcome
        .conflicted
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    for name in &conflicted {
        let query = DatasetQuery {
            dataset_type: Some(dataset_type),
            name: Some(DatasetName::from_stored((*name).to_owned())),
            ..Default::default()
        };
        let holder = app.registry.find(&query).await?;
        let holder_origin = holder
            .first()
            .and_then(|d| d.origin_path.clone())
            .unwrap_or_default();
        let named = dir_names
            .iter()
            .zip(&new_items)
            .filter(|(_, item)| item.name.as_str() == *name);
        for (dir_name, item) in named {
            if holder_origin == item.origin_path {
                report.already_registered += 1;
                continue;
            }
            handled.remove(dir_name);
            report_conflict(&mut report, item, &holder_origin);
        }
    }
    for (name, _, reason) in &outcome.errored {
        report.failed.push((name.to_string(), reason.clone()));
    }
    report.failed.extend(failed);
    report.registered = registered;
    // Names of directories that disappeared are forgotten, so a directory that comes back is
    // looked at again.
    let current_names: BTreeSet<String> = current
        .iter()
        .filter_map(|(name, _)| name.to_str().map(str::to_owned))
        .collect();
    let known: BTreeSet<String> = handled.intersection(&current_names).cloned().collect();
    app.store
        .save_watch_state(
            &key,
            &WatchState {
                scan_count: next_count,
                known,
            },
        )
        .await?;
    for registered in &report.registered {
        info!(dataset_id = registered.id, name = %registered.name, dataset_type = %dataset_type, "Registered a new dataset.");
    }
    Ok(report)
}

/// A directory whose name normalizes to that of a dataset from another directory (`a b` and
/// `a-b`, spec J.5): not that dataset, so reported (and not remembered, so that every scan
/// reports it again).
fn report_conflict(report: &mut SourceReport, item: &NewDataset, holder_origin: &str) {
    warn!(directory = %item.origin_path, name = %item.name, existing_origin = %holder_origin,
        "Directory not registered: its name normalizes to that of a dataset from another directory; rename one of them.");
    report
        .conflicts
        .push((item.origin_path.clone(), holder_origin.to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_scan_is_full() {
        let mut count = 0;
        let mut kinds = Vec::new();
        for _ in 0..6 {
            let (kind, next) = decide_scan(count, 3, false);
            kinds.push(kind);
            count = next;
        }
        use ScanKind::*;
        assert_eq!(
            kinds,
            [
                Incremental,
                Incremental,
                Full,
                Incremental,
                Incremental,
                Full
            ]
        );
        assert_eq!(decide_scan(0, 3, true), (Full, 0));
        // 0 disables full scans.
        assert_eq!(decide_scan(41, 0, false), (Incremental, 42));
    }

    #[test]
    fn candidates_are_directories_and_links_to_them_minus_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["b", "a", ".snapshots", "_testObservedPath_x"] {
            std::fs::create_dir(root.join(name)).unwrap();
        }
        std::fs::write(root.join("file"), b"x").unwrap();
        std::fs::create_dir(root.join("../elsewhere-for-link")).ok();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("linked")).unwrap();
        std::os::unix::fs::symlink(root.join("missing"), root.join("dangling")).unwrap();
        let mut rejects = globset::GlobSetBuilder::new();
        rejects.add(globset::Glob::new(".snapshots").unwrap());
        rejects.add(globset::Glob::new("_testObservedPath_*").unwrap());
        let found: Vec<_> = list_candidates(root, &rejects.build().unwrap())
            .unwrap()
            .into_iter()
            .map(|(name, _)| name.into_string().unwrap())
            .collect();
        assert_eq!(found, ["a", "b", "linked"]);
    }
}
