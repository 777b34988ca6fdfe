//! Admission by bytes: before a step writes a large output (a bundle, a staged tree) it reserves
//! the bytes on the file system it writes to, against the free space less the configured
//! headroom and the bytes other steps hold there (`SpaceLedger`, in the workflow store). A step
//! that does not fit waits, its message queued again, instead of failing half-way with "No space
//! left on device". Staging file systems can also be cleared on demand: the oldest staged copies
//! past a minimum age are purged until a step fits, or until the file system is below its low
//! watermark (`purge_staged_datasets`).
//!
//! Reservations are counted in full for as long as they are held, while the holder's output
//! also shows in the free space as it is written: an overestimate, never an underestimate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use indicatif::HumanBytes;
use tracing::{info, warn};

use super::{StepContext, StepEnv, StepError, withdraw_staged_copy};
use crate::compute::blocking;
use crate::model::DatasetState;
use crate::registry::{Dataset, DatasetId, DatasetQuery};
use crate::store::SpaceLedger;

/// Bytes a step is about to write below `dir`.
#[derive(Debug, Clone)]
pub struct Need {
    pub dir: PathBuf,
    pub bytes: u64,
}

/// A file system: where it is mounted, its size, the bytes in use and the bytes free to an
/// unprivileged writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsSpace {
    pub mount: PathBuf,
    pub total: u64,
    pub used: u64,
    pub free: u64,
}

impl FsSpace {
    /// Percent of the file system in use, as `df` counts it: used of used and available (the
    /// blocks kept for root count as neither).
    pub fn used_percent(&self) -> f64 {
        let usable = self.used.saturating_add(self.free);
        if usable == 0 {
            return 0.0;
        }
        100.0 * self.used as f64 / usable as f64
    }
}

/// The file system holding `dir` (created if missing): its mount point, found by walking up
/// from the resolved directory while the device stays the same, and its `statvfs` figures.
/// The mount point names the file system in the ledger, so hosts that mount a shared file
/// system at the same place share its account.
pub fn space_of(dir: &Path) -> anyhow::Result<FsSpace> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    space_at(dir)
}

/// `space_of` for a look-up that creates nothing: a directory that does not exist yet is on
/// the file system of its nearest existing ancestor.
pub fn space_at(dir: &Path) -> anyhow::Result<FsSpace> {
    use std::os::unix::fs::MetadataExt;
    let dir = dir
        .ancestors()
        .find(|d| d.exists())
        .with_context(|| format!("no part of `{}` exists", dir.display()))?;
    let resolved = std::fs::canonicalize(dir)
        .with_context(|| format!("cannot resolve `{}`", dir.display()))?;
    let device = std::fs::metadata(&resolved)
        .with_context(|| format!("cannot read `{}`", resolved.display()))?
        .dev();
    let mut mount = resolved.clone();
    while let Some(parent) = mount.parent() {
        match std::fs::metadata(parent) {
            Ok(meta) if meta.dev() == device => mount = parent.to_path_buf(),
            _ => break,
        }
    }
    let stat = rustix::fs::statvfs(&resolved)
        .with_context(|| format!("cannot read the free space of `{}`", resolved.display()))?;
    Ok(FsSpace {
        mount,
        total: stat.f_blocks.saturating_mul(stat.f_frsize),
        used: stat
            .f_blocks
            .saturating_sub(stat.f_bfree)
            .saturating_mul(stat.f_frsize),
        free: stat.f_bavail.saturating_mul(stat.f_frsize),
    })
}

/// A file system and the keys of the configured directories on it.
pub type FsOfKeys = (FsSpace, Vec<String>);

