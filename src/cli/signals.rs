//! SIGINT and SIGTERM: the first asks the work to stop ([`crate::cancel`]), which it does
//! within a UNet step or a VAE block, leaving every finished image and no temporary file; a
//! second exits at once (removing the temporary file being written, if any). The exit code
//! is 128 + the signal (130, 143), as shells report it.

use signal_hook::consts::{SIGINT, SIGTERM};

/// Installs the handlers (once; later calls do nothing). A watcher thread handles the
/// signals, outside signal context, so it may print and take locks.
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
            return;
        };
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if crate::cancel::requested().is_none() {
                    crate::cancel::request(sig);
                    crate::stderr!(
                        "\ninterrupted: stopping now; finished images are kept (again to exit at once)"
                    );
                } else {
                    crate::output::remove_current_temp();
                    crate::stderr!("\ninterrupted twice: exiting now");
                    std::process::exit(128 + sig);
                }
            }
        });
    });
}
