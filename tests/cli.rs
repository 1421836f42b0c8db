//! The `dmd2` binary end to end on the tiny fixture model: the image equals diffusers', and
//! bad input gives one line naming the file and the problem, a non-zero exit, no output file.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dmd2(args: &[&str]) -> Output {
    run_dmd2(args, None)
}

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("cli", name)
}

fn decode_png(path: &Path) -> (usize, usize, Vec<u8>) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    (img.width() as usize, img.height() as usize, img.into_raw())
}

fn gen_case(c: &Case, model: &Path, out: &Path) -> Output {
    let mut args: Vec<String> = vec![
        "gen".into(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        c.prompt.clone(),
        "--timesteps".into(),
        c.timesteps
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(","),
        "--cfg".into(),
        c.guidance_scale.to_string(),
        "--seed".into(),
        c.seed.to_string(),
        "--width".into(),
        c.width.to_string(),
        "--height".into(),
        c.height.to_string(),
        "--device".into(),
        "cpu".into(),
        "--output".into(),
        out.display().to_string(),
    ];
    if let Some(n) = &c.negative_prompt {
        args.push("--negative-prompt".into());
        args.push(n.clone());
    }
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    dmd2(&refs)
}

#[test]
fn gen_matches_diffusers_png() {
    let dir = tmpdir("gen");
    for name in ["cfg_off", "cfg_neg"] {
        let c = case(name);
        for src in Source::for_case(&c) {
            let out = dir.join(format!("{name}-{src:?}.png"));
            let o = gen_case(&c, &src.path(), &out);
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let (w, h, px) = decode_png(&out);
            let (rw, rh, want) = decode_png(&fixtures().join("refs").join(format!("{name}.png")));
            assert_eq!((w, h), (rw, rh));
            let d = max_level_diff(&px, &want);
            assert!(d <= 1, "{name} {src:?}: {d} levels off diffusers");
        }
    }
    // --steps 4 means DMD2's timesteps, the same as the explicit list.
    let c = case("cfg_off");
    let out = dir.join("steps.png");
    let o = dmd2(&[
        "gen",
        "--model",
        fixtures().join("tiny").to_str().unwrap(),
        "--prompt",
        &c.prompt,
        "--steps",
        "4",
        "--seed",
        "42",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, _, px) = decode_png(&out);
    let (_, _, want) = decode_png(&fixtures().join("refs/cfg_off.png"));
    assert!(max_level_diff(&px, &want) <= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One line on stderr that names `needle`, a non-zero exit, and no file in `dir`.
fn assert_bad(o: &Output, needle: &str, dir: &Path) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert_eq!(o.status.code(), Some(2), "bad input exits with 2: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(
        lines[0].contains(needle),
        "error should name {needle}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    let inputs: Vec<_> = files
        .iter()
        .filter(|f| !f.to_string_lossy().starts_with("in-"))
        .collect();
    assert!(inputs.is_empty(), "unexpected files left: {files:?}");
}

fn gen_with_model(model: &Path, out: &Path) -> Output {
    dmd2(&[
        "gen",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--seed",
        "1",
        "-o",
        out.to_str().unwrap(),
    ])
}

#[test]
fn missing_model_path() {
    let dir = tmpdir("missing");
    let model = dir.join("in-nope.safetensors");
    let o = gen_with_model(&model, &dir.join("out.png"));
    assert_bad(&o, "in-nope.safetensors", &dir);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such file"));
}

#[test]
fn not_safetensors() {
    let dir = tmpdir("notst");
    let model = dir.join("in-model.safetensors");
    std::fs::write(&model, b"this is a text file, not a checkpoint at all").unwrap();
    let o = gen_with_model(&model, &dir.join("out.png"));
    assert_bad(&o, "in-model.safetensors", &dir);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a safetensors file"));
}

#[test]
fn truncated_checkpoint() {
    let dir = tmpdir("trunc");
    let model = dir.join("in-trunc.safetensors");
    let bytes = std::fs::read(common::tiny_single_file()).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let o = gen_with_model(&model, &dir.join("out.png"));
    assert_bad(&o, "in-trunc.safetensors", &dir);
    assert!(String::from_utf8_lossy(&o.stderr).contains("truncated"));
}

#[test]
fn sd15_checkpoint_is_refused() {
    let dir = tmpdir("sd15");
    let model = dir.join("in-sd15.safetensors");
    // An SD 1.5-style key set: UNet under model.diffusion_model, CLIP under cond_stage_model.
    let dev = candle_core::Device::Cpu;
    let mut ts = std::collections::HashMap::new();
    for k in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "first_stage_model.decoder.conv_in.weight",
    ] {
        ts.insert(
            k.to_string(),
            candle_core::Tensor::zeros((4, 4), candle_core::DType::F16, &dev).unwrap(),
        );
    }
    candle_core::safetensors::save(&ts, &model).unwrap();
    let o = gen_with_model(&model, &dir.join("out.png"));
    assert_bad(&o, "in-sd15.safetensors", &dir);
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .to_lowercase()
            .contains("sdxl")
    );
}

#[test]
fn size_not_multiple_of_8_fails_before_loading() {
    let dir = tmpdir("size");
    // The model path does not exist: the size error must come first.
    let o = dmd2(&[
        "gen",
        "--model",
        "/nonexistent",
        "--prompt",
        "x",
        "--width",
        "100",
        "--height",
        "64",
        "-o",
        dir.join("o.png").to_str().unwrap(),
    ]);
    assert_bad(&o, "multiple of 8", &dir);
}

#[test]
fn readme_first_command_fails_fast_offline_with_a_hint() {
    let dir = tmpdir("offline");
    let t = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args([
            "gen",
            "--prompt",
            "a photo of a cat",
            "--output",
            dir.join("cat.png").to_str().unwrap(),
        ])
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
    assert!(!o.status.success());
    assert!(
        err.contains("stabilityai/stable-diffusion-xl-base-1.0"),
        "{err}"
    );
    assert!(err.contains("local path"), "{err}");
    assert!(!dir.join("cat.png").exists());
}

fn run_ok(args: &[&str]) -> Output {
    let o = dmd2(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn lora_inspect_and_merge_from_the_command_line() {
    let dir = tmpdir("lora");
    let lora = fixtures().join("lora/kohya_diffusers.safetensors");
    let (l, tiny) = (lora.to_str().unwrap(), fixtures().join("tiny"));
    let t = tiny.to_str().unwrap();
    // inspect says what each file is.
    let o = run_ok(&["inspect", l]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("kohya LoRA") && s.contains("rank: 4"), "{s}");
    let o = run_ok(&["inspect", common::tiny_single_file().to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("single file"));

    // gen --lora reproduces diffusers' image with the LoRA fused.
    let at_load = dir.join("at-load.png");
    let common = [
        "--prompt",
        "a photo of a cat",
        "--timesteps",
        "999,749,499,249",
        "--seed",
        "42",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
    ];
    let mut args = vec!["gen", "--model", t, "--lora", l];
    args.extend(common);
    args.extend(["-o", at_load.to_str().unwrap()]);
    let o = run_ok(&args);
    assert!(String::from_utf8_lossy(&o.stderr).contains("169/169 modules merged"));
    let (_, _, px) = decode_png(&at_load);
    let (_, _, want) = decode_png(&fixtures().join("lora/refs/kohya_cfg1.png"));
    assert!(max_level_diff(&px, &want) <= 1);

    // merge bakes it into a single file that needs no LoRA at load: the same image.
    let merged = dir.join("merged.safetensors");
    run_ok(&[
        "merge",
        "--model",
        t,
        "--lora",
        &format!("{l}:1.0"),
        "--output",
        merged.to_str().unwrap(),
        // f32: the merged weights are stored exactly as they were computed at load.
        "--dtype",
        "f32",
    ]);
    let baked = dir.join("baked.png");
    let mut args = vec!["gen", "--model", merged.to_str().unwrap()];
    args.extend(common);
    args.extend(["-o", baked.to_str().unwrap()]);
    run_ok(&args);
    assert_eq!(
        max_level_diff(&decode_png(&baked).2, &px),
        0,
        "baked LoRA differs from merging at load"
    );

    // A LoRA that fits nothing is refused, naming the file.
    let bad = dir.join("in-sd15-lora.safetensors");
    let mut ts = std::collections::HashMap::new();
    for k in [
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
    ] {
        ts.insert(
            k.to_string(),
            candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        );
    }
    candle_core::safetensors::save(&ts, &bad).unwrap();
    let mut args = vec!["gen", "--model", t, "--lora", bad.to_str().unwrap()];
    args.extend(common);
    let out = dir.join("none.png");
    args.extend(["-o", out.to_str().unwrap()]);
    let o = dmd2(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("in-sd15-lora.safetensors") && err.contains("does not fit"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn default_size_follows_the_folder_configs_like_diffusers() {
    // sample_size 128 × 2^(4 VAE levels − 1) = 1024, as diffusers' pipeline defaults.
    assert_eq!(
        dmd2::checkpoint::diffusers::default_image_size(&fixtures().join("tiny")),
        Some(1024)
    );
    assert_eq!(
        dmd2::checkpoint::diffusers::default_image_size(&common::tiny_single_file()),
        None
    );
}

#[test]
fn dtype_flag() {
    let dir = tmpdir("dtype");
    let model = common::fixtures().join("tiny");
    let run = |dtype: &str, out: &Path| {
        dmd2(&[
            "gen",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red cat",
            "--width",
            "64",
            "--height",
            "64",
            "--device",
            "cpu",
            "--seed",
            "5",
            "--dtype",
            dtype,
            "--verbose",
            "-o",
            out.to_str().unwrap(),
        ])
    };
    // f16 is a GPU precision: refused on the CPU before loading, no file written — with
    // dmd2's own kernels; under DMD2_KERNELS=candle it is the GPU's path (tests/gpu_path.rs).
    if std::env::var("DMD2_KERNELS").as_deref() != Ok("candle") {
        let o = run("f16", &dir.join("f16.png"));
        assert_bad(&o, "GPU", &dir);
    }
    // auto keeps a small model in f32; bf16 runs the bf16 path and stays close to f32.
    let (a, b, f) = (
        dir.join("auto.png"),
        dir.join("bf16.png"),
        dir.join("f32.png"),
    );
    for (d, p) in [("auto", &a), ("bf16", &b), ("f32", &f)] {
        let o = run(d, p);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "--dtype {d}: {err}");
        let want = if d == "bf16" {
            "precision: UNet bf16"
        } else {
            "precision: UNet f32"
        };
        assert!(err.contains(want), "--dtype {d}: {err}");
    }
    // The precision is recorded with the other settings.
    for (p, want) in [(&b, "bf16"), (&f, "f32")] {
        let s = dmd2::metadata::settings_from_png(p).unwrap();
        assert_eq!(s.precision.as_deref(), Some(want), "{}", p.display());
    }
    let (_, _, auto) = decode_png(&a);
    let (_, _, bf16) = decode_png(&b);
    let (_, _, f32) = decode_png(&f);
    assert_eq!(auto, f32, "auto must be f32 for a test-size model");
    let db = psnr(&bf16, &f32);
    assert!(db >= 35.0, "bf16 image {db:.1} dB from f32");
}

#[test]
fn vae_tiling_flag() {
    let dir = tmpdir("vae-tiling");
    let model = common::fixtures().join("tiny");
    let run = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "gen",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red cat",
            "--width",
            "192",
            "--height",
            "128",
            "--device",
            "cpu",
            "--seed",
            "5",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        dmd2(&args)
    };
    let o = run(
        &["--vae-tiling", "--vae-tile-size", "100"],
        &dir.join("bad.png"),
    );
    assert_bad(&o, "multiple of 64", &dir);
    let (whole, tiled) = (dir.join("whole.png"), dir.join("tiled.png"));
    assert!(run(&[], &whole).status.success());
    let o = run(&["--vae-tiling", "--vae-tile-size", "64"], &tiled);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (w, h, a) = decode_png(&whole);
    let (w2, h2, b) = decode_png(&tiled);
    assert_eq!((w, h), (192, 128));
    assert_eq!((w2, h2), (192, 128));
    // Tiles are decoded independently (see tests/vae_tiling.rs), so the random-weight
    // fixture gives a visibly different image: the flag took effect.
    assert_ne!(a, b);
}

/// `DMD2_CPU` and `DMD2_KERNELS`: every tier this CPU runs and candle's ops make the same
/// image (±1 level) and say which kernels ran; a bad value is one line and exit code 2.
#[test]
fn cpu_tier_and_kernel_switches() {
    use dmd2::kernels::{Level, Tier};
    let dir = tmpdir("tiers");
    let model = common::fixtures().join("tiny");
    let run = |env: &[(&str, &str)], out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_dmd2"))
            .args([
                "gen",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "a red cat",
                "--width",
                "64",
                "--height",
                "64",
                "--seed",
                "5",
                "--dtype",
                "f32",
                "--verbose",
                "-o",
                out.to_str().unwrap(),
            ])
            .envs(env.iter().copied())
            .output()
            .expect("run dmd2")
    };
    let reference = dir.join("native.png");
    let o = run(&[], &reference);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, _, want) = decode_png(&reference);
    let mut cases: Vec<(String, String)> = Tier::runnable()
        .into_iter()
        .map(|t| (format!("DMD2_CPU={t}"), format!("tier {t}")))
        .collect();
    cases.push(("DMD2_KERNELS=candle".into(), "CPU kernels: candle's".into()));
    for (i, (var, says)) in cases.iter().enumerate() {
        let (k, v) = var.split_once('=').unwrap();
        let out = dir.join(format!("{i}.png"));
        // The tiers are the own kernels' (whatever DMD2_KERNELS this test runs under).
        let kernels = if k == "DMD2_KERNELS" { v } else { "own" };
        let o = run(&[(k, v), ("DMD2_KERNELS", kernels)], &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{var}: {err}");
        assert!(err.contains(says), "{var}: {err}");
        let (_, _, got) = decode_png(&out);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(worst <= 1, "{var}: {worst} levels from the native run");
    }
    // Bad values: refused before any work, naming the variable.
    let mut bad = vec![
        ("DMD2_CPU", "sse9", "unknown"),
        ("DMD2_KERNELS", "fast", "unknown"),
    ];
    if let Some(l) = Level::ALL.into_iter().find(|l| Tier::new(*l).is_none()) {
        bad.push(("DMD2_CPU", l.name(), "lacks"));
    }
    for (k, v, needle) in bad {
        let out = dir.join("bad.png");
        let o = run(&[(k, v)], &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{k}={v}: {err}");
        assert!(
            err.contains(&format!("{k}={v}")) && err.contains(needle),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!out.exists());
    }
}

/// Habits from other tools: `dmd2 gen "PROMPT"` is `--prompt`; `--seed -1` draws a random
/// seed (and says it), another negative seed is refused; `DMD2_MODEL` and `DMD2_LORA`
/// (`;`-separated) stand in for `--model` and `--lora`, and flags win over them; `--version`
/// names the git revision, the features and the CPU kernels; `dmd2 man [SUBCOMMAND]` prints
/// manual pages; completions offer the preset names.
#[test]
fn cli_habits() {
    let dir = tmpdir("habits");
    let model = fixtures().join("tiny").display().to_string();
    let lora = fixtures()
        .join("lora/kohya_diffusers.safetensors")
        .display()
        .to_string();
    let out = |n: &str| dir.join(n).display().to_string();
    let run = |args: &[&str], env: &[(&str, &str)]| -> Output {
        let o = Command::new(env!("CARGO_BIN_EXE_dmd2"))
            .args(args)
            .env_remove("DMD2_MODEL")
            .env_remove("DMD2_LORA")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };
    let common = ["--width", "64", "--height", "64", "--seed", "9", "-q"];
    let mut a = vec!["gen", "--model", &model, "--prompt", "a red car", "--lora"];
    let with_lora = format!("{lora}:0.7");
    a.extend([with_lora.as_str(), "-o"]);
    let flags_png = out("flags.png");
    a.push(&flags_png);
    a.extend(common);
    run(&a, &[]);
    let env_png = out("env.png");
    let mut b = vec!["gen", "a red car", "-o", &env_png];
    b.extend(common);
    run(&b, &[("DMD2_MODEL", &model), ("DMD2_LORA", &with_lora)]);
    assert_eq!(
        decode_png(&dir.join("flags.png")),
        decode_png(&dir.join("env.png"))
    );
    // Two LoRAs from the variable, the same LoRA split in halves: the same image.
    let halves = format!("{lora}:0.35;{lora}:0.35");
    let split_png = out("split.png");
    let mut c = vec!["gen", "a red car", "-o", &split_png];
    c.extend(common);
    run(&c, &[("DMD2_MODEL", &model), ("DMD2_LORA", &halves)]);
    let (_, _, x) = decode_png(&dir.join("split.png"));
    let (_, _, y) = decode_png(&dir.join("flags.png"));
    assert!(max_level_diff(&x, &y) <= 1);
    // A flag beats the variable.
    let o = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args([
            "gen",
            "a cat",
            "--model",
            &model,
            "--no-lora",
            "-o",
            &out("x.png"),
        ])
        .args(common)
        .env("DMD2_MODEL", "/nonexistent/model")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // --seed -1: random, and said on stderr.
    let o = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args([
            "gen",
            "a cat",
            "--model",
            &model,
            "--seed",
            "-1",
            "-o",
            &out("r.png"),
        ])
        .args(["--width", "64", "--height", "64"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("seed: "), "{err}");
    let o = dmd2(&["gen", "a cat", "--model", &model, "--seed", "-2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("-1 for a random one"));
    // Completions offer the built-in preset names.
    for shell in ["bash", "zsh", "fish"] {
        let o = dmd2(&["completions", shell]);
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(script.contains("dmd2-8step-cfg"), "{shell}");
    }
    // Manual pages, from the same definitions as --help.
    let o = dmd2(&["man", "gen"]);
    let page = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        page.contains(".TH dmd2-gen 1") && page.contains("\\-\\-preview\\-vae"),
        "{page}"
    );
    let o = dmd2(&["man"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(".SH SUBCOMMANDS"));
    let o = dmd2(&["man", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    let o = dmd2(&["--version"]);
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        v.starts_with(&format!("dmd2 {} (git ", env!("CARGO_PKG_VERSION")))
            && v.contains("features: ")
            && v.contains("CPU kernels: "),
        "{v}"
    );
}