/// The file systems of `dirs` (key, directory), each once with the keys of the directories on
/// it, in the order first met; a directory not created yet counts on its nearest existing
/// ancestor's file system. Directories whose file system cannot be read come apart, with the
/// error. Nothing is created. Blocking: call it on a blocking thread.
pub fn file_systems_of(
    dirs: Vec<(String, PathBuf)>,
) -> (Vec<FsOfKeys>, Vec<(String, anyhow::Error)>) {
    let mut found: Vec<(FsSpace, Vec<String>)> = Vec::new();
    let mut unreadable = Vec::new();
    for (key, dir) in dirs {
        match space_at(&dir) {
            Ok(space) => match found.iter_mut().find(|(s, _)| s.mount == space.mount) {
                Some((_, keys)) => keys.push(key),
                None => found.push((space, vec![key])),
            },
            Err(err) => unreadable.push((key, err)),
        }
    }
    (found, unreadable)
}

/// The bytes a step holds; given back when dropped (and, should the process die, when the
/// reservations lapse, one claim period later). Renewed meanwhile.
pub struct Held {
    ledger: Arc<dyn SpaceLedger>,
    holder: String,
    /// Mount point and bytes, per file system held.
    mounts: Vec<(String, u64)>,
    renew: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(renew) = self.renew.take() {
            renew.abort();
        }
        let (ledger, holder, mounts) = (
            Arc::clone(&self.ledger),
            self.holder.clone(),
            std::mem::take(&mut self.mounts),
        );
        if mounts.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for (mount, _) in mounts {
                    if let Err(err) = ledger.release_space(&mount, &holder).await {
                        warn!(fs = %mount, error = %format!("{err:#}"),
                            "Could not give back reserved space; it lapses by itself.");
                    }
                }
            });
        }
    }
}

/// Reserves `needs` for the step, or returns `WaitingForSpace` naming what it waits for (a
/// permanent failure when the output could never fit). With `purge_to_fit`, a staging file
/// system that is short is first cleared of its oldest staged copies (`free_staging`).
pub async fn admit(
    ctx: &StepContext,
    needs: Vec<Need>,
    purge_to_fit: bool,
) -> Result<Held, StepError> {
    admit_as(&ctx.env, &ctx.task_id, ctx.dataset_id, needs, purge_to_fit).await
}

