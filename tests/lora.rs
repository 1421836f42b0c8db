//! LoRA merging against references from diffusers/PEFT and the LyCORIS formulas (see
//! scripts/make_lora_fixtures.py): fused weights for every format on the folder and the
//! single-file model, end-to-end images, `write_single_file` round trips, and the errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use dmd2::checkpoint::{self, ModelParts, writer};
use dmd2::keymap::Component;
use dmd2::lora::{self, LoraSpec, MergeReport};
use dmd2::pipeline::Pipeline;
use dmd2::weights::ComponentWeights;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

fn lora(name: &str) -> PathBuf {
    lora_dir().join(format!("{name}.safetensors"))
}

fn spec(name: &str, weight: f32) -> LoraSpec {
    LoraSpec {
        path: lora(name),
        weight,
    }
}

fn open(src: Source) -> ModelParts {
    checkpoint::open(&src.path()).unwrap_or_else(|e| panic!("{src:?}: {e:#}"))
}

fn open_with(src: Source, specs: &[LoraSpec]) -> (ModelParts, Vec<MergeReport>) {
    let mut parts = open(src);
    let reports = lora::apply_loras(&mut parts, specs).unwrap_or_else(|e| panic!("{src:?}: {e:#}"));
    (parts, reports)
}

fn component<'a>(parts: &'a ModelParts, name: &str) -> &'a Arc<ComponentWeights> {
    match name {
        "unet" => &parts.unet,
        "text_encoder" => &parts.text_encoder,
        "text_encoder_2" => &parts.text_encoder_2,
        other => panic!("unknown component {other}"),
    }
}

/// max |a − b| / max |b| in f64
fn rel64(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(a.dims(), b.dims());
    let d = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
    let s = b.abs().unwrap().max(0).unwrap();
    d.to_scalar::<f64>().unwrap() / s.to_scalar::<f64>().unwrap().max(1e-30)
}

const FORMATS: [&str; 8] = [
    "kohya_diffusers",
    "kohya_ldm",
    "peft",
    "peft_noalpha",
    "lora_dot",
    "locon",
    "loha",
    "lokr",
];

