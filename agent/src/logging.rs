//! Logs through tracing to stderr: human lines (without a timestamp of their own under
//! systemd's journal, which stamps each line), or JSON lines when asked.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` wins over `level`.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match (format, std::env::var_os("JOURNAL_STREAM").is_some()) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Human, true) => builder.without_time().try_init(),
        (LogFormat::Human, false) => builder.try_init(),
    };
}