/// `admit` for work that is not a step (a fixity recall): `holder` names the reservation.
pub async fn admit_as(
    env: &StepEnv,
    holder: &str,
    dataset_id: DatasetId,
    needs: Vec<Need>,
    purge_to_fit: bool,
) -> Result<Held, StepError> {
    let settings = &env.settings;
    let headroom = settings.capacity.headroom;
    let ttl = Duration::from_secs(settings.worker.lease_seconds.max(3));
    // Bytes per file system: two directories on one file system add up.
    let spaces = blocking(move || -> anyhow::Result<Vec<(FsSpace, u64)>> {
        let mut spaces: Vec<(FsSpace, u64)> = Vec::new();
        for need in needs {
            let space = space_of(&need.dir)?;
            match spaces.iter_mut().find(|(s, _)| s.mount == space.mount) {
                Some((_, bytes)) => *bytes += need.bytes,
                None => spaces.push((space, need.bytes)),
            }
        }
        Ok(spaces)
    })
    .await
    .map_err(StepError::retryable)?;

    let mut held = Held {
        ledger: Arc::clone(&env.space),
        holder: holder.to_owned(),
        mounts: Vec::new(),
        renew: None,
    };
    for (space, bytes) in spaces {
        let mount = space.mount.display().to_string();
        // What an unprivileged writer could ever have there: the blocks kept for root aside.
        let usable = space.used.saturating_add(space.free);
        if bytes.saturating_add(headroom) > usable {
            return Err(StepError::permanent(
                "InsufficientSpace",
                anyhow::format_err!(
                    "dataset {} needs {} on `{mount}`, which holds {} in all (capacity.headroom {}): it can never fit there",
                    dataset_id,
                    HumanBytes(bytes),
                    HumanBytes(usable),
                    HumanBytes(headroom)
                ),
            ));
        }
        let mut space = space;
        let mut taken = reserve(env, &mount, holder, bytes, &space, ttl).await?;
        if !taken && purge_to_fit {
            let others = held_by_others(env, &mount, holder).await?;
            let wanted = bytes.saturating_add(headroom).saturating_add(others);
            free_staging(env, &space.mount, wanted, Some(dataset_id), holder)
                .await
                .map_err(StepError::retryable)?;
            let dir = space.mount.clone();
            space = blocking(move || space_of(&dir))
                .await
                .map_err(StepError::retryable)?;
            taken = reserve(env, &mount, holder, bytes, &space, ttl).await?;
        }
        if !taken {
            let others = env
                .space
                .space_reservations(&mount)
                .await
                .map_err(StepError::retryable)?;
            let others: Vec<_> = others.into_iter().filter(|r| r.holder != holder).collect();
            let wait = settings.capacity.wait;
            return Err(StepError::waiting_for_space(
                wait,
                anyhow::format_err!(
                    "waiting for {} on `{mount}`: {} free, less {} headroom and {} held by {} other step(s); looking again in {} s",
                    HumanBytes(bytes),
                    HumanBytes(space.free),
                    HumanBytes(headroom),
                    HumanBytes(others.iter().map(|r| r.bytes).sum()),
                    others.len(),
                    wait.as_secs()
                ),
            ));
        }
        held.mounts.push((mount, bytes));
    }
    let (ledger, holder, mounts) = (
        Arc::clone(&env.space),
        holder.to_owned(),
        held.mounts.clone(),
    );
    held.renew = Some(tokio::spawn(async move {
        let mut every = tokio::time::interval(ttl / 3);
        every.tick().await;
        loop {
            every.tick().await;
            for (mount, bytes) in &mounts {
                // Taking it again while held renews it without a look at the free space; one
                // that lapsed meanwhile (the store out of reach) is put back whatever the space,
                // since the output is being written.
                if let Err(err) = ledger
                    .reserve_space(mount, &holder, *bytes, u64::MAX, ttl)
                    .await
                {
                    warn!(fs = %mount, error = %format!("{err:#}"), "Could not renew reserved space.");
                }
            }
        }
    }));
    Ok(held)
}

async fn reserve(
    env: &StepEnv,
    mount: &str,
    holder: &str,
    bytes: u64,
    space: &FsSpace,
    ttl: Duration,
) -> Result<bool, StepError> {
    let available = space.free.saturating_sub(env.settings.capacity.headroom);
    env.space
        .reserve_space(mount, holder, bytes, available, ttl)
        .await
        .map_err(StepError::retryable)
}

async fn held_by_others(env: &StepEnv, mount: &str, holder: &str) -> Result<u64, StepError> {
    Ok(env
        .space
        .space_reservations(mount)
        .await
        .map_err(StepError::retryable)?
        .iter()
        .filter(|r| r.holder != holder)
        .map(|r| r.bytes)
        .sum())
}

/// Purges staged copies on the file system mounted at `mount`, the longest staged first, until
/// it has `wanted_free` bytes free: only copies staged at least `stage.purge.min_age_hours`
/// ago whose workflows have all ended, at most `stage.purge.max_purges`, never `exclude` (the
/// dataset being staged). One
/// purge runs at a time per file system (a one-byte account `purge:<mount>` in the ledger, held
/// by `holder`); when another runs, this one leaves the work to it. Returns the datasets purged.
pub async fn free_staging(
    env: &StepEnv,
    mount: &Path,
    wanted_free: u64,
    exclude: Option<DatasetId>,
    holder: &str,
) -> anyhow::Result<Vec<(DatasetId, String)>> {
    let settings = &env.settings.stage;
    let lock = format!("purge:{}", mount.display());
    let ttl = Duration::from_secs(env.settings.worker.lease_seconds.max(3) * 4);
    if !env.space.reserve_space(&lock, holder, 1, 1, ttl).await? {
        info!(fs = %mount.display(), "Another purge is making room on this file system.");
        return Ok(Vec::new());
    }
    let purged = purge_until(env, mount, wanted_free, exclude).await;
    if let Err(err) = env.space.release_space(&lock, holder).await {
        warn!(fs = %mount.display(), error = %format!("{err:#}"), "Could not end the purge's hold; it lapses by itself.");
    }
    let purged = purged?;
    if !purged.is_empty() {
        info!(fs = %mount.display(), purged = purged.len(), min_age_hours = settings.min_age.as_secs() / 3600,
            "Purged staged copies to make room.");
    }
    Ok(purged)
}

