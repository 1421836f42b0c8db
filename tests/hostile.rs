//! Hostile and broken input files: each gives one `error:` line naming the file and the
//! problem, exit code 2, no panic, and no file appears in (or disappears from) the output
//! directory. Every bad file is made by the test itself from the fixtures.

mod common;

use common::fixtures;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh directory whose `out/` already holds an image finished earlier (which no failure
/// may touch).
fn tmpdir(name: &str) -> PathBuf {
    let d = common::fresh_dir("hostile", name);
    std::fs::create_dir_all(d.join("out")).unwrap();
    std::fs::write(d.join("out/keep.png"), b"finished earlier").unwrap();
    d
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn run_gen(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
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
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(&args)
        .output()
        .unwrap()
}

/// The checks every bad-input case shares.
fn assert_refused(
    o: &Output,
    file: &Path,
    problem: &str,
    out_dir: &Path,
    before: &BTreeSet<String>,
) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "exit code: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&file.display().to_string()),
        "names the file: {err}"
    );
    assert!(lines[0].contains(problem), "says {problem:?}: {err}");
    assert_eq!(&listing(out_dir), before, "output directory changed");
}

/// Rewrite a safetensors file: `edit` gets the header JSON and the data.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>)) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(dst, out).unwrap();
}

fn case(name: &str, make: impl FnOnce(&Path), problem: &str) {
    let d = tmpdir(name);
    let bad = d.join(format!("{name}.safetensors"));
    make(&bad);
    let out_dir = d.join("out");
    let before = listing(&out_dir);
    let o = run_gen(&bad, &out_dir.join("new.png"), &[]);
    assert_refused(&o, &bad, problem, &out_dir, &before);
    let _ = std::fs::remove_dir_all(&d);
}

fn tiny() -> PathBuf {
    common::tiny_single_file()
}

#[test]
fn wrong_magic() {
    case(
        "magic",
        |p| std::fs::write(p, [0xffu8; 4096]).unwrap(),
        "not a safetensors file",
    );
}

#[test]
fn empty_file() {
    case(
        "empty",
        |p| std::fs::write(p, b"").unwrap(),
        "not a safetensors file",
    );
}

#[test]
fn header_longer_than_file() {
    case(
        "longheader",
        |p| {
            let mut b = 1_000_000u64.to_le_bytes().to_vec();
            b.extend(b"{}");
            std::fs::write(p, b).unwrap();
        },
        "header length does not fit",
    );
}

#[test]
fn truncated_data() {
    case(
        "trunc",
        |p| {
            let b = std::fs::read(tiny()).unwrap();
            std::fs::write(p, &b[..b.len() - 1000]).unwrap();
        },
        "truncated",
    );
}

#[test]
fn offsets_out_of_range() {
    case(
        "offsets",
        |p| {
            rewrite(&tiny(), p, |h, _| {
                let k = "model.diffusion_model.input_blocks.0.0.weight";
                h[k]["data_offsets"][1] = serde_json::json!(u64::MAX / 2);
            })
        },
        "truncated or corrupt",
    );
}

#[test]
fn unsupported_dtype() {
    case(
        "dtype",
        |p| {
            rewrite(&tiny(), p, |h, _| {
                h["model.diffusion_model.input_blocks.0.0.bias"]["dtype"] =
                    serde_json::json!("F8_E5M2FNUZ")
            })
        },
        "dtype F8_E5M2FNUZ",
    );
}

#[test]
fn duplicate_key() {
    case(
        "dup",
        |p| {
            // serde_json cannot write duplicates: splice one into the header text.
            let bytes = std::fs::read(tiny()).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let h = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
            let key = "\"model.diffusion_model.input_blocks.0.0.bias\"";
            let start = h.find(key).unwrap();
            let end = start + h[start..].find('}').unwrap() + 1;
            let entry = h[start..end].to_string();
            let h2 = format!("{{{entry},{}", &h[1..]);
            let mut out = (h2.len() as u64).to_le_bytes().to_vec();
            out.extend(h2.as_bytes());
            out.extend(&bytes[8 + n..]);
            std::fs::write(p, out).unwrap();
        },
        "appears twice",
    );
}

