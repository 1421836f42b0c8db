//! Pipes that close: every subcommand whose stdout reader is gone — closed before it starts,
//! or gone after the first line as with `| head -n1` — ends quietly with exit code 0 (no panic,
//! no error line), and `gen` makes no image nobody will read: with the reader gone before the
//! start it does not even load the model. Unix only (pipes made by the test).
#![cfg(unix)]

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Runs dmd2 with stdout the write end of a pipe; `reader` gets the read end (drop it to close
/// the pipe) before the child is waited for. Returns the status and stderr.
fn run_piped(args: &[&str], reader: impl FnOnce(std::io::PipeReader)) -> (ExitStatus, String) {
    let (rx, tx) = std::io::pipe().expect("pipe");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(tx)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dmd2");
    reader(rx);
    let mut err = String::new();
    let stderr = child.stderr.take().expect("piped stderr");
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("dmd2 {args:?} did not finish after its stdout closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    err.push_str(&errs.join().expect("stderr reader"));
    (status, err)
}

fn assert_quiet(args: &[&str], status: ExitStatus, stderr: &str) {
    assert_eq!(
        status.code(),
        Some(0),
        "dmd2 {args:?}: {status:?}\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "dmd2 {args:?} complained about the closed pipe:\n{stderr}"
    );
}

fn pngs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
                .count()
        })
        .unwrap_or(0)
}

fn gen_args<'a>(model: &'a str, out: &'a str, n: &'a str) -> Vec<&'a str> {
    vec![
        "gen",
        "--model",
        model,
        "--prompt",
        "a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--num-images",
        n,
        "--json",
        "--out-dir",
        out,
    ]
}

#[test]
fn a_reader_closed_before_the_start() {
    let lora = fixtures().join("lora").join("peft.safetensors");
    let model = fixtures().join("tiny");
    let (lora, model) = (lora.to_str().unwrap(), model.to_str().unwrap());
    let dir = fresh_dir("pipes", "closed");
    let out = dir.to_str().unwrap();
    let gen_json = gen_args(model, out, "3");
    let cases: Vec<Vec<&str>> = vec![
        vec!["presets"],
        vec!["completions", "bash"],
        vec!["completions", "zsh"],
        vec!["completions", "fish"],
        vec!["man", "gen"],
        vec!["--version"],
        vec!["inspect", lora],
        vec!["inspect", model],
        vec!["--help"],
        gen_json,
    ];
    for args in &cases {
        let (status, err) = run_piped(args, drop);
        assert_quiet(args, status, &err);
    }
    assert_eq!(pngs(&dir), 0, "gen made images nobody could be told about");

    // -o -: the PNG itself goes to the closed pipe.
    let file = dir.join("never.png");
    let args = [
        "gen", "--model", model, "--prompt", "x", "--width", "64", "--height", "64", "-o", "-",
    ];
    let (status, err) = run_piped(&args, drop);
    assert_quiet(&args, status, &err);
    assert!(!file.exists());
}

#[test]
fn a_reader_that_leaves_after_one_line() {
    let model = fixtures().join("tiny");
    let dir = fresh_dir("pipes", "head");
    let args = gen_args(model.to_str().unwrap(), dir.to_str().unwrap(), "4");
    let mut first = String::new();
    let (status, err) = run_piped(&args, |rx| {
        // `head -n1`: one line, then the reader is gone.
        BufReader::new(rx).read_line(&mut first).expect("read");
    });
    assert_quiet(&args, status, &err);
    let line: serde_json::Value = serde_json::from_str(&first).expect("a JSON line");
    assert_eq!(line["index"], 0);
    // The first image is kept; the run stopped once it noticed (the tiny model is fast, so
    // the others may have been made and written before the reader left).
    let n = pngs(&dir);
    assert!((1..=4).contains(&n), "{n} images");

    // The listing subcommands the same way.
    for args in [vec!["presets"], vec!["completions", "zsh"]] {
        let (status, err) = run_piped(&args, |rx| {
            let mut l = String::new();
            BufReader::new(rx).read_line(&mut l).expect("read");
        });
        assert_quiet(&args, status, &err);
    }
}
