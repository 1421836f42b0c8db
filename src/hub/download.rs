//! Downloads through hf-hub: a reachability check first, then each file with a watchdog that
//! abandons requests that get no answer or stall, resumed downloads, and refs written as
//! huggingface_hub writes them.

use super::cache::{
    cached_file, cached_snapshot, is_commit_hash, missing_in_snapshot, offline_error,
};
use super::config::env_nonempty;
use super::files::needed_files;
use super::{CONNECT_TIMEOUT, DEFAULT_ENDPOINT, HubConfig, RETRIES};
use anyhow::{Context, Result, bail};
use hf_hub::api::Progress;
use hf_hub::api::sync::{Api, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::BTreeSet;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One file from a repo: cached, or downloaded into the cache.
pub(super) fn fetch_one(
    cfg: &HubConfig,
    id: &str,
    rev: Option<&str>,
    file: &str,
) -> Result<PathBuf> {
    let rev = rev.unwrap_or("main");
    if let Some(p) = cached_file(cfg, id, rev, file) {
        return Ok(p);
    }
    if cfg.offline {
        return Err(offline_error(cfg, id, rev, file));
    }
    let api = online(cfg, id, rev, file)?;
    let sha_ref = cfg.repo_dir(id).join("refs").join(rev);
    let had_ref = sha_ref.exists();
    let path = download(cfg, &api, id, rev, file)?;
    if is_commit_hash(rev) && !had_ref {
        // hf-hub records a commit-hash revision as refs/<sha>; huggingface_hub does not.
        std::fs::remove_file(sha_ref).ok();
    }
    Ok(path)
}

/// A diffusers repo: the snapshot folder with what dmd2 needs.
pub(super) fn fetch_diffusers(cfg: &HubConfig, id: &str, rev: Option<&str>) -> Result<PathBuf> {
    let rev = rev.unwrap_or("main");
    if let Some(snap) = cached_snapshot(cfg, id, rev) {
        let missing = missing_in_snapshot(&snap);
        if missing.is_empty() {
            return Ok(snap);
        }
        if cfg.offline {
            return Err(offline_error(cfg, id, rev, &missing.join(", ")));
        }
    } else if cfg.offline {
        return Err(offline_error(cfg, id, rev, "the model"));
    }
    let api = online(cfg, id, rev, "model_index.json")?;
    let (sha, listing) = repo_listing(cfg, &api, id, rev)?;
    let files: BTreeSet<&str> = listing.iter().map(String::as_str).collect();
    if !files.contains("model_index.json") {
        let singles: Vec<&str> = files
            .iter()
            .copied()
            .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
            .collect();
        let hint = match singles.first() {
            Some(f) => format!(
                "; to use a single-file checkpoint name it: --model {id}/{f}{}",
                if singles.len() > 1 {
                    format!(" (files: {})", singles.join(", "))
                } else {
                    String::new()
                }
            ),
            None => String::new(),
        };
        bail!("{id}: not a diffusers repo (no model_index.json){hint}");
    }
    // Every file from the same commit: download by commit hash.
    let had_sha_ref = cfg.repo_dir(id).join("refs").join(&sha).exists();
    let index = download(cfg, &api, id, &sha, "model_index.json")?;
    let snap = index
        .parent()
        .context("model_index.json has no folder")?
        .to_path_buf();
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("{id}: cannot read {}", index.display()))?;
    let model_index: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{id}: model_index.json is not valid JSON"))?;
    for f in needed_files(id, &model_index, &files)? {
        if !snap.join(&f).is_file() {
            download(cfg, &api, id, &sha, &f)?;
        }
    }
    record_ref(cfg, id, rev, &sha, had_sha_ref)?;
    let missing = missing_in_snapshot(&snap);
    if !missing.is_empty() {
        bail!(
            "{id}: the repo lacks files dmd2 needs: {} (dmd2 reads safetensors weights only)",
            missing.join(", ")
        );
    }
    Ok(snap)
}

