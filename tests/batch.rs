//! Batch generation and shell pipelines, end to end on the tiny fixture model.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dmd2"))
}

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("batch", name)
}

fn base_args(model: &Path) -> Vec<String> {
    [
        "gen",
        "--model",
        model.to_str().unwrap(),
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Generous bound: these runs make up to a dozen images, and CI also runs them under qemu.
fn run(args: &[String]) -> Output {
    run_dmd2_within(args, None, 600)
}

fn with(mut v: Vec<String>, extra: &[&str]) -> Vec<String> {
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn pngs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                pixels(&e.path()),
            )
        })
        .collect()
}

fn pixels(p: &Path) -> Vec<u8> {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
        .into_raw()
}

fn all_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn model() -> PathBuf {
    fixtures().join("tiny")
}

#[test]
fn prompt_file_with_comments_json_lines_and_names() {
    let d = tmpdir("file");
    let pf = d.join("prompts.txt");
    std::fs::write(
        &pf,
        "# a comment\n\na red apple\n   \nA blue house!\n# end\n",
    )
    .unwrap();
    let out = d.join("out");
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt-file",
            pf.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--seed",
            "10",
            "--num-images",
            "2",
            "--json",
            "--name",
            "{index:03}-{line}-{prompt}-{seed}",
        ],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files = all_files(&out);
    assert_eq!(
        files,
        vec![
            "000-3-a-red-apple-10.png",
            "001-3-a-red-apple-11.png",
            "002-5-a-blue-house-12.png",
            "003-5-a-blue-house-13.png"
        ]
    );
    let stdout = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 4);
    for (l, f) in lines.iter().zip(&files) {
        assert!(l["path"].as_str().unwrap().ends_with(f.as_str()));
        for k in [
            "prompt",
            "negative_prompt",
            "seed",
            "steps",
            "cfg",
            "sampler",
            "width",
            "height",
            "model",
            "loras",
            "seconds",
        ] {
            assert!(l.get(k).is_some(), "missing {k} in {l}");
        }
        // One time per UNet step, and they add up to the denoise time.
        let s = &l["seconds"];
        let steps: Vec<f64> = s["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(steps.len() as u64, l["steps"].as_u64().unwrap(), "{l}");
        let denoise = s["denoise"].as_f64().unwrap();
        assert!(steps.iter().sum::<f64>() <= denoise + 1e-9, "{l}");
        assert!(s["load"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert_eq!(lines[2]["prompt"], "A blue house!");
    assert_eq!(lines[3]["seed"], 13);
}

#[test]
fn per_image_seeds_regenerate_alone() {
    let d = tmpdir("seeds");
    let out = d.join("many");
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt",
            "a cat",
            "--seed",
            "100",
            "--num-images",
            "4",
            "--batch-size",
            "2",
            "--out-dir",
            out.to_str().unwrap(),
        ],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let many = pngs(&out);
    assert_eq!(many.len(), 4);
    let single = d.join("single.png");
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt",
            "a cat",
            "--seed",
            "103",
            "-o",
            single.to_str().unwrap(),
        ],
    ));
    assert!(o.status.success());
    assert_eq!(
        many["00003-103.png"],
        pixels(&single),
        "image 3 of a batched run equals seed+3 alone"
    );
}

#[test]
fn jsonl_overrides_and_stdin() {
    let d = tmpdir("jsonl");
    let jf = d.join("p.jsonl");
    std::fs::write(
        &jf,
        concat!(
            "{\"prompt\": \"a tree\", \"seed\": 5, \"name\": \"tree\"}\n",
            "\n",
            "{\"prompt\": \"a car\", \"width\": 96, \"height\": 64, \"num_images\": 2, \"cfg\": 2.0, \"negative_prompt\": \"dark\", \"steps\": 2}\n"
        ),
    )
    .unwrap();
    let out = d.join("out");
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt-file",
            jf.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--seed",
            "1",
            "--json",
        ],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        all_files(&out),
        vec!["00001-2.png", "00002-3.png", "tree.png"]
    );
    let img = image::open(out.join("00001-2.png")).unwrap();
    assert_eq!((img.width(), img.height()), (96, 64));
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["seed"], 5);
    assert_eq!(lines[1]["steps"], 2);
    assert_eq!(lines[1]["cfg"], 2.0);
    assert_eq!(lines[1]["negative_prompt"], "dark");

    // The same text through stdin.
    let out2 = d.join("stdin");
    let args = with(
        base_args(&model()),
        &[
            "--prompt-file",
            "-",
            "--prompt-format",
            "jsonl",
            "--out-dir",
            out2.to_str().unwrap(),
            "--seed",
            "1",
        ],
    );
    let o = run_dmd2(&args, Some(&std::fs::read(&jf).unwrap()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pngs(&out), pngs(&out2));
}

