//! The service's logger: one line per event on standard error, as text or as JSON
//! (`--log-format json`). The library and the Senders log through the `log` facade.

use std::io::Write;

use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-12-07T21:57:06Z INFO troutbox::relay: message`
    Text,
    /// `{"time":"...","level":"INFO","target":"...","message":"..."}`
    Json,
}

struct Logger {
    format: LogFormat,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // librdkafka's and lapin's debug chatter stays out; troutbox's info is the events.
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let time = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        // A message spanning lines (a server's error with its detail) stays one event.
        let message = record.args().to_string().replace('\n', " ");
        let line = match self.format {
            LogFormat::Text => {
                format!("{time} {} {}: {message}\n", record.level(), record.target())
            }
            LogFormat::Json => format!(
                "{}\n",
                json!({
                    "time": time,
                    "level": record.level().as_str(),
                    "target": record.target(),
                    "message": message,
                })
            ),
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger (once per process).
pub fn install(format: LogFormat) {
    // Leaked once: the logger lives as long as the process (`set_boxed_logger` needs
    // `log`'s std feature).
    if log::set_logger(Box::leak(Box::new(Logger { format }))).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
