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

mod cache;
mod config;
mod download;
mod files;
mod reference;

pub use config::HubConfig;
pub use files::needed_files;
pub use reference::ModelRef;

use anyhow::{Result, bail};
use std::path::PathBuf;
use std::time::Duration;

/// Default Hub endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// DNS and TCP connect timeout of the reachability check.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may wait for its first answer (default of [`HubConfig::response_timeout`]).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a download may go without receiving a byte (default of [`HubConfig::stall_timeout`]).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// In-run retries of a broken download (each resumes where the last one stopped).
pub(crate) const RETRIES: usize = 3;

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

/// The commit of a path inside a Hugging Face cache snapshot
/// (`…/models--ORG--NAME/snapshots/<40 hex>/…`), the revision a repo id resolved to.
pub fn snapshot_commit(path: &std::path::Path) -> Option<String> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.windows(3).find_map(|w| {
        (w[0].starts_with("models--") && w[1] == "snapshots" && cache::is_commit_hash(&w[2]))
            .then(|| w[2].clone())
    })
}

/// `spec` (a repo id, maybe with a file) pinned to commit `rev`, unless it names a revision
/// already or is not a repo id.
pub fn pin_revision(spec: &str, rev: &str) -> String {
    match ModelRef::parse(spec) {
        Ok(ModelRef::Repo {
            id,
            revision: None,
            file,
        }) => ModelRef::Repo {
            id,
            revision: Some(rev.to_string()),
            file,
        }
        .to_string(),
        _ => spec.to_string(),
    }
}

/// A `--vae` value: a local file or folder, `org/name[@rev]/FILE`, or a VAE repo
/// `org/name[@rev]` (its top-level `config.json` and weights, or its `vae/`).
pub fn resolve_vae(spec: &str) -> Result<PathBuf> {
    match ModelRef::parse(spec)? {
        ModelRef::Local(p) => Ok(p),
        r => resolve_vae_with(&HubConfig::from_env()?, &r),
    }
}

/// [`resolve_vae`] with an explicit configuration.
pub fn resolve_vae_with(cfg: &HubConfig, r: &ModelRef) -> Result<PathBuf> {
    match r {
        ModelRef::Repo {
            id,
            revision,
            file: None,
        } => download::fetch_vae(cfg, id, revision.as_deref()),
        r => resolve_file_with(cfg, r),
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
        } => download::fetch_one(cfg, id, revision.as_deref(), file),
        ModelRef::Repo {
            id,
            revision,
            file: None,
        } => download::fetch_diffusers(cfg, id, revision.as_deref()),
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

#[cfg(test)]
mod tests {
    use super::download::reachable;
    use super::files::select_weights;
    use super::*;
    use std::collections::BTreeSet;

    /// The commit of a snapshot path, and a repo id pinned to it (files and revisions kept).
    #[test]
    fn snapshot_commits_pin_repo_ids() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let p = std::path::PathBuf::from(format!(
            "/c/hub/models--org--name/snapshots/{sha}/unet/x.safetensors"
        ));
        assert_eq!(super::snapshot_commit(&p).as_deref(), Some(sha));
        assert_eq!(
            super::snapshot_commit(std::path::Path::new("/m/sdxl")),
            None
        );
        assert_eq!(
            super::pin_revision("org/name", sha),
            format!("org/name@{sha}")
        );
        assert_eq!(
            super::pin_revision("org/name/sd.safetensors", sha),
            format!("org/name@{sha}/sd.safetensors")
        );
        assert_eq!(super::pin_revision("org/name@v2", sha), "org/name@v2");
        assert_eq!(
            super::pin_revision("/local/x.safetensors", sha),
            "/local/x.safetensors"
        );
    }

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
