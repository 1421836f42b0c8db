//! The Hub settings from the environment: cache folder, endpoint, token, offline mode,
//! timeouts.

use super::{DEFAULT_ENDPOINT, RESPONSE_TIMEOUT, RETRIES, STALL_TIMEOUT};
use anyhow::{Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;
use std::time::Duration;

/// Where and how to reach the Hub; [`HubConfig::from_env`] reads the usual variables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub cache folder (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: never use the network.
    pub offline: bool,
    /// Show download progress on stderr (a bar on a terminal, lines in logs).
    pub progress: bool,
    /// Give up on a request with no answer after this long.
    pub response_timeout: Duration,
    /// Give up on a download that receives nothing for this long.
    pub stall_timeout: Duration,
}

pub(super) fn env_nonempty(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

pub(super) fn env_true(k: &str) -> bool {
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
            progress: true,
            response_timeout: RESPONSE_TIMEOUT,
            stall_timeout: STALL_TIMEOUT,
        })
    }

    pub(super) fn repo_dir(&self, id: &str) -> PathBuf {
        self.cache_dir
            .join(Repo::new(id.to_string(), RepoType::Model).folder_name())
    }

    pub(super) fn api(&self) -> Result<Api> {
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
