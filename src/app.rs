//! Builds the backends from the settings: the only place that chooses between them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::info;

use crate::archive::Archive;
use crate::archive::hsi::{HsiArchive, HsiConfig};
use crate::archive::local::LocalArchive;
use crate::broker::Broker;
use crate::broker::amqp::{AmqpBroker, AmqpConfig};
use crate::broker::sql::SqlBroker;
use crate::compute::Pool;
use crate::config::{ArchiveKind, BrokerKind, RegistryKind, Settings, StoreKind};
use crate::control::amqp::AmqpMailbox;
use crate::control::mailbox::Mailbox;
use crate::control::sql::SqlMailbox;
pub use crate::identity::Identity;
use crate::registry::Registry;
use crate::registry::http::{HttpConfig, HttpRegistry};
use crate::registry::sql::SqlRegistry;
use crate::sql::PgDb;
use crate::sqlite::Db;
use crate::steps::StepEnv;
use crate::store::mongo::MongoStore;
use crate::store::sql::SqlStore;
use crate::store::{SchedulerStore, SpaceLedger, WorkflowStore};
use crate::workflow::definitions::Definitions;

/// Workflow definitions that do not load are a configuration problem (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct DefinitionErrors(pub Vec<String>);

/// Everything a command needs: settings, backends, the CPU pool and the workflow definitions.
pub struct App {
    /// Shared with every step's `StepEnv`.
    pub settings: Arc<Settings>,
    pub registry: Arc<dyn Registry>,
    pub store: Arc<dyn WorkflowStore>,
    /// The scheduler's records, kept by the same backend as the workflow store.
    pub scheduler_store: Arc<dyn SchedulerStore>,
    /// The bytes steps hold on file systems for their output, kept by the same backend.
    pub space: Arc<dyn SpaceLedger>,
    pub broker: Arc<dyn Broker>,
    pub archive: Arc<dyn Archive>,
    pub pool: Pool,
    pub definitions: Definitions,
    pub identity: Identity,
    /// How control requests reach the workers: the pidbox of the RabbitMQ broker, or the
    /// embedded database.
    pub mailbox: Arc<dyn Mailbox>,
}

/// Whether the app may change anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    /// For commands that only look things up: the embedded database is opened read-only and
    /// never created; where it does not exist yet, an empty one in memory stands in for it.
    /// A PostgreSQL schema is required to be current and never migrated.
    ReadOnly,
}

impl App {
    /// What a step is given: the registry, the archive, the space ledger, the pool, the
    /// settings and the identity of this app, nothing else.
    pub fn step_env(&self) -> Arc<StepEnv> {
        StepEnv::new(
            Arc::clone(&self.settings),
            Arc::clone(&self.registry),
            Arc::clone(&self.archive),
            Arc::clone(&self.space),
            Arc::clone(&self.store),
            self.pool.clone(),
            self.identity.clone(),
        )
    }

    pub async fn build(settings: Settings) -> anyhow::Result<Arc<App>> {
        App::build_with(settings, None, Access::ReadWrite).await
    }

    /// Builds the app for a command that only reads: it creates no file and changes nothing
    /// in the embedded database, nor the schema of a PostgreSQL one.
    pub async fn build_read_only(settings: Settings) -> anyhow::Result<Arc<App>> {
        App::build_with(settings, None, Access::ReadOnly).await
    }

    /// Builds the app with `broker` instead of the one `broker.kind` names (a broker set up
    /// by hand, as tests of a production broker do); the other backends as configured.
    pub async fn with_broker(
        settings: Settings,
        broker: Arc<dyn Broker>,
    ) -> anyhow::Result<Arc<App>> {
        App::build_with(settings, Some(broker), Access::ReadWrite).await
    }

