//! Model sources: Hugging Face cache layouts and downloads (src/hub.rs), and `--unet` files
//! (src/checkpoint/unet_file.rs).
//!
//! - A cache built on disk (`models--org--tiny/{blobs,refs,snapshots}`) holding the tiny
//!   model and a LoRA file resolves offline to the same model: same image as the local path.
//! - A small HTTP server on 127.0.0.1 speaking the Hub's protocol (the endpoints hf-hub
//!   calls) proves a real download into the cache (only the needed files, the fp16 variant
//!   preferred), a download resumed after a dropped connection (within a run, and in the next
//!   run from the `.part` file), a 404 turned into a clear error, and `--vae` repos (a VAE
//!   repo's top level, a pipeline's `vae/`).
//! - An unreachable endpoint fails within seconds with the hint to pass a local path.
//!
//! Environment variables are process-global, so the tests that exercise them run in a child
//! process (this test binary re-run with `--exact` and the variables set on the command).

mod common;

use candle_core::{DType, Device};
use common::*;
use dmd2::checkpoint;
use dmd2::checkpoint::unet_file::replace_unet;
use dmd2::hub::{HubConfig, ModelRef, resolve_file_with, resolve_model_with, resolve_vae_with};
use dmd2::pipeline::{Pipeline, Request};
use dmd2::scheduler::SamplerSpec;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// A fresh folder under cargo's per-target temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "hub-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file of a folder, as repo paths (`unet/config.json`) → bytes.
fn folder_files(dir: &Path) -> HashMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut HashMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = HashMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A LoRA file to host: the LoRA fixture when present, else a small safetensors of our own.
fn lora_bytes() -> Vec<u8> {
    let p = fixtures().join("lora/kohya_diffusers.safetensors");
    if let Ok(b) = std::fs::read(&p) {
        return b;
    }
    let t = candle_core::Tensor::arange(0f32, 64f32, &Device::Cpu)
        .unwrap()
        .reshape((8, 8))
        .unwrap();
    let mut m = HashMap::new();
    m.insert(
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight".to_string(),
        t,
    );
    let tmp = TempDir::new("lora");
    let f = tmp.0.join("l.safetensors");
    candle_core::safetensors::save(&m, &f).unwrap();
    std::fs::read(&f).unwrap()
}

fn etag_of(data: &[u8]) -> String {
    // FNV-1a, enough to tell the test files apart
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}{:08x}", data.len())
}

/// Lay `files` out as the Hugging Face cache does: blobs named by etag, snapshot entries as
/// relative symlinks to them (copies where symlinks are unavailable), `refs/main`.
fn build_cache(cache: &Path, repo: &str, files: &HashMap<String, Vec<u8>>) {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), SHA).unwrap();
    for (name, data) in files {
        let etag = etag_of(data);
        std::fs::write(root.join("blobs").join(&etag), data).unwrap();
        let pointer = root.join("snapshots").join(SHA).join(name);
        std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
        #[cfg(unix)]
        {
            let depth = name.split('/').count() + 1;
            let rel = format!("{}blobs/{etag}", "../".repeat(depth));
            std::os::unix::fs::symlink(rel, &pointer).unwrap();
        }
        #[cfg(not(unix))]
        std::fs::write(&pointer, data).unwrap();
    }
}

fn request() -> Request {
    Request {
        prompt: "a photo of a cat".into(),
        negative_prompt: None,
        prompt_syntax: Default::default(),
        sampler: SamplerSpec::dmd2(vec![999, 749, 499, 249]),
        cfg: 1.0,
        seed: 42,
        width: 64,
        height: 64,
        init: None,
    }
}