#[test]
fn png_to_stdout_metadata_and_from_png() {
    let d = tmpdir("stdout");
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt",
            "a boat, at sea",
            "--negative-prompt",
            "fog",
            "--cfg",
            "1.5",
            "--seed",
            "77",
            "-o",
            "-",
        ],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = d.join("from-stdout.png");
    std::fs::write(&p, &o.stdout).unwrap();
    let img = image::load_from_memory(&o.stdout).expect("stdout is a PNG");
    assert_eq!((img.width(), img.height()), (64, 64));
    let chunks = dmd2::metadata::read_png_text(&p).unwrap();
    let params = &chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    let a = dmd2::metadata::parse_a1111(params).unwrap();
    assert_eq!(a.prompt, "a boat, at sea");
    assert_eq!(a.negative_prompt.as_deref(), Some("fog"));
    assert_eq!(a.get("Seed"), Some("77"));
    assert_eq!(a.get("CFG scale"), Some("1.5"));
    assert_eq!(a.get("Steps"), Some("4"));
    assert_eq!(a.get("Size"), Some("64x64"));
    // The image names its model by its folder's name, not this machine's path.
    let model = model();
    let model_name = model.file_name().unwrap().to_str().unwrap();
    let exact = dmd2::metadata::settings_from_png(&p).unwrap();
    assert_eq!(exact.model, model_name);
    assert!(
        !chunks
            .iter()
            .any(|(_, v)| v.contains(model.to_str().unwrap()))
    );
    // From the PNG alone, elsewhere: the model is not here, said in one line naming the PNG.
    let again = d.join("again.png");
    let from_png = |extra: &[&str]| {
        let mut args = vec!["gen", "--from-png", p.to_str().unwrap(), "--device", "cpu"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--quiet", "-o", again.to_str().unwrap()]);
        run(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    };
    let o = from_png(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(p.to_str().unwrap())
            && err.contains(model_name)
            && err.contains("--model-dir"),
        "{err}"
    );
    assert!(!again.exists());
    // Found by name in --model-dir: bit for bit.
    let o = from_png(&["--model-dir", model.parent().unwrap().to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pixels(&again), pixels(&p));
}

#[test]
fn shards_union_equals_unsharded() {
    let d = tmpdir("shard");
    let pf = d.join("p.txt");
    std::fs::write(&pf, "one\ntwo\nthree\n").unwrap();
    let all = d.join("all");
    let args = with(
        base_args(&model()),
        &[
            "--prompt-file",
            pf.to_str().unwrap(),
            "--seed",
            "3",
            "--num-images",
            "2",
            "--steps",
            "1",
        ],
    );
    assert!(
        run(&with(args.clone(), &["--out-dir", all.to_str().unwrap()]))
            .status
            .success()
    );
    let s = d.join("sharded");
    for k in 0..2 {
        let o = run(&with(
            args.clone(),
            &[
                "--out-dir",
                s.to_str().unwrap(),
                "--shard",
                &format!("{k}/2"),
            ],
        ));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, b) = (pngs(&all), pngs(&s));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b);
}

#[test]
fn skip_existing_resumes_a_killed_run() {
    let d = tmpdir("resume");
    let pf = d.join("p.txt");
    std::fs::write(
        &pf,
        (0..12)
            .map(|i| format!("prompt number {i}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = d.join("out");
    let args = with(
        base_args(&model()),
        &[
            "--prompt-file",
            pf.to_str().unwrap(),
            "--seed",
            "9",
            "--out-dir",
            out.to_str().unwrap(),
        ],
    );
    let mut child = bin()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a few images exist.
    let t0 = std::time::Instant::now();
    loop {
        let n = std::fs::read_dir(&out)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
                    .count()
            })
            .unwrap_or(0);
        if n >= 3 || t0.elapsed().as_secs() > 120 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let before = pngs(&out);
    assert!(
        before.len() >= 3 && before.len() < 12,
        "killed run left {} images",
        before.len()
    );
    let mtimes: BTreeMap<String, std::time::SystemTime> = before
        .keys()
        .map(|k| {
            (
                k.clone(),
                std::fs::metadata(out.join(k)).unwrap().modified().unwrap(),
            )
        })
        .collect();
    let o = run(&with(args.clone(), &["--skip-existing"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = pngs(&out);
    assert_eq!(after.len(), 12);
    for (k, t) in mtimes {
        assert_eq!(
            std::fs::metadata(out.join(&k)).unwrap().modified().unwrap(),
            t,
            "{k} was rewritten"
        );
        assert_eq!(after[&k], before[&k]);
    }
    assert!(
        all_files(&out).iter().all(|f| f.ends_with(".png")),
        "leftovers: {:?}",
        all_files(&out)
    );
    // A fresh full run gives the same images.
    let full = d.join("full");
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt-file",
            pf.to_str().unwrap(),
            "--seed",
            "9",
            "--out-dir",
            full.to_str().unwrap(),
        ],
    ));
    assert!(o.status.success());
    assert_eq!(pngs(&full), after);
}

#[test]
fn bad_lines_are_reported_with_file_and_line() {
    let d = tmpdir("bad");
    let jf = d.join("p.jsonl");
    std::fs::write(&jf, "{\"prompt\": \"ok\"}\n{\"prompt\": \"x\", \"colour\": 1}\n{broken\n{\"prompt\": \"y\", \"width\": 100}\n").unwrap();
    let out = d.join("out");
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt-file",
            jf.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--seed",
            "1",
        ],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let name = jf.display().to_string();
    assert!(
        err.contains(&format!("{name}:2: ")) && err.contains("unknown field `colour`"),
        "{err}"
    );
    assert!(err.contains(&format!("{name}:3: invalid JSON")), "{err}");
    assert!(err.contains(&format!("{name}:4: width 100")), "{err}");
    assert!(
        !out.exists() || all_files(&out).is_empty(),
        "nothing is generated when the file is checked up front"
    );

    // --on-error skip: the good line is made, the bad ones counted, exit non-zero.
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt-file",
            jf.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--seed",
            "1",
            "--on-error",
            "skip",
        ],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(all_files(&out), vec!["00000-1.png"]);
    assert!(err.contains("3 failed"), "{err}");
}

#[test]
fn names_cannot_escape_the_output_dir() {
    let d = tmpdir("escape");
    let jf = d.join("p.jsonl");
    std::fs::write(&jf, "{\"prompt\": \"x\", \"name\": \"../evil\"}\n").unwrap();
    let out = d.join("out");
    let o = run(&with(
        base_args(&model()),
        &[
            "--prompt-file",
            jf.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--seed",
            "1",
        ],
    ));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains(":1: "));
    assert!(!d.join("evil.png").exists());
}

