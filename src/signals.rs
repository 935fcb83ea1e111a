//! SIGTERM and SIGINT: the first asks for a graceful stop, the second forces exit.

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Runs `stop` on the first SIGTERM or SIGINT (on a thread of its own); a second signal
/// exits the process at once with status 130.
pub fn on_terminate(stop: impl FnOnce() + Send + 'static) {
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers; stop with SIGKILL");
            return;
        }
    };
    std::thread::Builder::new()
        .name("courier-signals".into())
        .spawn(move || {
            let mut stop = Some(stop);
            for sig in signals.forever() {
                match stop.take() {
                    Some(f) => {
                        tracing::info!(signal = sig, "stopping: closing connections");
                        f();
                    }
                    None => {
                        tracing::warn!(signal = sig, "second signal: exiting now");
                        std::process::exit(130);
                    }
                }
            }
        })
        .expect("spawning the signal thread");
}
