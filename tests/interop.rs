//! PNG metadata as other tools read it: the `parameters` text uses A1111's spellings
//! (`Sampler: LCM`, `Schedule type: Simple`, `RNG: CPU`, `<lora:NAME:W>` in the prompt,
//! `Lora hashes` with Civitai's AutoV3 of each LoRA, `Model hash` of a single-file model),
//! and `--from-png` says what it cannot apply from another tool's text (LoRA tags, other
//! samplers, clip skip), reads seeds as whole numbers, and warns when the text was edited
//! after the exact settings were stored. `-o x.jpg` / `x.webp` write JPEG and lossless WebP
//! with the parameters in EXIF UserComment exactly as A1111 writes them (the bytes piexif
//! makes, `scripts/make_exif_fixture.py`), which `--from-png` reads back; an unknown
//! extension is refused before any work.

mod common;

use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Output};

fn dmd2(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parameters(p: &Path) -> String {
    dmd2::metadata::read_png_text(p)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .unwrap()
        .1
}

#[test]
fn parameters_name_resources_as_a1111_and_civitai() {
    let dir = common::fresh_dir("interop", "names");
    let cache = dir.join("cache");
    let model = common::tiny_single_file();
    let lora = common::fixtures().join("lora/kohya_ldm.safetensors");
    let out = dir.join("o.png");
    let o = dmd2(
        &[
            "gen",
            "--model",
            model.to_str().unwrap(),
            "--lora",
            &format!("{}:0.7", lora.display()),
            "--prompt",
            "a cat",
            "--steps",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "5",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = parameters(&out);
    let bytes = std::fs::read(&lora).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let autov3 = hex(&Sha256::digest(&bytes[8 + n..]))[..12].to_string();
    let model_hash = hex(&Sha256::digest(std::fs::read(&model).unwrap()))[..10].to_string();
    assert!(text.starts_with("a cat <lora:kohya_ldm:0.7>\n"), "{text}");
    for f in [
        "Sampler: LCM".to_string(),
        "Schedule type: Simple".into(),
        format!("Model hash: {model_hash}"),
        format!("Lora hashes: \"kohya_ldm: {autov3}\""),
        "RNG: CPU".into(),
    ] {
        assert!(text.contains(&f), "{f}: {text}");
    }
    // The hashes were cached: a second run finds them there.
    assert!(cache.join("dmd2/hashes.json").exists());
    // The exact settings are what --from-png reads; the text's LoRA tag is not a prompt word.
    let s = dmd2::metadata::settings_from_png(&out).unwrap();
    assert_eq!(s.prompt, "a cat");
    assert_eq!(s.loras[0].hash.as_deref(), Some(autov3.as_str()));
}

/// An RGB PNG with a `parameters` tEXt chunk (as A1111 writes it) and, optionally, a
/// `dmd2` iTXt chunk.
fn write_png(path: &Path, rgb: &[u8], size: u32, parameters: &str, dmd2_json: Option<String>) {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, size, size);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_text_chunk("parameters".into(), parameters.into())
            .unwrap();
        if let Some(j) = dmd2_json {
            enc.add_itxt_chunk("dmd2".into(), j).unwrap();
        }
        let mut w = enc.write_header().unwrap();
        w.write_image_data(rgb).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(path, buf).unwrap();
}

fn png_with_parameters(path: &Path, text: &str) {
    write_png(path, &[0u8; 3 * 8 * 8], 8, text, None);
}

#[test]
fn from_png_says_what_it_cannot_apply() {
    let dir = common::fresh_dir("interop", "from_png");
    let p = dir.join("a1111.png");
    png_with_parameters(
        &p,
        "masterpiece, <lora:detail:0.6> a fox\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123456789012345678, Size: 64x64, Clip skip: 2, ENSD: 31337, Model: sd_xl_base_1.0, RNG: NV, Face restoration: CodeFormer, Version: v1.10.1",
    );
    let (s, warnings) = dmd2::metadata::read_png_settings(&p).unwrap();
    assert_eq!(s.seed, 123456789012345678);
    assert_eq!(s.prompt, "masterpiece,  a fox");
    // Every key that is not applied or not known, in one warning.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    for w in [
        "DPM++ 2M",
        "Karras",
        "Clip skip 2",
        "RNG \"NV\"",
        "unknown to dmd2: ENSD, Face restoration",
    ] {
        assert!(warnings[0].contains(w), "{w}: {warnings:?}");
    }
    // The LoRA tag is kept as a name for `gen` to look up (--lora-dir).
    assert_eq!(
        s.loras,
        [dmd2::metadata::LoraRef {
            path: "detail".into(),
            weight: 0.6,
            hash: None
        }]
    );
    // A seed that is not a whole number is an error, not a rounded or clamped number.
    png_with_parameters(&p, "x\nSteps: 4, Seed: -5, Size: 64x64");
    let e = dmd2::metadata::read_png_settings(&p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Seed"), "{e}");

    // An image whose text was edited after it was made: the exact settings win, with a word.
    let model = common::Source::Folder.path();
    let made = dir.join("made.png");
    let o = dmd2(
        &[
            "gen",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "5",
            "-q",
            "-o",
            made.to_str().unwrap(),
        ],
        &dir.join("cache"),
    );
    assert!(o.status.success());
    let exact = dmd2::metadata::read_png_text(&made)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "dmd2")
        .unwrap()
        .1;
    let img = image::open(&made).unwrap().to_rgb8();
    write_png(
        &made,
        img.as_raw(),
        64,
        "a dog\nSteps: 1, Sampler: LCM, Seed: 5, Size: 64x64",
        Some(exact.clone()),
    );
    let (s, warnings) = dmd2::metadata::read_png_settings(&made).unwrap();
    assert_eq!(s.prompt, "a dog");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("edited") && warnings[0].contains("in prompt ("),
        "{warnings:?}"
    );
    // Where they agree, the exact settings stand (the text has no CFG, spacing, precision).
    assert_eq!(s.seed, 5);
    assert_eq!(s.precision.as_deref(), Some("f32"));
    // Several edits are named together; the unedited text changes nothing.
    write_png(
        &made,
        img.as_raw(),
        64,
        "a dog <lora:detail:0.5>\nNegative prompt: ugly\nSteps: 2, Sampler: LCM, Seed: 6, Size: 64x64",
        Some(exact.clone()),
    );
    let (s, warnings) = dmd2::metadata::read_png_settings(&made).unwrap();
    for f in ["prompt", "negative prompt", "seed", "steps", "LoRAs"] {
        assert!(warnings[0].contains(f), "{f}: {warnings:?}");
    }
    assert_eq!(
        (s.seed, s.sampler.steps, s.sampler.timesteps.as_ref()),
        (6, 2, None)
    );
    assert_eq!(s.negative_prompt.as_deref(), Some("ugly"));
    assert_eq!(s.loras[0].path, "detail");
    let exact_settings: dmd2::metadata::ImageSettings = serde_json::from_str(&exact).unwrap();
    write_png(
        &made,
        img.as_raw(),
        64,
        &exact_settings.a1111(),
        Some(exact),
    );
    let (s, warnings) = dmd2::metadata::read_png_settings(&made).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(s, exact_settings);
}

