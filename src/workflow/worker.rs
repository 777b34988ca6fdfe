//! The worker loop: a fixed number of slots, each taking one message from the broker and
//! running it through the engine; and its graceful stop: no new messages, running steps get
//! a grace period to finish, then are interrupted and their messages given back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::engine::{self, Runner};
use crate::app::App;
use crate::broker::Consume;
use crate::control::WorkerControl;
use crate::control::events::EventSender;
use crate::store::WorkflowFilter;
use crate::ui::Display;

/// When the loop ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Only on shutdown.
    Shutdown,
    /// When no workflow in the store is active, no step runs here and (where the broker can
    /// tell) no message is due (`--wait`).
    Idle,
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub concurrency: usize,
    pub until: Until,
    /// The queues to take steps from; `None` takes what the broker serves by default.
    pub queues: Option<Vec<String>>,
    /// After a stop, how long running steps may go on before they are interrupted and their
    /// messages given back to the broker.
    pub shutdown_grace: Duration,
    /// The node name recorded as the `worker` of each task result (Celery's `--hostname`).
    pub node_name: String,
    /// Send Celery's monitoring events from the start (RabbitMQ only; `enable_events` from
    /// the fleet turns them on later).
    pub send_events: bool,
}

/// Expands a Celery-style node name: `%h` is the host name, `%n` its first label, `%d` the
/// rest (the domain), `%%` a percent sign. A name without `@` gets `workers@` in front, as
/// Celery puts `celery@` in front of one.
pub fn node_name(template: &str, hostname: &str) -> String {
    let (short, domain) = hostname.split_once('.').unwrap_or((hostname, ""));
    let mut out = String::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(hostname),
            Some('n') => out.push_str(short),
            Some('d') => out.push_str(domain),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    if out.contains('@') {
        out
    } else {
        engine::default_node_name(&out)
    }
}

/// How often a `Until::Idle` loop looks for stalled workflows to repair.
const REPAIR_EVERY: Duration = Duration::from_secs(30);

