//! Property tests (bounded fuzzing) of the parsers that read strangers' input: prompt-file
//! lines, PNG `parameters` text and text chunks, output-name templates, single-file key maps,
//! LoRA files and safetensors headers. None may panic; their outputs must keep their
//! invariants. Run longer with
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

use dmd2::checkpoint::single_file;
use dmd2::metadata::parse_a1111;
use dmd2::output::file_names::{self, NameFields};
use dmd2::prompts::{PromptFormat, check_settings, parse_line};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn lora_config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(150),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Key names shaped like the LoRA formats dmd2 reads, with random module paths and suffixes.
fn lora_key() -> impl Strategy<Value = String> {
    let prefix = prop_oneof![
        Just("lora_unet_"),
        Just("lora_te1_text_model_encoder_layers_"),
        Just("lora_te2_"),
        Just("unet."),
        Just("text_encoder."),
        Just("lycoris_"),
        Just(""),
    ];
    let module = prop_oneof![
        Just("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q".to_string()),
        Just("input_blocks_4_1_proj_in".to_string()),
        Just("down_blocks.1.attentions.0.proj_in".to_string()),
        Just("0_self_attn_q_proj".to_string()),
        "[a-z0-9_.]{0,30}",
    ];
    let suffix = prop_oneof![
        Just(".lora_down.weight"),
        Just(".lora_up.weight"),
        Just(".alpha"),
        Just(".lora_A.weight"),
        Just(".lora_B.weight"),
        Just(".lora.down.weight"),
        Just(".hada_w1_a"),
        Just(".hada_w1_b"),
        Just(".hada_w2_a"),
        Just(".hada_w2_b"),
        Just(".lokr_w1"),
        Just(".lokr_w2"),
        Just(".lokr_w2_a"),
        Just(".lora_mid.weight"),
        Just(".dora_scale"),
        Just(".diff"),
        Just(""),
    ];
    (prefix, module, suffix).prop_map(|(p, m, s)| format!("{p}{m}{s}"))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prompt_lines_never_panic(s in "\\PC{0,200}") {
        for f in [PromptFormat::Text, PromptFormat::Jsonl] {
            if let Ok(Some(settings)) = parse_line(&s, f) {
                let _ = check_settings(&settings, false);
            }
        }
    }

    #[test]
    fn jsonl_shaped_lines_never_panic(
        prompt in "\\PC{0,40}",
        key in "[a-z_]{1,16}",
        num in any::<i64>(),
        float in any::<f64>(),
    ) {
        let line = format!(r#"{{"prompt": {}, "{key}": {num}, "cfg": {float}}}"#, serde_json::to_string(&prompt).unwrap());
        if let Ok(Some(s)) = parse_line(&line, PromptFormat::Jsonl) {
            let _ = check_settings(&s, false);
        }
    }

    #[test]
    fn a1111_text_never_panics(s in "(\\PC{0,30}\n){0,4}Steps: \\PC{0,120}") {
        if let Ok(p) = parse_a1111(&s) {
            for (k, _) in &p.fields {
                prop_assert!(!k.contains(','));
            }
        }
    }

    #[test]
    fn arbitrary_parameters_never_panic(s in "\\PC{0,300}") {
        let _ = parse_a1111(&s);
    }

    #[test]
    fn names_stay_inside_the_output_dir(template in "\\PC{0,60}", prompt in "\\PC{0,60}") {
        if file_names::check_template(&template).is_ok() {
            let f = NameFields { index: 3, seed: 9, prompt: &prompt, line: 1, steps: 4, preset: "p" };
            if let Ok(name) = file_names::render(&template, &f)
                && let Ok(p) = file_names::safe_join(Path::new("/out/dir"), &name)
            {
                prop_assert!(p.starts_with("/out/dir"));
                prop_assert!(p != Path::new("/out/dir"));
                prop_assert!(!p.components().any(|c| matches!(c, std::path::Component::ParentDir)));
            }
        }
    }

    #[test]
    fn single_file_detection_never_panics(
        keys in proptest::collection::vec(("(model\\.diffusion_model|conditioner\\.embedders\\.[01]\\.(model|transformer)|first_stage_model)\\.[a-z_0-9.]{0,40}", proptest::collection::vec(0usize..5000, 0..5)), 0..40)
    ) {
        let shapes: BTreeMap<String, Vec<usize>> = keys.into_iter().collect();
        let _ = single_file::detect(&shapes);
    }
}

proptest! {
    #![proptest_config(lora_config())]

    /// Random LoRA files (key names and shapes) against the tiny model: the parser and the
    /// merge either accept them or say why; they never panic.
    #[test]
    fn lora_files_never_panic(
        entries in proptest::collection::vec((lora_key(), proptest::collection::vec(1usize..9, 0..4)), 0..12)
    ) {
        let dir = std::env::temp_dir().join(format!("dmd2-fuzz-lora-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.safetensors");
        let mut ts = std::collections::HashMap::new();
        for (k, shape) in entries {
            let t = candle_core::Tensor::ones(shape, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
            ts.insert(k, t);
        }
        candle_core::safetensors::save(&ts, &path).unwrap();
        let mut parts = dmd2::checkpoint::open(&fixtures_tiny()).unwrap();
        let spec = dmd2::lora::LoraSpec { path: path.clone(), weight: 0.5 };
        let _ = dmd2::lora::apply_loras(&mut parts, &[spec]);
        let _ = dmd2::lora::describe_file(&path);
    }
}

fn file_config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(400),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A header entry with hostile numbers: huge, zero, wrapping shapes; offsets anywhere.
fn header_entry() -> impl Strategy<Value = serde_json::Value> {
    let dim = prop_oneof![
        0u64..5,
        Just(u64::MAX),
        Just((1u64 << 59) + 4),
        Just(1u64 << 32),
        any::<u64>(),
    ];
    let dtype = prop_oneof![
        Just("F32"),
        Just("F16"),
        Just("BF16"),
        Just("U8"),
        Just("BOOL"),
        Just("F8_E4M3"),
        Just("X")
    ];
    let offset = prop_oneof![0u64..64, Just(u64::MAX), any::<u64>()];
    (
        dtype,
        proptest::collection::vec(dim, 0..4),
        offset.clone(),
        offset,
    )
        .prop_map(|(d, shape, a, b)| serde_json::json!({"dtype": d, "shape": shape, "data_offsets": [a, b]}))
}

proptest! {
    #![proptest_config(file_config())]

    /// The safetensors reader on hostile headers (wrapping shapes, offsets out of range,
    /// unknown dtypes, data too short or too long) and on random bytes: it accepts only
    /// headers whose every tensor fits its data, and never panics.
    #[test]
    fn safetensors_reader_never_panics(
        entries in proptest::collection::vec(("[a-c]{1,2}", header_entry()), 0..5),
        data in 0usize..128,
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let dir = std::env::temp_dir().join(format!("dmd2-fuzz-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let header: serde_json::Map<String, serde_json::Value> = entries.into_iter().collect();
        let h = serde_json::to_vec(&header).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(vec![0u8; data]);
        let p = dir.join("f.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(f) = dmd2::safetensors_file::SafetensorsFile::open(&p) {
            for t in f.tensors.values() {
                prop_assert!(t.start + t.len <= bytes.len() as u64);
            }
        }
        std::fs::write(&p, &junk).unwrap();
        prop_assert!(dmd2::safetensors_file::SafetensorsFile::open(&p).is_err() || junk.len() >= 8);
    }

    /// PNG text chunks of any kind and content (and random bytes as a PNG): the settings
    /// reader takes them or says why, and never panics.
    #[test]
    fn png_text_reader_never_panics(
        chunks in proptest::collection::vec((0u8..3, "[a-z0-9]{1,12}", "\\PC{0,200}"), 0..4),
        junk in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let dir = std::env::temp_dir().join(format!("dmd2-fuzz-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.png");
        {
            let f = std::fs::File::create(&p).unwrap();
            let mut enc = png::Encoder::new(f, 1, 1);
            enc.set_color(png::ColorType::Rgb);
            for (kind, key, text) in chunks {
                let key = if kind == 0 { "parameters".to_string() } else if kind == 1 { "dmd2".to_string() } else { key };
                let _ = match kind % 3 {
                    0 => enc.add_ztxt_chunk(key, text),
                    1 => enc.add_itxt_chunk(key, text),
                    _ => enc.add_text_chunk(key, text.chars().filter(|c| c.is_ascii()).collect()),
                };
            }
            if let Ok(mut w) = enc.write_header() {
                let _ = w.write_image_data(&[0, 0, 0]);
            }
        }
        let _ = dmd2::metadata::settings_from_png(&p);
        std::fs::write(&p, &junk).unwrap();
        let _ = dmd2::metadata::settings_from_png(&p);
    }
}

fn fixtures_tiny() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}
