//! Models and add-ons from the Hugging Face Hub, through the `hf-hub` crate, into the standard
//! Hugging Face cache (shared with Python tools).
//!
//! - `--model` takes a path or a repo: `org/name` (a diffusers repo: only what dmd2 needs is
//!   fetched — `model_index.json`, each component's config, its safetensors weights, preferring
//!   the `.fp16` variant and never the `.bin` duplicates, and the tokenizer files),
//!   `org/name/path/in/repo.safetensors` (one file, e.g. a single-file checkpoint), with an
//!   optional `@revision` after the name (`org/name@rev`, `org/name@rev/file`).
//! - `--lora` / `--unet` take a path or `org/name[@rev]/FILE`, see [`resolve_file`].
//!
//! Cache: `HF_HUB_CACHE` (or `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, in the usual layout
//! (`models--org--name/{blobs,refs,snapshots}`). `HF_ENDPOINT` picks the server, `HF_TOKEN`
//! (or the token file next to the cache, `HF_TOKEN_PATH`) authenticates, `HF_HUB_OFFLINE=1`
//! forbids any network access: files must be in the cache.
//!
//! What is already cached is used without touching the network (a complete snapshot of the
//! requested revision). Network failures are reported quickly and on one line, naming the
//! repo and file and how to pass a local path instead: a reachability check of the endpoint
//! with short timeouts precedes the first request, and a watchdog abandons requests that get
//! no answer or stall. Interrupted downloads resume (hf-hub keeps `blobs/<etag>.part` and
//! continues it with an HTTP range request, both within a run and in the next one).

use anyhow::{Context, Result, bail};
use hf_hub::api::Progress;
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::BTreeSet;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default Hub endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// DNS and TCP connect timeout of the reachability check.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may wait for its first answer (default of [`HubConfig::response_timeout`]).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a download may go without receiving a byte (default of [`HubConfig::stall_timeout`]).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// In-run retries of a broken download (each resumes where the last one stopped).
const RETRIES: usize = 3;

/// The safetensors weights of these components are needed; the others only their configs.
const MODEL_COMPONENTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("text_encoder_2", "model"),
];
const TOKENIZER_COMPONENTS: [&str; 2] = ["tokenizer", "tokenizer_2"];

/// Where a model (or file) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// An existing local file or folder.
    Local(PathBuf),
    /// A Hub repo: a diffusers repo when `file` is `None`, else one file in it.
    Repo {
        id: String,
        revision: Option<String>,
        file: Option<String>,
    },
}

impl ModelRef {
    /// `PATH` if it exists, else `org/name[@rev][/path/in/repo]`. Strings that can only be
    /// paths (`./x`, `/x`, `~/x`, `x.safetensors`, `dir/x.safetensors`) and do not exist are
    /// a "no such file" error.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            bail!("empty model path or repo id");
        }
        let p = Path::new(s);
        if p.exists() {
            return Ok(ModelRef::Local(p.to_path_buf()));
        }
        let no_such = || anyhow::anyhow!("{s}: no such file or directory");
        let looks_like_path = s.starts_with('/')
            || s.starts_with("./")
            || s.starts_with("../")
            || s.starts_with('~')
            || s.starts_with('.')
            || s.contains('\\')
            || s.contains("//")
            || (s.len() >= 2 && s.as_bytes()[1] == b':');
        if looks_like_path {
            return Err(no_such());
        }
        let mut parts = s.splitn(3, '/');
        let (Some(org), Some(name_rev)) = (parts.next(), parts.next()) else {
            return Err(no_such());
        };
        let file = parts.next().map(str::to_string);
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, Some(r.to_string())),
            Some(_) => bail!("{s}: empty revision after '@'"),
            None => (name_rev, None),
        };
        // `models/sdxl.safetensors` is a missing local file, not a repo called so.
        if file.is_none() && has_weight_extension(name) {
            return Err(no_such());
        }
        if !valid_repo_part(org) || !valid_repo_part(name) {
            return Err(no_such());
        }
        if let Some(f) = &file
            && (f.is_empty() || f.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
        {
            bail!("{s}: '{f}' is not a file path inside a repo");
        }
        Ok(ModelRef::Repo {
            id: format!("{org}/{name}"),
            revision,
            file,
        })
    }
}

impl std::str::FromStr for ModelRef {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelRef::parse(s)
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Local(p) => write!(f, "{}", p.display()),
            ModelRef::Repo { id, revision, file } => {
                write!(f, "{id}")?;
                if let Some(r) = revision {
                    write!(f, "@{r}")?;
                }
                if let Some(file) = file {
                    write!(f, "/{file}")?;
                }
                Ok(())
            }
        }
    }
}

