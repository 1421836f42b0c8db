//! `--prompt-syntax a1111` against the independent Python reference of A1111's SDXL prompt
//! handling (scripts/make_a1111_fixtures.py, tests/fixtures/a1111/): `dmd2 tokens --json`
//! prints the reference's segments, chunk ids and chunk weights exactly; the tiny model's
//! conditioning (weighted, chunked past 150 tokens with commas at the boundaries, BREAK,
//! weighted negatives padded to the prompt's chunks, zeros for an absent negative) matches
//! it, from the folder and the single file; and the images diffusers made from those
//! embeddings come out within one level. Textual-inversion embeddings (fixtures'
//! `embeddings/`) are placed and weighted as the reference places them, also where their
//! vectors do not fit at the end of a chunk.

mod common;

use candle_core::Device;
use common::{Source, assert_close, fixtures, ids_of, max_level_diff, rel_err};
use dmd2::embeddings::Embeddings;
use dmd2::pipeline::Pipeline;
use dmd2::pipeline::Request;
use dmd2::precision::RunPrecision;
use dmd2::prompt_syntax::PromptSyntax;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, Deserialize)]
struct ImageCase {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    guidance_scale: f64,
    seed: u64,
    timesteps: Vec<usize>,
    width: usize,
    height: usize,
    chunks: usize,
}

/// The tiny model with the fixtures' embeddings (`kitty_style`, `neg_hands`), from the folder
/// or the single file; prompts that name none are unaffected by them.
fn pipeline(src: Source) -> Arc<Pipeline> {
    static CACHE: OnceLock<Mutex<HashMap<Source, Arc<Pipeline>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(src)
        .or_insert_with(|| {
            let mut parts = dmd2::checkpoint::open(&src.path()).unwrap();
            parts.embeddings =
                Embeddings::load(&[], &[fixtures().join("a1111/embeddings")]).unwrap();
            Arc::new(Pipeline::load(parts, &Device::Cpu, RunPrecision::F32).unwrap())
        })
        .clone()
}

fn embedding_file(name: &str) -> String {
    fixtures()
        .join(format!("a1111/embeddings/{name}.safetensors"))
        .display()
        .to_string()
}

