//! Queue throughput driver: `workers worker` running `noop` steps through the backends of one
//! profile (the embedded SQLite file, PostgreSQL, or RabbitMQ and MongoDB), as configured by
//! the environment. `benches/queue_throughput.sh` calls it once per run and profile.
//!
//! ```text
//! queue_throughput WORKERS_BINARY WORKFLOWS STEPS SLOTS
//! ```
//!
//! It starts the worker, waits until it is idle, creates WORKFLOWS workflows of STEPS `noop`
//! steps in the store and publishes their first steps at once, then times until every workflow
//! has succeeded (and checks that every one did). Prints one JSON line: `{"steps", "seconds",
//! "steps_per_second", "worker_cpu_seconds", "machine_cpu_seconds", "cpus"}`; the worker's
//! CPU is the worker process's own (user + system), the machine's that of every process (the
//! database server's included) and of the kernel, over the same time. On PostgreSQL also `transactions_per_step`: the database's committed transactions
//! (every statement outside a transaction counts as one) per step, read from
//! `pg_stat_database` once every connection has closed, the driver's own polling included.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use workers::app::App;
use workers::broker::TaskMessage;
use workers::config::LoadOptions;
use workers::store::{StepSpec, TaskStatus, WorkflowFilter, WorkflowSpec};
use workers::workflow::engine::start_task_id;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, binary, workflows, steps, slots] = args.as_slice() else {
        bail!("usage: queue_throughput WORKERS_BINARY WORKFLOWS STEPS SLOTS");
    };
    let (workflows, steps): (usize, usize) = (workflows.parse()?, steps.parse()?);
    let config_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let settings = workers::config::load(&LoadOptions {
        config_dir: config_dir.clone(),
        app_env: std::env::var("APP_ENV").ok(),
        env: std::env::vars().collect(),
        problems: vec![],
        flags: vec![],
    })
    .map_err(|e| anyhow::format_err!("benchmark configuration: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut worker = Command::new(binary)
        .args(["--config-dir"])
        .arg(&config_dir)
        .args(["worker", "--concurrency", slots])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the worker")?;
    let postgres = (settings.backends.store == workers::config::StoreKind::Postgres)
        .then(|| settings.postgres.url.clone());
    let commits_before = postgres.as_deref().map(committed).transpose()?;
    let outcome = runtime.block_on(measure(settings, &worker, workflows, steps));
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(worker.id() as i32).context("pid")?,
        rustix::process::Signal::TERM,
    );
    let _ = worker.wait();
    drop(runtime);
    let mut outcome = outcome?;
    if let (Some(url), Some(before)) = (postgres.as_deref(), commits_before) {
        // A closing backend reports its counts; give the last ones a moment.
        std::thread::sleep(Duration::from_secs(2));
        let per_step = (committed(url)? - before) as f64 / (workflows * steps) as f64;
        outcome["transactions_per_step"] = json!(per_step);
    }
    println!("{outcome}");
    Ok(())
}

/// Transactions committed in the database so far.
fn committed(url: &str) -> Result<i64> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let row = client.query_one(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )?;
    Ok(row.get(0))
}

async fn measure(
    settings: workers::config::Settings,
    worker: &Child,
    workflows: usize,
    steps: usize,
) -> Result<Value> {
    let app = App::build(settings).await?;
    // The worker connects and settles before the clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spec = WorkflowSpec {
        name: "throughput".into(),
        description: None,
        steps: (0..steps)
            .map(|i| StepSpec {
                name: format!("s{i}"),
                task: "noop".into(),
                queue: None,
                kwargs: None,
                priority: None,
            })
            .collect(),
    };
    let items: Vec<(String, Vec<Value>)> = (0..workflows)
        .map(|i| (uuid::Uuid::new_v4().to_string(), vec![json!(i + 1)]))
        .collect();
    let app_id = app.settings.app_id.clone();
    let messages: Vec<TaskMessage> = items
        .iter()
        .map(|(id, args)| {
            let mut kwargs = Map::new();
            kwargs.insert("workflow_id".into(), json!(id));
            kwargs.insert("step".into(), json!("s0"));
            kwargs.insert("app_id".into(), json!(app_id));
            let task_id = start_task_id(id);
            TaskMessage {
                root_id: task_id.clone(),
                id: task_id,
                task: "noop".into(),
                args: args.clone(),
                kwargs,
                priority: 1,
                eta: None,
                retries: 0,
                parent_id: None,
                queue: format!("{app_id}.q"),
                time_limits: Default::default(),
            }
        })
        .collect();
    app.store.create_workflows(&app_id, &spec, &items).await?;
    let cpu_before = cpu_seconds(worker.id())?;
    let machine_before = machine_busy_seconds()?;
    let started = Instant::now();
    app.broker.publish_many(&messages).await?;
    loop {
        if app
            .store
            .workflows(WorkflowFilter::Active, 1)
            .await?
            .is_empty()
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("the workflows did not finish within 900 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(worker.id())? - cpu_before;
    let machine = machine_busy_seconds()? - machine_before;
    for (id, _) in &items {
        let status = app.store.workflow_status(id).await?;
        if status != Some(TaskStatus::Success) {
            bail!("workflow {id} ended {status:?}, not SUCCESS");
        }
    }
    let total = (workflows * steps) as f64;
    Ok(json!({
        "steps": workflows * steps,
        "seconds": seconds,
        "steps_per_second": total / seconds,
        "worker_cpu_seconds": cpu,
        "machine_cpu_seconds": machine,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
    }))
}

/// CPU seconds every process of the machine has spent so far, the database server's and the
/// kernel's included: the `cpu` line of `/proc/stat` less its idle and iowait times.
fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal ...; guest time is already in user.
    let busy = ticks.iter().take(8).sum::<f64>() - ticks[3] - ticks[4];
    Ok(busy / 100.0)
}

/// User + system CPU seconds of process `pid` so far (`/proc/PID/stat`, fields 14 and 15).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    Ok(ticks / 100.0)
}