/// The image of [`request`] from a model path.
fn image_of(path: &Path) -> Vec<u8> {
    let parts = checkpoint::open(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let p = Pipeline::load(parts, &Device::Cpu, dmd2::precision::RunPrecision::F32).unwrap();
    p.generate(&request(), &mut |_, _| {}).unwrap().rgb
}

/// The reference image: the tiny diffusers folder, loaded from its local path.
fn local_image() -> Vec<u8> {
    pipeline(Source::Folder)
        .generate(&request(), &mut |_, _| {})
        .unwrap()
        .rgb
}

fn config(cache: &Path, endpoint: &str, offline: bool) -> HubConfig {
    HubConfig {
        cache_dir: cache.to_path_buf(),
        endpoint: endpoint.to_string(),
        token: None,
        offline,
        progress: false,
        response_timeout: dmd2::hub::RESPONSE_TIMEOUT,
        stall_timeout: dmd2::hub::STALL_TIMEOUT,
    }
}

// ---------------------------------------------------------------------------------------
// A Hub on 127.0.0.1
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Logged {
    path: String,
    range: Option<String>,
}

struct HubRepo {
    files: HashMap<String, Vec<u8>>,
    /// file → how many more body requests to cut off after `cut` bytes
    drops: HashMap<String, (usize, usize)>,
}

/// A minimal Hub: `/api/models/{repo}/revision/{rev}` and `/{repo}/resolve/{rev}/{file}`
/// with range requests, ETag and X-Repo-Commit, one request per connection. It serves until
/// dropped or for two minutes at most.
struct FakeHub {
    endpoint: String,
    log: Arc<Mutex<Vec<Logged>>>,
    stop: Arc<AtomicBool>,
    /// Cut-off responses keep their connection open (a stalled transfer) instead of closing.
    hold_open: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    fn start(repos: HashMap<String, HubRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let hold_open = Arc::new(AtomicBool::new(false));
        let (l, s, h) = (log.clone(), stop.clone(), hold_open.clone());
        let repos = Arc::new(Mutex::new(repos));
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Ok(Some(open)) = serve(stream, &repos, &l, h.load(Ordering::Relaxed))
                        {
                            held.push(open);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            endpoint,
            log,
            stop,
            hold_open,
            thread: Some(thread),
        }
    }

    fn log(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(
    s: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// Answer one request; a cut-off response's connection is returned when it is to be held
/// open.
fn serve(
    stream: TcpStream,
    repos: &Mutex<HashMap<String, HubRepo>>,
    log: &Mutex<Vec<Logged>>,
    hold_open: bool,
) -> std::io::Result<Option<TcpStream>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None); // a bare connect (the reachability check)
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    log.lock().unwrap().push(Logged {
        path: path.clone(),
        range: range.clone(),
    });
    let mut s = stream;
    let not_found = |s: &mut TcpStream, code: &str| {
        respond(
            s,
            "404 Not Found",
            &[
                ("X-Error-Code", code.to_string()),
                ("Content-Length", "0".into()),
            ],
            b"",
        )
        .map(|_| None)
    };
    let mut repos = repos.lock().unwrap();
    if let Some(rest) = path.strip_prefix("/api/models/") {
        // {org}/{name}/revision/{rev}
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() == 4 && parts[2] == "revision" {
            let id = format!("{}/{}", parts[0], parts[1]);
            if let Some(repo) = repos.get(&id)
                && (parts[3] == "main" || parts[3] == SHA)
            {
                let mut names: Vec<&String> = repo.files.keys().collect();
                names.sort();
                let body = serde_json::json!({
                    "id": id,
                    "sha": SHA,
                    "siblings": names.iter().map(|n| serde_json::json!({"rfilename": n})).collect::<Vec<_>>(),
                })
                .to_string();
                return respond(
                    &mut s,
                    "200 OK",
                    &[
                        ("Content-Type", "application/json".into()),
                        ("Content-Length", body.len().to_string()),
                    ],
                    body.as_bytes(),
                )
                .map(|_| None);
            }
        }
        return respond(
            &mut s,
            "401 Unauthorized",
            &[
                ("X-Error-Code", "RepoNotFound".into()),
                ("Content-Length", "0".into()),
            ],
            b"",
        )
        .map(|_| None);
    }
    // /{org}/{name}/resolve/{rev}/{file...}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return not_found(&mut s, "RepoNotFound");
    }
    let id = format!("{}/{}", parts[0], parts[1]);
    let (rev, file) = (parts[3], parts[4]);
    let Some(repo) = repos.get_mut(&id) else {
        return not_found(&mut s, "RepoNotFound");
    };
    if rev != "main" && rev != SHA {
        return not_found(&mut s, "RevisionNotFound");
    }
    let Some(data) = repo.files.get(file).cloned() else {
        return not_found(&mut s, "EntryNotFound");
    };
    let total = data.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse().unwrap_or(total - 1)
            };
            (a, b.min(total - 1))
        }
        None => (0, total - 1),
    };
    if start > end {
        return respond(
            &mut s,
            "416 Range Not Satisfiable",
            &[
                ("Content-Range", format!("bytes */{total}")),
                ("Content-Length", "0".into()),
            ],
            b"",
        )
        .map(|_| None);
    }
    let body = &data[start..=end];
    let headers = [
        ("ETag", format!("\"{}\"", etag_of(&data))),
        ("X-Repo-Commit", SHA.to_string()),
        ("Accept-Ranges", "bytes".into()),
        ("Content-Range", format!("bytes {start}-{end}/{total}")),
        ("Content-Length", body.len().to_string()),
    ];
    let is_body = range.as_deref() != Some("bytes=0-0");
    if is_body
        && let Some((left, cut)) = repo.drops.get_mut(file)
        && *left > 0
    {
        *left -= 1;
        let cut = (*cut).min(body.len());
        // headers promise the whole range; send part of it and hang up
        let mut head = "HTTP/1.1 206 Partial Content\r\nConnection: close\r\n".to_string();
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        s.write_all(&body[..cut])?;
        s.flush()?;
        if hold_open {
            return Ok(Some(s));
        }
        s.shutdown(std::net::Shutdown::Both)?;
        return Ok(None);
    }
    respond(&mut s, "206 Partial Content", &headers, body).map(|_| None)
}