/// The commit `rev` resolves to and the repo's file list at it (one request, watched).
fn repo_listing(cfg: &HubConfig, api: &Api, id: &str, rev: &str) -> Result<(String, Vec<String>)> {
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        rev.to_string(),
    ));
    let info = watchdog(cfg, None, move |_| repo.info())
        .map_err(|e| e.into_error(id, rev, None, cfg))?
        .map_err(|e| hub_error(e, id, rev, None, cfg))?;
    let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
    Ok((info.sha, files))
}

/// The requested ref points at commit `sha`, as huggingface_hub records it; hf-hub also
/// wrote refs/<sha>, which huggingface_hub never does (removed unless it was there before).
fn record_ref(cfg: &HubConfig, id: &str, rev: &str, sha: &str, had_sha_ref: bool) -> Result<()> {
    let refs = cfg.repo_dir(id).join("refs");
    if rev != sha {
        if let Some(parent) = refs.join(rev).parent() {
            std::fs::create_dir_all(parent).ok();
        }
        std::fs::write(refs.join(rev), sha)
            .with_context(|| format!("{id}: cannot write {}", refs.join(rev).display()))?;
    }
    if !had_sha_ref {
        std::fs::remove_file(refs.join(sha)).ok();
    }
    Ok(())
}

/// A repo holding one diffusers component at its top (`config.json` and
/// `diffusion_pytorch_model*.safetensors`, as `madebyollin/taesdxl`), or a pipeline repo's
/// `vae/`: the cached (downloaded if needed) folder of that component.
pub(super) fn fetch_vae(cfg: &HubConfig, id: &str, rev: Option<&str>) -> Result<PathBuf> {
    const STEM: &str = "diffusion_pytorch_model";
    let rev = rev.unwrap_or("main");
    let complete = |dir: &Path| {
        dir.join("config.json").is_file()
            && crate::checkpoint::diffusers::weight_files(dir, STEM)
                .is_ok_and(|f| f.iter().all(|p| p.is_file()))
    };
    if let Some(snap) = cached_snapshot(cfg, id, rev) {
        for dir in [snap.clone(), snap.join("vae")] {
            if complete(&dir) {
                return Ok(dir);
            }
        }
    }
    if cfg.offline {
        return Err(offline_error(cfg, id, rev, "the VAE"));
    }
    let api = online(cfg, id, rev, "config.json")?;
    let (sha, listing) = repo_listing(cfg, &api, id, rev)?;
    let files: BTreeSet<&str> = listing.iter().map(String::as_str).collect();
    let folder = if files.contains("config.json") {
        ""
    } else if files.contains("vae/config.json") {
        "vae"
    } else {
        bail!(
            "{id}: no config.json at the top or in vae/, so not a diffusers VAE repo; name a \
             file in it instead (--vae {id}/FILE.safetensors)"
        );
    };
    let here: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| {
            let (dir, name) = f.rsplit_once('/').unwrap_or(("", f));
            dir == folder && name.starts_with(STEM)
        })
        .collect();
    let what = if folder.is_empty() {
        "the repo"
    } else {
        folder
    };
    let weights = super::files::select_weights(id, what, &here)?;
    let had_sha_ref = cfg.repo_dir(id).join("refs").join(&sha).exists();
    let join = |f: &str| {
        if folder.is_empty() {
            f.to_string()
        } else {
            format!("{folder}/{f}")
        }
    };
    let config = download(cfg, &api, id, &sha, &join("config.json"))?;
    for f in &weights {
        download(cfg, &api, id, &sha, f)?;
    }
    record_ref(cfg, id, rev, &sha, had_sha_ref)?;
    let dir = config
        .parent()
        .context("config.json has no folder")?
        .to_path_buf();
    if !complete(&dir) {
        bail!("{id}: the download of the VAE is incomplete");
    }
    Ok(dir)
}

/// Shared activity clock of a running request: milliseconds since its start of the last
/// byte seen (0: nothing yet).
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms.max(1), Ordering::Relaxed);
    }
}

