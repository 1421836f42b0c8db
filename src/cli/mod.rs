//! The command line: `dmd2 gen …`. Parsing and validation happen here, before any model is
//! loaded; the work is done by the library modules.

pub mod generate;

use crate::error::one_line;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "dmd2",
    version,
    about = "SDXL images in 4 steps with DMD2 (Improved Distribution Matching Distillation)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt.
    Gen(generate::GenArgs),
}

/// Run the CLI; returns the process exit code. Errors are printed as one line on stderr.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match cli.command {
        Command::Gen(a) => generate::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            crate::error::exit_code(&e)
        }
    }
}