#[test]
fn missing_key() {
    case(
        "missing",
        |p| {
            let mut ts = candle_core::safetensors::load(tiny(), &candle_core::Device::Cpu).unwrap();
            ts.remove("model.diffusion_model.out.2.weight");
            candle_core::safetensors::save(&ts, p).unwrap();
        },
        "model.diffusion_model.out.2.weight",
    );
}

#[test]
fn sd15_and_flux_checkpoints() {
    for (name, keys, says) in [
        (
            "sd15",
            vec![
                "model.diffusion_model.input_blocks.0.0.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            ],
            "SD",
        ),
        (
            "flux",
            vec![
                "double_blocks.0.img_attn.qkv.weight",
                "single_blocks.0.linear1.weight",
            ],
            "Flux",
        ),
    ] {
        case(
            name,
            |p| {
                let mut ts = std::collections::HashMap::new();
                for k in keys {
                    ts.insert(
                        k.to_string(),
                        candle_core::Tensor::zeros(
                            (2, 2),
                            candle_core::DType::F16,
                            &candle_core::Device::Cpu,
                        )
                        .unwrap(),
                    );
                }
                candle_core::safetensors::save(&ts, p).unwrap();
            },
            says,
        );
    }
}

#[test]
fn nan_weights_warn_and_strict_refuses() {
    let d = tmpdir("nan");
    let bad = d.join("nan.safetensors");
    // Overwrite the UNet's conv_in bias (f16) with NaNs.
    rewrite(&tiny(), &bad, |h, data| {
        let o = &h["model.diffusion_model.input_blocks.0.0.bias"]["data_offsets"];
        let (a, b) = (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        );
        for c in data[a..b].chunks_mut(2) {
            c.copy_from_slice(&0x7e00u16.to_le_bytes());
        }
    });
    let out_dir = d.join("out");
    let before = listing(&out_dir);
    let o = run_gen(&bad, &out_dir.join("new.png"), &["--strict"]);
    assert_refused(&o, &bad, "NaN or Inf", &out_dir, &before);
    // Without --strict: a warning, then the sampler notices the NaN latents at step 1.
    let o = run_gen(&bad, &out_dir.join("new.png"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning:") && err.contains("NaN or Inf"),
        "{err}"
    );
    assert!(err.contains("step 1 of 4"), "{err}");
    assert!(!o.status.success());
    assert_eq!(listing(&out_dir), before, "no image written");
}

#[test]
fn unwritable_output_keeps_finished_images() {
    let d = tmpdir("unwritable");
    // The output directory's parent is a regular file: it can never be created.
    let blocker = d.join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let o = run_gen(&fixtures().join("tiny"), &blocker.join("sub/new.png"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("cannot create the output directory") || err.contains("cannot write"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    assert_eq!(
        std::fs::read(d.join("out/keep.png")).unwrap(),
        b"finished earlier"
    );
}

/// SIGINT stops a batch within the image being made: every finished image is whole, no
/// temporary file is left, the exit code is 130.
#[test]
fn sigint_stops_a_batch() {
    let d = tmpdir("sigint");
    let pf = d.join("p.txt");
    std::fs::write(
        &pf,
        (0..40).map(|i| format!("prompt {i}\n")).collect::<String>(),
    )
    .unwrap();
    let out = d.join("out");
    let child = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args([
            "gen",
            "--model",
            fixtures().join("tiny").to_str().unwrap(),
            "--prompt-file",
            pf.to_str().unwrap(),
            "--width",
            "64",
            "--height",
            "64",
            "--device",
            "cpu",
            "--seed",
            "1",
            "--out-dir",
            out.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while listing(&out).iter().filter(|f| f.ends_with(".png")).count() < 3
        && t0.elapsed().as_secs() < 120
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let files = listing(&out);
    let pngs = files
        .iter()
        .filter(|f| f.ends_with(".png") && *f != "keep.png")
        .count();
    assert!((2..41).contains(&pngs), "{files:?}");
    assert!(pngs < 40, "it stopped early");
    assert!(
        files.iter().all(|f| f.ends_with(".png")),
        "no temporary file left: {files:?}"
    );
    for f in files.iter().filter(|f| *f != "keep.png") {
        image::open(out.join(f)).unwrap_or_else(|e| panic!("{f} is not a whole PNG: {e}"));
    }
}

#[test]
fn memory_estimate_refuses_what_cannot_fit() {
    let d = tmpdir("memory");
    let out_dir = d.join("out");
    let before = listing(&out_dir);
    let model = fixtures().join("tiny");
    let o = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args([
            "gen",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--width",
            "4096",
            "--height",
            "4096",
            "--batch-size",
            "64",
            "--num-images",
            "64",
            "--device",
            "cpu",
            "--out-dir",
            out_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("GiB") && err.contains("--force"), "{err}");
    assert_eq!(listing(&out_dir), before);
}

/// Shapes whose element count wraps u64 while the byte ranges stay as they were: refused by
/// the header reader, naming the file and the tensor, before any tensor is read (a LoRA, and
/// a single file's token embedding).
#[test]
fn wrapped_shapes_are_refused() {
    let huge = (1u64 << 59) + 4;
    let d = tmpdir("wrap");
    let out_dir = d.join("out");
    let before = listing(&out_dir);
    // A LoRA: one module's down and up factors.
    let lora = d.join("wrap-lora.safetensors");
    rewrite(
        &fixtures().join("lora/kohya_diffusers.safetensors"),
        &lora,
        |h, _| {
            let obj = h.as_object_mut().unwrap();
            let down = obj
                .keys()
                .find(|k| k.ends_with(".lora_down.weight"))
                .unwrap()
                .clone();
            let up = down.replace("lora_down", "lora_up");
            let rank = obj[&down]["shape"][0].clone();
            obj.get_mut(&down).unwrap()["shape"] = serde_json::json!([huge, 32]);
            obj.get_mut(&up).unwrap()["shape"] = serde_json::json!([rank, huge]);
        },
    );
    let o = run_gen(
        &fixtures().join("tiny"),
        &out_dir.join("new.png"),
        &["--lora", lora.to_str().unwrap()],
    );
    assert_refused(&o, &lora, "overflows", &out_dir, &before);
    let o = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(["inspect", lora.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("overflows") && !err.contains("panicked"),
        "{err}"
    );
    // A single file's token embedding.
    let model = d.join("wrap-model.safetensors");
    rewrite(&tiny(), &model, |h, _| {
        let k = "conditioner.embedders.1.model.token_embedding.weight";
        h[k]["shape"] = serde_json::json!([huge, 32]);
    });
    let o = run_gen(&model, &out_dir.join("new.png"), &[]);
    assert_refused(&o, &model, "overflows", &out_dir, &before);
}

/// A shape that lies without wrapping is blamed on the file that holds it (the LoRA), not on
/// the model.
#[test]
fn lying_lora_shape_names_the_lora() {
    let d = tmpdir("lie");
    let out_dir = d.join("out");
    let before = listing(&out_dir);
    let lora = d.join("lie.safetensors");
    rewrite(
        &fixtures().join("lora/kohya_diffusers.safetensors"),
        &lora,
        |h, _| {
            let obj = h.as_object_mut().unwrap();
            let down = obj
                .keys()
                .find(|k| k.ends_with(".lora_down.weight"))
                .unwrap()
                .clone();
            let s = obj[&down]["shape"].as_array().unwrap().clone();
            let n = s[0].as_u64().unwrap();
            let mut s2 = s.clone();
            s2[0] = serde_json::json!(n * 2);
            obj.get_mut(&down).unwrap()["shape"] = serde_json::json!(s2);
        },
    );
    let o = run_gen(
        &fixtures().join("tiny"),
        &out_dir.join("new.png"),
        &["--lora", lora.to_str().unwrap()],
    );
    assert_refused(&o, &lora, "does not match", &out_dir, &before);
}

/// FIFOs and devices as model, LoRA or inspected file: refused at once (a FIFO would block
/// forever), naming the file.
#[test]
fn special_files_as_inputs() {
    let d = tmpdir("special-in");
    let out_dir = d.join("out");
    let before = listing(&out_dir);
    let fifo = d.join("fifo.safetensors");
    let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(ok.success());
    let timed = |args: &[&str]| common::run_dmd2_within(args, None, 30);
    let o = run_gen(&fifo, &out_dir.join("new.png"), &[]);
    assert_refused(&o, &fifo, "not a regular file", &out_dir, &before);
    let o = timed(&[
        "gen",
        "--model",
        fixtures().join("tiny").to_str().unwrap(),
        "--lora",
        fifo.to_str().unwrap(),
        "--prompt",
        "x",
        "-o",
        out_dir.join("new.png").to_str().unwrap(),
    ]);
    assert_refused(&o, &fifo, "not a regular file", &out_dir, &before);
    let o = timed(&["inspect", fifo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = run_gen(Path::new("/dev/null"), &out_dir.join("new.png"), &[]);
    assert_refused(
        &o,
        Path::new("/dev/null"),
        "not a regular file",
        &out_dir,
        &before,
    );
}

/// A PNG whose zTXt settings chunk inflates to half a gigabyte: refused after at most a
/// megabyte of inflation, with little memory.
#[test]
fn png_text_bomb_is_refused() {
    let d = tmpdir("bomb");
    let out_dir = d.join("out");
    let before = listing(&out_dir);
    let png_path = d.join("bomb.png");
    {
        let f = std::fs::File::create(&png_path).unwrap();
        let mut enc = png::Encoder::new(f, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        // 512 MiB of zeros deflate to a few megabytes.
        let text = "\0".repeat(512 << 20);
        enc.add_ztxt_chunk("parameters".into(), text).unwrap();
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0, 0, 0]).unwrap();
    }
    let size = std::fs::metadata(&png_path).unwrap().len();
    assert!(size < 8 << 20, "{size}");
    let out = out_dir.join("new.png");
    let o = run_gen_rss(&[
        "--from-png",
        png_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_refused(&o.0, &png_path, "inflates", &out_dir, &before);
    assert!(o.1 < 512 << 20, "peak RSS {} MiB", o.1 >> 20);
}

/// Runs `dmd2 gen --device cpu ARGS` and returns its output and its peak
/// resident memory: the largest VmHWM read from /proc/PID/status while it runs (the
/// kernel's high-water mark of the child's own address space; ru_maxrss would count this test
/// process's memory, which a spawned child inherits until exec).
fn run_gen_rss(extra: &[&str]) -> (Output, u64) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(["gen", "--device", "cpu"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        so.read_to_end(&mut v).unwrap();
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        se.read_to_end(&mut v).unwrap();
        v
    });
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_file)
            && let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib * 1024);
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let o = Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    (o, peak)
}

// ---------------------------------------------------------------------------------------
// Outputs: only regular files created or replaced, never an input, never through a link.
// ---------------------------------------------------------------------------------------

fn dmd2(args: &[&str]) -> Output {
    common::run_dmd2(args, None)
}

fn gen_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "gen", "--model", model, "--width", "64", "--height", "64", "--device", "cpu", "--seed",
        "1",
    ];
    v.extend_from_slice(extra);
    v
}

fn err_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn outputs_to_devices_and_fifos_are_plain_writes() {
    use std::os::unix::fs::FileTypeExt;
    let d = tmpdir("special-out");
    let tiny = fixtures().join("tiny");
    let model = tiny.to_str().unwrap();
    // /dev/null: written to, still a device.
    let o = dmd2(&gen_args(model, &["--prompt", "x", "-o", "/dev/null"]));
    assert!(o.status.success(), "{}", err_of(&o));
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    // A symlink to /dev/null: written through, the link stays a link.
    let link = d.join("null.png");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    let o = dmd2(&gen_args(
        model,
        &["--prompt", "x", "-o", link.to_str().unwrap()],
    ));
    assert!(o.status.success(), "{}", err_of(&o));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // /dev/full: the write fails, exit 1, counted in the summary.
    let o = dmd2(&gen_args(model, &["--prompt", "x", "-o", "/dev/full"]));
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/full") && err.contains("1 failed"),
        "{err}"
    );
    assert!(
        std::fs::metadata("/dev/full")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    // A FIFO with a reader gets the PNG; without one, an error at once.
    let fifo = d.join("pipe.png");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(&fifo).unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let o = dmd2(&gen_args(
        model,
        &["--prompt", "x", "-o", fifo.to_str().unwrap()],
    ));
    assert!(o.status.success(), "{}", err_of(&o));
    let bytes = reader.join().unwrap();
    image::load_from_memory(&bytes).expect("a whole PNG through the FIFO");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let o = dmd2(&gen_args(
        model,
        &["--prompt", "x", "-o", fifo.to_str().unwrap()],
    ));
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no process reads"), "{err}");
    // A directory: refused before any work.
    let o = dmd2(&gen_args(
        model,
        &["--prompt", "x", "-o", d.to_str().unwrap()],
    ));
    assert_eq!(o.status.code(), Some(2), "{}", err_of(&o));
    assert!(err_of(&o).contains("is a directory"));
    // merge --output /dev/null writes through, leaving the device.
    let o = dmd2(&["merge", "--model", model, "--output", "/dev/null", "-q"]);
    assert!(o.status.success(), "{}", err_of(&o));
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
}

/// An output naming an input of the run (the model, a LoRA, a link or hard link to one) is
/// refused before any work and the input is untouched.
#[test]
fn outputs_never_replace_inputs() {
    let d = tmpdir("inputs");
    let model = d.join("m.safetensors");
    std::fs::copy(tiny(), &model).unwrap();
    let lora = d.join("l.safetensors");
    std::fs::copy(fixtures().join("lora/kohya_diffusers.safetensors"), &lora).unwrap();
    let hard = d.join("hard.png");
    std::fs::hard_link(&model, &hard).unwrap();
    let soft = d.join("soft.png");
    std::os::unix::fs::symlink(&lora, &soft).unwrap();
    let before = (
        std::fs::read(&model).unwrap(),
        std::fs::read(&lora).unwrap(),
    );
    let m = model.to_str().unwrap();
    let l = lora.to_str().unwrap();
    // The model's and LoRA's own names are refused for their extension already; a `.png`
    // link to either for being an input.
    for (out, why) in [
        (m, "is not an image format"),
        (l, "is not an image format"),
        (hard.to_str().unwrap(), "is an input of this run"),
        (soft.to_str().unwrap(), "is an input of this run"),
    ] {
        let o = dmd2(&gen_args(m, &["--lora", l, "--prompt", "x", "-o", out]));
        let err = err_of(&o);
        assert_eq!(o.status.code(), Some(2), "{out}: {err}");
        assert!(err.contains(why), "{err}");
    }
    let o = dmd2(&["merge", "--model", m, "--lora", l, "--output", l]);
    assert_eq!(o.status.code(), Some(2), "{}", err_of(&o));
    assert_eq!(
        (
            std::fs::read(&model).unwrap(),
            std::fs::read(&lora).unwrap()
        ),
        before
    );
}

/// Names two images of a run would share: refused before any work for a file or flags; for
/// stdin the second image is refused (reported, counted) and the first is kept.
#[test]
fn colliding_names_are_refused() {
    let d = tmpdir("collide");
    let out = d.join("out");
    let before = listing(&out);
    let tiny = fixtures().join("tiny");
    let model = tiny.to_str().unwrap();
    let o = dmd2(&gen_args(
        model,
        &[
            "--prompt",
            "x",
            "--num-images",
            "3",
            "--name",
            "same.png",
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("same.png") && err.contains("earlier image"),
        "{err}"
    );
    assert_eq!(listing(&out), before, "nothing written");
    let pf = d.join("p.txt");
    std::fs::write(&pf, "a red car\nA red car!\n").unwrap();
    let o = dmd2(&gen_args(
        model,
        &[
            "--prompt-file",
            pf.to_str().unwrap(),
            "--name",
            "{prompt}.png",
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    assert_eq!(o.status.code(), Some(2), "{}", err_of(&o));
    assert_eq!(listing(&out), before, "nothing written");
    // stdin: streamed, so the second image is refused when it comes.
    let o = common::run_dmd2(
        &gen_args(
            model,
            &[
                "--prompt-file",
                "-",
                "--name",
                "{prompt}.png",
                "--json",
                "--out-dir",
                out.to_str().unwrap(),
            ],
        ),
        Some(b"a red car\nA red car!\n"),
    );
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("1 written") && err.contains("1 failed"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(listing(&out).contains("a-red-car.png"));
}

/// Counts far beyond any real run are checked, not materialised: refused with a reason, or
/// (sharded) made at once for this shard's one image.
#[test]
fn huge_counts_are_cheap() {
    let d = tmpdir("counts");
    let out = d.join("out");
    let tiny = fixtures().join("tiny");
    let model = tiny.to_str().unwrap();
    let o = dmd2(&gen_args(
        model,
        &[
            "--prompt",
            "x",
            "--num-images",
            "18446744073709551615",
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--num-images") && !err.contains("panicked"),
        "{err}"
    );
    let t0 = std::time::Instant::now();
    let o = dmd2(&gen_args(
        model,
        &[
            "--prompt",
            "x",
            "--num-images",
            "4294967296",
            "--shard",
            "4294967295/4294967296",
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    assert!(o.status.success(), "{}", err_of(&o));
    assert!(t0.elapsed().as_secs() < 60);
    let pngs: Vec<String> = listing(&out)
        .into_iter()
        .filter(|f| f != "keep.png")
        .collect();
    assert_eq!(pngs, vec!["4294967295-4294967296.png".to_string()]);
    let pf = d.join("p.jsonl");
    std::fs::write(
        &pf,
        r#"{"prompt": "x", "num_images": 18446744073709551615}"#,
    )
    .unwrap();
    let o = dmd2(&gen_args(
        model,
        &[
            "--prompt-file",
            pf.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("num_images") && !err.contains("panicked"),
        "{err}"
    );
}

/// Explicit timesteps from a preset file or a PNG's settings are checked as flags are.
#[test]
fn timesteps_from_presets_and_pngs_are_checked() {
    let d = tmpdir("timesteps");
    let tiny = fixtures().join("tiny");
    let model = tiny.to_str().unwrap();
    let out = d.join("out/new.png");
    for bad in ["[5000, 10]", "[]", "[999, 999]", "[10, 500]"] {
        let preset = d.join("p.toml");
        std::fs::write(&preset, format!("timesteps = {bad}\n")).unwrap();
        let o = dmd2(&gen_args(
            model,
            &[
                "--preset",
                preset.to_str().unwrap(),
                "--prompt",
                "x",
                "-o",
                out.to_str().unwrap(),
            ],
        ));
        let err = err_of(&o);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains("timesteps") && !err.contains("panicked"),
            "{bad}: {err}"
        );
        assert!(!out.exists());
    }
    // A PNG whose dmd2 settings chunk says [5000, 10], or holds a NUL in its prompt.
    let good = d.join("good.png");
    let o = dmd2(&gen_args(
        model,
        &["--prompt", "x", "-o", good.to_str().unwrap()],
    ));
    assert!(o.status.success(), "{}", err_of(&o));
    let settings = dmd2::metadata::settings_from_png(&good).unwrap();
    for (name, edit) in [
        (
            "ts",
            serde_json::json!({"sampler": {"kind": "dmd2", "steps": 2, "timesteps": [5000, 10], "spacing": "leading"}}),
        ),
        ("nul", serde_json::json!({"prompt": "a\u{0}b"})),
    ] {
        let mut v = serde_json::to_value(&settings).unwrap();
        for (k, x) in edit.as_object().unwrap() {
            v[k] = x.clone();
        }
        let png_path = d.join(format!("{name}.png"));
        let f = std::fs::File::create(&png_path).unwrap();
        let mut enc = png::Encoder::new(f, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.add_itxt_chunk("dmd2".into(), v.to_string()).unwrap();
        enc.write_header()
            .unwrap()
            .write_image_data(&[0, 0, 0])
            .unwrap();
        let o = dmd2(&[
            "gen",
            "--from-png",
            png_path.to_str().unwrap(),
            "--device",
            "cpu",
            "-o",
            out.to_str().unwrap(),
        ]);
        let err = err_of(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains(png_path.to_str().unwrap()) || err.contains("NUL"),
            "{name}: {err}"
        );
        assert!(!out.exists());
    }
}

/// A prompt line of 10 MB is refused without holding it; a prompt over the limit is refused
/// with the limit named.
#[test]
fn long_prompts_are_bounded() {
    let d = tmpdir("long");
    let out = d.join("out");
    let pf = d.join("p.txt");
    let mut text = "y".repeat(10 << 20);
    text.push('\n');
    text.push_str(&"z".repeat(70_000));
    text.push('\n');
    std::fs::write(&pf, text).unwrap();
    let model = fixtures().join("tiny");
    let (o, peak) = run_gen_rss(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt-file",
        pf.to_str().unwrap(),
        "--width",
        "64",
        "--height",
        "64",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(":1: the line is longer"), "{err}");
    assert!(err.contains(":2: the prompt has 70000 bytes"), "{err}");
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);
}

/// Temporary files of dead processes are removed when a run starts in the directory; a live
/// process's are left.
#[test]
fn stale_temp_files_are_removed() {
    let d = tmpdir("stale");
    let out = d.join("out");
    let dead = ".a.png.dmd2-999999999-0123456789abcdef.tmp";
    let live = format!(".b.png.dmd2-{}-0123456789abcdef.tmp", std::process::id());
    std::fs::write(out.join(dead), b"partial").unwrap();
    std::fs::write(out.join(&live), b"being written").unwrap();
    let tiny = fixtures().join("tiny");
    let o = dmd2(&gen_args(
        tiny.to_str().unwrap(),
        &["--prompt", "x", "--out-dir", out.to_str().unwrap()],
    ));
    assert!(o.status.success(), "{}", err_of(&o));
    let files = listing(&out);
    assert!(!files.contains(dead), "{files:?}");
    assert!(files.contains(&live), "{files:?}");
}

/// SIGTERM during one long image stops it within a step: exit code 143, no image, no
/// temporary file, within seconds.
#[test]
fn sigterm_stops_a_long_image() {
    use std::io::{BufRead, BufReader};
    let d = tmpdir("sigterm");
    let out = d.join("out");
    let tiny = fixtures().join("tiny");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args([
            "gen",
            "--model",
            tiny.to_str().unwrap(),
            "--device",
            "cpu",
            "--prompt",
            "x",
            "--steps",
            "400",
            "--width",
            "256",
            "--height",
            "256",
            "--verbose",
            "--out-dir",
            out.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // Loaded: the sampling loop is about to run.
    while !seen.contains("load:") {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let t0 = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(t0.elapsed().as_secs_f64() < 10.0, "took {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(143), "{seen}{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    assert_eq!(listing(&out), BTreeSet::from(["keep.png".to_string()]));
}

/// A copy of the tiny folder (weights and tokenizers linked) with `edit` applied to the JSON
/// file `rel`.
fn tiny_with(
    d: &Path,
    name: &str,
    rel: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    fn copy(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap().flatten() {
            let (s, t) = (e.path(), dst.join(e.file_name()));
            if s.is_dir() {
                copy(&s, &t);
            } else if s.extension().is_some_and(|x| x == "json") {
                std::fs::copy(&s, &t).unwrap();
            } else {
                std::os::unix::fs::symlink(&s, &t).unwrap();
            }
        }
    }
    let dst = d.join(name);
    copy(&fixtures().join("tiny"), &dst);
    let p = dst.join(rel);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    dst
}

/// Config values the model cannot be built with, and schedules it does not implement: one
/// line naming the file and the field, exit code 2, before any tensor is read.
#[test]
fn bad_config_values_are_refused_by_name() {
    let d = tmpdir("configs");
    let out_dir = d.join("out");
    let before = listing(&out_dir);
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, &str, Edit, &str)> = vec![
        (
            "heads0",
            "unet/config.json",
            Box::new(|v| v["attention_head_dim"] = serde_json::json!([0, 0, 0])),
            "attention_head_dim",
        ),
        (
            "heads5",
            "unet/config.json",
            Box::new(|v| v["attention_head_dim"] = serde_json::json!([1, 5, 4])),
            "attention_head_dim",
        ),
        (
            "groups",
            "unet/config.json",
            Box::new(|v| v["norm_num_groups"] = serde_json::json!(0)),
            "norm_num_groups",
        ),
        (
            "scale0",
            "vae/config.json",
            Box::new(|v| v["scaling_factor"] = serde_json::json!(0)),
            "scaling_factor",
        ),
        (
            "te_heads",
            "text_encoder/config.json",
            Box::new(|v| v["num_attention_heads"] = serde_json::json!(3)),
            "num_attention_heads",
        ),
        (
            "vpred",
            "scheduler/scheduler_config.json",
            Box::new(|v| v["prediction_type"] = serde_json::json!("v_prediction")),
            "prediction_type",
        ),
        (
            "betas",
            "scheduler/scheduler_config.json",
            Box::new(|v| v["beta_schedule"] = serde_json::json!("linear")),
            "beta_schedule",
        ),
    ];
    for (name, rel, edit, field) in cases {
        let model = tiny_with(&d, name, rel, edit);
        let o = run_gen(&model, &out_dir.join("new.png"), &[]);
        assert_refused(&o, &model.join(rel), field, &out_dir, &before);
    }
}

/// Names up to 255 bytes work (the temporary name is shortened); longer ones are refused
/// before any work. A subdirectory that is a link out of --out-dir is refused.
#[test]
fn name_lengths_and_linked_subdirectories() {
    let d = tmpdir("names");
    let out = d.join("out");
    let tiny = fixtures().join("tiny");
    let model = tiny.to_str().unwrap();
    let long = format!("{}.png", "n".repeat(251));
    assert_eq!(long.len(), 255);
    let o = dmd2(&gen_args(
        model,
        &[
            "--prompt",
            "x",
            "--name",
            &long,
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    assert!(o.status.success(), "{}", err_of(&o));
    assert!(listing(&out).contains(&long));
    let too_long = format!("{}.png", "m".repeat(252));
    let o = dmd2(&gen_args(
        model,
        &[
            "--prompt",
            "x",
            "--name",
            &too_long,
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    assert_eq!(o.status.code(), Some(2), "{}", err_of(&o));
    assert!(!listing(&out).contains(&too_long));
    // out/sub -> a directory outside: a JSON line's name sub/x.png must not go through it.
    let outside = d.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("sub")).unwrap();
    let pf = d.join("p.jsonl");
    std::fs::write(&pf, r#"{"prompt": "x", "name": "sub/x.png"}"#).unwrap();
    let o = dmd2(&gen_args(
        model,
        &[
            "--prompt-file",
            pf.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

/// A write that fails after its image was made is counted as failed and, with
/// `--on-error skip`, the run goes on.
#[test]
fn failed_writes_are_counted_and_skippable() {
    let d = tmpdir("failwrite");
    let out = d.join("out");
    assert!(
        Command::new("mkfifo")
            .arg(out.join("pipe.png"))
            .status()
            .unwrap()
            .success()
    );
    let pf = d.join("p.jsonl");
    std::fs::write(
        &pf,
        "{\"prompt\": \"x\", \"name\": \"pipe.png\"}\n{\"prompt\": \"y\", \"name\": \"ok.png\"}\n",
    )
    .unwrap();
    let tiny = fixtures().join("tiny");
    let o = dmd2(&gen_args(
        tiny.to_str().unwrap(),
        &[
            "--prompt-file",
            pf.to_str().unwrap(),
            "--on-error",
            "skip",
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("1 written") && err.contains("1 failed"),
        "{err}"
    );
    assert!(listing(&out).contains("ok.png"));
}

/// NaN in a `--unet` file is blamed on that file, not on `--model`.
#[test]
fn nan_in_a_unet_file_names_it() {
    let d = tmpdir("nan-unet");
    let unet = d.join("unet.safetensors");
    rewrite(
        &fixtures().join("tiny/unet/diffusion_pytorch_model.safetensors"),
        &unet,
        |h, data| {
            let o = &h["conv_in.bias"]["data_offsets"];
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            for c in data[a..b].chunks_mut(2) {
                c.copy_from_slice(&0x7e00u16.to_le_bytes());
            }
        },
    );
    let o = run_gen(
        &fixtures().join("tiny"),
        &d.join("out/new.png"),
        &["--unet", unet.to_str().unwrap(), "--strict"],
    );
    let err = err_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(unet.to_str().unwrap()) && err.contains("conv_in.bias"),
        "{err}"
    );
}

/// Prompt files that are not regular files: a FIFO (or `<(…)`) is read once, as a stream;
/// /dev/null holds no prompt.
#[test]
fn prompt_files_from_fifos_and_devices() {
    let d = tmpdir("pf-fifo");
    let out = d.join("out");
    let fifo = d.join("prompts");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::write(&fifo, "a fox\n").unwrap())
    };
    let tiny = fixtures().join("tiny");
    let o = dmd2(&gen_args(
        tiny.to_str().unwrap(),
        &[
            "--prompt-file",
            fifo.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    writer.join().unwrap();
    let err = err_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("1 written"), "{err}");
    let o = dmd2(&gen_args(
        tiny.to_str().unwrap(),
        &[
            "--prompt-file",
            "/dev/null",
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    let err = err_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("0 written"), "{err}");
}
