//! The command line: `dmd2 gen …`. Parsing and validation happen here, before any model is
//! loaded; the work is done by the library modules.

pub mod generate;
pub mod inspect;
pub mod merge;
pub mod signals;
pub mod tokens;

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
    Gen(Box<generate::GenArgs>),
    /// Say what a file is: checkpoint (layout, architecture, dtype, size) or LoRA (format,
    /// ranks, alphas, modules, parts touched).
    Inspect(inspect::InspectArgs),
    /// Bake LoRAs into a model and write an original-layout single-file checkpoint.
    Merge(merge::MergeArgs),
    /// List the presets with their values.
    Presets,
    /// Count a prompt's CLIP tokens as A1111 does: chunks of 75, token texts and weights.
    Tokens(tokens::TokensArgs),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a manual page (roff): `dmd2 man | man -l -`, `dmd2 man gen > dmd2-gen.1`.
    Man {
        /// The subcommand whose page to print (gen, inspect, merge, presets, tokens,
        /// completions); without one, the overview.
        subcommand: Option<String>,
    },
}

/// `dmd2 --version`: the version, the git revision it was built from, the cargo features
/// and the CPU kernels this machine runs.
pub fn long_version() -> String {
    let rev = option_env!("DMD2_GIT_REV").filter(|r| !r.is_empty());
    let mut features: Vec<&str> = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "metal") {
        features.push("metal");
    }
    let kernels = if crate::kernels::own() {
        format!(
            "own, tier {} (best here: {})",
            crate::kernels::Tier::current(),
            crate::kernels::Tier::best()
        )
    } else {
        "candle's (DMD2_KERNELS=candle)".to_string()
    };
    format!(
        "{} (git {})\nfeatures: {}\nCPU kernels: {kernels}",
        env!("CARGO_PKG_VERSION"),
        rev.unwrap_or("unknown"),
        if features.is_empty() {
            "none (CPU only)".to_string()
        } else {
            features.join(", ")
        }
    )
}

/// `dmd2 man [SUBCOMMAND]`: the page clap_mangen renders from the same definitions as
/// `--help` (subcommand pages are named `dmd2-gen` and so on).
fn man_page(subcommand: Option<&str>) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command()
        .long_version(&*Box::leak(long_version().into_boxed_str()))
        .disable_help_subcommand(true)
        .propagate_version(true);
    cmd.build();
    let page = match subcommand {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(c) => c.clone(),
            None => {
                let names: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
                return Err(crate::error::bad_input(anyhow::anyhow!(
                    "no subcommand {name:?}; one of: {}",
                    names.join(", ")
                )));
            }
        },
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    crate::stdio::write_stdout(&out)
}

/// Run the CLI; returns the process exit code. Errors are printed as one line on stderr.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    use clap::{CommandFactory, FromArgMatches};
    let parsed = Cli::command()
        .long_version(&*Box::leak(long_version().into_boxed_str()))
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    // DMD2_CPU / DMD2_KERNELS: a bad value is bad input, reported before any work.
    if let Err(e) = crate::kernels::check_env() {
        crate::stderr!("error: {e}");
        return 2;
    }
    let result = match cli.command {
        Command::Gen(a) => generate::run(*a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Presets => list_presets(),
        Command::Tokens(a) => tokens::run(a),
        Command::Man { subcommand } => man_page(subcommand.as_deref()),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "dmd2", &mut script);
            crate::stdio::write_stdout(&script)
        }
    };
    match result {
        Ok(()) => 0,
        // The reader of stdout is gone (`| head`): nothing more to do, and not a failure.
        Err(e) if crate::stdio::stdout_closed(&e) => 0,
        // Stopped by SIGINT or SIGTERM: the summary said so; 128 + the signal, as shells do.
        Err(e) if crate::cancel::interrupted(&e).is_some() => {
            128 + crate::cancel::interrupted(&e).unwrap_or(2)
        }
        Err(e) => {
            crate::stderr!("error: {}", one_line(&e));
            crate::error::exit_code(&e)
        }
    }
}

fn list_presets() -> anyhow::Result<()> {
    let all = crate::presets::all().map_err(crate::error::bad_input)?;
    let mut text = String::new();
    for p in all {
        text += &format!("{}\n\n", p.describe());
    }
    if let Some(d) = crate::presets::user_dir() {
        text += &format!("user presets: {}/*.toml\n", d.display());
    }
    crate::stdio::write_stdout(text.as_bytes())
}
