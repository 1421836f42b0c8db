//! `--vae` against diffusers (scripts/make_vae_fixtures.py, tests/fixtures/vae/): the tiny
//! SDXL pipeline with its VAE swapped for a second random AutoencoderKL — as a diffusers
//! folder, its bare diffusers-key .safetensors and an original-layout (LDM) single file — and
//! for a random narrow AutoencoderTiny (folder and bare file, whose configuration is read
//! from the layer numbering), text-to-image and img2img (the tiny VAE's encoder makes no
//! generator draw), each image within one level; `AutoencoderTiny.decode` itself to 1e-4 on
//! latents big enough for its tanh clamp; an f16 run decodes in f16 exactly when the VAE's
//! config allows it; the CLI records the VAE in the PNG and refuses files that are not a
//! complete VAE with one line naming them.

mod common;

use common::{fixtures, ids_of, max_level_diff, run_dmd2};
use dmd2::loader::{MemoryPolicy, ModelSpec, RunShape};
use dmd2::pipeline::Request;
use dmd2::precision::{DtypeChoice, Precision};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    vae: String,
    kind: String,
    prompt: String,
    negative_prompt: Option<String>,
    guidance_scale: f64,
    seed: u64,
    strength: Option<f64>,
    width: usize,
    height: usize,
}

fn dir() -> PathBuf {
    fixtures().join("vae")
}

fn cases() -> Vec<Case> {
    common::fixture_cases("vae")
}

fn refs(name: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    common::fixture_refs("vae", name)
}

fn image_ref(name: &str) -> Vec<u8> {
    ids_of(&refs(name)["image"])
        .into_iter()
        .map(|x| x as u8)
        .collect()
}

fn model() -> PathBuf {
    fixtures().join("tiny")
}

/// Every form each fixture VAE comes in.
fn forms(vae: &str) -> Vec<PathBuf> {
    match vae {
        "kl" => vec![
            dir().join("kl"),
            dir().join("kl/diffusion_pytorch_model.safetensors"),
            dir().join("kl_ldm.safetensors"),
        ],
        "tiny" => vec![
            dir().join("tiny"),
            dir().join("tiny/diffusion_pytorch_model.safetensors"),
        ],
        other => panic!("unknown fixture VAE {other}"),
    }
}

fn pipeline(vae: &std::path::Path, dtype: DtypeChoice) -> dmd2::pipeline::Pipeline {
    let spec = ModelSpec {
        model: model().display().to_string(),
        unet: None,
        vae: Some(vae.display().to_string()),
        loras: vec![],
        embeddings: vec![],
        embedding_dirs: vec![],
    };
    let run = RunShape {
        width: 64,
        height: 64,
        batch: 1,
        cfg: true,
    };
    let memory = MemoryPolicy {
        vae_tiling: None,
        tile_px: 512,
        force: true,
    };
    dmd2::loader::open(&spec)
        .unwrap()
        .build(&candle_core::Device::Cpu, dtype, run, memory, None)
        .unwrap()
        .0
}

fn request(c: &Case) -> Request {
    let init = (c.kind == "img2img").then(|| {
        let image = dmd2::init_image::Loaded::read(&fixtures().join("img2img/init.png")).unwrap();
        dmd2::init_image::prepare(
            &image,
            None,
            c.width,
            c.height,
            c.strength.unwrap(),
            Default::default(),
        )
        .unwrap()
    });
    Request {
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        prompt_syntax: Default::default(),
        sampler: dmd2::scheduler::SamplerSpec::dmd2(vec![999, 749, 499, 249]),
        cfg: c.guidance_scale,
        seed: c.seed,
        width: c.width,
        height: c.height,
        init,
    }
}

#[test]
fn swapped_vaes_match_diffusers() {
    let cs = cases();
    assert_eq!(cs.len(), 4);
    for c in &cs {
        let want = image_ref(&c.name);
        for vae in forms(&c.vae) {
            let img = pipeline(&vae, DtypeChoice::F32)
                .generate(&request(c), &mut |_, _| {})
                .unwrap();
            let d = max_level_diff(&img.rgb, &want);
            assert!(d <= 1, "{} with {}: {d} levels off", c.name, vae.display());
        }
    }
}

/// The decoder alone, raw output, on latents of ±12 (the tanh clamp's range).
#[test]
fn tiny_decode_is_diffusers() {
    let r = refs("tiny_decode");
    let src = dmd2::checkpoint::vae_file::open(&dir().join("tiny")).unwrap();
    let dmd2::config::VaeArch::Tiny(cfg) = &src.arch else {
        panic!("not read as a tiny VAE");
    };
    let dec = dmd2::vae::TinyDecoder::new(
        cfg,
        std::sync::Arc::new(src.weights).var_builder(Precision::F32, &candle_core::Device::Cpu),
    )
    .unwrap();
    let got = dec.decode(&r["latents"]).unwrap();
    let err = common::max_abs(&got, &r["decoded"]);
    assert!(err <= 1e-4, "max abs error {err}");
}

