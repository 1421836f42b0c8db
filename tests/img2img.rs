//! img2img and inpainting against diffusers (scripts/make_img2img_fixtures.py,
//! tests/fixtures/img2img/): `StableDiffusionXLImg2ImgPipeline` at two strengths with and
//! without CFG, from an image whose size is not a multiple of 8 and resized to another size,
//! and `StableDiffusionXLInpaintPipeline` with a soft grey mask at its default strength, at 1
//! (pure noise) with CFG and at 0.5 — each image within one level, from the folder and the
//! single file; PIL's Lanczos resize, grey conversion and Gaussian blur bit for bit; and `dmd2 gen
//! --init-image/--mask/--strength`, JSON lines with relative paths, stdin, the PNG's
//! record of what an image started from, and bad input.

mod common;

use common::{Source, fixtures, ids_of, max_level_diff, pipeline};
use dmd2::init_image::{Loaded, Pixels, prepare};
use dmd2::pipeline::Request;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    kind: String,
    init: String,
    mask: Option<String>,
    prompt: String,
    negative_prompt: Option<String>,
    strength: Option<f64>,
    guidance_scale: f64,
    seed: u64,
    width: usize,
    height: usize,
}

fn dir() -> PathBuf {
    fixtures().join("img2img")
}

fn cases() -> Vec<Case> {
    common::fixture_cases("img2img")
}

fn refs(name: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    common::fixture_refs("img2img", name)
}

fn bytes_of(t: &candle_core::Tensor) -> Vec<u8> {
    ids_of(t).into_iter().map(|x| x as u8).collect()
}

fn request(c: &Case) -> Request {
    let image = Loaded::read(&dir().join(&c.init)).unwrap();
    let mask = c
        .mask
        .as_ref()
        .map(|m| Loaded::read(&dir().join(m)).unwrap());
    let strength = c.strength.unwrap_or(if mask.is_some() {
        dmd2::img2img::DEFAULT_INPAINT_STRENGTH
    } else {
        dmd2::img2img::DEFAULT_STRENGTH
    });
    let init = prepare(
        &image,
        mask.as_ref(),
        c.width,
        c.height,
        strength,
        Default::default(),
    )
    .unwrap();
    Request {
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        prompt_syntax: Default::default(),
        sampler: dmd2::scheduler::SamplerSpec::dmd2(vec![999, 749, 499, 249]),
        cfg: c.guidance_scale,
        seed: c.seed,
        width: c.width,
        height: c.height,
        init: Some(init),
    }
}

#[test]
fn lanczos_and_grey_are_pils() {
    let r = refs("resize");
    let src = &r["src"];
    let (h, w, _) = src.dims3().unwrap();
    let p = Pixels {
        width: w,
        height: h,
        channels: 3,
        data: bytes_of(src),
    };
    for (k, t) in &r {
        if let Some(size) = k.strip_prefix("lanczos_") {
            let (tw, th) = size.split_once('x').unwrap();
            let got = p.resize_lanczos(tw.parse().unwrap(), th.parse().unwrap());
            assert_eq!(got.data, bytes_of(t), "{k}");
        }
    }
    let grey = p.to_grey();
    assert_eq!(grey.data, bytes_of(&r["grey"]));
    for radius in ["0.7", "2.5", "4", "30"] {
        let got = grey.gaussian_blur(radius.parse().unwrap());
        assert_eq!(
            got.data,
            bytes_of(&r[&format!("grey_blur_{radius}")]),
            "blur {radius}"
        );
    }
    assert_eq!(p.gaussian_blur(4.0).data, bytes_of(&r["rgb_blur_4"]));
    assert_eq!(
        grey.resize_lanczos(30, 30).data,
        bytes_of(&r["grey_lanczos_30x30"])
    );
}

