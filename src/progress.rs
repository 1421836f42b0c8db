//! Progress on stderr: indicatif bars on a terminal, plain lines otherwise, nothing with
//! `--quiet`. Standard output stays free for PNG bytes and JSON lines.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

pub struct Progress {
    mode: Mode,
    started: Instant,
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
                    eprintln!("{label}: step {i}/{n}");
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
                eprintln!(
                    "wrote {path} ({done} done, {:.1}s)",
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