fn has_weight_extension(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    [".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf"]
        .iter()
        .any(|e| l.ends_with(e))
}

/// Hub repo names: letters, digits, `-`, `_`, `.`; no leading/trailing `-`/`.`, no `..`.
fn valid_repo_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
        && !s.contains("..")
}

/// Where and how to reach the Hub; [`HubConfig::from_env`] reads the usual variables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub cache folder (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: never use the network.
    pub offline: bool,
    /// Draw progress bars on stderr.
    pub progress: bool,
    /// Give up on a request with no answer after this long.
    pub response_timeout: Duration,
    /// Give up on a download that receives nothing for this long.
    pub stall_timeout: Duration,
}

fn env_nonempty(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

fn env_true(k: &str) -> bool {
    env_nonempty(k).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "on" | "yes" | "true"
        )
    })
}

impl HubConfig {
    pub fn from_env() -> Result<Self> {
        let home = || -> Result<PathBuf> {
            if let Some(h) = env_nonempty("HF_HOME") {
                return Ok(PathBuf::from(h));
            }
            if let Some(x) = env_nonempty("XDG_CACHE_HOME") {
                return Ok(PathBuf::from(x).join("huggingface"));
            }
            let home = env_nonempty("HOME")
                .or_else(|| env_nonempty("USERPROFILE"))
                .context(
                    "cannot locate the Hugging Face cache: set HF_HOME or HF_HUB_CACHE \
                     (or pass a local path)",
                )?;
            Ok(PathBuf::from(home).join(".cache").join("huggingface"))
        };
        let cache_dir =
            match env_nonempty("HF_HUB_CACHE").or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE")) {
                Some(c) => PathBuf::from(c),
                None => home()?.join("hub"),
            };
        let token = env_nonempty("HF_TOKEN")
            .or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = env_nonempty("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .or_else(|| home().ok().map(|h| h.join("token")))?;
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        let endpoint = env_nonempty("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Ok(Self {
            cache_dir,
            endpoint,
            token,
            offline: env_true("HF_HUB_OFFLINE"),
            progress: std::io::stderr().is_terminal(),
            response_timeout: RESPONSE_TIMEOUT,
            stall_timeout: STALL_TIMEOUT,
        })
    }

    fn repo_dir(&self, id: &str) -> PathBuf {
        self.cache_dir
            .join(Repo::new(id.to_string(), RepoType::Model).folder_name())
    }

    fn api(&self) -> Result<Api> {
        ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .with_retries(RETRIES)
            .with_user_agent("dmd2", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the Hub client: {e}"))
    }
}

/// The local path of a `--model` value: itself when local; else the cached (downloaded if
/// needed) file, or diffusers snapshot folder (usable by [`crate::checkpoint::open`]).
pub fn resolve_model(r: &ModelRef) -> Result<PathBuf> {
    match r {
        ModelRef::Local(p) => Ok(p.clone()),
        r => resolve_model_with(&HubConfig::from_env()?, r),
    }
}

/// A `--lora` / `--unet` value: a local file, else `org/name[@rev]/FILE` from the Hub.
pub fn resolve_file(spec: &str) -> Result<PathBuf> {
    match ModelRef::parse(spec)? {
        ModelRef::Local(p) => Ok(p),
        r => resolve_file_with(&HubConfig::from_env()?, &r),
    }
}

/// [`resolve_model`] with an explicit configuration.
pub fn resolve_model_with(cfg: &HubConfig, r: &ModelRef) -> Result<PathBuf> {
    match r {
        ModelRef::Local(p) => Ok(p.clone()),
        ModelRef::Repo {
            id,
            revision,
            file: Some(file),
        } => fetch_one(cfg, id, revision.as_deref(), file),
        ModelRef::Repo {
            id,
            revision,
            file: None,
        } => fetch_diffusers(cfg, id, revision.as_deref()),
    }
}

/// [`resolve_file`] with an explicit configuration.
pub fn resolve_file_with(cfg: &HubConfig, r: &ModelRef) -> Result<PathBuf> {
    match r {
        ModelRef::Local(p) => Ok(p.clone()),
        ModelRef::Repo { file: None, .. } => bail!(
            "{r}: name a file inside the repo (REPO_ID/FILE.safetensors), or give a local path"
        ),
        r => resolve_model_with(cfg, r),
    }
}

