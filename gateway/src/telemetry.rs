//! Logging and traces: [`mira_telemetry`], which every process starts (`RUST_LOG`,
//! `Logging__Format`, and the standard `OTEL_*` variables for exporting traces).

pub use mira_telemetry::{init, subscriber, Guard, InitError, DEV_FILTER};

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::EnvFilter;

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
        let sub = subscriber(EnvFilter::new("info"), format, move || out.clone(), None);
        tracing::dispatcher::with_default(&sub, || tracing::info!(job = "j-1", "job started"));
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