/// Why a watched request was abandoned.
enum Abandoned {
    NoAnswer,
    Stalled,
    Crashed,
}

impl Abandoned {
    fn into_error(self, id: &str, rev: &str, file: Option<&str>, cfg: &HubConfig) -> anyhow::Error {
        let what = match self {
            Abandoned::NoAnswer => format!(
                "no answer from {} within {}s",
                cfg.endpoint,
                cfg.response_timeout.as_secs_f32()
            ),
            Abandoned::Stalled => format!(
                "the download stalled (nothing received for {}s)",
                cfg.stall_timeout.as_secs_f32()
            ),
            Abandoned::Crashed => "the download thread failed".to_string(),
        };
        anyhow::anyhow!("{}: {what}; {}", target(id, rev, file), local_hint(cfg))
    }
}

/// Run `f` on a thread; give up when it shows no activity for too long. A request that is
/// given up keeps running detached until the process exits.
fn watchdog<T: Send + 'static>(
    cfg: &HubConfig,
    activity: Option<Activity>,
    f: impl FnOnce(Activity) -> T + Send + 'static,
) -> std::result::Result<T, Abandoned> {
    let act = activity.unwrap_or(Activity {
        start: Instant::now(),
        last_ms: Arc::new(AtomicU64::new(0)),
    });
    let (tx, rx) = channel();
    let a = act.clone();
    std::thread::spawn(move || {
        let _ = tx.send(f(a));
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(v) => return Ok(v),
            Err(RecvTimeoutError::Disconnected) => return Err(Abandoned::Crashed),
            Err(RecvTimeoutError::Timeout) => {
                let last = act.last_ms.load(Ordering::Relaxed);
                let now = act.start.elapsed();
                if last == 0 {
                    if now > cfg.response_timeout {
                        return Err(Abandoned::NoAnswer);
                    }
                } else if now.saturating_sub(Duration::from_millis(last)) > cfg.stall_timeout {
                    return Err(Abandoned::Stalled);
                }
            }
        }
    }
}

/// Progress of one download: feeds the watchdog and shows the bytes
/// ([`crate::progress::Transfer`]: a bar on a terminal, a line every few seconds in logs).
struct Bar {
    activity: Activity,
    transfer: crate::progress::Transfer,
    /// hf-hub reports the resume offset (0 for a fresh transfer) right after `init`.
    expect_offset: bool,
}

impl Progress for Bar {
    fn init(&mut self, size: usize, _filename: &str) {
        self.activity.touch();
        self.expect_offset = true;
        self.transfer.start(size);
    }

    fn update(&mut self, size: usize) {
        self.activity.touch();
        if std::mem::take(&mut self.expect_offset) {
            self.transfer.resumed(size);
        }
        self.transfer.advance(size);
    }

    fn finish(&mut self) {
        self.activity.touch();
        self.transfer.finish();
    }
}

/// Check once per endpoint that it can be reached at all, with short timeouts, so that an
/// offline machine fails in seconds rather than waiting on the OS connect timeout.
fn online(cfg: &HubConfig, id: &str, rev: &str, file: &str) -> Result<Api> {
    static REACHED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let known = REACHED
        .lock()
        .map(|r| r.contains(&cfg.endpoint))
        .unwrap_or(false);
    if !known {
        if let Err(e) = reachable(&cfg.endpoint) {
            bail!(
                "{}: cannot reach {} ({e}); {}",
                target(id, rev, Some(file)),
                cfg.endpoint,
                local_hint(cfg)
            );
        }
        if let Ok(mut r) = REACHED.lock() {
            r.push(cfg.endpoint.clone());
        }
    }
    cfg.api()
}

fn proxy_configured() -> bool {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|k| env_nonempty(k).is_some())
}

