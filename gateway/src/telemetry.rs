//! Logging: an `EnvFilter` from `RUST_LOG` (default `warn`, so tooling output stays clean),
//! written to stderr, one line per record.

use tracing_subscriber::EnvFilter;

/// `mira dev`'s default: Mira's own steps at `info` (a line per request, per slide verified,
/// per job started and ended), its libraries' chatter at `warn`. `RUST_LOG` overrides it, for
/// `mira dev` and, passed on, for the worker it starts.
pub const DEV_FILTER: &str =
    "info,sqlx=warn,hyper=warn,hyper_util=warn,tower=warn,aws_config=warn,aws_smithy_runtime=warn,reqwest=warn";

pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
