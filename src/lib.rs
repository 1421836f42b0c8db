//! dmd2: SDXL images in 4 steps with DMD2 (Improved Distribution Matching Distillation,
//! arXiv 2405.14867), on candle.
//!
//! The modules follow the pipeline: [`checkpoint`] (formats and key maps) and [`weights`]
//! feed [`config`]ured models — [`clip`] text encoders, the [`unet`], the [`vae`] — which
//! [`pipeline`] drives with the [`scheduler`] and the torch-compatible [`rng`]; [`cli`] and
//! [`output`] face the user.

pub mod cancel;
pub mod checkpoint;
pub mod cli;
pub mod clip;
pub mod conditioning;
pub mod config;
pub mod device;
pub mod embeddings;
pub mod error;
pub mod files;
pub mod hashes;
pub mod hub;
pub mod img2img;
pub mod init_image;
pub mod kernels;
pub mod keymap;
pub mod loader;
pub mod lora;
pub mod memory;
pub mod metadata;
pub mod nn;
pub mod output;
pub mod pipeline;
pub mod precision;
pub mod presets;
pub mod preview;
pub mod progress;
pub mod prompt_chunks;
pub mod prompt_syntax;
pub mod prompts;
pub mod random_weights;
pub mod rng;
pub mod safetensors_file;
pub mod scheduler;
pub mod sources;
pub mod stdio;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
