//! Stopping a run early. Whoever handles the signals (the CLI) calls [`request`]; the work
//! checks [`check`] between UNet steps, before the VAE decode and between its blocks and
//! tiles, so a SIGINT or SIGTERM stops an image within a step instead of minutes later.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked to stop (0: none).
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// The error work returns when it stops because it was asked to.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted {
    /// The signal that asked (SIGINT 2, SIGTERM 15).
    pub signal: i32,
}

/// Asks the running work to stop; the first request's signal is kept.
pub fn request(signal: i32) {
    let _ = REQUESTED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

/// The signal that asked to stop, if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `Err(Interrupted)` once a stop was requested.
pub fn check() -> Result<(), Interrupted> {
    match requested() {
        None => Ok(()),
        Some(signal) => Err(Interrupted { signal }),
    }
}

/// The stop request in an error chain, if the error is one.
pub fn interrupted(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Interrupted>())
        .map(|i| i.signal)
        .or_else(|| {
            // candle wraps errors from inside a model's forward pass as text.
            e.chain()
                .any(|c| c.to_string() == "interrupted")
                .then(requested)
                .flatten()
        })
}