/// The EXIF block is piexif's, byte for byte, and reads back as the text.
#[test]
fn exif_is_a1111s() {
    let dir = common::fixtures().join("exif");
    let text = std::fs::read_to_string(dir.join("user_comment.txt")).unwrap();
    let piexif = std::fs::read(dir.join("user_comment.exif")).unwrap();
    let ours = dmd2::output::exif_user_comment(&text);
    assert_eq!(piexif.strip_prefix(b"Exif\0\0").unwrap(), &ours[..]);
    assert_eq!(
        dmd2::output::read_exif_user_comment(&piexif).as_deref(),
        Some(text.as_str())
    );
    assert_eq!(dmd2::output::read_exif_user_comment(b"MM\0\x2a\0\0"), None);
}

fn exif_of(p: &Path) -> String {
    use image::ImageDecoder;
    let bytes = std::io::Cursor::new(std::fs::read(p).unwrap());
    let exif = if p.extension().unwrap() == "webp" {
        image::codecs::webp::WebPDecoder::new(bytes)
            .unwrap()
            .exif_metadata()
    } else {
        image::codecs::jpeg::JpegDecoder::new(bytes)
            .unwrap()
            .exif_metadata()
    }
    .unwrap()
    .expect("an EXIF block");
    dmd2::output::read_exif_user_comment(&exif).expect("a UserComment")
}