/// DNS lookup and TCP connect to the endpoint's host, each bounded by [`CONNECT_TIMEOUT`].
/// Skipped behind a proxy (the proxy decides what is reachable).
pub(super) fn reachable(endpoint: &str) -> std::result::Result<(), String> {
    if proxy_configured() {
        return Ok(());
    }
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("HF_ENDPOINT '{endpoint}' is not a URL"))?;
    let default_port = match scheme {
        "https" => 443,
        "http" => 80,
        other => return Err(format!("unsupported scheme {other}")),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        // [v6]:port
        let (h, after) = h.split_once(']').ok_or("bad IPv6 address")?;
        let port = after
            .strip_prefix(':')
            .map(|p| {
                p.parse::<u16>()
                    .map_err(|_| format!("bad port in {endpoint}"))
            })
            .transpose()?
            .unwrap_or(default_port);
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("bad port in {endpoint}"))?,
            ),
            None => (authority.to_string(), default_port),
        }
    };
    let (tx, rx) = channel();
    let h = host.clone();
    std::thread::spawn(move || {
        let _ = tx.send(
            (h.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>()),
        );
    });
    let addrs = match rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(Ok(a)) if !a.is_empty() => a,
        Ok(Ok(_)) | Ok(Err(_)) => return Err(format!("cannot resolve {host}")),
        Err(_) => return Err(format!("no DNS answer for {host}")),
    };
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut last = String::new();
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(if last.is_empty() {
        "connection timed out".to_string()
    } else {
        last
    })
}

fn target(id: &str, rev: &str, file: Option<&str>) -> String {
    let rev = if rev == "main" {
        String::new()
    } else {
        format!("@{rev}")
    };
    match file {
        Some(f) => format!("{id}{rev}/{f}"),
        None => format!("{id}{rev}"),
    }
}

fn local_hint(cfg: &HubConfig) -> String {
    let endpoint = if cfg.endpoint == DEFAULT_ENDPOINT {
        "check the network (or set HF_ENDPOINT to a mirror)".to_string()
    } else {
        format!("check the network and HF_ENDPOINT ({})", cfg.endpoint)
    };
    format!(
        "{endpoint}, or download it elsewhere and pass a local path instead (--model \
         /path/to/model for a diffusers folder or .safetensors checkpoint, --lora/--unet \
         /path/to/file.safetensors)"
    )
}

/// hf-hub's error as one line naming the repo and file.
fn hub_error(
    e: ApiError,
    id: &str,
    rev: &str,
    file: Option<&str>,
    cfg: &HubConfig,
) -> anyhow::Error {
    let t = target(id, rev, file);
    match &e {
        ApiError::RequestError(re) => match re.as_ref() {
            ureq::Error::StatusCode(404) => match file {
                Some(f) => anyhow::anyhow!(
                    "{t}: not found (HTTP 404): {id} has no file {f} at revision {rev}"
                ),
                None => anyhow::anyhow!(
                    "{t}: repository or revision not found (HTTP 404), and no such local path"
                ),
            },
            ureq::Error::StatusCode(c @ (401 | 403)) => anyhow::anyhow!(
                "{t}: access denied (HTTP {c}): no such local path, and the repo does not exist \
                 or is private or gated (accept its license on the Hub and set HF_TOKEN)"
            ),
            ureq::Error::StatusCode(c) => {
                anyhow::anyhow!("{t}: the Hub answered HTTP {c}; {}", local_hint(cfg))
            }
            other => anyhow::anyhow!("{t}: download failed ({other}); {}", local_hint(cfg)),
        },
        ApiError::TooManyRetries(inner) => anyhow::anyhow!(
            "{t}: download failed after {RETRIES} retries ({inner}); run again to resume, or {}",
            local_hint(cfg)
        ),
        _ => anyhow::anyhow!("{t}: download failed ({e}); {}", local_hint(cfg)),
    }
}