/// Every weight the LoRA touches equals the reference (first row exactly-ish, and a random
/// projection of the whole tensor and of its update), and nothing else is patched.
fn check_fused(format: &str, src: Source, weight: f32) {
    let (parts, reports) = open_with(src, &[spec(format, weight)]);
    let refs = candle_core::safetensors::load(
        lora_dir()
            .join("fused")
            .join(format!("{format}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let mut want: BTreeSet<(String, String)> = BTreeSet::new();
    for k in refs.keys() {
        if let Some(base) = k.strip_suffix(".rows") {
            let (c, name) = base.split_once('/').unwrap();
            want.insert((c.to_string(), name.to_string()));
        }
    }
    assert!(!want.is_empty());
    let r = &reports[0];
    assert_eq!(r.matched, want.len(), "{format} {src:?}: {r}");
    assert_eq!(r.total, want.len(), "{format} {src:?}: {r}");
    assert!(r.unmatched.is_empty(), "{format}: {:?}", r.unmatched);
    assert!(r.ignored_keys.is_empty(), "{format}: {:?}", r.ignored_keys);

    let mut patched = BTreeSet::new();
    for c in ["unet", "text_encoder", "text_encoder_2"] {
        for (name, p) in &component(&parts, c).patches {
            assert_eq!(p.len(), 1);
            patched.insert((c.to_string(), name.clone()));
        }
    }
    assert_eq!(patched, want, "{format} {src:?}: patched weights differ");
    assert!(parts.vae.patches.is_empty());

    let mut worst = (0f64, 0f64, 0f64);
    for (c, name) in &want {
        let w = component(&parts, c);
        let fused = w.load(name, DType::F32, &Device::Cpu).unwrap();
        let base = w.load_raw(name).unwrap().to_dtype(DType::F32).unwrap();
        let key = format!("{c}/{name}");
        let flat = fused.flatten_from(1).unwrap();
        let n = flat.dim(1).unwrap();
        let probe = refs[&format!("probe/{n}")]
            .to_dtype(DType::F64)
            .unwrap()
            .reshape((n, 1))
            .unwrap();
        let proj = flat
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&probe)
            .unwrap()
            .flatten_all()
            .unwrap();
        // The update itself, as the patch computes it (not fused − W, which loses bits).
        let patch = &w.patches[name][0];
        let delta = (patch.delta.delta(base.dims()).unwrap() * patch.multiplier as f64)
            .unwrap()
            .flatten_from(1)
            .unwrap();
        let dproj = delta
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&probe)
            .unwrap()
            .flatten_all()
            .unwrap();
        let w_ = weight as f64;
        let rows_ref = if weight == 1.0 {
            refs[&format!("{key}.rows")].clone()
        } else {
            // W + w·Δ from the reference at weight 1: (rows − W) · w + W
            let base_row = base.flatten_from(1).unwrap().narrow(0, 0, 1).unwrap();
            let d = (&refs[&format!("{key}.rows")] - &base_row).unwrap();
            ((d * w_).unwrap() + base_row).unwrap()
        };
        let dproj_ref = (&refs[&format!("{key}.dproj")] * w_).unwrap();
        let proj_ref = if weight == 1.0 {
            refs[&format!("{key}.proj")].clone()
        } else {
            let base_proj = base
                .flatten_from(1)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .matmul(&probe)
                .unwrap()
                .flatten_all()
                .unwrap();
            (base_proj + &dproj_ref).unwrap()
        };
        let e_rows = rel64(&flat.narrow(0, 0, 1).unwrap(), &rows_ref);
        let e_proj = rel64(&proj, &proj_ref);
        let e_dproj = rel64(&dproj, &dproj_ref);
        assert!(
            e_rows <= 1e-5 && e_proj <= 1e-5 && e_dproj <= 1e-5,
            "{format} {src:?} {key}: relative errors rows {e_rows:e}, projection {e_proj:e}, update projection {e_dproj:e}"
        );
        worst = (
            worst.0.max(e_rows),
            worst.1.max(e_proj),
            worst.2.max(e_dproj),
        );
    }
    eprintln!(
        "{format} {src:?} ×{weight}: {} weights; worst relative error rows {:.1e}, projection {:.1e}, update {:.1e}; {r}",
        want.len(),
        worst.0,
        worst.1,
        worst.2
    );
}

macro_rules! fused_tests {
    ($($format:ident),* $(,)?) => {$(
        mod $format {
            use super::*;
            #[test]
            fn folder() { check_fused(stringify!($format), Source::Folder, 1.0); }
            #[test]
            fn single_file() { check_fused(stringify!($format), Source::SingleFile, 1.0); }
        }
    )*};
}

fused_tests!(
    kohya_diffusers,
    kohya_ldm,
    peft,
    peft_noalpha,
    lora_dot,
    locon,
    loha,
    lokr
);

#[test]
fn every_format_is_tested() {
    let mut files: Vec<String> = std::fs::read_dir(lora_dir().join("fused"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".safetensors")
                .to_string()
        })
        .collect();
    files.sort();
    let mut formats: Vec<String> = FORMATS.iter().map(|s| s.to_string()).collect();
    formats.sort();
    assert_eq!(files, formats);
}

#[test]
fn negative_and_large_weights() {
    check_fused("kohya_ldm", Source::SingleFile, -0.5);
    check_fused("lokr", Source::Folder, 1.75);
}

