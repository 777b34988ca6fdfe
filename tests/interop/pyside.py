"""The original Python side (Celery 5.2 + sca-rhythm), driven by the interop tests and the
worker benchmark as a real peer of the Rust workers.

Configured like the Bioloop workers (spec G.3): JSON serializers, MongoDB result backend with
extended results, track_started, acks_late, prefetch 1, default queue "<app_id>.q" with
x-max-priority 10 and default priority 1.

Environment: PYSIDE_AMQP_URL, PYSIDE_MONGO_URI (with the database in its path), PYSIDE_APP_ID.

Commands (results are printed as one JSON document):
  start NAME STEPS_JSON ARG [KWARGS_JSON]  create and start a workflow (ARG a JSON value, or a list
                                           of arguments); prints {"workflow_id"}
  embellished WORKFLOW_ID                  sca-rhythm's embellished view of a workflow
  status WORKFLOW_IDS_JSON                 {id: derived status} for many workflows
  resume WORKFLOW_ID                       sca-rhythm's resume()
  worker QUEUES CONCURRENCY [ORIGINAL]     a Celery worker serving `noop`, `fail_once` and
                                           `site_task`; ORIGINAL=1 adds the original's
                                           one-task-per-child
  send TASK ARGS_JSON [TASK_ID]            publish a plain task as `apply_async` does
                                           (default queue, priority 1); prints {"task_id"}
  result TASK_ID                           AsyncResult's view: {"state", "result"}
  ping [DESTINATIONS_JSON]                 app.control.ping(): [{node: {"ok": "pong"}}]
  inspect METHOD [DESTINATIONS_JSON]       app.control.inspect().METHOD(): {node: reply}
                                           (named nodes: the answer comes as soon as each has
                                           replied; otherwise every reply within a second)
  revoke TASK_ID                           app.control.revoke(TASK_ID, terminate=True)
  shutdown DESTINATIONS_JSON               app.control.shutdown(destination=...)
  pause WORKFLOW_ID                        sca-rhythm's pause()
  malformed                                publish to the mailbox what no node can read: text
                                           that is not JSON, and JSON without a method
"""

import contextlib
import datetime
import json
import os
import sys

import celery
from sca_rhythm import Workflow, WorkflowTask

APP_ID = os.environ.get("PYSIDE_APP_ID", "bioloop-dev.sca.iu.edu")
DEFAULT_QUEUE = f"{APP_ID}.q"

