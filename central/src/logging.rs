//! Logs through tracing to stderr as `[log]` says: human lines (without a timestamp of
//! their own under systemd's journal, which stamps each line), or JSON lines.

use protocol::settings::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; `RUST_LOG` wins over `log.level`.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let to = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match (log.format, std::env::var_os("JOURNAL_STREAM").is_some()) {
        (LogFormat::Json, _) => to.json().flatten_event(true).try_init(),
        (LogFormat::Human, true) => to.without_time().try_init(),
        (LogFormat::Human, false) => to.try_init(),
    };
}
