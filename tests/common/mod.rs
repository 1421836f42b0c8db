//! Shared helpers for the parity tests: fixture paths, reference cases, tolerances.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use dmd2::checkpoint;
use dmd2::pipeline::{Pipeline, Request};
use dmd2::prompt_syntax::PromptSyntax;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `tests/fixtures/SUB/cases.json`, as the fixture scripts write it.
pub fn fixture_cases<T: serde::de::DeserializeOwned>(sub: &str) -> Vec<T> {
    let path = fixtures().join(sub).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The reference tensors of case `name` in `tests/fixtures/SUB/NAME.safetensors`.
pub fn fixture_refs(sub: &str, name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(sub).join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub timesteps: Vec<usize>,
    pub guidance_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// Where the case's `<name>.safetensors` lies (set when cases.json is read).
    #[serde(skip)]
    pub refs_dir: PathBuf,
}

impl Case {
    /// diffusers is the reference of `plain` prompts; the default syntax (A1111's) reads
    /// every case's prompts the same way except those past 75 tokens, which diffusers cuts
    /// off and A1111 continues in a second chunk.
    pub fn syntax(&self) -> PromptSyntax {
        let tok = dmd2::tokenizer::ClipTokenizer::builtin("<|endoftext|>").unwrap();
        let long = |p: &str| tok.tokenize(p).unwrap().len() > 75;
        if long(&self.prompt) || self.negative_prompt.as_deref().is_some_and(long) {
            PromptSyntax::Plain
        } else {
            PromptSyntax::default()
        }
    }

    pub fn request(&self) -> Request {
        Request {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            prompt_syntax: self.syntax(),
            sampler: dmd2::scheduler::SamplerSpec::dmd2(self.timesteps.clone()),
            cfg: self.guidance_scale,
            seed: self.seed,
            width: self.width,
            height: self.height,
            init: None,
        }
    }

    pub fn refs(&self) -> HashMap<String, Tensor> {
        let p = self.refs_dir.join(format!("{}.safetensors", self.name));
        candle_core::safetensors::load(&p, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }
}

/// The reference cases of scripts/make_fixtures.py (`refs/`) and of
/// scripts/make_variant_fixtures.py (`variants/refs/`).
pub fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    for dir in [fixtures().join("refs"), fixtures().join("variants/refs")] {
        let p = dir.join("cases.json");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut cases: Vec<Case> = serde_json::from_str(&text).expect("cases.json");
        for c in &mut cases {
            c.refs_dir = dir.clone();
        }
        all.extend(cases);
    }
    all
}

pub fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// Model sources: the diffusers folder and the single file hold the same weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Folder,
    SingleFile,
    Tiny2,
    /// A diffusers folder under `variants/` (scripts/make_variant_fixtures.py).
    Variant(&'static str),
}

impl Source {
    pub fn path(self) -> PathBuf {
        match self {
            Source::Folder => fixtures().join("tiny"),
            Source::SingleFile => tiny_single_file(),
            Source::Tiny2 => fixtures().join("tiny2.safetensors"),
            Source::Variant(name) => fixtures().join("variants").join(name),
        }
    }

    pub fn for_case(c: &Case) -> Vec<Source> {
        match c.model.as_str() {
            "tiny" => vec![Source::Folder, Source::SingleFile],
            "tiny2" => vec![Source::Tiny2],
            "va" => vec![Source::Variant("va")],
            "vb" => vec![Source::Variant("vb")],
            other => panic!("case {}: unknown model {other}", c.name),
        }
    }
}

/// The tiny model as one original-layout (LDM/sgm) SDXL checkpoint, written from the diffusers
/// folder by dmd2's own writer into cargo's test scratch directory (once, again when the folder
/// is newer). The repository holds the tiny weights once; `tests/single_file_map.rs` checks
/// this file tensor by tensor against the description of the reference converter's file
/// (`tests/fixtures/tiny.single_file.json`, made by scripts/make_fixtures.py and read back by
/// diffusers' `from_single_file`), so every test that reads it reads that file's numbers.
pub fn tiny_single_file() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("tiny.safetensors");
        let folder = fixtures().join("tiny");
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let newest_input = walk(&folder).iter().filter_map(|p| mtime(p)).max();
        if let (Some(made), Some(input)) = (mtime(&out), newest_input)
            && made >= input
        {
            return out;
        }
        // Written aside and renamed: test binaries running at once never see half a file.
        let tmp = dir.join(format!("tiny.{}.tmp", std::process::id()));
        let parts = checkpoint::open(&folder).unwrap_or_else(|e| panic!("{e:#}"));
        dmd2::checkpoint::writer::write_single_file(&parts, &tmp, Some(DType::F16))
            .unwrap_or_else(|e| panic!("{e:#}"));
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
    .clone()
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Pipelines are loaded once per test binary and shared.
pub fn pipeline(src: Source) -> Arc<Pipeline> {
    static CACHE: OnceLock<Mutex<HashMap<Source, Arc<Pipeline>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(src)
        .or_insert_with(|| {
            let parts =
                checkpoint::open(&src.path()).unwrap_or_else(|e| panic!("{:?}: {e:#}", src));
            Arc::new(
                Pipeline::load(parts, &Device::Cpu, dmd2::precision::RunPrecision::F32)
                    .unwrap_or_else(|e| panic!("{e:#}")),
            )
        })
        .clone()
}

/// max |a − b| / max |b|
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12);
    diff / scale
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

pub fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Largest per-channel difference in levels between two RGB8 buffers.
pub fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Peak signal-to-noise ratio of two 8-bit images, in dB (∞ when equal).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// An empty directory `<tmp>/dmd2-<kind>-<pid>-<name>`, removed first if an earlier run left it.
pub fn fresh_dir(kind: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dmd2-{kind}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `dmd2 ARGS`, stdout and stderr captured, `stdin` written to its standard input (closed
/// after; none: no input at all), killed and failed after `secs` seconds.
pub fn run_dmd2_within<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    stdin: Option<&[u8]>,
    secs: u64,
) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dmd2");
    let pid = child.id() as libc::pid_t;
    let (input, data) = (child.stdin.take(), stdin.map(<[u8]>::to_vec));
    // Written on its own thread so that a child filling its stdout pipe cannot deadlock us.
    let writer = std::thread::spawn(move || {
        if let (Some(mut input), Some(data)) = (input, data) {
            let _ = input.write_all(&data);
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(output) => {
            let _ = writer.join();
            output.expect("wait for dmd2")
        }
        Err(_) => {
            // SAFETY: kill(2) on the child's pid; it has not been reaped (its waiter is blocked).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("dmd2 {args:?} did not finish within {secs} s");
        }
    }
}

/// [`run_dmd2_within`] 120 s.
pub fn run_dmd2<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    stdin: Option<&[u8]>,
) -> std::process::Output {
    run_dmd2_within(args, stdin, 120)
}