/// The configuration of a bare tiny-VAE file, read from its layer numbering, is its
/// config.json's.
#[test]
fn bare_tiny_file_reads_as_its_config() {
    let folder = dmd2::checkpoint::vae_file::open(&dir().join("tiny")).unwrap();
    let file =
        dmd2::checkpoint::vae_file::open(&dir().join("tiny/diffusion_pytorch_model.safetensors"))
            .unwrap();
    assert_eq!(folder.arch, file.arch);
    let kl = dmd2::checkpoint::vae_file::open(&dir().join("kl")).unwrap();
    let ldm = dmd2::checkpoint::vae_file::open(&dir().join("kl_ldm.safetensors")).unwrap();
    let (Some(a), Some(b)) = (kl.arch.kl(), ldm.arch.kl()) else {
        panic!("not read as AutoencoderKL");
    };
    assert!(!a.force_upcast && b.force_upcast, "config vs SDXL default");
    assert_eq!(
        (&a.block_out_channels, a.layers_per_block),
        (&b.block_out_channels, b.layers_per_block)
    );
}

/// `--dtype f16` (the GPU's dtype logic, through candle's CPU ops) decodes in f16 with a VAE
/// whose config says `force_upcast: false`, in f32 with the model's own (SDXL's: true).
#[test]
fn f16_decodes_in_f16_only_when_the_vae_allows() {
    let out = common::fresh_dir("vae", "f16");
    for (vae, want) in [(None, "VAE f32"), (Some(dir().join("kl")), "VAE f16")] {
        let mut args: Vec<String> = [
            "gen",
            "--model",
            &model().display().to_string(),
            "--prompt",
            "a cat",
            "--seed",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--dtype",
            "f16",
            "-v",
            "-o",
            &out.join("a.png").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(v) = &vae {
            args.extend(["--vae".to_string(), v.display().to_string()]);
        }
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_dmd2"))
            .args(&args)
            .env("DMD2_KERNELS", "candle")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains(want), "{vae:?}: {err}");
    }
}