async fn purge_until(
    env: &StepEnv,
    mount: &Path,
    wanted_free: u64,
    exclude: Option<DatasetId>,
) -> anyhow::Result<Vec<(DatasetId, String)>> {
    let settings = &env.settings.stage;
    let cutoff = Utc::now() - chrono::Duration::from_std(settings.min_age).unwrap_or_default();
    let query = DatasetQuery {
        staged_before: Some(cutoff),
        ..Default::default()
    };
    let mut candidates: Vec<(chrono::DateTime<Utc>, Dataset)> = Vec::new();
    for dataset in env.registry.find(&query).await? {
        if Some(dataset.id) == exclude || in_use(env, &dataset).await? {
            continue;
        }
        let Some(staged) = dataset.staged_path.clone().map(PathBuf::from) else {
            continue;
        };
        let on_mount = blocking(move || space_of_existing(&staged))
            .await
            .is_some_and(|space| space.mount == mount);
        if !on_mount {
            continue;
        }
        let staged_at = dataset
            .states
            .iter()
            .rev()
            .find(|s| s.state == DatasetState::Staged.as_str())
            .map_or(dataset.updated_at, |s| s.timestamp);
        candidates.push((staged_at, dataset));
    }
    candidates.sort_by_key(|(staged_at, d)| (*staged_at, d.id));

    let mut purged = Vec::new();
    for (_, dataset) in candidates {
        let dir = mount.to_path_buf();
        let free = blocking(move || space_of(&dir)).await?.free;
        if free >= wanted_free || purged.len() >= settings.max_purges as usize {
            break;
        }
        purge_staged_copy(env, &dataset).await?;
        info!(dataset_id = dataset.id, name = %dataset.name, "Purged the staged copy to make room.");
        purged.push((dataset.id, dataset.name.to_string()));
    }
    Ok(purged)
}

/// Whether a workflow of the dataset is still active (its steps may read the staged copy: validate,
/// setup_download, QC). The store's cached status is read; a stale one errs on the side of
/// keeping the copy.
async fn in_use(env: &StepEnv, dataset: &Dataset) -> anyhow::Result<bool> {
    for workflow_id in &dataset.workflows {
        if let Some(status) = env.workflows.workflow_status(workflow_id).await?
            && !status.is_done()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The file system of a path that may no longer exist (a staged copy removed by hand).
fn space_of_existing(path: &Path) -> Option<FsSpace> {
    path.exists().then(|| space_of(path).ok()).flatten()
}

/// Withdraws a staged copy: the record first (not staged, then PURGED), then the links, the
/// tree and the bundle; a purge that fails half-way leaves files behind, never a staged record
/// without its copy.
pub async fn purge_staged_copy(env: &StepEnv, dataset: &Dataset) -> anyhow::Result<()> {
    withdraw_staged_copy(env, dataset).await?;
    env.registry
        .add_state(dataset.id, DatasetState::Purged)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_placed_on_its_file_system_by_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let space = space_of(&nested).unwrap();
        assert!(nested.is_dir(), "the directory is created");
        let resolved = std::fs::canonicalize(&nested).unwrap();
        assert!(resolved.starts_with(&space.mount), "{space:?}");
        assert!(space.total >= space.free && space.total > 0, "{space:?}");
        // Two directories of one file system have one mount point.
        let other = space_of(dir.path()).unwrap();
        assert_eq!(other.mount, space.mount);
        assert!((0.0..=100.0).contains(&space.used_percent()));
    }
}
