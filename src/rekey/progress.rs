//! How a rekey run shows its progress: a bar on a terminal (indicatif),
//! JSON lines on stderr otherwise (one every 2 s and one at the end).
//! Counts only: never a key name or a value.

use super::Census;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a JSON progress line is written.
const LINE_EVERY: Duration = Duration::from_secs(2);

pub enum Progress {
    /// A bar on stderr, a terminal.
    Bar(ProgressBar),
    /// JSON lines on stderr.
    Lines { last: Option<Instant>, of: u64 },
    /// Nothing (a run inside another program).
    Silent,
}

impl Progress {
    /// A bar when stderr is a terminal, JSON lines otherwise.
    pub fn for_stderr() -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:40}] {human_pos}/{human_len} keys, \
                 {eta} left\n  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            Progress::Bar(bar)
        } else {
            Progress::Lines { last: None, of: 0 }
        }
    }

    pub fn silent() -> Progress {
        Progress::Silent
    }

    /// The run starts (or resumes) with `census`, over about
    /// `keys_in_database` keys (DBSIZE: `--match` may take fewer).
    pub(super) fn start(&mut self, keys_in_database: u64, census: &Census) {
        match self {
            Progress::Bar(bar) => {
                bar.set_length(keys_in_database.max(census.keys));
                bar.set_position(census.keys);
                bar.enable_steady_tick(Duration::from_millis(200));
            }
            Progress::Lines { of, .. } => *of = keys_in_database,
            Progress::Silent => {}
        }
    }

    /// After each page; `rate` is the values-per-second limit in force.
    pub(super) fn page(&mut self, census: &Census, rate: Option<u64>, finished: bool) {
        match self {
            Progress::Bar(bar) => {
                // SCAN may return a key twice: the count can pass DBSIZE.
                if census.keys > bar.length().unwrap_or(0) {
                    bar.set_length(census.keys);
                }
                bar.set_position(census.keys);
                bar.set_message(summary(census, rate));
                if finished {
                    bar.finish();
                }
            }
            Progress::Lines { last, of } => {
                if finished || last.is_none_or(|at| at.elapsed() >= LINE_EVERY) {
                    *last = Some(Instant::now());
                    let line = serde_json::json!({
                        "rekey": if finished { "done" } else { "progress" },
                        "keys": census.keys,
                        "of": of,
                        "rewritten": census.rewritten,
                        "rewritten_bytes": census.rewritten_bytes,
                        "skipped": census.skipped,
                        "failed": census.failed,
                        "rate": rate,
                    });
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
            }
            Progress::Silent => {}
        }
    }
}

fn summary(census: &Census, rate: Option<u64>) -> String {
    let mut text = format!(
        "rewritten {} ({}), skipped {}, failed {}",
        census.rewritten,
        indicatif::HumanBytes(census.rewritten_bytes),
        census.skipped,
        census.failed
    );
    if let Some(rate) = rate {
        text.push_str(&format!(", paced at {rate}/s"));
    }
    text
}