/// JPEG (`--quality`) and lossless WebP from the extension, in any case and from name
/// templates; the parameters in EXIF; `--from-png` on a JPEG makes the PNG's image; `.bmp`
/// is refused with one line and no file.
#[test]
fn jpeg_and_webp_outputs() {
    let dir = common::fresh_dir("interop", "formats");
    let cache = dir.join("cache");
    let model = common::fixtures().join("tiny").display().to_string();
    let make = |out: &str, extra: &[&str]| -> Output {
        let mut args = vec![
            "gen",
            "--model",
            &model,
            "--prompt",
            "a cat, ünïcode",
            "--seed",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "-q",
        ];
        args.extend_from_slice(extra);
        if !out.is_empty() {
            args.extend(["-o", out]);
        }
        dmd2(&args, &cache)
    };
    let path = |n: &str| dir.join(n).display().to_string();
    for n in ["a.png", "a.jpg", "a.webp", "b.JPEG"] {
        let o = make(&path(n), &[]);
        assert!(
            o.status.success(),
            "{n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let rgb = |n: &str| image::open(dir.join(n)).unwrap().to_rgb8().into_raw();
    let png = rgb("a.png");
    assert_eq!(rgb("a.webp"), png, "WebP is lossless");
    let jpeg = rgb("a.jpg");
    assert_eq!(jpeg.len(), png.len());
    assert!(common::psnr(&jpeg, &png) > 30.0);
    assert_eq!(
        image::ImageFormat::from_path(dir.join("b.JPEG")).unwrap(),
        image::ImageFormat::Jpeg
    );
    let want = parameters(&dir.join("a.png"));
    for n in ["a.jpg", "a.webp"] {
        assert_eq!(exif_of(&dir.join(n)), want, "{n}");
        assert_eq!(
            image::guess_format(&std::fs::read(dir.join(n)).unwrap()).unwrap(),
            image::ImageFormat::from_path(dir.join(n)).unwrap()
        );
    }
    // A lower quality, a smaller file.
    let o = make(&path("q50.jpg"), &["--quality", "50"]);
    assert!(o.status.success());
    let size = |n: &str| std::fs::metadata(dir.join(n)).unwrap().len();
    assert!(size("q50.jpg") < size("a.jpg"));
    // Back from the JPEG's parameters (A1111 names the model; --model gives its path).
    let o = dmd2(
        &[
            "gen",
            "--from-png",
            &path("a.jpg"),
            "--model",
            &model,
            "-q",
            "-o",
            &path("again.png"),
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rgb("again.png"), png);
    // Name templates pick the format too.
    let o = make("", &["--out-dir", &path("dir"), "--name", "{seed}.webp"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rgb("dir/3.webp"), png);
    let o = make(&path("x.bmp"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("x.bmp") && err.contains(".bmp"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);
    assert!(!dir.join("x.bmp").exists());
}

/// The image the `--from-png` lookups must make again: "a red car", seed 9, 64², `extra`.
fn make_red_car(model: &str, extra: &[&str], out: &str, cache: &Path) {
    let mut args = vec![
        "gen",
        "--model",
        model,
        "--prompt",
        "a red car",
        "--seed",
        "9",
        "--width",
        "64",
        "--height",
        "64",
        "-q",
        "-o",
        out,
    ];
    args.extend_from_slice(extra);
    let o = dmd2(&args, cache);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `--from-png` with `--lora-dir`: A1111's `<lora:NAME:W>` tags are found by file name, or
/// by their `Lora hashes` entry (AutoV3) under another name in a subdirectory; the image is
/// the one `--lora FILE:W` makes. Without `--lora-dir` the tag is reported and left out.
#[test]
fn from_png_finds_loras_in_a_dir() {
    let dir = common::fresh_dir("interop", "lora_dir");
    let cache = dir.join("cache");
    let model = common::fixtures().join("tiny").display().to_string();
    let lora = common::fixtures().join("lora/peft.safetensors");
    let hash = dmd2::hashes::lora_hash(&lora).unwrap();
    let by_name = dir.join("by-name");
    std::fs::create_dir_all(&by_name).unwrap();
    std::fs::copy(&lora, by_name.join("mylora.safetensors")).unwrap();
    let by_hash = dir.join("by-hash/sub");
    std::fs::create_dir_all(&by_hash).unwrap();
    std::fs::copy(&lora, by_hash.join("renamed.safetensors")).unwrap();
    let p = dir.join("a1111.png");
    png_with_parameters(
        &p,
        &format!(
            "a red car <lora:mylora:0.7>\nSteps: 4, Sampler: LCM, Schedule type: Simple, CFG scale: 1, Seed: 9, Size: 64x64, Lora hashes: \"mylora: {hash}\", Model: tiny"
        ),
    );
    let out = |n: &str| dir.join(n).display().to_string();
    let lora_arg = format!("{}:0.7", lora.display());
    make_red_car(&model, &["--lora", &lora_arg], &out("want.png"), &cache);
    let rgb = |n: &str| image::open(dir.join(n)).unwrap().to_rgb8().into_raw();
    for (sub, name) in [("by-name", "a.png"), ("by-hash", "b.png")] {
        let o = dmd2(
            &[
                "gen",
                "--from-png",
                p.to_str().unwrap(),
                "--model",
                &model,
                "--lora-dir",
                &out(sub),
                "-q",
                "-o",
                &out(name),
            ],
            &cache,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(!err.contains("not loaded"), "{sub}: {err}");
        assert_eq!(rgb(name), rgb("want.png"), "{sub}");
    }
    let o = dmd2(
        &[
            "gen",
            "--from-png",
            p.to_str().unwrap(),
            "--model",
            &model,
            "-o",
            &out("c.png"),
        ],
        &cache,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("mylora:0.7") && err.contains("--lora-dir"),
        "{err}"
    );
}

/// `--from-png --model-dir DIR`: an A1111 image's `Model: NAME` is found as NAME.safetensors
/// in DIR or below, else by its `Model hash` (A1111's: 10 hex of the file's sha256) under
/// another name; the image is the one `--model FILE` makes. Not found, it is a one-line
/// error naming the PNG, the model and its hash (exit 2, no file); `DMD2_MODEL_DIR` stands
/// for the flag.
#[test]
fn from_png_finds_the_model_by_name_or_hash() {
    let dir = common::fresh_dir("interop", "model_dir");
    let cache = dir.join("cache");
    let model = common::tiny_single_file();
    let hash = dmd2::hashes::model_hash(&model).unwrap();
    let link = |sub: &str, name: &str| {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(&model, d.join(name)).unwrap();
    };
    link("by-name/SDXL", "my_sdxl.safetensors");
    link("by-hash/SDXL", "renamed.safetensors");
    let p = dir.join("a1111.png");
    png_with_parameters(
        &p,
        &format!(
            "a red car\nNegative prompt: \nSteps: 4, Sampler: LCM, Schedule type: Simple, CFG scale: 1, Seed: 9, Size: 64x64, Model hash: {hash}, Model: my_sdxl"
        ),
    );
    let out = |n: &str| dir.join(n).display().to_string();
    make_red_car(model.to_str().unwrap(), &[], &out("want.png"), &cache);
    let rgb = |n: &str| image::open(dir.join(n)).unwrap().to_rgb8().into_raw();
    for (sub, name) in [("by-name", "a.png"), ("by-hash", "b.png")] {
        let o = dmd2(
            &[
                "gen",
                "--from-png",
                p.to_str().unwrap(),
                "--model-dir",
                &out(sub),
                "-o",
                &out(name),
            ],
            &cache,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{sub}: {err}");
        assert_eq!(rgb(name), rgb("want.png"), "{sub}");
        assert_eq!(err.contains("looking for hash"), sub == "by-hash", "{err}");
    }
    // The environment's directory.
    let o = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args([
            "gen",
            "--from-png",
            p.to_str().unwrap(),
            "-q",
            "-o",
            &out("c.png"),
        ])
        .env("XDG_CACHE_HOME", &cache)
        .env("DMD2_MODEL_DIR", dir.join("by-hash"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rgb("c.png"), rgb("want.png"));
    // Not found: with and without --model-dir.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let d_png = dir.join("d.png");
    for extra in [vec![], vec!["--model-dir", empty.to_str().unwrap()]] {
        let mut args = vec!["gen", "--from-png", p.to_str().unwrap()];
        args.extend(extra.iter().copied());
        args.extend(["-o", d_png.to_str().unwrap()]);
        let o = dmd2(&args, &cache);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        for w in [p.to_str().unwrap(), "\"my_sdxl\"", hash.as_str(), "--model"] {
            assert!(err.contains(w), "{w}: {err}");
        }
        assert!(!dir.join("d.png").exists());
    }
    // A text without `Model:`: a preset's model fills it in.
    let bare = dir.join("bare.png");
    png_with_parameters(
        &bare,
        "a red car\nSteps: 4, Sampler: LCM, CFG scale: 1, Seed: 9, Size: 64x64",
    );
    let preset = dir.join("mine.toml");
    std::fs::write(
        &preset,
        format!("model = {:?}\n", model.display().to_string()),
    )
    .unwrap();
    let o = dmd2(
        &[
            "gen",
            "--from-png",
            bare.to_str().unwrap(),
            "--preset",
            preset.to_str().unwrap(),
            "-q",
            "-o",
            &out("e.png"),
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rgb("e.png"), rgb("want.png"));
}

/// What a shared image carries: names and hashes, never this machine's directories (the
/// `dmd2` chunk and the text); always a `Negative prompt:` line (empty when there is none,
/// read back as none); `--no-hash` leaves the hashes out; `--json` lines keep the paths as
/// given.
#[test]
fn shared_images_name_files_not_paths() {
    let dir = common::fresh_dir("interop", "shared");
    let cache = dir.join("cache");
    let model = common::tiny_single_file();
    let lora = common::fixtures().join("lora/peft.safetensors");
    let run = |extra: &[&str], name: &str| {
        let mut args = vec![
            "gen",
            "--model",
            model.to_str().unwrap(),
            "--lora",
            lora.to_str().unwrap(),
            "a cat",
            "--steps",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--json",
            "-q",
            "-o",
        ];
        let out = dir.join(name);
        let out = out.to_str().unwrap().to_string();
        args.push(&out);
        args.extend_from_slice(extra);
        let o = dmd2(&args, &cache);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        (
            dmd2::metadata::read_png_text(Path::new(&out)).unwrap(),
            line,
        )
    };
    let (chunks, line) = run(&[], "a.png");
    let fixtures = common::fixtures().display().to_string();
    for (k, v) in &chunks {
        assert!(!v.contains(&fixtures), "{k}: {v}");
    }
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("\nNegative prompt: \n"), "{params}");
    assert!(
        params.contains("Model hash: ") && params.contains("Lora hashes: "),
        "{params}"
    );
    let s = dmd2::metadata::settings_from_png(&dir.join("a.png")).unwrap();
    assert_eq!(s.model, model.file_name().unwrap().to_str().unwrap());
    assert_eq!(s.loras[0].path, "peft.safetensors");
    assert_eq!(s.negative_prompt, None);
    assert_eq!(
        dmd2::metadata::parse_a1111(params)
            .unwrap()
            .negative_prompt
            .as_deref(),
        Some("")
    );
    // --json: this machine's paths, as given.
    assert_eq!(line["model"], model.to_str().unwrap());
    assert_eq!(line["loras"][0]["path"], lora.to_str().unwrap());
    // --no-hash.
    let (chunks, _) = run(&["--no-hash"], "b.png");
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(!params.contains("hash"), "{params}");
    let s = dmd2::metadata::settings_from_png(&dir.join("b.png")).unwrap();
    assert_eq!((s.model_hash, s.loras[0].hash.clone()), (None, None));
}

/// The real `sd-parsers` reads dmd2's text as A1111's: what it read from two PNGs dmd2 wrote
/// (`scripts/make_sd_parsers_fixture.py`, run by hand) is the generator, sampler, schedule,
/// model name and hash, prompts and negative prompts dmd2 meant; and dmd2 still writes those
/// very texts from the same arguments (the Version field aside).
#[test]
fn sd_parsers_reads_our_text() {
    let dir = common::fresh_dir("interop", "sd_parsers");
    let fixture = common::fixtures().join("sd_parsers/cases.json");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let without_version = |t: &str| t.split(", Version: ").next().unwrap().to_string();
    for (name, case) in all["cases"].as_object().unwrap() {
        let tiny = common::tiny_single_file();
        let args: Vec<String> = serde_json::from_value::<Vec<String>>(case["args"].clone())
            .unwrap()
            .into_iter()
            .map(|a| match a.as_str() {
                "TINY_SINGLE_FILE" => tiny.display().to_string(),
                _ => a,
            })
            .collect();
        let out = dir.join(format!("{name}.png"));
        let o = Command::new(env!("CARGO_BIN_EXE_dmd2"))
            .args(&args)
            .args(["-o", out.to_str().unwrap()])
            .current_dir(root)
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ours = parameters(&out);
        let theirs = case["parameters"].as_str().unwrap();
        assert_eq!(without_version(&ours), without_version(theirs), "{name}");
        // What sd-parsers understood of it.
        assert_eq!(case["generator"], "AUTOMATIC1111", "{name}");
        assert_eq!(case["sampler"], "LCM", "{name}");
        assert_eq!(case["sampler_parameters"]["scheduler"], "Simple", "{name}");
        let hash = dmd2::hashes::model_hash(&tiny).unwrap();
        assert_eq!(case["model"]["name"], "tiny", "{name}");
        assert_eq!(case["model"]["hash"], hash.as_str(), "{name}");
        let s = dmd2::metadata::settings_from_png(&out).unwrap();
        assert_eq!(
            case["sampler_parameters"]["seed"],
            s.seed.to_string(),
            "{name}"
        );
        let prompt = case["prompts"][0].as_str().unwrap();
        assert_eq!(
            dmd2::metadata::strip_lora_tags(prompt).0,
            s.prompt,
            "{name}"
        );
        let negatives: Vec<String> =
            serde_json::from_value(case["negative_prompts"].clone()).unwrap();
        assert_eq!(negatives.first().cloned(), s.negative_prompt, "{name}");
    }
}

/// A PNG exactly as A1111 saves one (`scripts/make_a1111_png_fixture.py`: PIL's text chunk,
/// A1111's key order, a hires txt2img with a LoRA, a VAE, an embedding, clip skip): every
/// field is accounted for — applied (prompt without the LoRA tag, negative prompt, steps, CFG,
/// seed beyond 2^32, size, model name and hash, the LoRA with its hash, the hires pass) or
/// named, all in one warning, with why (sampler, schedule, VAE, clip skip, upscaler,
/// embeddings, emphasis).
#[test]
fn an_a1111_png_is_read_field_by_field() {
    let png = common::fixtures().join("a1111_png/hires_lora.png");
    let (s, warnings) = dmd2::metadata::read_png_settings(&png).unwrap();
    assert_eq!(
        s.prompt,
        "masterpiece, a (red:1.2) fox in snow, 雪,  [blurry]"
    );
    assert_eq!(s.negative_prompt.as_deref(), Some("easynegative, lowres"));
    assert_eq!(s.prompt_syntax, dmd2::prompt_syntax::PromptSyntax::A1111);
    assert_eq!(
        (s.sampler.steps, s.cfg, s.seed, s.width, s.height),
        (20, 7.0, 1234567890123, 832, 1216)
    );
    assert_eq!(
        (s.model.as_str(), s.model_hash.as_deref()),
        ("sd_xl_base_1.0", Some("31e35c80fc"))
    );
    assert_eq!(
        s.loras,
        [dmd2::metadata::LoraRef {
            path: "detail_tweaker".into(),
            weight: 0.8,
            hash: Some("1a2b3c4d5e6f".into())
        }]
    );
    let h = s.hires.expect("the hires pass");
    assert_eq!((h.scale, h.steps, h.strength), (1.5, 10, 0.4));
    assert_eq!(s.strength, None);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    for w in [
        "Sampler \"DPM++ 2M\"",
        "Schedule type \"Karras\"",
        "VAE \"sdxl_vae.safetensors\"",
        "Clip skip 2",
        "Hires upscaler \"R-ESRGAN 4x+\"",
        "TI hashes",
        "Emphasis \"No norm\"",
    ] {
        assert!(warnings[0].contains(w), "{w}: {warnings:?}");
    }
    assert!(!warnings[0].contains("unknown"), "{warnings:?}");
}
