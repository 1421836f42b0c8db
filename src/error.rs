//! Error kinds callers branch on: bad input (exit code 2) versus failures while running (1).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Dmd2Error {
    /// The user's input is wrong: a flag, a file, a prompt line. Exit code 2.
    #[error("{0}")]
    BadInput(String),
}

/// Wrap any error as bad input, keeping its context chain in one line.
pub fn bad_input(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Dmd2Error::BadInput(one_line(&e)))
}

/// `a: b: c` from an anyhow context chain.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        // Contexts often repeat their cause; keep each piece once.
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// The process exit code for an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.chain().any(|c| c.downcast_ref::<Dmd2Error>().is_some()) {
        2
    } else {
        1
    }
}
