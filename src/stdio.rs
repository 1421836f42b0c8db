//! The standard streams as a pipeline sees them: stderr lines that never panic (a closed or
//! full stderr loses the line, not the run) and stdout writes that tell a closed reader
//! (`| head`) apart from a real failure, so every subcommand can end quietly when nobody is
//! reading any more.

use std::fmt;
use std::io::{self, Write};

/// Nobody reads stdout any more (the reader of its pipe is gone). Not a failure of the run:
/// the CLI ends quietly with exit code 0, as ripgrep and coreutils do.
#[derive(Debug, thiserror::Error)]
#[error("stdout is closed")]
pub struct StdoutClosed;

/// Whether `e` (or its cause) is [`StdoutClosed`].
pub fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// Writes `bytes` to stdout and flushes: a broken pipe is [`StdoutClosed`], any other error
/// says it was stdout.
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// Whether stdout is a pipe or socket whose reader is gone, asked before work that would only
/// produce output nobody reads. Never blocks; false when it cannot tell.
pub fn stdout_reader_gone() -> bool {
    #[cfg(unix)]
    {
        let mut fd = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a zero timeout. POLLERR is reported for the write end of a
        // pipe without readers (and POLLHUP for a hung-up socket) even with no events asked.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// One line on stderr; errors are ignored (used through [`crate::stderr!`]).
pub fn stderr_line(args: fmt::Arguments) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|_| err.write_all(b"\n"));
}

/// `eprintln!` that never panics: a closed or full stderr loses the line, never the run.
#[macro_export]
macro_rules! stderr {
    () => {
        $crate::stdio::stderr_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stdio::stderr_line(format_args!($($arg)*))
    };
}
