//! Logging: an `EnvFilter` from `RUST_LOG` (default `warn`, so tooling output stays clean),
//! written to stderr, one line per record.

use tracing_subscriber::EnvFilter;

/// `mira dev`'s default: Mira's own steps at `info` (a line per request, per slide verified,
/// per job started and ended), its libraries' chatter at `warn`. `RUST_LOG` overrides it, for
/// `mira dev` and, passed on, for the worker it starts.
pub const DEV_FILTER: &str =
    "info,sqlx=warn,hyper=warn,hyper_util=warn,tower=warn,aws_config=warn,aws_smithy_runtime=warn,reqwest=warn";

/// Starts logging to stderr in `Logging__Format` (`text` or `json`); a bad value is an error
/// that names the setting.
pub fn init(default: &str) -> Result<(), mira_config::ConfigError> {
    let format = mira_config::LogFormat::from_env(|k| std::env::var(k).ok())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing::subscriber::set_global_default(subscriber(filter, format, std::io::stderr));
    Ok(())
}

/// The subscriber `init` installs, writing to `writer`.
pub fn subscriber<W>(
    filter: EnvFilter,
    format: mira_config::LogFormat,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    match format {
        mira_config::LogFormat::Text => Box::new(
            fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .finish(),
        ),
        // One object per line: timestamp, level, message and fields, and the spans it is in.
        mira_config::LogFormat::Json => Box::new(fmt.json().with_current_span(true).with_span_list(false).finish()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: mira_config::LogFormat) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = subscriber(EnvFilter::new("info"), format, move || out.clone());
        tracing::subscriber::with_default(sub, || tracing::info!(job = "j-1", "job started"));
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_logs_are_one_object_per_line_with_the_fields() {
        let out = logged(mira_config::LogFormat::Json);
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["fields"]["message"], "job started");
        assert_eq!(line["fields"]["job"], "j-1");
        let text = logged(mira_config::LogFormat::Text);
        assert!(
            serde_json::from_str::<serde_json::Value>(text.trim()).is_err() && text.contains("job started"),
            "{text}"
        );
    }
}
