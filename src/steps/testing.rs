//! Steps under test without a worker: a [`StepEnv`] over the embedded registry and a local
//! archive in a temporary project, built from the shipped default configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Map;

use super::{StepContext, StepEnv};
use crate::archive::local::LocalArchive;
use crate::cancel::CancellationToken;
use crate::compute::Pool;
use crate::config::LoadOptions;
use crate::identity::Identity;
use crate::model::{CreateMethod, DatasetName, DatasetType};
use crate::progress::Progress;
use crate::registry::sql::SqlRegistry;
use crate::registry::{DatasetId, NewDataset};
use crate::sqlite::Db;
use crate::store::sql::SqlStore;

/// A temporary project: `config/default.toml` as shipped, the database and the data beside it.
pub(crate) struct TestEnv {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) env: Arc<StepEnv>,
}

impl TestEnv {
    pub(crate) fn new() -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        std::fs::create_dir_all(&config).expect("mkdir config");
        std::fs::write(
            config.join("default.toml"),
            include_str!("../../config/default.toml"),
        )
        .expect("write default.toml");
        let mut env = BTreeMap::new();
        env.insert("ALIAS_SALT".to_owned(), "test".to_owned());
        let settings = crate::config::load(&LoadOptions {
            config_dir: config,
            app_env: None,
            env,
            problems: vec![],
            flags: vec![],
        })
        .expect("the default configuration loads");
        let db = Db::open(&dir.path().join("test.db"), Duration::from_secs(5)).expect("db");
        let pool = Pool::new(2).expect("pool");
        let env = StepEnv::new(
            Arc::new(settings),
            Arc::new(SqlRegistry::new(db.clone())),
            Arc::new(LocalArchive::new(pool.clone())),
            Arc::new(SqlStore::new(db.clone())),
            Arc::new(SqlStore::new(db)),
            pool,
            Identity::current(),
        );
        TestEnv { dir, env }
    }

    /// Writes `files` under `data/NAME` and registers the directory as a raw-data dataset.
    pub(crate) async fn dataset(
        &self,
        name: &str,
        files: &[(&str, &[u8])],
    ) -> (DatasetId, PathBuf) {
        let root = self.dir.path().join("data").join(name);
        for (path, content) in files {
            write(&root.join(path), content);
        }
        let created = self
            .env
            .registry
            .bulk_create(&[NewDataset {
                name: DatasetName::normalize(name).expect("name"),
                dataset_type: DatasetType::RawData,
                origin_path: root.to_str().expect("UTF-8 path").to_owned(),
                create_method: CreateMethod::Scan,
                description: None,
                metadata: None,
            }])
            .await
            .expect("register");
        (created.created[0].id, root)
    }

    /// The context a worker would give a step of dataset `id`.
    pub(crate) fn context(&self, id: DatasetId) -> StepContext {
        StepContext {
            env: Arc::clone(&self.env),
            dataset_id: id,
            task_id: format!("test-{id}"),
            args: Vec::new(),
            kwargs: Map::new(),
            progress: Progress::new(),
            cancel: CancellationToken::new(),
            retries: 0,
            max_retries: 0,
        }
    }
}

pub(crate) fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}