#[test]
fn images_match_diffusers() {
    for c in cases() {
        let want = bytes_of(&refs(&c.name)["image"]);
        for src in [Source::Folder, Source::SingleFile] {
            let img = pipeline(src)
                .generate(&request(&c), &mut |_, _| {})
                .unwrap();
            assert_eq!((img.width, img.height), (c.width, c.height));
            let d = max_level_diff(&img.rgb, &want);
            assert!(d <= 1, "{} ({}) {src:?}: {d} levels off", c.name, c.kind);
        }
    }
}

fn dmd2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(args)
        .output()
        .unwrap()
}

fn rgb(p: &Path) -> Vec<u8> {
    image::open(p).unwrap().to_rgb8().into_raw()
}

fn fixture(name: &str) -> String {
    dir().join(name).display().to_string()
}

/// The CLI makes diffusers' images: img2img and inpainting from flags, inpainting from a
/// JSON line with paths relative to the prompt file, img2img from stdin; the PNG records the
/// init image's and mask's paths and pixel hashes and the strength, and `--from-png` makes
/// the same image again.
#[test]
fn gen_starts_from_images() {
    let out = common::fresh_dir("img2img", "gen");
    let model = Source::Folder.path().display().to_string();
    let cs = cases();
    let case = |n: &str| cs.iter().find(|c| c.name == n).unwrap();
    let base = |c: &Case| -> Vec<String> {
        let mut a: Vec<String> = [
            "gen",
            "--model",
            &model,
            "--prompt",
            &c.prompt,
            "--seed",
            &c.seed.to_string(),
            "--cfg",
            &c.guidance_scale.to_string(),
            "--steps",
            "4",
            "-q",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(n) = &c.negative_prompt {
            a.extend(["--negative-prompt".into(), n.clone()]);
        }
        a
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = dmd2(&refs);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o
    };
    // img2img, flags.
    let c = case("img2img_odd_size");
    let p = out.join("a.png");
    let mut a = base(c);
    a.extend([
        "--init-image".into(),
        fixture(&c.init),
        "--strength".into(),
        "0.5".into(),
    ]);
    a.extend(["-o".into(), p.display().to_string()]);
    run(a);
    assert!(max_level_diff(&rgb(&p), &bytes_of(&refs(&c.name)["image"])) <= 1);
    let s = dmd2::metadata::settings_from_png(&p).unwrap();
    assert_eq!(s.strength, Some(0.5));
    // The file's name, not this machine's path (found again beside the PNG, or given).
    assert_eq!(s.init_image.as_ref().unwrap().path, c.init);
    assert_eq!(s.init_image.as_ref().unwrap().sha256.len(), 64);
    assert_eq!((s.width, s.height), (80, 64));
    let params = dmd2::metadata::read_png_text(&p).unwrap();
    assert!(
        params
            .iter()
            .any(|(k, v)| k == "parameters" && v.contains("Denoising strength: 0.5"))
    );
    // --from-png makes it again, with the init image found beside the PNG; not there, it
    // is an error naming the PNG and the image.
    let again = out.join("again.png");
    let from_png: Vec<String> = vec![
        "gen".into(),
        "--from-png".into(),
        p.display().to_string(),
        "--model".into(),
        model.clone(),
        "-q".into(),
        "-o".into(),
        again.display().to_string(),
    ];
    let o = dmd2(&from_png.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&p.display().to_string())
            && err.contains(&c.init)
            && err.contains("--init-image"),
        "{err}"
    );
    std::fs::copy(fixture(&c.init), out.join(&c.init)).unwrap();
    run(from_png);
    assert_eq!(rgb(&again), rgb(&p));

    // Inpainting from a JSON line, paths relative to the prompt file.
    let c = case("inpaint_half");
    let jdir = out.join("job");
    std::fs::create_dir_all(&jdir).unwrap();
    for f in ["init.png", "mask.png"] {
        std::fs::copy(dir().join(f), jdir.join(f)).unwrap();
    }
    let line = serde_json::json!({
        "prompt": c.prompt, "negative_prompt": c.negative_prompt, "seed": c.seed,
        "cfg": c.guidance_scale, "init_image": "init.png", "mask": "mask.png",
        "strength": 0.5, "name": "inpaint.png",
    });
    std::fs::write(jdir.join("p.jsonl"), format!("{line}\n")).unwrap();
    run(vec![
        "gen".into(),
        "--model".into(),
        model.clone(),
        "--prompt-file".into(),
        jdir.join("p.jsonl").display().to_string(),
        "--steps".into(),
        "4".into(),
        "-q".into(),
        "--out-dir".into(),
        out.display().to_string(),
    ]);
    assert!(
        max_level_diff(
            &rgb(&out.join("inpaint.png")),
            &bytes_of(&refs(&c.name)["image"])
        ) <= 1
    );

    // img2img from stdin, at its default strength (0.3 → one step at 249).
    let p2 = out.join("stdin.png");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args([
            "gen",
            "--model",
            &model,
            "--prompt",
            "x",
            "--steps",
            "4",
            "--init-image",
            "-",
            "-q",
            "-o",
            p2.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(dir().join("init.png")).unwrap())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let s = dmd2::metadata::settings_from_png(&p2).unwrap();
    assert_eq!(
        (s.strength, s.init_image.unwrap().path.as_str()),
        (Some(0.3), "-")
    );
}

/// Bad starts are one-line errors naming the file, exit 2, nothing written.
#[test]
fn bad_starts_are_refused() {
    let out = common::fresh_dir("img2img", "bad");
    let model = Source::Folder.path().display().to_string();
    let not_image = out.join("notes.png");
    std::fs::write(&not_image, "hello").unwrap();
    let small_mask = out.join("small.png");
    image::RgbImage::new(32, 32).save(&small_mask).unwrap();
    let init = fixture("init.png");
    let wide = out.join("wide.png");
    image::RgbImage::new(4104, 8).save(&wide).unwrap();
    let target = out.join("o.png");
    let t = target.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--init-image", not_image.to_str().unwrap()],
            "notes.png",
        ),
        (vec!["--init-image", "/no/such.png"], "/no/such.png"),
        (
            vec![
                "--init-image",
                &init,
                "--mask",
                small_mask.to_str().unwrap(),
            ],
            "small.png",
        ),
        (
            vec!["--init-image", &init, "--strength", "0.1"],
            "at least 0.25",
        ),
        (vec!["--init-image", &init, "--strength", "1.5"], "(0, 1]"),
        (vec!["--mask", &init], "--init-image"),
        (
            vec!["--init-image", wide.to_str().unwrap()],
            "outside 64..4096",
        ),
    ] {
        let mut all = vec![
            "gen", "--model", &model, "--prompt", "x", "--steps", "4", "-o", t,
        ];
        all.extend(args.iter().copied());
        let o = dmd2(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!target.exists(), "{args:?}");
    }
}