#[derive(Debug, Deserialize)]
struct TokenCase {
    prompt: String,
    #[serde(default)]
    embeddings: Vec<String>,
    segments: Vec<(String, f64)>,
    chunks: Vec<Chunk>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Chunk {
    ids: Vec<u32>,
    weights: Vec<f64>,
    /// (position in `ids` of the first vector, embedding name)
    #[serde(default)]
    embeddings: Vec<(usize, String)>,
}

#[derive(Debug, Deserialize)]
struct Cases {
    images: Vec<ImageCase>,
    tokens: Vec<TokenCase>,
}

fn cases() -> Cases {
    let p = fixtures().join("a1111/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn tokens_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .arg("tokens")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tokens_json_matches_the_reference() {
    for c in cases().tokens {
        let files: Vec<String> = c.embeddings.iter().map(|n| embedding_file(n)).collect();
        let mut args = vec!["--json"];
        for f in &files {
            args.extend(["--embedding", f.as_str()]);
        }
        args.extend(["--", &c.prompt]);
        let v = tokens_json(&args);
        let segments: Vec<(String, f64)> = serde_json::from_value(v["segments"].clone()).unwrap();
        assert_eq!(segments, c.segments, "{:?}: segments", c.prompt);
        let chunks: Vec<Chunk> = serde_json::from_value(v["chunks"].clone()).unwrap();
        assert_eq!(chunks.len(), c.chunks.len(), "{:?}: chunk count", c.prompt);
        for (i, (a, b)) in chunks.iter().zip(&c.chunks).enumerate() {
            assert_eq!(a.ids, b.ids, "{:?}: chunk {i} ids", c.prompt);
            assert_eq!(a.weights, b.weights, "{:?}: chunk {i} weights", c.prompt);
            assert_eq!(
                a.embeddings, b.embeddings,
                "{:?}: chunk {i} embeddings",
                c.prompt
            );
        }
    }
}

#[test]
fn tokens_reads_stdin_and_the_negative_prompt() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(["tokens", "--json", "--negative-prompt", "(ugly:1.3)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"a [cat]\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["segments"][1][0], "cat");
    assert_eq!(v["negative_prompt"]["segments"][0][1], 1.3);
    // A weight that is not a number is refused as bad input, as a one-line error.
    let out = Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(["tokens", "(x:1.2.3)"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn request(c: &ImageCase) -> Request {
    Request {
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        prompt_syntax: PromptSyntax::A1111,
        sampler: dmd2::scheduler::SamplerSpec::dmd2(c.timesteps.clone()),
        cfg: c.guidance_scale,
        seed: c.seed,
        width: c.width,
        height: c.height,
        init: None,
    }
}

fn refs(c: &ImageCase) -> std::collections::HashMap<String, candle_core::Tensor> {
    let p = fixtures().join(format!("a1111/{}.safetensors", c.name));
    candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap()
}

#[test]
fn conditioning_matches_the_reference() {
    for c in cases().images {
        let r = refs(&c);
        for src in [Source::Folder, Source::SingleFile] {
            let p = pipeline(src);
            let what = format!("{} {src:?}", c.name);
            let cond = p.encode_prompt(PromptSyntax::A1111, &c.prompt).unwrap();
            let mut ctx = cond.context.clone();
            if c.guidance_scale > 1.0 {
                let u = p
                    .encode_negative(PromptSyntax::A1111, c.negative_prompt.as_deref(), &cond)
                    .unwrap();
                let empty = p.encode_empty().unwrap();
                let k = cond.chunks().unwrap().max(u.chunks().unwrap());
                assert_eq!(k, c.chunks, "{what}: chunks");
                ctx = cond.padded(k, &empty).unwrap().context;
                let u = u.padded(k, &empty).unwrap();
                assert_close(
                    &format!("{what} negative"),
                    &u.context,
                    &r["negative_prompt_embeds"],
                    1e-4,
                );
                assert_close(
                    &format!("{what} negative pooled"),
                    &u.pooled,
                    &r["negative_pooled_prompt_embeds"],
                    1e-4,
                );
            }
            assert_close(&what, &ctx, &r["prompt_embeds"], 1e-4);
            // The reference is not what plain text would give: the weights took effect.
            if c.chunks == 1 {
                let plain = p.encode_prompt(PromptSyntax::Plain, &c.prompt).unwrap();
                assert!(
                    rel_err(&plain.context, &r["prompt_embeds"]) > 1e-2,
                    "{what}"
                );
            }
            assert_close(
                &format!("{what} pooled"),
                &cond.pooled,
                &r["pooled_prompt_embeds"],
                1e-4,
            );
        }
    }
}

#[test]
fn images_match_the_reference() {
    for c in cases().images {
        let want = ids_of(&refs(&c)["image"])
            .into_iter()
            .map(|x| x as u8)
            .collect::<Vec<_>>();
        for src in [Source::Folder, Source::SingleFile] {
            let img = pipeline(src)
                .generate(&request(&c), &mut |_, _| {})
                .unwrap();
            let d = max_level_diff(&img.rgb, &want);
            assert!(d <= 1, "{} {src:?}: {d} levels off", c.name);
        }
    }
}

/// Images whose prompts have different chunk counts share a batch and still come out as
/// each would alone.
#[test]
fn batches_of_different_chunk_counts_match_single_images() {
    let cs = cases();
    let reqs: Vec<Request> = cs.images.iter().take(3).map(request).collect::<Vec<_>>();
    let reqs: Vec<Request> = reqs
        .iter()
        .map(|r| Request {
            cfg: 1.0,
            ..r.clone()
        })
        .collect();
    let p = pipeline(Source::Folder);
    let batch = p.generate_batch(&reqs, &mut |_, _| {}).unwrap();
    for (r, b) in reqs.iter().zip(&batch) {
        let alone = p.generate(r, &mut |_, _| {}).unwrap();
        assert_eq!(alone.rgb, b.rgb, "{}", r.prompt);
    }
}

fn dmd2_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dmd2"))
        .args(args)
        .output()
        .unwrap()
}

/// `dmd2 gen` with `--embedding` gives the reference's image (its prompts are encoded up
/// front, before the UNet loads), records the syntax in the PNG, and a JSON line's
/// `prompt_syntax` and `--prompt-syntax plain` are honoured (plain warns about what it cuts).
#[test]
fn gen_reads_a1111_prompts_and_embeddings() {
    let cs = cases();
    let c = cs.images.iter().find(|c| c.name == "embeddings").unwrap();
    let dir = common::fresh_dir("a1111", "gen");
    let out = dir.join("emb.png");
    let model = Source::Folder.path().display().to_string();
    let (e1, e2) = (embedding_file("kitty_style"), embedding_file("neg_hands"));
    let o = dmd2_cmd(&[
        "gen",
        "--model",
        &model,
        "--prompt",
        &c.prompt,
        "--negative-prompt",
        c.negative_prompt.as_deref().unwrap(),
        "--embedding",
        &e1,
        "--embedding",
        &e2,
        "--timesteps",
        "999,749,499,249",
        "--cfg",
        "2",
        "--seed",
        &c.seed.to_string(),
        "--width",
        "64",
        "--height",
        "64",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap().to_rgb8().into_raw();
    let want: Vec<u8> = ids_of(&refs(c)["image"])
        .into_iter()
        .map(|x| x as u8)
        .collect();
    assert!(max_level_diff(&img, &want) <= 1);
    let settings = dmd2::metadata::settings_from_png(&out).unwrap();
    assert_eq!(settings.prompt_syntax, PromptSyntax::A1111);

    // A JSON line asks for plain: the brackets are text, the long prompt is cut (and said).
    let long = vec!["cat"; 80].join(" ");
    let jsonl = dir.join("p.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{{\"prompt\": \"{long}\", \"prompt_syntax\": \"plain\", \"name\": \"plain.png\"}}\n{{\"prompt\": \"{long}\", \"name\": \"a1111.png\"}}\n"
        ),
    )
    .unwrap();
    let o = dmd2_cmd(&[
        "gen",
        "--model",
        &model,
        "--prompt-file",
        jsonl.to_str().unwrap(),
        "--steps",
        "1",
        "--seed",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "-q",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        err.matches("tokens; the last 5 are cut off").count(),
        1,
        "{err}"
    );
    let plain = dmd2::metadata::settings_from_png(&dir.join("plain.png")).unwrap();
    assert_eq!(plain.prompt_syntax, PromptSyntax::Plain);
    let a = image::open(dir.join("a1111.png"))
        .unwrap()
        .to_rgb8()
        .into_raw();
    let p = image::open(dir.join("plain.png"))
        .unwrap()
        .to_rgb8()
        .into_raw();
    assert_ne!(
        a, p,
        "80 tokens: a1111 reads a second chunk, plain does not"
    );
    // A weight that is not a number is a bad prompt: exit 2 before any work, nothing written.
    let o = dmd2_cmd(&[
        "gen",
        "--model",
        &model,
        "--prompt",
        "(cat:1.2.3)",
        "--steps",
        "1",
        "-o",
        dir.join("bad.png").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!dir.join("bad.png").exists());
    // An SD 1.x-width embedding is refused with the file named.
    let bad = dir.join("wide.safetensors");
    let t = candle_core::Tensor::zeros((2, 768), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("clip_l".to_string(), t.clone()), ("clip_g".to_string(), t)]),
        &bad,
    )
    .unwrap();
    let o = dmd2_cmd(&[
        "gen",
        "--model",
        &model,
        "--prompt",
        "wide",
        "--embedding",
        bad.to_str().unwrap(),
        "--steps",
        "1",
        "-o",
        dir.join("wide.png").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("wide.safetensors") && err.contains("768"),
        "{err}"
    );
}

/// Weights that cancel a chunk's mean (A1111 divides by zero there) leave finite states.
#[test]
fn zero_weights_stay_finite() {
    let p = pipeline(Source::Folder);
    for prompt in [
        "(cat:0)",
        "(a:0) (b:-0)",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[x]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    ] {
        let c = p.encode_prompt(PromptSyntax::A1111, prompt).unwrap();
        let v = c.context.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{prompt}");
    }
}

/// A pipeline loaded for known prompts (as `gen` loads one) encodes the empty prompt — what
/// pads the shorter of a prompt and its negative — only when their chunk counts differ, and
/// then exactly as a pipeline that keeps its encoders does; a lone prompt skips that pass.
#[test]
fn empty_prompt_encoded_up_front_only_when_padding_can_happen() {
    let open = || dmd2::checkpoint::open(&Source::Folder.path()).unwrap();
    let short = "a cat";
    let long = "a cat sitting on a red sofa, ".repeat(12);
    let syntax = PromptSyntax::A1111;
    let one =
        Pipeline::load_for_prompts(open(), &Device::Cpu, RunPrecision::F32, &[(syntax, short)])
            .unwrap();
    assert!(
        one.encode_empty().is_err(),
        "a lone prompt needs no padding"
    );
    let two = Pipeline::load_for_prompts(
        open(),
        &Device::Cpu,
        RunPrecision::F32,
        &[(syntax, short), (syntax, &long)],
    )
    .unwrap();
    let a = two.encode_prompt(syntax, short).unwrap();
    let b = two.encode_prompt(syntax, &long).unwrap();
    assert!(a.chunks().unwrap() < b.chunks().unwrap());
    let got = two.encode_empty().unwrap();
    let want = Pipeline::load(open(), &Device::Cpu, RunPrecision::F32)
        .unwrap()
        .encode_empty()
        .unwrap();
    assert_close("empty context", &got.context, &want.context, 0.0);
    assert_close("empty pooled", &got.pooled, &want.pooled, 0.0);
}
