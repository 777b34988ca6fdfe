// pm2 deployment (the original workers' process manager): `pm2 start ecosystem.config.js`.
// The scheduler replaces the original's `watch` app and its `cron_restart` scripts; the worker
// replaces `celery_worker`. WORKERS_BIN points at the binary (default: the release build here).
const bin = process.env.WORKERS_BIN || `${__dirname}/target/release/workers`;

const common = {
  script: bin,
  interpreter: 'none',
  cwd: __dirname,
  env: { APP_ENV: 'production' },
  log_date_format: 'YYYY-MM-DD HH:mm Z',
  exp_backoff_restart_delay: 100,
  autorestart: true,
};

module.exports = {
  apps: [
    {
      ...common,
      name: 'workers_scheduler',
      args: 'scheduler',
      // Longer than scheduler.grace_seconds: running jobs get their grace period on stop.
      kill_timeout: 90000,
      out_file: '../logs/workers/workers_scheduler.log',
      error_file: '../logs/workers/workers_scheduler.err',
    },
    {
      ...common,
      name: 'workers_worker',
      args: 'worker',
      // SIGTERM drains: running steps finish first (worker.shutdown_grace_seconds, 24 h).
      kill_timeout: 86460000,
      out_file: '../logs/workers/workers_worker.log',
      error_file: '../logs/workers/workers_worker.err',
    },
  ],
};
