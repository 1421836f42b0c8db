//! Parity with diffusers on the tiny SDXL-architecture fixtures (see scripts/make_fixtures.py):
//! token ids, prompt embeddings, one UNet forward, the sampler's latents and the final pixels,
//! for the diffusers folder and the single-file checkpoint alike.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use dmd2::prompt_syntax::PromptSyntax;

fn cases_for(name: &str) -> Vec<(Case, Source)> {
    let c = case(name);
    Source::for_case(&c)
        .into_iter()
        .map(|s| (c.clone(), s))
        .collect()
}

fn check_text(name: &str) {
    for (c, src) in cases_for(name) {
        let p = pipeline(src);
        let r = c.refs();
        let (ids1, ids2) = p.token_ids(&c.prompt).unwrap();
        assert_eq!(ids1, ids_of(&r["ids_1"]), "{name} {src:?}: tokenizer 1 ids");
        assert_eq!(ids2, ids_of(&r["ids_2"]), "{name} {src:?}: tokenizer 2 ids");
        // The default syntax (A1111's) reads a prompt without brackets, BREAK or more than
        // 75 tokens exactly as diffusers does: the same tensors, bit for bit.
        let syntax = c.syntax();
        let cond = p.encode_prompt(syntax, &c.prompt).unwrap();
        if syntax == PromptSyntax::A1111 {
            let plain = p.encode_prompt(PromptSyntax::Plain, &c.prompt).unwrap();
            assert_eq!(
                cond.context
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                plain
                    .context
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                "{name}: a1111 and plain differ"
            );
            assert_eq!(
                cond.pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                plain
                    .pooled
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
        assert_close(
            &format!("{name} {src:?} prompt_embeds"),
            &cond.context,
            &r["prompt_embeds"],
            1e-4,
        );
        assert_close(
            &format!("{name} {src:?} pooled"),
            &cond.pooled,
            &r["pooled_prompt_embeds"],
            1e-4,
        );
        // diffusers encodes the negative prompt only for CFG, "" when none is given and the
        // model does not zero it (model vb).
        if r.contains_key("neg_ids_1") {
            let neg = c.negative_prompt.as_deref().unwrap_or("");
            let (n1, n2) = p.token_ids(neg).unwrap();
            assert_eq!(n1, ids_of(&r["neg_ids_1"]), "{name}: negative ids 1");
            assert_eq!(n2, ids_of(&r["neg_ids_2"]), "{name}: negative ids 2");
        }
        if c.guidance_scale > 1.0 {
            let u = p
                .encode_negative(syntax, c.negative_prompt.as_deref(), &cond)
                .unwrap();
            assert_close(
                &format!("{name} {src:?} negative embeds"),
                &u.context,
                &r["negative_prompt_embeds"],
                1e-4,
            );
            assert_close(
                &format!("{name} {src:?} negative pooled"),
                &u.pooled,
                &r["negative_pooled_prompt_embeds"],
                1e-4,
            );
        }
    }
}

fn check_unet(name: &str) {
    for (c, src) in cases_for(name) {
        let p = pipeline(src);
        let r = c.refs();
        let t = r["unet_timestep"]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let out = p
            .unet()
            .expect("the UNet is loaded")
            .forward(
                &r["unet_sample"],
                t as f64,
                &r["unet_encoder_hidden_states"],
                &r["unet_text_embeds"],
                &r["unet_time_ids"],
            )
            .unwrap();
        assert_close(
            &format!("{name} {src:?} unet forward"),
            &out,
            &r["unet_out"],
            1e-4,
        );
    }
}

fn check_end_to_end(name: &str) {
    for (c, src) in cases_for(name) {
        let p = pipeline(src);
        let r = c.refs();
        let req = c.request();
        // The initial noise is torch's.
        let dims = r["init_latents"].dims().to_vec();
        let numel: usize = dims.iter().product();
        let noise = Tensor::from_vec(
            dmd2::rng::TorchRng::new(c.seed).randn(numel),
            dims,
            &Device::Cpu,
        )
        .unwrap();
        assert!(
            max_abs(&noise, &r["init_latents"]) <= 1e-5,
            "{name}: initial noise differs from torch"
        );

        let out = p.generate(&req, &mut |_, _| {}).unwrap();
        assert_close(
            &format!("{name} {src:?} final latents"),
            &out.latents,
            &r["final_latents"],
            1e-3,
        );
        let decoded = p.decode_raw(&r["final_latents"]).unwrap();
        assert_close(
            &format!("{name} {src:?} VAE decode"),
            &decoded,
            &r["decoded"],
            1e-4,
        );
        let want = r["image"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let d = max_level_diff(&out.rgb, &want);
        assert!(d <= 1, "{name} {src:?}: pixels differ by {d} levels");
    }
}

macro_rules! parity_case {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn text() { super::check_text(stringify!($case)); }
            #[test]
            fn unet() { super::check_unet(stringify!($case)); }
            #[test]
            fn end_to_end() { super::check_end_to_end(stringify!($case)); }
        }
    )*};
}

parity_case!(
    cfg_off,
    cfg_neg,
    cfg_noneg,
    one_step,
    eight_step,
    nonsquare,
    bang,
    long,
    tiny2,
    va_cfg_off,
    va_cfg_neg,
    vb_cfg_empty_neg,
    vb_one_step,
);

#[test]
fn every_reference_case_is_tested() {
    let names: Vec<String> = cases().into_iter().map(|c| c.name).collect();
    for n in [
        "cfg_off",
        "cfg_neg",
        "cfg_noneg",
        "one_step",
        "eight_step",
        "nonsquare",
        "bang",
        "long",
        "tiny2",
        "va_cfg_off",
        "va_cfg_neg",
        "vb_cfg_empty_neg",
        "vb_one_step",
    ] {
        assert!(
            names.iter().any(|x| x == n),
            "case {n} missing from cases.json"
        );
    }
    assert_eq!(
        names.len(),
        13,
        "a case in cases.json has no test: {names:?}"
    );
}