/// The hires fix is txt2img → Lanczos upscale → img2img, exactly: the same pixels as those
/// three steps run by hand with the same seed; latent upscaling makes its own image; the
/// PNG carries A1111's hires fields and `--from-png` makes the image again.
#[test]
fn hires_fix_is_txt2img_upscale_img2img() {
    let out = common::fresh_dir("img2img", "hires");
    let model = Source::Folder.path().display().to_string();
    let p = |n: &str| out.join(n).display().to_string();
    let common_args = |extra: &[&str], o: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "gen",
            "--model",
            &model,
            "--prompt",
            "a lighthouse",
            "--seed",
            "31",
            "--steps",
            "4",
            "-q",
            "-o",
            o,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = dmd2(&refs);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(common_args(
        &["--width", "64", "--height", "64", "--hires-scale", "1.5"],
        &p("hires.png"),
    ));
    run(common_args(
        &["--width", "64", "--height", "64"],
        &p("first.png"),
    ));
    run(common_args(
        &[
            "--init-image",
            &p("first.png"),
            "--width",
            "96",
            "--height",
            "96",
            "--strength",
            "0.5",
        ],
        &p("by_hand.png"),
    ));
    let hires = image::open(out.join("hires.png")).unwrap().to_rgb8();
    assert_eq!(hires.dimensions(), (96, 96));
    assert_eq!(hires.into_raw(), rgb(&out.join("by_hand.png")));
    let text = dmd2::metadata::read_png_text(&out.join("hires.png")).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    for f in [
        "Size: 64x64",
        "Hires upscale: 1.5",
        "Hires steps: 4",
        "Hires upscaler: Lanczos",
        "Denoising strength: 0.5",
    ] {
        assert!(params.contains(f), "{f}: {params}");
    }
    run(vec![
        "gen".into(),
        "--from-png".into(),
        p("hires.png"),
        "--model".into(),
        model.clone(),
        "-q".into(),
        "-o".into(),
        p("again.png"),
    ]);
    assert_eq!(rgb(&out.join("again.png")), rgb(&out.join("hires.png")));
    run(common_args(
        &[
            "--width",
            "64",
            "--height",
            "64",
            "--hires-scale",
            "2",
            "--hires-upscale",
            "latent",
        ],
        &p("latent.png"),
    ));
    let latent = image::open(out.join("latent.png")).unwrap().to_rgb8();
    assert_eq!(latent.dimensions(), (128, 128));
    // A strength that keeps no step of the hires pass is refused before any work.
    let o = dmd2(
        &common_args(
            &["--hires-scale", "2", "--hires-strength", "0.1"],
            &p("no.png"),
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.join("no.png").exists());
}

#[test]
fn latent_upscaling_is_torchs() {
    use candle_core::{Device, Tensor};
    let x = Tensor::from_vec(vec![0f32, 1.0, 2.0, 3.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
    let n = dmd2::img2img::upscale_latents(&x, 4, 4, false).unwrap();
    assert_eq!(
        n.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [
            0., 0., 1., 1., 0., 0., 1., 1., 2., 2., 3., 3., 2., 2., 3., 3.
        ]
    );
    // torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    let b = dmd2::img2img::upscale_latents(&x, 4, 4, true).unwrap();
    let want = [
        0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
    ];
    assert_eq!(b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
}

/// `--mask-blur` and `--paste-back`: where the blurred mask is black the init image's pixels
/// come back exactly, where it is white the new image's; the PNG records both settings.
#[test]
fn paste_back_keeps_the_unmasked_pixels() {
    let out = common::fresh_dir("img2img", "paste");
    let model = Source::Folder.path().display().to_string();
    let (init, mask) = (fixture("init.png"), fixture("mask.png"));
    let run = |extra: &[&str], o: &Path| {
        let mut a = vec![
            "gen",
            "--model",
            &model,
            "--prompt",
            "a dog",
            "--seed",
            "3",
            "--steps",
            "4",
            "--init-image",
            &init,
            "--mask",
            &mask,
            "-q",
            "-o",
            o.to_str().unwrap(),
        ];
        a.extend(extra);
        let r = dmd2(&a);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    };
    let (plain, pasted) = (out.join("plain.png"), out.join("pasted.png"));
    run(&[], &plain);
    run(&["--mask-blur", "3", "--paste-back"], &pasted);
    let grey = Loaded::read(Path::new(&mask))
        .unwrap()
        .pixels
        .to_grey()
        .gaussian_blur(3.0);
    let (orig, a, b) = (rgb(Path::new(&init)), rgb(&plain), rgb(&pasted));
    let (mut kept, mut differs) = (0, 0);
    for (i, &m) in grey.data.iter().enumerate() {
        for c in 0..3 {
            if m == 0 {
                assert_eq!(b[i * 3 + c], orig[i * 3 + c], "pixel {i}");
                kept += 1;
            }
            differs += (a[i * 3 + c] != orig[i * 3 + c]) as usize;
        }
    }
    assert!(kept > 1000 && differs > 1000, "{kept} {differs}");
    let s = dmd2::metadata::settings_from_png(&pasted).unwrap();
    assert_eq!((s.mask_blur, s.paste_back), (Some(3.0), true));
}