    async fn build_with(
        settings: Settings,
        broker: Option<Arc<dyn Broker>>,
        access: Access,
    ) -> anyhow::Result<Arc<App>> {
        let mut definitions =
            Definitions::load(&settings.workflows_dir).map_err(DefinitionErrors)?;
        if settings.integrated_qc {
            definitions.add_integrated_qc();
        }
        let pool = Pool::new(settings.parallelism)?;
        let identity = Identity::current();
        // The embedded backends share one database file; open it only if one of them is used.
        let mut db: Option<Db> = None;
        let mut embedded_db = || -> anyhow::Result<Db> {
            if let Some(db) = &db {
                return Ok(db.clone());
            }
            let path = &settings.sqlite.path;
            let busy_timeout = Duration::from_secs(settings.sqlite.busy_timeout_seconds);
            let opened = match access {
                Access::ReadWrite => Db::open(path, busy_timeout),
                Access::ReadOnly => match Db::open_read_only(path, busy_timeout) {
                    Ok(Some(db)) => Ok(db),
                    Ok(None) => {
                        info!(
                            database = %path.display(),
                            "The database does not exist yet: nothing has been recorded."
                        );
                        Db::empty(path)
                    }
                    Err(err) => Err(err),
                },
            }
            .context("cannot open the embedded database (sqlite.path)")?;
            db = Some(opened.clone());
            Ok(opened)
        };
        // The postgres backends share one pool; connect only if one of them is used.
        let backends = settings.backends;
        let postgres = if backends.registry == RegistryKind::Postgres
            || backends.store == StoreKind::Postgres
            || backends.broker == BrokerKind::Postgres
        {
            let connected = match access {
                Access::ReadWrite => PgDb::connect(settings.postgres.clone()).await,
                // A command that only reads leaves the schema as it is.
                Access::ReadOnly => PgDb::connect_read_only(settings.postgres.clone()).await,
            };
            Some(connected.context("cannot use the PostgreSQL database (postgres.url)")?)
        } else {
            None
        };
        let shared_db = |kind: &str| -> anyhow::Result<PgDb> {
            postgres.clone().with_context(|| {
                format!("{kind} is of kind \"postgres\" but no database was connected")
            })
        };
        let registry: Arc<dyn Registry> = match settings.backends.registry {
            RegistryKind::Sqlite => Arc::new(SqlRegistry::new(embedded_db()?)),
            RegistryKind::Postgres => {
                let registry = SqlRegistry::new(shared_db("registry")?);
                Arc::new(match &settings.postgres_reports_dir {
                    Some(dir) => registry.keeping_reports_in(dir.clone()),
                    None => registry,
                })
            }
            RegistryKind::Http => {
                let api = &settings.api;
                let token = api.token.as_ref().map(|t| t.expose().to_owned());
                Arc::new(HttpRegistry::new(HttpConfig {
                    base_url: api.base_url.clone(),
                    // Validation requires the token for this backend.
                    token: token.unwrap_or_default(),
                    connect_timeout: api.connect_timeout,
                    read_timeout: api.read_timeout,
                    max_retries: api.max_retries,
                    backoff: api.backoff,
                    backoff_max: api.backoff_max,
                    rows_visible_wait: crate::registry::http::ROWS_VISIBLE_WAIT,
                    file_batch: settings.inspect.file_metadata_batch_size,
                })?)
            }
        };
        #[allow(clippy::type_complexity)]
        let (store, scheduler_store, space): (
            Arc<dyn WorkflowStore>,
            Arc<dyn SchedulerStore>,
            Arc<dyn SpaceLedger>,
        ) = match settings.backends.store {
            StoreKind::Sqlite => {
                let store = Arc::new(SqlStore::new(embedded_db()?));
                (store.clone(), store.clone(), store)
            }
            StoreKind::Postgres => {
                let store = Arc::new(SqlStore::new(shared_db("store")?));
                (store.clone(), store.clone(), store)
            }
            StoreKind::Mongo => {
                let mongo = &settings.mongo;
                let store = Arc::new(
                    MongoStore::connect(mongo.uri.expose(), &mongo.database)
                        .await
                        .with_context(|| {
                            format!("cannot use the MongoDB store at {}", mongo.display)
                        })?,
                );
                (store.clone(), store.clone(), store)
            }
        };
        let broker: Arc<dyn Broker> = match (broker, settings.backends.broker) {
            (Some(broker), _) => broker,
            (None, BrokerKind::Embedded) => Arc::new(SqlBroker::new(
                embedded_db()?,
                identity.clone(),
                Duration::from_secs(settings.worker.lease_seconds),
            )),
            (None, BrokerKind::Postgres) => Arc::new(SqlBroker::new(
                shared_db("broker")?,
                identity.clone(),
                Duration::from_secs(settings.worker.lease_seconds),
            )),
            (None, BrokerKind::Amqp) => Arc::new(AmqpBroker::new(
                AmqpConfig {
                    uri: settings.amqp.uri.expose().to_owned(),
                    queues: settings.amqp.queues.clone(),
                    prefetch: u16::try_from(settings.worker.concurrency).unwrap_or(u16::MAX),
                    heartbeat: settings.amqp.heartbeat,
                    reconnect_max: settings.amqp.reconnect_max,
                    max_held: settings.amqp.max_held,
                    dead_letter_exchange: settings.amqp.dead_letter_exchange.clone(),
                },
                &identity,
            )?),
        };
        let mailbox: Arc<dyn Mailbox> = match settings.backends.broker {
            BrokerKind::Embedded => Arc::new(SqlMailbox::new(embedded_db()?)),
            BrokerKind::Postgres => Arc::new(SqlMailbox::new(shared_db("broker")?)),
            BrokerKind::Amqp => Arc::new(AmqpMailbox::new(
                settings.amqp.uri.expose(),
                &settings.amqp.display,
                &format!("workers {} {}", identity.hostname, identity.pid),
            )?),
        };
        let archive: Arc<dyn Archive> = match settings.backends.archive {
            ArchiveKind::Local => Arc::new(LocalArchive::new(pool.clone())),
            ArchiveKind::Hsi => Arc::new(HsiArchive::new(
                HsiConfig {
                    command: settings.hsi.command.clone(),
                    verify: settings.hsi.verify,
                    progress_interval: settings.progress_interval,
                    command_timeout: Duration::from_secs(settings.hsi.command_timeout_seconds),
                    stall_timeout: Duration::from_secs(settings.hsi.stall_timeout_seconds),
                },
                pool.clone(),
            )),
        };
        Ok(Arc::new(App {
            mailbox,
            settings: Arc::new(settings),
            registry,
            store,
            scheduler_store,
            space,
            broker,
            archive,
            pool,
            definitions,
            identity,
        }))
    }
}
