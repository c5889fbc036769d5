//! Signals -> cancellation. The first SIGTERM or SIGINT cancels the token
//! the accept loop and every session watch; the server then drains within
//! its grace period. A second one exits at once (exit code 1), cutting
//! whatever is still open. SIGHUP asks for a reload ([`crate::reload`]);
//! it never kills the process (its default action).

use crate::reload::{ReloadRequests, Trigger};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The exit code when a second signal cuts the drain short.
pub const EXIT_CUT_SHORT: i32 = 1;

/// A token cancelled by the first SIGTERM or SIGINT; SIGHUP goes to `reloads`.
pub fn on_signal(reloads: ReloadRequests) -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
                _ = hangup.recv() => {
                    if reloads.request(Trigger::Signal) {
                        info!("SIGHUP: reloading");
                    } else {
                        warn!("SIGHUP: nothing to reload (not serving yet, or reloads already queued)");
                    }
                    continue;
                }
            };
            if cancel.is_cancelled() {
                error!("{name} while draining: exiting now, cutting the connections still open");
                crate::logs::flush();
                std::process::exit(EXIT_CUT_SHORT);
            }
            info!("{name}: draining");
            cancel.cancel();
        }
    });
    Ok(token)
}
