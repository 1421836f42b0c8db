//! `dmd2::rng::TorchRng` against reference `torch.randn` outputs written by
//! `scripts/make_rng_fixtures.py` (torch CPU generator, x86-64 AVX2 kernel).

use std::collections::HashMap;

use dmd2::rng::TorchRng;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/rng.safetensors"
);

#[derive(Deserialize)]
struct Draw {
    numel: usize,
    stride: usize,
}

#[derive(Deserialize)]
struct Case {
    seed: u64,
    draws: Vec<Draw>,
}

fn f32_values(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), Dtype::F32, "{name}");
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn randn_matches_torch() {
    let path = std::env::var("DMD2_RNG_FIXTURE").unwrap_or_else(|_| FIXTURE.to_string());
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("fixture header");
    let meta: &HashMap<String, String> = meta.metadata().as_ref().expect("fixture metadata");
    let cases: Vec<Case> = serde_json::from_str(&meta["index"]).expect("fixture index");
    let st = SafeTensors::deserialize(&bytes).expect("fixture tensors");

    let (mut total, mut exact, mut max_err) = (0usize, 0usize, 0f32);
    let (mut large_total, mut large_exact) = (0usize, 0usize);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut rng = TorchRng::new(case.seed);
        for (k, draw) in case.draws.iter().enumerate() {
            let name = format!("case{i}_draw{k}");
            let want = f32_values(&st, &name);
            let got = rng.randn(draw.numel);
            assert_eq!(got.len(), draw.numel, "{name}");
            let got: Vec<f32> = got.into_iter().step_by(draw.stride).collect();
            assert_eq!(got.len(), want.len(), "{name}: length");
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                let err = (g - w).abs();
                total += 1;
                let same = g.to_bits() == w.to_bits();
                exact += same as usize;
                if draw.numel >= 16 {
                    large_total += 1;
                    large_exact += same as usize;
                }
                max_err = max_err.max(err);
                if err.is_nan() || err > 1e-6 {
                    failures.push(format!(
                        "{name} (seed {}, numel {}) [{}]: got {g} want {w}",
                        case.seed,
                        draw.numel,
                        j * draw.stride
                    ));
                }
            }
        }
    }
    println!(
        "torch randn parity: {exact}/{total} values bit-exact ({:.4}%), \
         {large_exact}/{large_total} on the float (numel >= 16) path, max abs err {max_err:e}",
        100.0 * exact as f64 / total as f64
    );
    assert!(total > 10_000, "fixture too small: {total}");
    assert!(
        failures.is_empty(),
        "{} values off by more than 1e-6:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}