#[test]
fn formats_are_named() {
    let want = [
        ("kohya_diffusers", "kohya LoRA, diffusers module names"),
        ("kohya_ldm", "kohya LoRA, LDM module names"),
        ("peft", "PEFT LoRA"),
        ("peft_noalpha", "PEFT LoRA"),
        ("lora_dot", "diffusers (lora.down/lora.up) LoRA"),
        ("locon", "LyCORIS LoCon + LoRA, LDM module names"),
        ("loha", "LyCORIS LoHa, diffusers module names"),
        ("lokr", "LyCORIS LoKr, LDM module names"),
    ];
    for (f, name) in want {
        let (_, r) = open_with(Source::Folder, &[spec(f, 1.0)]);
        assert_eq!(r[0].format, name, "{f}");
        let line = r[0].to_string();
        assert!(
            line.contains(&format!("{}/{}", r[0].matched, r[0].total)),
            "{line}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct LoraRef {
    file: String,
    weight: f32,
}

fn lora_cases() -> Vec<(Case, Vec<LoraSpec>)> {
    let text = std::fs::read_to_string(lora_dir().join("cases.json")).unwrap();
    let v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    v.into_iter()
        .map(|c| {
            let loras: Vec<LoraRef> = serde_json::from_value(c["loras"].clone()).unwrap();
            let case: Case = serde_json::from_value(c).unwrap();
            let specs = loras
                .into_iter()
                .map(|l| LoraSpec {
                    path: lora_dir().join(l.file),
                    weight: l.weight,
                })
                .collect();
            (case, specs)
        })
        .collect()
}

fn lora_case(name: &str) -> (Case, Vec<LoraSpec>) {
    lora_cases()
        .into_iter()
        .find(|(c, _)| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn refs_of(c: &Case) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        lora_dir()
            .join("refs")
            .join(format!("{}.safetensors", c.name)),
        &Device::Cpu,
    )
    .unwrap()
}

fn run(parts: ModelParts, c: &Case) -> dmd2::pipeline::Generated {
    let p = Pipeline::load(parts, &Device::Cpu, dmd2::precision::RunPrecision::F32).unwrap();
    p.generate(&c.request(), &mut |_, _| {}).unwrap()
}

fn check_end_to_end(name: &str) {
    let (c, specs) = lora_case(name);
    let r = refs_of(&c);
    let want = r["image"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    for src in [Source::Folder, Source::SingleFile] {
        let (parts, _) = open_with(src, &specs);
        let out = run(parts, &c);
        assert_close(
            &format!("{name} {src:?} final latents"),
            &out.latents,
            &r["final_latents"],
            1e-3,
        );
        let d = max_level_diff(&out.rgb, &want);
        assert!(d <= 1, "{name} {src:?}: pixels differ by {d} levels");
    }
}

#[test]
fn end_to_end_kohya_cfg1() {
    check_end_to_end("kohya_cfg1");
}

#[test]
fn end_to_end_kohya_07_cfg() {
    check_end_to_end("kohya_07_cfg");
}

#[test]
fn end_to_end_kohya_plus_loha() {
    check_end_to_end("kohya_plus_loha");
}

#[test]
fn every_lora_case_is_tested() {
    let names: Vec<String> = lora_cases().into_iter().map(|(c, _)| c.name).collect();
    assert_eq!(names, ["kohya_cfg1", "kohya_07_cfg", "kohya_plus_loha"]);
}

// ---------------------------------------------------------------------------------------
// merge: write_single_file
// ---------------------------------------------------------------------------------------

fn tmp_dir(tag: &str) -> PathBuf {
    common::fresh_dir("lora-test", tag)
}

fn keys_and_dtypes(path: &Path) -> BTreeMap<String, DType> {
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path).unwrap() };
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, DType::try_from(v.dtype()).unwrap()))
        .collect()
}

