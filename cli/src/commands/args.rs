//! The command line: every subcommand and flag of `mira`, with their help.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

use super::common::{parse_role, parse_time};

#[derive(Parser)]
#[command(
    name = "mira",
    version,
    about = "Mira: whole-slide image processing on an audit-grade event log"
)]
pub struct Cli {
    /// Optional TOML settings file, read after the defaults and before the environment.
    #[arg(long, global = true, env = "MIRA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply the database schema (idempotent), as the owner (Database__MigrationUrl, else
    /// DATABASE_URL), and grant the runtime roles to DATABASE_URL's role when it is another.
    Migrate {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create the keys the settings name, where they do not exist yet: the checkpoint signing
    /// key, the local keyring and the witness directory. No other command creates a key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Verify, checkpoint, replay and export the event log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Benchmarks against a live database.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// The SNS/SQS topology.
    Bus {
        #[command(subcommand)]
        command: BusCommand,
    },
    /// The whole platform on embedded defaults: a private PostgreSQL cluster (unless
    /// DATABASE_URL is set), the in-memory bus, the local blob store, a local identity
    /// provider, the relay, projector and handlers. Ctrl-C stops it; the data persists.
    Dev {
        /// Where the cluster, blobs, keys and identity key live (default ./.mira; `dev token`
        /// without it uses ./.mira if it has a key, else the running `mira dev`'s).
        #[arg(long, global = true, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Address to listen on: a loopback one, unless --expose-sign-in.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: String,
        /// Listen on a non-loopback --listen, knowing what it exposes: the local sign-in, which
        /// gives anyone who reaches it a token for any user, tenant and role.
        #[arg(long)]
        expose_sign_in: bool,
        /// Use this database instead of the private cluster (mira dev migrates it). A
        /// DATABASE_URL in the environment is ignored: it may name a shared database.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// Send every process's traces over OTLP/HTTP to this collector (for example a local
        /// Jaeger's http://127.0.0.1:4318), as OTEL_EXPORTER_OTLP_ENDPOINT would.
        #[arg(long, value_name = "URL")]
        otlp: Option<String>,
        #[command(subcommand)]
        command: Option<DevCommand>,
    },
    /// Serve the HTTP API (and, with --with, background roles in the same process).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: String,
        /// Also run these roles here (comma-separated): relay, projector, handlers. Without it,
        /// the roles Roles__Enabled names (none by default).
        #[arg(long = "with", value_parser = parse_role, value_delimiter = ',', value_name = "ROLES")]
        with: Option<Vec<mira_gateway::roles::Role>>,
        #[command(flatten)]
        metrics: MetricsListen,
    },
    /// Follow the log and publish every event to the SNS topic (one active relay at a time).
    Relay {
        #[command(flatten)]
        metrics: MetricsListen,
    },
    /// Run the read-model projector on the `projections` queue (Messaging__Provider=Aws).
    Projector {
        #[command(flatten)]
        metrics: MetricsListen,
    },
    /// Run the lifecycle handlers on the `handlers` queue (Messaging__Provider=Aws): queueing
    /// jobs when their slide is verified, retries after backoff, lease expiry.
    Handlers {
        #[command(flatten)]
        metrics: MetricsListen,
    },
    /// List, inspect and rebuild projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Parked aggregates and dead-lettered messages.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
pub enum DevCommand {
    /// Print an ID token that the running `mira dev` with this data directory accepts.
    Token {
        /// The user (`sub`).
        #[arg(long, default_value = "dev-user")]
        sub: String,
        /// The tenant (`custom:tenant`).
        #[arg(long, default_value = "dev")]
        tenant: String,
        /// Roles (`cognito:groups`), comma-separated: pathologist, auditor, admin.
        #[arg(long, value_delimiter = ',', default_value = "pathologist,auditor")]
        groups: Vec<String>,
        /// Hours until the token expires.
        #[arg(long, default_value_t = 12)]
        hours: u64,
    },
    /// Print a connection URL (with its password) to the running `mira dev`'s private
    /// PostgreSQL cluster, for psql and other processes.
    Url {
        /// The API's login (`mira_svc_api`, which owns nothing) instead of the cluster's owner
        /// (`postgres`).
        #[arg(long)]
        service: bool,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create what is missing; keep what exists (idempotent). Prints the public audit key.
    Init {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum BusCommand {
    /// Create the FIFO topic, the three FIFO queues with their DLQs, filters and
    /// subscriptions (idempotent), on AWS or the endpoint in AWS_ENDPOINT_URL.
    Init {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The topology `init` creates and the Pulumi program deploys (bus/topology.json), with
    /// the names these settings give.
    Topology {
        /// The topology file as it is, JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// The projections Mira keeps.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Each projection's position, lag in events and lag in seconds.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a projection from the log into new tables while the old ones serve, then swap.
    /// Safe to interrupt and rerun.
    Rebuild {
        /// The projection (see `mira projections list`).
        name: String,
        /// Compare the rebuilt model with the live one before swapping; print the differences
        /// and exit 1 (without swapping) if there are any.
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Parked aggregates per consumer, and messages in each dead-letter queue.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Un-park aggregates: their consumers replay them from the log. With --dead-letters,
    /// also move dead-lettered messages back to their queues.
    Redrive {
        /// Only this consumer's parked aggregates (for example `projections`).
        #[arg(long)]
        consumer: Option<String>,
        /// Only this aggregate id.
        #[arg(long)]
        aggregate: Option<String>,
        /// Also move SQS dead-letter messages back (Messaging__Provider=Aws).
        #[arg(long)]
        dead_letters: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Re-derive every hash and check every checkpoint's digest and signature. Exits 1 and
    /// names the first bad event if anything was altered, removed or re-hashed.
    Verify {
        /// The trusted public audit key (hex). Default: Audit__PublicKeyFile, or the `.pub`
        /// beside Audit__SigningKeyFile.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a signed checkpoint covering every settled event now.
    Checkpoint {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Start a new epoch of the log after its last checkpoint: after a point-in-time restore,
    /// whose repeated checkpoint numbers the witness refuses (a witness conflict). Writes a
    /// signed epoch record to the witness, then to the database; `verify` reports every epoch.
    NewEpoch {
        /// Why: the restore's time, its ticket, who approved it. Kept in the witness for good.
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild Job and Slide state as of an instant, from the log alone.
    Replay {
        /// The instant, RFC 3339 (for example 2026-11-25T18:00:00.123456Z).
        #[arg(long, value_parser = parse_time, value_name = "T")]
        as_of: DateTime<Utc>,
        /// Only this aggregate id.
        #[arg(long, value_name = "ID")]
        aggregate: Option<String>,
        /// Machine-readable output (one JSON object per aggregate per line).
        #[arg(long)]
        json: bool,
    },
    /// Write the log, its hashes and its checkpoints as JSON Lines for outside verification.
    Export {
        /// Only events recorded at or after this instant (RFC 3339).
        #[arg(long, value_parser = parse_time, value_name = "T")]
        from: Option<DateTime<Utc>>,
        /// Only events recorded at or before this instant (RFC 3339).
        #[arg(long, value_parser = parse_time, value_name = "T")]
        to: Option<DateTime<Utc>>,
        /// Output file (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The public audit key to name in the header. Default as for `verify`.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Real commands (submit, queue, start, progress, succeed) through the command path.
    Append {
        /// Commands to run (rounded up to whole jobs of five).
        #[arg(long, default_value_t = 5000)]
        commands: u64,
        /// Concurrent writers.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a large synthetic log fast (one real job, cloned with valid hashes, by COPY), for
    /// scale tests of `audit verify` and `projections rebuild`. Scratch databases only.
    Seed {
        /// Jobs to write (five events each).
        #[arg(long, default_value_t = 1000)]
        jobs: u64,
        /// Then checkpoint the whole log in checkpoints of this many events each, every one
        /// witnessed, inserted in bulk (a log of many checkpoints for the verify benchmark).
        #[arg(long, value_name = "EVENTS", value_parser = clap::value_parser!(i64).range(1..=20_000))]
        checkpoint_span: Option<i64>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Events/s of a full read-model rebuild against a plain sequential read of the log.
    Rebuild {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Latency from POST /api/jobs to the first job.updated on the WebSocket, through a
    /// gateway in this process with the relay, projector and handlers on the configured bus.
    E2e {
        /// Jobs to submit, one at a time.
        #[arg(long, default_value_t = 500)]
        jobs: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Relay throughput and append→consume latency on the configured bus.
    Fanout {
        /// Events for the throughput phase.
        #[arg(long, default_value_t = 1000)]
        events: u64,
        /// Events for the latency phase, appended one at a time.
        #[arg(long, default_value_t = 200)]
        latency_events: u64,
        /// Pause between latency-phase appends, in milliseconds.
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        /// Use the in-memory bus instead of Messaging__Provider.
        #[arg(long)]
        in_memory: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Where a process without the API serves its `/metrics`.
#[derive(clap::Args, Debug, Clone)]
pub struct MetricsListen {
    /// Serve this process's metrics at http://ADDR/metrics (default: Api__MetricsListen; unset:
    /// none).
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    pub addr: Option<String>,
}