/// The tiny model as a Hub repo: the diffusers folder, plus files dmd2 must not download
/// (a `.bin` duplicate, a non-fp16 VAE next to an fp16 one, a single-file checkpoint).
fn tiny_repo() -> HubRepo {
    let mut files = folder_files(&fixtures().join("tiny"));
    let vae = files
        .remove("vae/diffusion_pytorch_model.safetensors")
        .unwrap();
    files.insert(
        "vae/diffusion_pytorch_model.fp16.safetensors".into(),
        vae.clone(),
    );
    files.insert(
        "vae/diffusion_pytorch_model.safetensors".into(),
        b"must not be downloaded".to_vec(),
    );
    files.insert(
        "unet/diffusion_pytorch_model.bin".into(),
        b"must not be downloaded".to_vec(),
    );
    files.insert(
        "tiny.safetensors".into(),
        b"must not be downloaded".to_vec(),
    );
    files.insert("lora.safetensors".into(), lora_bytes());
    HubRepo {
        files,
        drops: HashMap::new(),
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

/// A prepared cache resolves offline to the same model and the same LoRA file.
#[test]
fn offline_cache_gives_the_same_image() {
    let tmp = TempDir::new("offline");
    let cache = tmp.0.join("hub");
    let mut files = folder_files(&fixtures().join("tiny"));
    files.insert("lora.safetensors".into(), lora_bytes());
    build_cache(&cache, "org/tiny", &files);
    let cfg = config(&cache, "http://127.0.0.1:9", true);

    let snap = resolve_model_with(&cfg, &ModelRef::parse("org/tiny").unwrap()).unwrap();
    assert_eq!(
        snap,
        cache.join(format!("models--org--tiny/snapshots/{SHA}"))
    );
    let by_sha =
        resolve_model_with(&cfg, &ModelRef::parse(&format!("org/tiny@{SHA}")).unwrap()).unwrap();
    assert_eq!(by_sha, snap);
    assert_eq!(image_of(&snap), local_image(), "image from the cached repo");

    let lora =
        resolve_file_with(&cfg, &ModelRef::parse("org/tiny/lora.safetensors").unwrap()).unwrap();
    assert_eq!(std::fs::read(&lora).unwrap(), lora_bytes());

    // Not in the cache: a clear error, no network.
    let t0 = Instant::now();
    let e = resolve_file_with(
        &cfg,
        &ModelRef::parse("org/tiny/other.safetensors").unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        e.contains("org/tiny") && e.contains("other.safetensors"),
        "{e}"
    );
    assert!(
        e.contains("not in the Hugging Face cache") && e.contains("local path"),
        "{e}"
    );
    let e = resolve_model_with(&cfg, &ModelRef::parse("org/absent").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("org/absent") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );

    // A snapshot missing a weight file is not mistaken for a model.
    let unet = snap.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&unet).unwrap();
    let e = resolve_model_with(&cfg, &ModelRef::parse("org/tiny").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unet/diffusion_pytorch_model.safetensors"),
        "{e}"
    );
}

/// A real download: only what is needed, the fp16 variant preferred, in the standard layout;
/// then the same image; then served from the cache without a request.
#[test]
fn download_diffusers_repo() {
    let mut repos = HashMap::new();
    repos.insert("org/tiny".to_string(), tiny_repo());
    let hub = FakeHub::start(repos);
    let tmp = TempDir::new("download");
    let cache = tmp.0.join("hub");
    let cfg = config(&cache, &hub.endpoint, false);

    let snap = resolve_model_with(&cfg, &ModelRef::parse("org/tiny").unwrap())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let root = cache.join("models--org--tiny");
    assert_eq!(snap, root.join("snapshots").join(SHA));
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        SHA
    );
    assert!(!root.join("refs").join(SHA).exists(), "stray refs/<sha>");
    let fetched: Vec<String> = hub
        .log()
        .iter()
        .filter(|l| l.path.contains("/resolve/") && l.range.as_deref() != Some("bytes=0-0"))
        .map(|l| {
            l.path
                .rsplit(&format!("{SHA}/"))
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer_2/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(
            fetched.iter().any(|x| x == f),
            "{f} not downloaded: {fetched:?}"
        );
    }
    // tokenizer_2's vocabulary is tokenizer's, byte for byte: the cached blob is linked
    // after the metadata request instead of being downloaded again
    for f in ["tokenizer_2/vocab.json", "tokenizer_2/merges.txt"] {
        assert!(snap.join(f).is_file(), "{f} missing");
        assert!(!fetched.iter().any(|x| x == f), "{f} downloaded twice");
    }
    for f in [
        "vae/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "tiny.safetensors",
        "lora.safetensors",
    ] {
        assert!(
            !fetched.iter().any(|x| x == f),
            "{f} downloaded: {fetched:?}"
        );
    }
    // snapshot entries point into blobs/
    let unet = snap.join("unet/diffusion_pytorch_model.safetensors");
    #[cfg(unix)]
    assert!(
        std::fs::symlink_metadata(&unet)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read(&unet).unwrap(),
        std::fs::read(fixtures().join("tiny/unet/diffusion_pytorch_model.safetensors")).unwrap()
    );
    assert_eq!(
        image_of(&snap),
        local_image(),
        "image from the downloaded repo"
    );

    // Second time: from the cache, no request at all.
    let n = hub.log().len();
    let again = resolve_model_with(&cfg, &ModelRef::parse("org/tiny").unwrap()).unwrap();
    assert_eq!(again, snap);
    assert_eq!(hub.log().len(), n, "a cached model made requests");

    // A single file, and a 404 as a clear error.
    let lora =
        resolve_file_with(&cfg, &ModelRef::parse("org/tiny/lora.safetensors").unwrap()).unwrap();
    assert_eq!(std::fs::read(&lora).unwrap(), lora_bytes());
    assert!(lora.starts_with(root.join("snapshots").join(SHA)));
    // by commit hash: no refs/<sha> left behind (huggingface_hub writes none)
    let by_sha = ModelRef::parse(&format!("org/tiny@{SHA}/tiny.safetensors")).unwrap();
    let p = resolve_file_with(&cfg, &by_sha).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), b"must not be downloaded");
    assert!(!root.join("refs").join(SHA).exists(), "stray refs/<sha>");
    let e = resolve_file_with(
        &cfg,
        &ModelRef::parse("org/tiny/missing.safetensors").unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("org/tiny") && e.contains("missing.safetensors") && e.contains("404"),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");
    let e = resolve_model_with(&cfg, &ModelRef::parse("org/nothing").unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("org/nothing") && e.contains("HTTP 401"), "{e}");
    let e = resolve_file_with(
        &cfg,
        &ModelRef::parse("org/tiny@v9/lora.safetensors").unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("org/tiny@v9/lora.safetensors") && e.contains("404"),
        "{e}"
    );
}