app = celery.Celery("pyside")
app.conf.update(
    broker_url=os.environ["PYSIDE_AMQP_URL"],
    result_backend=os.environ["PYSIDE_MONGO_URI"],
    result_extended=True,
    result_expires=0,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_track_started=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=DEFAULT_QUEUE,
    task_queue_max_priority=10,
    task_default_priority=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(base=WorkflowTask, bind=True, name="noop")
def noop(self, dataset_id, **kwargs):
    return (dataset_id,)


@app.task(base=WorkflowTask, bind=True, name="fail_once", autoretry_for=(Exception,),
          max_retries=1, default_retry_delay=1)
def fail_once(self, dataset_id, **kwargs):
    if self.request.retries == 0:
        raise RuntimeError(f"dataset {dataset_id}: first attempt fails")
    return (dataset_id,)


@app.task(bind=True, name="site_task")
def site_task(self, dataset_id):
    """A site's own plain task, which only the Python workers have."""
    return {"ran_on": "python", "dataset_id": dataset_id, "worker": self.request.hostname}


def dump(value):
    def default(obj):
        if isinstance(obj, (datetime.datetime, datetime.date)):
            return obj.isoformat()
        return str(obj)

    print(json.dumps(value, default=default, sort_keys=True))


def reply_timeout(destination):
    """Seconds to collect a broadcast's replies. Named nodes bound the wait (kombu stops at one
    reply from each), so it can be long enough for a loaded machine; a broadcast to all has no
    end but its timeout, and is only used to discover nodes, polled again when one is missing."""
    return 15 if destination else 1


def main(argv):
    command = argv[1]
    if command == "start":
        name, steps, arg = argv[2], json.loads(argv[3]), json.loads(argv[4])
        kwargs = json.loads(argv[5]) if len(argv) > 5 else {}
        for step in steps:
            step.setdefault("queue", DEFAULT_QUEUE)
        wf = Workflow(app, steps=steps, name=name, app_id=APP_ID, description=None)
        # A list is several arguments: `start(dataset_id, 30)` holds a `noop` step for 30 s.
        if isinstance(arg, list):
            wf.start(*arg, **kwargs)
        else:
            wf.start(arg, **kwargs)
        dump({"workflow_id": wf.workflow["_id"]})
    elif command == "embellished":
        wf = Workflow(app, workflow_id=argv[2])
        # sca-rhythm prints a note to stdout for every task without date_done (running ones).
        with contextlib.redirect_stdout(sys.stderr):
            view = wf.get_embellished_workflow(last_task_run=True, prev_task_runs=True)
        dump(view)
    elif command == "status":
        ids = json.loads(argv[2])
        dump({wid: Workflow(app, workflow_id=wid).get_workflow_status() for wid in ids})
    elif command == "resume":
        dump(Workflow(app, workflow_id=argv[2]).resume())
    elif command == "send":
        name, args = argv[2], json.loads(argv[3])
        task_id = argv[4] if len(argv) > 4 else None
        # What `manage_upload_workflows` does with `verify_upload_integrity.apply_async`.
        result = app.send_task(name, args=args, task_id=task_id, priority=1,
                               queue=DEFAULT_QUEUE)
        dump({"task_id": result.id})
    elif command == "result":
        result = app.AsyncResult(argv[2])
        state = result.state
        value = result.result
        if isinstance(value, BaseException):
            value = {"exc_type": type(value).__name__, "exc_message": [str(a) for a in value.args]}
        dump({"state": state, "result": value})
    elif command == "ping":
        destination = json.loads(argv[2]) if len(argv) > 2 else None
        dump(app.control.ping(destination=destination, timeout=reply_timeout(destination)))
    elif command == "inspect":
        destination = json.loads(argv[3]) if len(argv) > 3 else None
        inspect = app.control.inspect(timeout=reply_timeout(destination), destination=destination)
        dump(getattr(inspect, argv[2])() or {})
    elif command == "revoke":
        app.control.revoke(argv[2], terminate=True)
        dump({})
    elif command == "shutdown":
        app.control.shutdown(destination=json.loads(argv[2]))
        dump({})
    elif command == "malformed":
        from kombu import Exchange, Producer
        exchange = Exchange("celery.pidbox", type="fanout", durable=False,
                            delivery_mode="transient")
        with app.connection_for_write() as conn:
            producer = Producer(conn.default_channel)
            producer.publish(b"not json {", exchange=exchange, routing_key="",
                             content_type="application/json", content_encoding="utf-8")
            producer.publish({"arguments": {"x": 1}}, exchange=exchange, routing_key="",
                             serializer="json")
        dump({})
    elif command == "pause":
        dump(Workflow(app, workflow_id=argv[2]).pause())
    elif command == "worker":
        queues, concurrency = argv[2], argv[3]
        original = len(argv) > 4 and argv[4] == "1"
        args = ["worker", "--loglevel=WARNING", f"--queues={queues}",
                f"--concurrency={concurrency}", "-O", "fair", "--without-gossip",
                "--without-mingle", "--without-heartbeat",
                # Unique to the test run, so that runs sharing one RabbitMQ tell their nodes apart.
                f"--hostname=py-{APP_ID}-{os.getpid()}@%h"]
        if original:
            # The original workers start a fresh process per task (spec G.3).
            args.append("--max-tasks-per-child=1")
        app.worker_main(args)
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