/// Runs steps until `opts.until` or until `stop` turns true. A stop ends the taking of new
/// messages at once; running steps get `opts.shutdown_grace` to finish, then are interrupted
/// and their messages go back to the broker, to run again here or elsewhere.
pub async fn run(
    app: Arc<App>,
    opts: WorkerOptions,
    outer_stop: watch::Receiver<bool>,
    display: Display,
) -> anyhow::Result<()> {
    let concurrency = opts.concurrency.max(1);
    // A stop comes from the caller (signals) or from a remote `shutdown`.
    let (stop_tx, mut stop) = watch::channel(*outer_stop.borrow());
    let forward_stop = tokio::spawn({
        let (mut outer_stop, stop_tx) = (outer_stop.clone(), stop_tx.clone());
        async move {
            if outer_stop.wait_for(|s| *s).await.is_ok() {
                let _ = stop_tx.send(true);
            }
        }
    });
    // Events travel through RabbitMQ; the embedded and postgres profiles have no one to
    // receive them.
    let (events, event_publisher) = match app.settings.backends.broker {
        crate::config::BrokerKind::Amqp => {
            let (sender, publisher) = EventSender::start(
                app.settings.amqp.uri.expose(),
                &app.settings.amqp.display,
                &format!("workers {} {}", app.identity.hostname, app.identity.pid),
                &opts.node_name,
                app.identity.pid,
            )?;
            (Some((sender, opts.send_events)), Some(publisher))
        }
        crate::config::BrokerKind::Embedded | crate::config::BrokerKind::Postgres => {
            if opts.send_events {
                warn!("Events are sent only with the RabbitMQ broker; this worker sends none.");
            }
            (None, None)
        }
    };
    let control = Arc::new(WorkerControl::new(
        Arc::clone(&app),
        &opts.node_name,
        concurrency,
        opts.queues
            .clone()
            .unwrap_or_else(|| app.settings.amqp.queues.clone()),
        stop_tx,
        events,
    ));
    let heartbeat = tokio::spawn({
        let control = Arc::clone(&control);
        async move {
            let mut beat = tokio::time::interval(crate::control::events::HEARTBEAT);
            loop {
                beat.tick().await;
                control.heartbeat();
            }
        }
    });
    match control.load_revoked().await {
        Ok(0) => {}
        Ok(remembered) => info!(remembered, "Loaded the revoked task ids."),
        Err(err) => {
            warn!(error = %format!("{err:#}"), "Could not load the revoked task ids; revokes sent from now on are honoured.")
        }
    }
    // The mailbox is served until the slots are done, so that a draining worker still
    // answers inspections and revokes.
    let (mailbox_stop_tx, mailbox_stop) = watch::channel(false);
    let mailbox = tokio::spawn({
        let (app, control) = (Arc::clone(&app), Arc::clone(&control));
        async move { app.mailbox.serve(control, mailbox_stop).await }
    });
    if opts.until == Until::Idle {
        // A loop that ends once idle would otherwise find nothing to do and succeed while
        // the queue is out of reach; a long-running worker waits for the broker instead.
        app.broker.check_reachable().await?;
    }
    app.broker
        .start_consuming(&Consume {
            queues: opts.queues.clone(),
            prefetch: u16::try_from(concurrency).unwrap_or(u16::MAX),
        })
        .await?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let (interrupt_tx, interrupt) = watch::channel(false);
    let runner = Runner {
        node_name: opts.node_name.clone(),
        interrupt: Some(interrupt),
        control: Some(Arc::clone(&control)),
    };
    let drain = tokio::spawn(drain_on_stop(
        Arc::clone(&app),
        stop.clone(),
        opts.shutdown_grace,
        Arc::clone(&in_flight),
        interrupt_tx,
    ));
    let mut slots = Vec::new();
    for slot in 0..concurrency {
        let (app, display, in_flight) = (Arc::clone(&app), display.clone(), Arc::clone(&in_flight));
        let (mut stop, mut done, runner) = (stop.clone(), done_rx.clone(), runner.clone());
        slots.push(tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    _ = done.wait_for(|d| *d) => break,
                    delivery = app.broker.next() => delivery,
                };
                let delivery = match delivery {
                    Ok(delivery) => delivery,
                    Err(err) => {
                        error!(slot, error = %format!("{err:#}"), "Could not take a step from the broker.");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                in_flight.fetch_add(1, Ordering::SeqCst);
                // Not cancelled by a stop: the runner's interrupt ends the step once the
                // grace runs out, and the engine then gives its message back.
                let handled = engine::handle_with(&app, delivery, &display, &runner).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                if let Err(err) = handled {
                    error!(slot, error = %format!("{err:#}"), "Could not record a step; it will be delivered again.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }));
    }

    if opts.until == Until::Idle {
        let mut last_repair: Option<tokio::time::Instant> = None;
        let known_tasks = crate::steps::Task::ALL.map(crate::steps::Task::name);
        loop {
            if last_repair.is_none_or(|t| t.elapsed() >= REPAIR_EVERY) {
                let repaired = engine::repair_stalled(&app).await?;
                if !repaired.is_empty() {
                    info!(workflows = repaired.len(), "Repaired stalled workflows.");
                }
                last_repair = Some(tokio::time::Instant::now());
            }
            let active = app.store.workflows(WorkflowFilter::Active, 1).await?;
            if active.is_empty()
                && in_flight.load(Ordering::SeqCst) == 0
                && app.broker.has_due_messages(&known_tasks).await? != Some(true)
            {
                break;
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        let _ = done_tx.send(true);
    }
    for slot in slots {
        let _ = slot.await;
    }
    drain.abort();
    forward_stop.abort();
    let _ = mailbox_stop_tx.send(true);
    let _ = mailbox.await;
    heartbeat.abort();
    control.offline();
    // The last events (worker-offline) go out before the process ends, if RabbitMQ takes
    // them within moments.
    drop(control);
    if let Some(publisher) = event_publisher {
        let _ = tokio::time::timeout(Duration::from_secs(3), publisher).await;
    }
    Ok(())
}

/// On stop: stops consuming, waits up to `grace` for the running steps, then interrupts them.
async fn drain_on_stop(
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    in_flight: Arc<AtomicUsize>,
    interrupt: watch::Sender<bool>,
) {
    if stop.wait_for(|s| *s).await.is_err() {
        return;
    }
    if let Err(err) = app.broker.stop_consuming().await {
        warn!(error = %format!("{err:#}"), "Could not stop consuming.");
    }
    let running = in_flight.load(Ordering::SeqCst);
    if running > 0 {
        info!(
            running,
            grace_seconds = grace.as_secs_f64(),
            "Stopping: no new steps; waiting for the running ones."
        );
    }
    let deadline = tokio::time::Instant::now() + grace;
    while in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = interrupt.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_expand_like_celerys() {
        let host = "worker1.sca.iu.edu";
        assert_eq!(
            node_name("bioloop-w1@%h", host),
            "bioloop-w1@worker1.sca.iu.edu"
        );
        assert_eq!(node_name("w@%n", host), "w@worker1");
        assert_eq!(node_name("%n@%d", host), "worker1@sca.iu.edu");
        assert_eq!(node_name("100%%@%n", host), "100%@worker1");
        assert_eq!(node_name("%h", host), "workers@worker1.sca.iu.edu");
        assert_eq!(node_name("w@%n", "solo"), "w@solo");
    }
}
