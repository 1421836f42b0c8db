//! `--vae-tiling`: the tiled decode against diffusers' `AutoencoderKL.tiled_decode` on the
//! fixture VAE (scripts/make_vae_tiling_fixtures.py).
//!
//! Tiles are decoded independently, as in diffusers, so each tile's group-norm statistics and
//! mid-block attention see only the tile: on these random-weight fixtures the tiled image is
//! far from the whole decode (diffusers itself: 59–160 levels), which is why the reference is
//! diffusers' tiled output and not the whole decode.

mod common;

use candle_core::{Device, Tensor};
use common::{Source, fixtures, max_abs, pipeline};

fn levels(t: &Tensor) -> Vec<u8> {
    dmd2::vae::to_rgb8(&t.get(0).unwrap()).unwrap()
}

#[test]
fn tiled_decode_matches_diffusers() {
    let refs =
        candle_core::safetensors::load(fixtures().join("vae_tiling.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&str> = refs
        .keys()
        .filter_map(|k| k.strip_suffix(".latents"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 3);
    for src in [Source::Folder, Source::SingleFile] {
        let p = pipeline(src);
        for name in &names {
            let z = &refs[&format!("{name}.latents")];
            let want = &refs[&format!("{name}.tiled")];
            let tile = refs[&format!("{name}.tile")].to_vec1::<i64>().unwrap()[0] as usize;
            let got = p.vae().decode_tiled(z, tile).unwrap();
            assert_eq!(got.dims(), want.dims(), "{name}");
            let e = max_abs(&got, want);
            assert!(e <= 2e-4, "{name} {src:?}: tiled decode differs by {e}");
            let d = levels(&got)
                .iter()
                .zip(levels(want))
                .map(|(a, b)| a.abs_diff(b))
                .max()
                .unwrap();
            assert!(d <= 1, "{name} {src:?}: {d} levels from diffusers");
            // And it really tiled: the whole decode is a different image here.
            let whole = p.decode_raw(z).unwrap();
            assert!(
                max_abs(&whole, want) > 0.05,
                "{name}: tiling changed nothing"
            );
        }
    }
}

#[test]
fn latents_within_one_tile_decode_whole() {
    let p = pipeline(Source::Folder);
    let z = Tensor::randn(0f32, 1.0, (1, 4, 16, 24), &Device::Cpu).unwrap();
    let whole = p.decode_raw(&z).unwrap();
    let tiled = p.vae().decode_tiled(&z, 24).unwrap();
    assert_eq!(max_abs(&whole, &tiled), 0.0);
}