/// `dmd2 gen --vae` makes diffusers' image and names the VAE and its hash in the PNG's
/// parameters (A1111's `VAE hash`, `VAE`) and settings; `--from-png` makes it again, and so
/// does a preset naming the VAE.
#[test]
fn gen_with_vae_records_it() {
    let out = common::fresh_dir("vae", "gen");
    let c = cases()
        .into_iter()
        .find(|c| c.name == "tiny_txt2img")
        .unwrap();
    let png = out.join("a.png");
    let vae = dir().join("tiny");
    let o = run_dmd2(
        &[
            "gen",
            "--model",
            &model().display().to_string(),
            "--vae",
            &vae.display().to_string(),
            "--prompt",
            &c.prompt,
            "--negative-prompt",
            c.negative_prompt.as_deref().unwrap(),
            "--cfg",
            &c.guidance_scale.to_string(),
            "--seed",
            &c.seed.to_string(),
            "--width",
            "64",
            "--height",
            "64",
            "-q",
            "-o",
            &png.display().to_string(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rgb = image::open(&png).unwrap().to_rgb8().into_raw();
    assert!(max_level_diff(&rgb, &image_ref(&c.name)) <= 1);
    let settings = dmd2::metadata::settings_from_png(&png).unwrap();
    // By name (not this machine's path) and hash.
    assert_eq!(settings.vae.as_deref(), Some("tiny"));
    let hash = settings.vae_hash.clone().expect("VAE hash");
    assert_eq!(hash.len(), 10);
    let text = dmd2::metadata::read_png_text(&png).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.contains(&format!("VAE hash: {hash}, VAE: tiny")),
        "{params}"
    );
    let again = out.join("b.png");
    let o = run_dmd2(
        &[
            "gen",
            "--from-png",
            &png.display().to_string(),
            // The model folder and the VAE folder are both called `tiny`: the kind of
            // folder and the VAE hash tell them apart.
            "--model-dir",
            &common::fixtures().display().to_string(),
            "-q",
            "-o",
            &again.display().to_string(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::open(&again).unwrap().to_rgb8().into_raw(), rgb);
    // A preset names the VAE as `vae = …`.
    let preset = out.join("tiny-vae.toml");
    std::fs::write(
        &preset,
        format!(
            "model = {:?}\nvae = {:?}\ncfg = {}\nwidth = 64\nheight = 64\n",
            model().display().to_string(),
            vae.display().to_string(),
            c.guidance_scale
        ),
    )
    .unwrap();
    let third = out.join("c.png");
    let o = run_dmd2(
        &[
            "gen",
            "--preset",
            &preset.display().to_string(),
            "--prompt",
            &c.prompt,
            "--negative-prompt",
            c.negative_prompt.as_deref().unwrap(),
            "--seed",
            &c.seed.to_string(),
            "-q",
            "-o",
            &third.display().to_string(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::open(&third).unwrap().to_rgb8().into_raw(), rgb);
}

/// Files that are not a complete VAE are refused before any work, on one line naming them.
#[test]
fn bad_vaes_are_named() {
    let out = common::fresh_dir("vae", "bad");
    // Half of the tiny VAE's tensors.
    let half = out.join("half.safetensors");
    let all = candle_core::safetensors::load(
        dir().join("tiny/diffusion_pytorch_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let some: std::collections::HashMap<_, _> = all
        .into_iter()
        .filter(|(k, _)| k.starts_with("decoder.") || k == "encoder.layers.0.weight")
        .collect();
    candle_core::safetensors::save(&some, &half).unwrap();
    // The LDM file with one decoder convolution the wrong size.
    let wrong = out.join("wrong.safetensors");
    let mut ldm =
        candle_core::safetensors::load(dir().join("kl_ldm.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    ldm.insert(
        "decoder.conv_in.weight".into(),
        candle_core::Tensor::zeros(
            (32, 4, 1, 1),
            candle_core::DType::F16,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    candle_core::safetensors::save(&ldm, &wrong).unwrap();
    let unet = fixtures().join("tiny/unet/diffusion_pytorch_model.safetensors");
    let missing = out.join("nope.safetensors");
    let not_vae_dir = fixtures().join("tiny/unet");
    let png = out.join("x.png");
    for (vae, needle) in [
        (half.display().to_string(), "encoder.layers"),
        (wrong.display().to_string(), "decoder.conv_in.weight"),
        (unet.display().to_string(), "not a VAE"),
        (missing.display().to_string(), "no such file"),
        (not_vae_dir.display().to_string(), "UNet2DConditionModel"),
    ] {
        let o = run_dmd2(
            &[
                "gen",
                "--model",
                &model().display().to_string(),
                "--vae",
                &vae,
                "--prompt",
                "a cat",
                "-q",
                "-o",
                &png.display().to_string(),
            ],
            None,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{vae}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{vae}: {err}");
        assert!(err.contains(needle), "{vae}: {err}");
        assert!(!png.exists());
    }
    // The alias names its repo; offline it fails at once with the hint.
    let t = std::time::Instant::now();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(["gen", "--model", &model().display().to_string()])
        .args(["--vae", "taesdxl", "--prompt", "a cat", "-o"])
        .arg(&png)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", out.join("empty-cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("madebyollin/taesdxl") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 10);
}

/// `--preview`: a valid PNG after every step, never seen half-written by a reader polling it
/// all the while (it is replaced by a rename), no temporary file left; `--json` announces
/// each preview; with the tiny VAE the last preview is the image itself; `--preview-every`
/// thins them out (the last step always shows); the output image is not a preview target.
#[test]
fn previews_are_whole_pngs() {
    let out = common::fresh_dir("vae", "preview");
    let preview = out.join("preview.png");
    let png = out.join("out.png");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (stop, preview) = (stop.clone(), preview.clone());
        std::thread::spawn(move || {
            let mut seen = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(bytes) = std::fs::read(&preview) {
                    image::load_from_memory(&bytes).expect("a preview read whole");
                    seen += 1;
                }
            }
            seen
        })
    };
    let base = |extra: &[&str]| -> std::process::Output {
        let mut args = vec![
            "gen".to_string(),
            "--model".into(),
            model().display().to_string(),
            "--prompt".into(),
            "a lighthouse".into(),
            "--seed".into(),
            "5".into(),
            "--width".into(),
            "64".into(),
            "--height".into(),
            "64".into(),
            "--steps".into(),
            "8".into(),
            "--json".into(),
            "-q".into(),
            "-o".into(),
            png.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        run_dmd2(&args, None)
    };
    let tiny = dir().join("tiny").display().to_string();
    let p = preview.display().to_string();
    let o = base(&["--vae", &tiny, "--preview", &p]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let polled = poller.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(polled > 0, "the poller never saw a preview");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = lines
        .iter()
        .filter(|l| l["event"] == "preview")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    assert_eq!(lines.len(), 9, "8 previews and the image's line");
    let rgb = |p: &std::path::Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(rgb(&preview), rgb(&png), "the last preview is the image");
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // The linear preview (no tiny VAE): latent size, every third step and the last.
    std::fs::remove_file(&preview).unwrap();
    let o = base(&["--preview", &p, "--preview-every", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps: Vec<u64> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["event"] == "preview")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [3, 6, 8]);
    let img = image::open(&preview).unwrap();
    assert_eq!((img.width(), img.height()), (8, 8));

    // The preview may not be the output image.
    let o = base(&["--preview", &png.display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("also the output image"));
}
