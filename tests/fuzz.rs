//! Property tests (bounded fuzzing) of the parsers that read strangers' input: prompt-file
//! lines, PNG `parameters` text, output-name templates, and single-file key maps. None may
//! panic; their outputs must keep their invariants. Run longer with
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

use dmd2::checkpoint::single_file;
use dmd2::metadata::parse_a1111;
use dmd2::naming::{self, NameFields};
use dmd2::prompts::{PromptFormat, check_settings, parse_line};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() }
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
        if naming::check_template(&template).is_ok() {
            let f = NameFields { index: 3, seed: 9, prompt: &prompt, line: 1, steps: 4, preset: "p" };
            if let Ok(name) = naming::render(&template, &f)
                && let Ok(p) = naming::safe_join(Path::new("/out/dir"), &name)
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