/// A repo without model_index.json: the error names its single files.
#[test]
fn single_file_repo_needs_a_file_name() {
    let mut files = HashMap::new();
    files.insert("sdxl.safetensors".to_string(), lora_bytes());
    let mut repos = HashMap::new();
    repos.insert(
        "org/single".to_string(),
        HubRepo {
            files,
            drops: HashMap::new(),
        },
    );
    let hub = FakeHub::start(repos);
    let tmp = TempDir::new("single");
    let cfg = config(&tmp.0, &hub.endpoint, false);
    let e = resolve_model_with(&cfg, &ModelRef::parse("org/single").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a diffusers repo") && e.contains("org/single/sdxl.safetensors"),
        "{e}"
    );
    let p = resolve_model_with(
        &cfg,
        &ModelRef::parse("org/single/sdxl.safetensors").unwrap(),
    )
    .unwrap();
    assert_eq!(std::fs::read(p).unwrap(), lora_bytes());
}

/// The connection drops halfway: hf-hub resumes with a range request, within the run (its
/// retries) and, once those are spent, in the next run from the `.part` file.
#[test]
fn interrupted_downloads_resume() {
    let data = std::fs::read(fixtures().join("tiny/text_encoder_2/model.safetensors")).unwrap();
    let half = data.len() / 2;
    // different bytes (an identical blob would be linked, not downloaded)
    let data_b: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    let mut files = HashMap::new();
    files.insert("a.safetensors".to_string(), data.clone());
    files.insert("b.safetensors".to_string(), data_b.clone());
    let data_c: Vec<u8> = data.iter().map(|b| b ^ 0x33).collect();
    files.insert("c.safetensors".to_string(), data_c.clone());
    let mut drops = HashMap::new();
    // c: cut 4 times: hf-hub's last retry completes the file but reports "too many
    // retries"; the complete file is kept
    drops.insert("c.safetensors".to_string(), (4, 1000));
    // a: cut once at half → resumed by the in-run retry
    drops.insert("a.safetensors".to_string(), (1, half));
    // b: cut 5 times, 1000 bytes each (hf-hub makes 1 try + 4 retries when told 3, and
    // gives up after the last) → the run fails, the next resumes
    drops.insert("b.safetensors".to_string(), (5, 1000));
    let mut repos = HashMap::new();
    repos.insert("org/r".to_string(), HubRepo { files, drops });
    let hub = FakeHub::start(repos);
    let tmp = TempDir::new("resume");
    let cfg = config(&tmp.0, &hub.endpoint, false);

    let a = resolve_file_with(&cfg, &ModelRef::parse("org/r/a.safetensors").unwrap())
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(std::fs::read(&a).unwrap(), data);
    let ranges: Vec<String> = hub
        .log()
        .iter()
        .filter(|l| l.path.ends_with("/a.safetensors"))
        .filter_map(|l| l.range.clone())
        .collect();
    assert!(
        ranges.contains(&format!("bytes={half}-")),
        "no resumed request: {ranges:?}"
    );

    let e = resolve_file_with(&cfg, &ModelRef::parse("org/r/b.safetensors").unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("org/r/b.safetensors"), "{e}");
    let part = std::fs::read_dir(tmp.0.join("models--org--r/blobs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "part"))
        .expect("a .part file is left to resume");
    let kept = part.metadata().unwrap().len() as usize;
    assert_eq!(kept, 5000);
    let b = resolve_file_with(&cfg, &ModelRef::parse("org/r/b.safetensors").unwrap())
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(std::fs::read(&b).unwrap(), data_b);
    let last = hub
        .log()
        .iter()
        .rev()
        .find(|l| l.path.ends_with("/b.safetensors"))
        .and_then(|l| l.range.clone());
    assert_eq!(last, Some(format!("bytes={kept}-")));

    let c = resolve_file_with(&cfg, &ModelRef::parse("org/r/c.safetensors").unwrap())
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(std::fs::read(&c).unwrap(), data_c);
}

/// A server that accepts connections and never answers, or stops sending mid-file: the
/// watchdog gives up (timeouts shortened here; 30 s and 60 s by default).
#[test]
fn silent_server_is_abandoned() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    listener.set_nonblocking(true).unwrap();
    let t = std::thread::spawn(move || {
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((c, _)) = listener.accept() {
                held.push(c); // never answered
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let tmp = TempDir::new("silent");
    let mut cfg = config(&tmp.0, &endpoint, false);
    cfg.response_timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let e = resolve_file_with(&cfg, &ModelRef::parse("org/x/y.safetensors").unwrap())
        .unwrap_err()
        .to_string();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        e.contains("org/x/y.safetensors") && e.contains("no answer"),
        "{e}"
    );
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();

    // stalls mid-body: the fake hub sends 1000 bytes and then nothing (the connection
    // stays open until the hub is dropped)
    let data = vec![7u8; 100_000];
    let mut files = HashMap::new();
    files.insert("s.safetensors".to_string(), data);
    let mut drops = HashMap::new();
    drops.insert("s.safetensors".to_string(), (usize::MAX, 1000));
    let mut repos = HashMap::new();
    repos.insert("org/s".to_string(), HubRepo { files, drops });
    let hub = FakeHub::start(repos);
    hub.hold_open.store(true, Ordering::Relaxed);
    let mut cfg = config(&tmp.0, &hub.endpoint, false);
    cfg.stall_timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let e = resolve_file_with(&cfg, &ModelRef::parse("org/s/s.safetensors").unwrap())
        .unwrap_err()
        .to_string();
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(
        e.contains("org/s/s.safetensors") && e.contains("stalled"),
        "{e}"
    );
}

/// No server behind the endpoint: a one-line error within seconds, with the hint.
#[test]
fn unreachable_endpoint_fails_fast() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tmp = TempDir::new("unreachable");
    let cfg = config(&tmp.0, &format!("http://127.0.0.1:{port}"), false);
    for spec in [
        "org/tiny",
        "tianweiy/DMD2/dmd2_sdxl_4step_lora_fp16.safetensors",
    ] {
        let t0 = Instant::now();
        let e = resolve_model_with(&cfg, &ModelRef::parse(spec).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{spec}: took {:?}",
            t0.elapsed()
        );
        assert!(
            e.contains(
                spec.split('/')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join("/")
                    .as_str()
            ),
            "{e}"
        );
        assert!(e.contains("--model /path/to/"), "{e}");
        assert!(e.contains("cannot reach"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

/// The environment variables, checked in a child process (see the module docs).
#[test]
fn environment_variables() {
    let tmp = TempDir::new("env");
    let cache = tmp.0.join("hub");
    let mut files = folder_files(&fixtures().join("tiny"));
    files.insert("lora.safetensors".into(), lora_bytes());
    build_cache(&cache, "org/tiny", &files);
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let run = |vars: &[(&str, String)], mode: &str| {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "env_child", "--nocapture", "--test-threads=1"]);
        for k in [
            "HF_HOME",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_HUB_OFFLINE",
            "HF_ENDPOINT",
            "HF_TOKEN",
        ] {
            c.env_remove(k);
        }
        c.env("DMD2_HUB_TEST_MODE", mode);
        c.env("DMD2_HUB_TEST_DIR", &tmp.0);
        for (k, v) in vars {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child {mode} failed:\n{text}");
        assert!(
            text.contains("env_child ... ok") || text.contains("1 passed"),
            "{text}"
        );
    };
    let offline = ("HF_HUB_OFFLINE", "1".to_string());
    run(
        &[
            ("HF_HUB_CACHE", cache.display().to_string()),
            offline.clone(),
        ],
        "cached",
    );
    // HF_HOME/hub is the cache when HF_HUB_CACHE is unset
    run(
        &[("HF_HOME", tmp.0.display().to_string()), offline.clone()],
        "cached",
    );
    run(
        &[
            ("HF_HUB_CACHE", tmp.0.join("empty").display().to_string()),
            offline,
        ],
        "offline-miss",
    );
    run(
        &[
            ("HF_HUB_CACHE", tmp.0.join("empty").display().to_string()),
            ("HF_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ],
        "unreachable",
    );
}

/// Runs only as the child of [`environment_variables`].
#[test]
fn env_child() {
    let Ok(mode) = std::env::var("DMD2_HUB_TEST_MODE") else {
        return;
    };
    let local = fixtures().join("tiny");
    match mode.as_str() {
        "cached" => {
            let dir = PathBuf::from(std::env::var("DMD2_HUB_TEST_DIR").unwrap());
            let snap = dmd2::hub::resolve_model(&ModelRef::parse("org/tiny").unwrap()).unwrap();
            assert_eq!(
                snap,
                dir.join(format!("hub/models--org--tiny/snapshots/{SHA}"))
            );
            assert_eq!(image_of(&snap), local_image());
            let lora = dmd2::hub::resolve_file("org/tiny/lora.safetensors").unwrap();
            assert_eq!(std::fs::read(lora).unwrap(), lora_bytes());
            // local paths win
            assert_eq!(
                dmd2::hub::resolve_file(local.to_str().unwrap()).unwrap(),
                local
            );
        }
        "offline-miss" => {
            let e = dmd2::hub::resolve_file("org/tiny/lora.safetensors")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("not in the Hugging Face cache") && e.contains("HF_HUB_OFFLINE"),
                "{e}"
            );
        }
        "unreachable" => {
            let t0 = Instant::now();
            let e = dmd2::hub::resolve_file("tianweiy/DMD2/dmd2_sdxl_4step_lora_fp16.safetensors")
                .unwrap_err()
                .to_string();
            eprintln!("unreachable after {:?}: {e}", t0.elapsed());
            assert!(t0.elapsed() < Duration::from_secs(10));
            assert!(
                e.contains("tianweiy/DMD2/dmd2_sdxl_4step_lora_fp16.safetensors")
                    && e.contains("--model /path/to/")
                    && e.contains("HF_ENDPOINT"),
                "{e}"
            );
            let e = dmd2::hub::resolve_file("./nope.safetensors")
                .unwrap_err()
                .to_string();
            assert!(e.contains("no such file"), "{e}");
        }
        other => panic!("unknown mode {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// --unet
// ---------------------------------------------------------------------------------------

/// The va variant's UNet saved by torch.save in float16 (its weights are float16 values):
/// replacing the UNet with it changes nothing.
#[test]
fn unet_from_torch_bin() {
    let bin = fixtures().join("variants/va_unet_fp16.bin");
    let src = Source::Variant("va");
    let want = pipeline(src)
        .generate(&request(), &mut |_, _| {})
        .unwrap()
        .rgb;
    let mut parts = checkpoint::open(&src.path()).unwrap();
    replace_unet(&mut parts, &bin).unwrap_or_else(|e| panic!("{e:#}"));
    let p = Pipeline::load(parts, &Device::Cpu, dmd2::precision::RunPrecision::F32).unwrap();
    let got = p.generate(&request(), &mut |_, _| {}).unwrap().rgb;
    assert_eq!(got, want, "va with the .bin UNet");
}

/// A diffusers safetensors UNet into the single-file model.
#[test]
fn unet_from_safetensors() {
    let st = fixtures().join("tiny/unet/diffusion_pytorch_model.safetensors");
    let mut parts = checkpoint::open(&Source::SingleFile.path()).unwrap();
    replace_unet(&mut parts, &st).unwrap();
    let p = Pipeline::load(parts, &Device::Cpu, dmd2::precision::RunPrecision::F32).unwrap();
    let got = p.generate(&request(), &mut |_, _| {}).unwrap().rgb;
    assert_eq!(got, local_image());
}

/// Wrong files are refused with the key and shapes named.
#[test]
fn unet_mismatches() {
    let tmp = TempDir::new("unet");
    let st = fixtures().join("tiny/unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let key = "conv_in.weight";
    let w = tensors.remove(key).unwrap();
    let dims = w.dims().to_vec();
    tensors.insert(
        key.to_string(),
        candle_core::Tensor::zeros(
            (dims[0] * 2, dims[1], dims[2], dims[3]),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
    );
    let bad = tmp.0.join("bad.safetensors");
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let mut parts = checkpoint::open(&Source::Folder.path()).unwrap();
    let e = replace_unet(&mut parts, &bad).unwrap_err().to_string();
    assert!(
        e.contains(key)
            && e.contains(&format!("{:?}", dims))
            && e.contains(&format!("{}", dims[0] * 2)),
        "{e}"
    );

    tensors.remove(key);
    let missing = tmp.0.join("missing.safetensors");
    candle_core::safetensors::save(&tensors, &missing).unwrap();
    let e = replace_unet(&mut parts, &missing).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("missing"), "{e}");

    // an original-layout checkpoint, a text file, a missing file
    let e = replace_unet(&mut parts, &Source::SingleFile.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("original-layout"), "{e}");
    let txt = tmp.0.join("x.bin");
    std::fs::write(&txt, "hello").unwrap();
    let e = replace_unet(&mut parts, &txt).unwrap_err().to_string();
    assert!(
        e.contains("neither a safetensors file nor a PyTorch checkpoint"),
        "{e}"
    );
    let e = replace_unet(&mut parts, &tmp.0.join("none.bin"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such file"), "{e}");
    // the model is untouched by the failures
    let p = Pipeline::load(parts, &Device::Cpu, dmd2::precision::RunPrecision::F32).unwrap();
    assert_eq!(
        p.generate(&request(), &mut |_, _| {}).unwrap().rgb,
        local_image()
    );
}

/// `--unet REPO/FILE.bin` through the cache, then into the model.
#[test]
fn unet_from_the_hub_cache() {
    let tmp = TempDir::new("unet-hub");
    let mut files = HashMap::new();
    files.insert(
        "dmd2_sdxl_1step_unet_fp16.bin".to_string(),
        std::fs::read(fixtures().join("variants/va_unet_fp16.bin")).unwrap(),
    );
    build_cache(&tmp.0, "org/unets", &files);
    let cfg = config(&tmp.0, "http://127.0.0.1:9", true);
    let path = resolve_file_with(
        &cfg,
        &ModelRef::parse("org/unets/dmd2_sdxl_1step_unet_fp16.bin").unwrap(),
    )
    .unwrap();
    let src = Source::Variant("va");
    let mut parts = checkpoint::open(&src.path()).unwrap();
    replace_unet(&mut parts, &path).unwrap();
    let p = Pipeline::load(parts, &Device::Cpu, dmd2::precision::RunPrecision::F32).unwrap();
    assert_eq!(
        p.generate(&request(), &mut |_, _| {}).unwrap().rgb,
        pipeline(src)
            .generate(&request(), &mut |_, _| {})
            .unwrap()
            .rgb
    );
}

/// `--vae REPO`: a VAE repo's top-level config.json and diffusers weights (not its `.bin`,
/// not the single-file copy beside them, as in madebyollin/sdxl-vae-fp16-fix), or a
/// pipeline repo's `vae/` (its fp16 variant); afterwards offline from the cache; a repo with
/// neither is refused with the hint to name a file.
#[test]
fn download_vae_repos() {
    let vae_dir = fixtures().join("vae/kl");
    let mut fix = folder_files(&vae_dir);
    fix.insert(
        "diffusion_pytorch_model.bin".into(),
        b"must not be downloaded".to_vec(),
    );
    fix.insert(
        "sdxl_vae.safetensors".into(),
        b"must not be downloaded".to_vec(),
    );
    let mut none = HashMap::new();
    none.insert("README.md".to_string(), b"no VAE here".to_vec());
    let mut repos = HashMap::new();
    repos.insert(
        "org/fix".to_string(),
        HubRepo {
            files: fix,
            drops: HashMap::new(),
        },
    );
    repos.insert("org/tiny".to_string(), tiny_repo());
    repos.insert(
        "org/none".to_string(),
        HubRepo {
            files: none,
            drops: HashMap::new(),
        },
    );
    let hub = FakeHub::start(repos);
    let tmp = TempDir::new("vae-repos");
    let cache = tmp.0.join("hub");
    let online = config(&cache, &hub.endpoint, false);
    let resolve = |cfg: &HubConfig, s: &str| resolve_vae_with(cfg, &ModelRef::parse(s).unwrap());

    let dir = resolve(&online, "org/fix").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        dir,
        cache.join("models--org--fix/snapshots").join(SHA),
        "the snapshot's top"
    );
    let vae = checkpoint::vae_file::open(&dir).unwrap();
    assert_eq!(vae.arch, checkpoint::vae_file::open(&vae_dir).unwrap().arch);
    let dir = resolve(&online, "org/tiny").unwrap_or_else(|e| panic!("{e:#}"));
    assert!(dir.ends_with("vae"), "{}", dir.display());
    assert!(
        dir.join("diffusion_pytorch_model.fp16.safetensors")
            .is_file()
    );
    checkpoint::vae_file::open(&dir).unwrap();
    let fetched: Vec<String> = hub.log().iter().map(|l| l.path.clone()).collect();
    for f in [
        "diffusion_pytorch_model.bin",
        "sdxl_vae.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert!(
            !fetched.iter().any(|p| p.ends_with(&format!("{SHA}/{f}"))),
            "{f} downloaded"
        );
    }
    let e = resolve(&online, "org/none").unwrap_err().to_string();
    assert!(e.contains("--vae org/none/FILE.safetensors"), "{e}");

    // Offline, from the cache alone.
    let offline = config(&cache, &hub.endpoint, true);
    let before = hub.log().len();
    resolve(&offline, "org/fix").unwrap();
    resolve(&offline, "org/tiny").unwrap();
    assert_eq!(hub.log().len(), before, "no request offline");
}