// ---------------------------------------------------------------------------------------
// The cache
// ---------------------------------------------------------------------------------------

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached snapshot folder of a revision (which may not hold every file).
fn cached_snapshot(cfg: &HubConfig, id: &str, rev: &str) -> Option<PathBuf> {
    let dir = cfg.repo_dir(id);
    let commit = if is_commit_hash(rev) {
        rev.to_string()
    } else {
        std::fs::read_to_string(dir.join("refs").join(rev))
            .ok()?
            .trim()
            .to_string()
    };
    if commit.is_empty() {
        return None;
    }
    let snap = dir.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

fn cached_file(cfg: &HubConfig, id: &str, rev: &str, file: &str) -> Option<PathBuf> {
    let p = cached_snapshot(cfg, id, rev)?.join(file);
    p.is_file().then_some(p)
}

fn offline_error(cfg: &HubConfig, id: &str, rev: &str, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{id}: {what} (revision {rev}) is not in the Hugging Face cache {} and HF_HUB_OFFLINE=1 \
         forbids downloading it; download it elsewhere and pass a local path \
         (--model /path/to/model or /path/to/file.safetensors), or unset HF_HUB_OFFLINE",
        cfg.cache_dir.display()
    )
}

/// Which files of a diffusers snapshot dmd2 needs are missing (empty: complete).
fn missing_in_snapshot(snap: &Path) -> Vec<String> {
    let index = snap.join("model_index.json");
    let Ok(text) = std::fs::read_to_string(&index) else {
        return vec!["model_index.json".into()];
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return vec!["model_index.json (unreadable)".into()];
    };
    let listed = |c: &str| v.get(c).is_some_and(component_present);
    let mut missing = Vec::new();
    for (c, stem) in MODEL_COMPONENTS {
        let dir = snap.join(c);
        if !dir.join("config.json").is_file() {
            missing.push(format!("{c}/config.json"));
            continue;
        }
        match crate::checkpoint::diffusers::weight_files(&dir, stem) {
            Ok(files) => missing.extend(
                files
                    .iter()
                    .filter(|f| !f.is_file())
                    .map(|f| format!("{c}/{}", file_name(f))),
            ),
            Err(_) => missing.push(format!("{c}/{stem}.safetensors")),
        }
    }
    for c in TOKENIZER_COMPONENTS {
        if !listed(c) {
            continue;
        }
        let dir = snap.join(c);
        let bpe = dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file();
        if !bpe && !dir.join("tokenizer.json").is_file() {
            missing.push(format!("{c}/vocab.json"));
        }
    }
    missing
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A model_index.json entry naming a real component: `["library", "Class"]`.
fn component_present(v: &serde_json::Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x.is_string()))
}

// ---------------------------------------------------------------------------------------
// Downloads
// ---------------------------------------------------------------------------------------

/// One file from a repo: cached, or downloaded into the cache.
fn fetch_one(cfg: &HubConfig, id: &str, rev: Option<&str>, file: &str) -> Result<PathBuf> {
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
fn fetch_diffusers(cfg: &HubConfig, id: &str, rev: Option<&str>) -> Result<PathBuf> {
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
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        rev.to_string(),
    ));
    let info = watchdog(cfg, None, move |_| repo.info())
        .map_err(|e| e.into_error(id, rev, None, cfg))?
        .map_err(|e| hub_error(e, id, rev, None, cfg))?;
    let sha = info.sha.clone();
    let files: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
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
    // The requested ref points at this commit, as huggingface_hub records it; hf-hub also
    // wrote refs/<sha>, which huggingface_hub never does.
    let refs = cfg.repo_dir(id).join("refs");
    if rev != sha {
        if let Some(parent) = refs.join(rev).parent() {
            std::fs::create_dir_all(parent).ok();
        }
        std::fs::write(refs.join(rev), &sha)
            .with_context(|| format!("{id}: cannot write {}", refs.join(rev).display()))?;
    }
    if !had_sha_ref {
        std::fs::remove_file(refs.join(&sha)).ok();
    }
    let missing = missing_in_snapshot(&snap);
    if !missing.is_empty() {
        bail!(
            "{id}: the repo lacks files dmd2 needs: {} (dmd2 reads safetensors weights only)",
            missing.join(", ")
        );
    }
    Ok(snap)
}