/// The merged file reloads through `checkpoint::open` and gives the image of merging at load;
/// its keys are those of a real single file.
#[test]
fn merged_file_reproduces_merge_at_load() {
    let (c, specs) = lora_case("kohya_plus_loha");
    let dir = tmp_dir("merge");
    let reference = tests_single_file_keys();
    for src in [Source::Folder, Source::SingleFile] {
        let (parts, _) = open_with(src, &specs);
        let out = dir.join(format!("merged-{src:?}.safetensors"));
        writer::write_single_file(&parts, &out, Some(DType::F32)).unwrap();
        let at_load = run(parts, &c);
        let written = keys_and_dtypes(&out);
        assert_eq!(
            written.keys().cloned().collect::<BTreeSet<_>>(),
            reference,
            "{src:?}: key set"
        );
        assert!(written.values().all(|d| *d == DType::F32));
        let merged = checkpoint::open(&out).unwrap();
        assert_eq!(merged.layout, checkpoint::Layout::SingleFile);
        let from_file = run(merged, &c);
        assert_eq!(
            max_abs(&from_file.latents, &at_load.latents),
            0.0,
            "{src:?}: latents differ"
        );
        assert_eq!(from_file.rgb, at_load.rgb, "{src:?}: image differs");
        let want = refs_of(&c)["image"]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert!(max_level_diff(&from_file.rgb, &want) <= 1);
        std::fs::remove_file(&out).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tests_single_file_keys() -> BTreeSet<String> {
    keys_and_dtypes(&Source::SingleFile.path())
        .into_keys()
        .collect()
}

/// Without LoRAs and with stored dtypes, the single file is rewritten tensor for tensor.
#[test]
fn rewrite_without_lora_is_identical() {
    let dir = tmp_dir("rewrite");
    let out = dir.join("same.safetensors");
    let parts = open(Source::SingleFile);
    writer::write_single_file(&parts, &out, None).unwrap();
    let a = candle_core::safetensors::load(Source::SingleFile.path(), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(
        a.keys().collect::<BTreeSet<_>>(),
        b.keys().collect::<BTreeSet<_>>()
    );
    for (k, t) in &a {
        assert_eq!(t.dtype(), b[k].dtype(), "{k}");
        assert_eq!(t.dims(), b[k].dims(), "{k}");
        assert_eq!(max_abs(t, &b[k]), 0.0, "{k}");
    }
    // The folder (f32) written as f16 holds the same numbers too (they are f16 values).
    let folder = open(Source::Folder);
    writer::write_single_file(&folder, &out, Some(DType::F16)).unwrap();
    let c = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    for (k, t) in &a {
        assert_eq!(max_abs(t, &c[k]), 0.0, "{k}");
    }
    // Writing over an existing file replaces it whole; no temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

fn save(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    let p = dir.join(name);
    candle_core::safetensors::save(&map, &p).unwrap();
    p
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn apply_err(src: Source, specs: &[LoraSpec]) -> (String, ModelParts) {
    let mut parts = open(src);
    let e = lora::apply_loras(&mut parts, specs).expect_err("should fail");
    (format!("{e:#}"), parts)
}

fn no_patches(parts: &ModelParts) -> bool {
    [
        &parts.unet,
        &parts.text_encoder,
        &parts.text_encoder_2,
        &parts.vae,
    ]
    .iter()
    .all(|c| c.patches.is_empty())
}

#[test]
fn errors() {
    let dir = tmp_dir("errors");
    let one = |p: &Path| LoraSpec {
        path: p.to_path_buf(),
        weight: 1.0,
    };

    // An SD 1.5 LoRA (its first level has attention; SDXL's has none) and a Flux one.
    let sd15 = save(
        &dir,
        "sd15.safetensors",
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                randn(&[4, 320]),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                randn(&[320, 4]),
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                randn(&[4, 768]),
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                randn(&[768, 4]),
            ),
        ],
    );
    let flux = save(
        &dir,
        "flux.safetensors",
        &[
            (
                "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
                randn(&[4, 3072]),
            ),
            (
                "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight",
                randn(&[3072, 4]),
            ),
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                randn(&[4, 3072]),
            ),
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
                randn(&[9216, 4]),
            ),
        ],
    );
    for (p, n) in [(&sd15, 2), (&flux, 2)] {
        for src in [Source::Folder, Source::SingleFile] {
            let (e, parts) = apply_err(src, &[one(p)]);
            assert!(
                e.contains(&format!("0 of {n} modules matched")) && e.contains("is it for SDXL?"),
                "{e}"
            );
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(no_patches(&parts));
        }
    }

    // A shape mismatch names the key and both shapes.
    let key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k";
    let bad = save(
        &dir,
        "mismatch.safetensors",
        &[
            (&format!("{key}.lora_down.weight"), randn(&[4, 77])),
            (&format!("{key}.lora_up.weight"), randn(&[64, 4])),
            (
                &format!("{key}.alpha"),
                Tensor::new(4f32, &Device::Cpu).unwrap(),
            ),
        ],
    );
    // With a good LoRA before it: nothing at all is merged.
    let (e, parts) = apply_err(Source::Folder, &[spec("kohya_diffusers", 1.0), one(&bad)]);
    assert!(e.contains(&format!("{key}.lora_down.weight")), "{e}");
    assert!(e.contains("[64, 77]") && e.contains("[64, 48]"), "{e}");
    assert!(e.contains("mismatch.safetensors"), "{e}");
    assert!(no_patches(&parts), "a failed merge left patches behind");

    // Not safetensors: the file is named.
    let text = dir.join("notes.safetensors");
    std::fs::write(
        &text,
        "this is not a LoRA, just some text that is long enough",
    )
    .unwrap();
    let empty = dir.join("empty.safetensors");
    std::fs::write(&empty, "").unwrap();
    let missing = dir.join("missing.safetensors");
    for p in [&text, &empty, &missing] {
        let (e, parts) = apply_err(Source::Folder, &[one(p)]);
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(no_patches(&parts));
    }
    let (e, _) = apply_err(Source::Folder, &[one(&text)]);
    assert!(e.contains("not a safetensors file"), "{e}");
    // A checkpoint given as a LoRA.
    let (e, _) = apply_err(Source::Folder, &[one(&Source::SingleFile.path())]);
    assert!(
        e.contains("not a LoRA") && e.contains("model checkpoint"),
        "{e}"
    );

    // DoRA is rejected by name.
    let key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";
    let dora = save(
        &dir,
        "dora.safetensors",
        &[
            (&format!("{key}.lora_down.weight"), randn(&[4, 64])),
            (&format!("{key}.lora_up.weight"), randn(&[64, 4])),
            (&format!("{key}.dora_scale"), randn(&[1, 64])),
        ],
    );
    let (e, _) = apply_err(Source::Folder, &[one(&dora)]);
    assert!(e.contains("DoRA") && e.contains("dora.safetensors"), "{e}");

    // Half a module, factors that do not multiply, a non-number alpha.
    let half = save(
        &dir,
        "half.safetensors",
        &[(&format!("{key}.lora_down.weight"), randn(&[4, 64]))],
    );
    let (e, _) = apply_err(Source::Folder, &[one(&half)]);
    assert!(e.contains("half.safetensors") && e.contains(key), "{e}");
    let rank = save(
        &dir,
        "rank.safetensors",
        &[
            (&format!("{key}.lora_down.weight"), randn(&[4, 64])),
            (&format!("{key}.lora_up.weight"), randn(&[64, 3])),
        ],
    );
    let (e, _) = apply_err(Source::Folder, &[one(&rank)]);
    assert!(e.contains("rank") && e.contains("[64, 3]"), "{e}");
    let nan = save(
        &dir,
        "nan.safetensors",
        &[
            (&format!("{key}.lora_down.weight"), randn(&[4, 64])),
            (&format!("{key}.lora_up.weight"), randn(&[64, 4])),
            (
                &format!("{key}.alpha"),
                Tensor::new(f32::NAN, &Device::Cpu).unwrap(),
            ),
        ],
    );
    let (e, _) = apply_err(Source::Folder, &[one(&nan)]);
    assert!(e.contains("alpha") && e.contains("nan.safetensors"), "{e}");

    // Components already shared with a pipeline.
    let mut parts = open(Source::Folder);
    let _held = parts.unet.clone();
    let e = lora::apply_loras(&mut parts, &[spec("kohya_diffusers", 1.0)]).unwrap_err();
    assert!(format!("{e:#}").contains("already in use"), "{e:#}");

    std::fs::remove_dir_all(&dir).unwrap();
}

/// Some modules match, some do not: merged and reported, not an error.
#[test]
fn partial_match_is_reported() {
    let dir = tmp_dir("partial");
    let good = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";
    let p = save(
        &dir,
        "partial.safetensors",
        &[
            (&format!("{good}.lora_down.weight"), randn(&[4, 64])),
            (&format!("{good}.lora_up.weight"), randn(&[64, 4])),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                randn(&[4, 32]),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                randn(&[32, 4]),
            ),
            ("lora_unet_something_else.weight", randn(&[2])),
        ],
    );
    let (parts, r) = open_with(
        Source::Folder,
        &[LoraSpec {
            path: p,
            weight: 0.5,
        }],
    );
    assert_eq!((r[0].matched, r[0].total), (1, 2));
    assert_eq!(
        r[0].unmatched,
        ["lora_unet_down_blocks_0_attentions_0_proj_in"]
    );
    assert_eq!(r[0].ignored_keys, ["lora_unet_something_else.weight"]);
    assert_eq!(r[0].parts, [(Component::Unet, 1)]);
    let line = r[0].to_string();
    assert!(
        line.contains("1/2 modules") && line.contains("1 not in this model"),
        "{line}"
    );
    assert_eq!(parts.unet.patches.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspect_describes_loras_and_checkpoints() {
    for f in FORMATS {
        let s = lora::describe_file(&lora(f)).unwrap();
        eprintln!("{s}\n");
        assert!(s.contains("LoRA") || s.contains("LyCORIS"), "{s}");
        assert!(s.contains("modules:"), "{s}");
    }
    let s = lora::describe_file(&lora("kohya_diffusers")).unwrap();
    assert!(
        s.contains("rank: 4") && s.contains("alpha: 2 (scale 0.5)") && s.contains("UNet 169"),
        "{s}"
    );
    let s = lora::describe_file(&lora("kohya_ldm")).unwrap();
    assert!(s.contains("CLIP-L") && s.contains("bigG"), "{s}");
    for src in [Source::SingleFile, Source::Folder] {
        let s = lora::describe_file(&src.path()).unwrap();
        eprintln!("{s}\n");
        assert!(
            s.contains("SDXL checkpoint") && s.contains("parameters"),
            "{s}"
        );
    }
    let s = lora::describe_file(&Source::SingleFile.path()).unwrap();
    assert!(
        s.contains("original (LDM/sgm) single file") && s.contains("F16"),
        "{s}"
    );
    let dir = tmp_dir("inspect");
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, [0u8; 64]).unwrap();
    let e = lora::describe_file(&junk).unwrap_err();
    assert!(format!("{e:#}").contains("junk.safetensors"), "{e:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The fused merge (`weights::merge_patches`, which `ComponentWeights::load` uses: one f32
/// buffer, `acc += m · ΔW` in place, one cast) gives exactly the numbers of the plain tensor
/// arithmetic `(W.f32 + ΔW₁ · m₁ + …).to_dtype()`, in every output dtype.
#[test]
fn merge_patches_equals_tensor_arithmetic() {
    let (parts, _) = open_with(
        Source::SingleFile,
        &[
            spec("kohya_diffusers", 0.7),
            spec("loha", -1.3),
            spec("lokr", 1.0),
        ],
    );
    let mut scratch = dmd2::weights::MergeScratch::default();
    let mut n = 0;
    for w in [&parts.unet, &parts.text_encoder, &parts.text_encoder_2] {
        for (name, patches) in &w.patches {
            let raw = w.load_raw(name).unwrap();
            let mut sum = raw.to_dtype(DType::F32).unwrap();
            for p in patches {
                let d = p.delta.delta(raw.dims()).unwrap();
                sum = (sum + (d * p.multiplier as f64).unwrap()).unwrap();
            }
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let want = sum.to_dtype(dtype).unwrap();
                let got = dmd2::weights::merge_patches(&raw, patches, dtype, &mut scratch).unwrap();
                assert_eq!(got.dtype(), dtype);
                assert_eq!(got.dims(), want.dims());
                assert_eq!(max_abs(&got, &want), 0.0, "{name} {dtype:?}");
                let loaded = w.load(name, dtype, &Device::Cpu).unwrap();
                assert_eq!(max_abs(&loaded, &want), 0.0, "load {name} {dtype:?}");
            }
            n += 1;
        }
    }
    assert!(n > 150, "{n}");
}
