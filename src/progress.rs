//! Progress on stderr: indicatif bars on a terminal, plain lines otherwise, nothing with
//! `--quiet`. Standard output stays free for PNG bytes and JSON lines.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

pub struct Progress {
    mode: Mode,
    started: Instant,
    /// Images the run makes, when known before it starts.
    total: Option<u64>,
}

enum Mode {
    Quiet,
    Plain(Mutex<Instant>),
    Bars {
        steps: ProgressBar,
        images: ProgressBar,
    },
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            let mp = indicatif::MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let images = mp.add(ProgressBar::new_spinner());
            images.set_style(
                ProgressStyle::with_template(
                    "{spinner} images {pos} done  {per_sec}  {elapsed_precise}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            let steps = mp.add(ProgressBar::new(0));
            steps.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] step {pos}/{len}  {per_sec}  eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Mode::Bars { steps, images }
        } else {
            Mode::Plain(Mutex::new(Instant::now()))
        };
        Self {
            mode,
            started: Instant::now(),
            total: None,
        }
    }

    /// The run makes `total` images: per-image lines say `k/N`.
    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
        if let Mode::Bars { images, .. } = &self.mode {
            images.set_length(total);
            images.set_style(
                ProgressStyle::with_template(
                    "{spinner} images {pos}/{len} done  {per_sec}  {elapsed_precise}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
        }
    }

    pub fn step(&self, label: &str, i: usize, n: usize) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Bars { steps, .. } => {
                steps.set_prefix(label.to_string());
                steps.set_length(n as u64);
                steps.set_position(i as u64);
            }
            Mode::Plain(last) => {
                // At most one line every 10 s, so logs stay readable on slow CPUs.
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed().as_secs_f64() >= 10.0 {
                    crate::stderr!("{label}: step {i}/{n}");
                    *last = Instant::now();
                }
            }
        }
    }

    pub fn image_done(&self, path: &str, done: usize) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Bars { images, .. } => {
                images.set_position(done as u64);
                images.set_message(format!("wrote {path}"));
            }
            Mode::Plain(_) => {
                let of = self.total.map(|n| format!("/{n}")).unwrap_or_default();
                crate::stderr!(
                    "wrote {path} ({done}{of} done, {:.1}s)",
                    self.started.elapsed().as_secs_f64()
                );
            }
        }
    }

    pub fn finish(&self) {
        if let Mode::Bars { steps, images } = &self.mode {
            steps.finish_and_clear();
            images.finish_and_clear();
        }
    }
}

/// Bytes of one transfer (a download), on stderr: a bar redrawn at most ten times a second on
/// a terminal, otherwise a line every few seconds (so a long download is visible in logs);
/// nothing when `quiet`.
pub struct Transfer {
    label: String,
    terminal: bool,
    quiet: bool,
    total: usize,
    done: usize,
    resumed_at: usize,
    since: Instant,
    last: Option<Instant>,
}

impl Transfer {
    /// Seconds between lines when stderr is not a terminal.
    const LOG_EVERY: f64 = 5.0;

    pub fn new(label: String, quiet: bool) -> Self {
        Self {
            label,
            terminal: std::io::stderr().is_terminal(),
            quiet,
            total: 0,
            done: 0,
            resumed_at: 0,
            since: Instant::now(),
            last: None,
        }
    }

    /// A transfer of `total` bytes starts (again).
    pub fn start(&mut self, total: usize) {
        self.total = total;
        self.done = 0;
        self.resumed_at = 0;
        self.since = Instant::now();
        self.show(true);
    }

    /// The bytes a resumed transfer starts from (counted as done, not in the rate).
    pub fn resumed(&mut self, at: usize) {
        self.resumed_at = at;
    }

    pub fn advance(&mut self, bytes: usize) {
        self.done += bytes;
        self.show(false);
    }

    pub fn finish(&mut self) {
        self.show(true);
        if self.terminal && !self.quiet {
            crate::stderr!();
        }
    }

    fn show(&mut self, force: bool) {
        if self.quiet {
            return;
        }
        let now = Instant::now();
        let every = if self.terminal { 0.1 } else { Self::LOG_EVERY };
        if !force && self.last.is_some_and(|t| (now - t).as_secs_f64() < every) {
            return;
        }
        self.last = Some(now);
        let mb = |b: usize| b as f64 / 1e6;
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let secs = (now - self.since).as_secs_f64().max(1e-3);
        let rate = mb(self.done.saturating_sub(self.resumed_at)) / secs;
        if self.terminal {
            let width = 30;
            let filled = (self.done * width)
                .checked_div(self.total)
                .unwrap_or(width)
                .min(width);
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2K{} [{}{}] {:.1}/{:.1} MB {pct}% {rate:.1} MB/s",
                self.label,
                "#".repeat(filled),
                "-".repeat(width - filled),
                mb(self.done),
                mb(self.total),
            );
            let _ = err.flush();
        } else {
            crate::stderr!(
                "{}: {:.1}/{:.1} MB ({pct}%), {rate:.1} MB/s",
                self.label,
                mb(self.done),
                mb(self.total)
            );
        }
    }
}