/// The files of a diffusers repo dmd2 needs, from its file list.
pub fn needed_files(
    id: &str,
    model_index: &serde_json::Value,
    files: &BTreeSet<&str>,
) -> Result<Vec<String>> {
    let mut out = vec!["model_index.json".to_string()];
    let in_dir = |dir: &str| -> Vec<&str> {
        files
            .iter()
            .copied()
            .filter(|f| {
                f.strip_prefix(dir)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_some_and(|r| !r.contains('/'))
            })
            .collect()
    };
    let listed = |c: &str| model_index.get(c).is_some_and(component_present);
    for (c, _) in MODEL_COMPONENTS {
        if !listed(c) {
            bail!("{id}: model_index.json has no {c}; not an SDXL pipeline");
        }
        let here = in_dir(c);
        let config = format!("{c}/config.json");
        if !here.contains(&config.as_str()) {
            bail!("{id}: no {config} in the repo");
        }
        out.push(config);
        out.extend(select_weights(id, c, &here)?);
    }
    for c in TOKENIZER_COMPONENTS {
        if listed(c) {
            out.extend(
                in_dir(c)
                    .into_iter()
                    .filter(|f| f.ends_with(".json") || f.ends_with(".txt"))
                    .map(str::to_string),
            );
        }
    }
    if listed("scheduler") {
        out.extend(
            in_dir("scheduler")
                .into_iter()
                .filter(|f| f.ends_with(".json"))
                .map(str::to_string),
        );
    }
    Ok(out)
}