#[test]
fn completions_and_presets() {
    let o = run(&["completions".to_string(), "bash".to_string()]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("dmd2"));
    let o = run(&["presets".to_string()]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for p in [
        "dmd2-4step",
        "dmd2-8step",
        "dmd2-8step-cfg",
        "dmd2-hyper-4step",
        "dmd2-1step",
        "sdxl-teacher",
    ] {
        assert!(s.contains(p), "{p} missing from `dmd2 presets`");
    }
}

/// `--skip-existing --json` says `"skipped": true` for each image it leaves alone; when every
/// image exists it loads nothing (a model path that does not exist is never opened), and the
/// LoRA weight in the JSON lines is the one typed (`0.7`).
#[test]
fn skip_existing_reports_and_loads_nothing_when_done() {
    let d = tmpdir("skip-json");
    let out = d.join("out");
    let lora = fixtures().join("lora/peft.safetensors");
    let lora = format!("{}:0.7", lora.display());
    let args = |model: &Path| {
        with(
            base_args(model),
            &[
                "--prompt",
                "a red car",
                "--num-images",
                "2",
                "--seed",
                "4",
                "--lora",
                &lora,
                "--out-dir",
                out.to_str().unwrap(),
                "--json",
            ],
        )
    };
    let lines = |o: &Output| -> Vec<serde_json::Value> {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let first = lines(&run(&args(&model())));
    assert_eq!(first.len(), 2);
    assert_eq!(first[0]["loras"][0]["weight"], serde_json::json!(0.7));
    // One image gone: it is made again, the other reported as skipped.
    let gone = first[1]["path"].as_str().unwrap().to_string();
    std::fs::remove_file(&gone).unwrap();
    let second = lines(&run(&with(args(&model()), &["--skip-existing"])));
    assert_eq!(second.len(), 2);
    assert_eq!(second[0]["skipped"], serde_json::json!(true));
    assert_eq!(second[0]["index"], serde_json::json!(0));
    assert_eq!(second[0]["seed"], serde_json::json!(4));
    assert_eq!(second[1]["path"].as_str(), Some(gone.as_str()));
    assert!(second[1].get("skipped").is_none());
    // Everything there: nothing is loaded, not even the model's files.
    let third = lines(&run(&with(
        args(Path::new("/nonexistent/model")),
        &["--skip-existing"],
    )));
    assert_eq!(third.len(), 2);
    assert!(
        third
            .iter()
            .all(|l| l["skipped"] == serde_json::json!(true))
    );
}

/// Per-image lines in logs say `k/N` when the run's size is known up front (this shard's
/// share of it).
#[test]
fn image_lines_count_k_of_n() {
    let d = tmpdir("k-of-n");
    let mut args = base_args(&model());
    args.retain(|a| a != "--quiet");
    let args = with(
        args,
        &[
            "--prompt",
            "a cat",
            "--num-images",
            "3",
            "--shard",
            "0/2",
            "--seed",
            "1",
            "--out-dir",
            d.to_str().unwrap(),
        ],
    );
    let o = run(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("(1/2 done") && err.contains("(2/2 done"),
        "{err}"
    );
}

/// `seed + i` wraps past 2^64 − 1 to 0 (documented), and the JSON lines carry the seeds as
/// exact integers.
#[test]
fn seeds_wrap_at_two_to_the_64() {
    let d = tmpdir("seed-wrap");
    let args = with(
        base_args(&model()),
        &[
            "--prompt",
            "a cat",
            "--num-images",
            "2",
            "--seed",
            "18446744073709551615",
            "--out-dir",
            d.to_str().unwrap(),
            "--json",
        ],
    );
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seeds: Vec<u64> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seed"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seeds, [u64::MAX, 0]);
}