/// Download one file at `rev` into the cache (hf-hub: metadata, blob, snapshot pointer,
/// ref) and return its snapshot path. A blob already in the cache is linked, not fetched.
fn download(cfg: &HubConfig, api: &Api, id: &str, rev: &str, file: &str) -> Result<PathBuf> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string());
    let api_repo = api.repo(repo.clone());
    let url = api_repo.url(file);
    let a = api.clone();
    let meta = watchdog(cfg, None, move |_| a.metadata(&url))
        .map_err(|e| e.into_error(id, rev, Some(file), cfg))?
        .map_err(|e| hub_error(e, id, rev, Some(file), cfg))?;
    let repo_dir = cfg.repo_dir(id);
    let blob = repo_dir.join("blobs").join(meta.etag());
    let pointer = repo_dir
        .join("snapshots")
        .join(meta.commit_hash())
        .join(file);
    let size = meta.size() as u64;
    let len_of = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    let mut part = blob.clone();
    part.set_extension("part");
    let finish = |from_part: bool| -> Result<PathBuf> {
        if from_part {
            std::fs::rename(&part, &blob)
                .with_context(|| format!("{}: cannot move into place", blob.display()))?;
        }
        if !pointer.exists() {
            link_blob(&blob, &pointer)
                .with_context(|| format!("{}: cannot link the cached blob", pointer.display()))?;
        }
        Cache::new(cfg.cache_dir.clone())
            .repo(repo.clone())
            .create_ref(meta.commit_hash())
            .with_context(|| format!("{id}: cannot write the ref {rev}"))?;
        Ok(pointer.clone())
    };
    if blob.is_file() && len_of(&blob) == Some(size) {
        return finish(false);
    }
    // A complete `.part` (a run stopped between the last byte and the rename) would make
    // hf-hub ask for the range past the end; one longer than the file cannot be resumed.
    match len_of(&part) {
        Some(n) if n == size => return finish(true),
        Some(n) if n > size => {
            std::fs::remove_file(&part).ok();
        }
        _ => {}
    }
    let activity = Activity {
        start: Instant::now(),
        last_ms: Arc::new(AtomicU64::new(0)),
    };
    let label = target(id, rev, Some(file));
    let quiet = !cfg.progress;
    let file_name = file.to_string();
    let path = watchdog(cfg, Some(activity.clone()), move |act| {
        let bar = Bar {
            activity: act,
            transfer: crate::progress::Transfer::new(label, quiet),
            expect_offset: false,
        };
        api_repo.download_with_progress(&file_name, bar)
    })
    .map_err(|e| e.into_error(id, rev, Some(file), cfg))?;
    let path = match path {
        Ok(p) => p,
        // hf-hub reports "too many retries" even when its last retry completed the file.
        Err(ApiError::TooManyRetries(_)) if len_of(&part) == Some(size) => finish(true)?,
        Err(e) => return Err(hub_error(e, id, rev, Some(file), cfg)),
    };
    // hf-hub leaves its lock file next to the blob.
    let mut lock = blob.clone();
    lock.set_extension("lock");
    std::fs::remove_file(lock).ok();
    // hf-hub does not check the result's size (a server ignoring the range request, or a
    // body cut short without an error, would leave a damaged blob).
    let got = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if got != meta.size() as u64 {
        std::fs::remove_file(&blob).ok();
        std::fs::remove_file(&path).ok();
        bail!(
            "{}: incomplete download ({got} of {} bytes); run again",
            target(id, rev, Some(file)),
            meta.size()
        );
    }
    Ok(path)
}

/// A snapshot entry pointing at a blob: a relative symlink as huggingface_hub makes it,
/// or a copy where symlinks are not available.
fn link_blob(blob: &Path, pointer: &Path) -> std::io::Result<()> {
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent)?;
    }
    #[cfg(unix)]
    {
        // snapshots/<commit>/<file...> → ../../(..)/blobs/<etag>
        let depth = pointer
            .strip_prefix(
                blob.parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("")),
            )
            .map(|rel| rel.components().count().saturating_sub(1))
            .unwrap_or(0);
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(rel, pointer)
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, pointer).map(|_| ())
    }
}