/// A component's safetensors weights: the `fp16` variant when the repo has it (single file
/// or shards with their index), else the plain ones. Never `.bin`, `.msgpack`, `.onnx`.
fn select_weights(id: &str, comp: &str, here: &[&str]) -> Result<Vec<String>> {
    let name = |f: &str| f.rsplit('/').next().unwrap_or(f).to_string();
    let is_fp16 = |n: &str| n.ends_with(".fp16.safetensors") || n.contains(".fp16-");
    let variant_tag = |n: &str| {
        // model.<variant>.safetensors / model.<variant>-00001-of-00002.safetensors
        let stem = n.trim_end_matches(".safetensors");
        stem.split('.').count() > 1
    };
    let st: Vec<&str> = here
        .iter()
        .copied()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    let idx = |fp16: bool| {
        here.iter().copied().find(|f| {
            let n = name(f);
            if fp16 {
                n.ends_with(".safetensors.index.fp16.json")
            } else {
                n.ends_with(".safetensors.index.json")
            }
        })
    };
    for fp16 in [true, false] {
        let picks: Vec<&str> = st
            .iter()
            .copied()
            .filter(|f| {
                let n = name(f);
                if fp16 { is_fp16(&n) } else { !variant_tag(&n) }
            })
            .collect();
        if picks.is_empty() {
            continue;
        }
        let sharded = picks.iter().any(|f| f.contains("-of-"));
        let mut out: Vec<String> = picks.iter().map(|s| s.to_string()).collect();
        if sharded {
            match idx(fp16) {
                Some(i) => out.push(i.to_string()),
                None => continue,
            }
        }
        return Ok(out);
    }
    if here.iter().any(|f| f.ends_with(".bin")) {
        bail!(
            "{id}: {comp}/ has only PyTorch .bin weights; dmd2 reads safetensors for whole models"
        );
    }
    bail!("{id}: no safetensors weights in {comp}/")
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

/// Progress of one download: feeds the watchdog and, on a terminal, draws a bar on stderr.
struct Bar {
    activity: Activity,
    draw: bool,
    label: String,
    total: usize,
    done: usize,
    last_draw: Option<Instant>,
    since: Instant,
    resumed_at: usize,
    /// hf-hub reports the resume offset (0 for a fresh transfer) right after `init`.
    expect_offset: bool,
}

impl Bar {
    fn render(&mut self, force: bool) {
        if !self.draw {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last_draw
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last_draw = Some(now);
        let mb = |b: usize| b as f64 / 1e6;
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let secs = (now - self.since).as_secs_f64().max(1e-3);
        let rate = mb(self.done.saturating_sub(self.resumed_at)) / secs;
        let width = 30;
        let filled = (self.done * width)
            .checked_div(self.total)
            .unwrap_or(width)
            .min(width);
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
    }
}

impl Progress for Bar {
    fn init(&mut self, size: usize, _filename: &str) {
        self.activity.touch();
        self.total = size;
        self.done = 0;
        self.resumed_at = 0;
        self.expect_offset = true;
        self.since = Instant::now();
        self.render(true);
    }

    fn update(&mut self, size: usize) {
        self.activity.touch();
        if std::mem::take(&mut self.expect_offset) {
            self.resumed_at = size;
        }
        self.done += size;
        self.render(false);
    }

    fn finish(&mut self) {
        self.activity.touch();
        self.render(true);
        if self.draw {
            let _ = writeln!(std::io::stderr());
        }
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
fn reachable(endpoint: &str) -> std::result::Result<(), String> {
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
    let draw = cfg.progress;
    let file_name = file.to_string();
    let path = watchdog(cfg, Some(activity.clone()), move |act| {
        let bar = Bar {
            activity: act,
            draw,
            label,
            total: 0,
            done: 0,
            last_draw: None,
            since: Instant::now(),
            resumed_at: 0,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(id: &str, rev: Option<&str>, file: Option<&str>) -> ModelRef {
        ModelRef::Repo {
            id: id.into(),
            revision: rev.map(Into::into),
            file: file.map(Into::into),
        }
    }

    #[test]
    fn parse_refs() {
        assert_eq!(
            ModelRef::parse("stabilityai/stable-diffusion-xl-base-1.0").unwrap(),
            repo("stabilityai/stable-diffusion-xl-base-1.0", None, None)
        );
        assert_eq!(
            ModelRef::parse("tianweiy/DMD2/dmd2_sdxl_4step_lora_fp16.safetensors").unwrap(),
            repo(
                "tianweiy/DMD2",
                None,
                Some("dmd2_sdxl_4step_lora_fp16.safetensors")
            )
        );
        assert_eq!(
            ModelRef::parse("org/name@v1.0/sub/dir/x.safetensors").unwrap(),
            repo("org/name", Some("v1.0"), Some("sub/dir/x.safetensors"))
        );
        assert_eq!(
            ModelRef::parse("org/name@0123456789abcdef0123456789abcdef01234567").unwrap(),
            repo(
                "org/name",
                Some("0123456789abcdef0123456789abcdef01234567"),
                None
            )
        );
        assert_eq!(
            ModelRef::parse("src").unwrap(),
            ModelRef::Local(PathBuf::from("src"))
        );
        for bad in [
            "./x",
            "/x",
            "/nonexistent/model.safetensors",
            "x.safetensors",
            "models/sdxl.safetensors",
            "~/x",
            "x",
            "org/-bad",
            "org/na me",
            "C:\\models\\x.safetensors",
        ] {
            let e = ModelRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains("no such file"), "{bad}: {e}");
        }
        assert!(ModelRef::parse("org/name@/x").is_err());
        assert!(ModelRef::parse("org/name/../x").is_err());
        assert!(ModelRef::parse("").is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["org/name", "org/name@dev", "org/name@dev/a/b.safetensors"] {
            assert_eq!(ModelRef::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn weight_selection() {
        let sdxl = [
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.bin",
            "unet/openvino_model.bin",
            "unet/model.onnx",
        ];
        let here: Vec<&str> = sdxl.to_vec();
        assert_eq!(
            select_weights("r", "unet", &here).unwrap(),
            vec!["unet/diffusion_pytorch_model.fp16.safetensors"]
        );
        let plain = ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"];
        assert_eq!(
            select_weights("r", "vae", &plain).unwrap(),
            vec!["vae/diffusion_pytorch_model.safetensors"]
        );
        let sharded = [
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
            "unet/diffusion_pytorch_model-00001-of-00003.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00003.safetensors",
            "unet/diffusion_pytorch_model-00003-of-00003.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.json",
        ];
        assert_eq!(
            select_weights("r", "unet", &sharded).unwrap(),
            vec![
                "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
            ]
        );
        let bin_only = ["unet/config.json", "unet/diffusion_pytorch_model.bin"];
        let e = select_weights("r", "unet", &bin_only)
            .unwrap_err()
            .to_string();
        assert!(e.contains(".bin"), "{e}");
    }

    #[test]
    fn needed_files_of_sdxl_layout() {
        let files: BTreeSet<&str> = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/flax_model.msgpack",
            "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "tokenizer_2/merges.txt",
            "tokenizer_2/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae_1_0/diffusion_pytorch_model.safetensors",
            "sd_xl_base_1.0.safetensors",
        ]
        .into_iter()
        .collect();
        let index = serde_json::json!({
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "image_encoder": [null, null],
        });
        let got = needed_files("r", &index, &files).unwrap();
        assert!(got.contains(&"text_encoder/model.fp16.safetensors".to_string()));
        assert!(!got.contains(&"text_encoder/model.safetensors".to_string()));
        assert!(got.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
        assert!(got.contains(&"tokenizer_2/vocab.json".to_string()));
        assert!(got.contains(&"scheduler/scheduler_config.json".to_string()));
        assert!(
            !got.iter().any(|f| f.contains("msgpack")
                || f.contains("vae_1_0")
                || f.contains("sd_xl_base"))
        );
    }

    #[test]
    fn endpoint_reachability_errors() {
        assert!(reachable("ftp://x").is_err());
        assert!(reachable("nonsense").is_err());
    }
}
