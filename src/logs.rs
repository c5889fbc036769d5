//! Logs go to stderr through a bounded, lossy, non-blocking writer, so
//! logging never slows, blocks or fails serving: a full disk, a closed pipe
//! or a slow reader behind stderr costs log lines, never requests. Lines
//! that could not be queued or written are counted
//! (`redcloak_log_lines_dropped_total`). Nothing here panics on a write error.

use crate::cli::LogFormat;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines waiting for the writer thread at most; past it lines are dropped.
const QUEUED_LINES: usize = 16_384;

/// Lines the writer thread failed to write.
static FAILED_WRITES: AtomicU64 = AtomicU64::new(0);
/// Lines dropped because the queue was full.
static QUEUE_DROPS: OnceLock<ErrorCounter> = OnceLock::new();
/// Dropping it writes out what is queued: [`flush`] does, before exit.
static WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Starts logging (filtered by `RUST_LOG`, default `info`).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald, files and pipes get plain text.
    let colours = io::IsTerminal::is_terminal(&io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("redcloak-logs")
        .finish(Stderr);
    let _ = QUEUE_DROPS.set(writer.error_counter());
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(colours);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    // Security events also go to the audit log (when `[audit]` is set),
    // whatever RUST_LOG lets through to stderr.
    let installed = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(crate::telemetry::audit::layer())
        .try_init();
    if installed.is_ok() {
        *WRITER.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    }
}

/// Writes out the queued lines (waiting a moment at most); call before exit.
pub fn flush() {
    let guard = WRITER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(guard);
}

/// Log lines lost so far (queue full, or stderr failed).
pub fn dropped_lines() -> u64 {
    let queued = QUEUE_DROPS.get().map_or(0, |c| c.dropped_lines() as u64);
    queued + FAILED_WRITES.load(Ordering::Relaxed)
}

/// stderr that counts, and swallows, its failures.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if io::stderr().write_all(buf).is_err() {
            FAILED_WRITES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}
