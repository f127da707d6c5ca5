//! The embedded default models (models/, trained by tools/train_text_model.py and
//! tools/train_image_model.py) against the libraries they were trained with: the text model's
//! greedy ids equal transformers' (reference.json, written by the training script from the saved
//! f16 weights), and the image pipeline's picture for fixed latents matches diffusers' within
//! 40 dB PSNR (reference/, same script).

use kiln::diffusion::models::{read_pipeline_dir, SdModels};
use kiln::diffusion::pipeline::ImageOptions;
use kiln::kernels::sample::SamplerSettings;
use kiln::llm::{GenerateOptions, LoadOptions, TextModel};
use std::path::PathBuf;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

use kiln_tests::{image_psnr, json_ids as u32s, read_json, read_npy};

#[test]
fn default_text_model_matches_transformers_greedy_ids() {
    let dir = models_dir().join("text-kjv");
    let files = kiln::llm::generate::read_model_path(&dir).unwrap();
    let mut model = pollster::block_on(TextModel::load(
        &kiln_tests::gpu(),
        files,
        &LoadOptions::default(),
        &mut |_, _| {},
    ))
    .unwrap();
    let refs = read_json(&dir.join("reference.json"));
    let refs = refs.as_array().unwrap();
    assert!(refs.len() >= 4, "reference.json has {} prompts", refs.len());
    for r in refs {
        let prompt = r["prompt"].as_str().unwrap();
        let prompt_ids = u32s(&r["prompt_ids"]);
        assert_eq!(
            model.tokenizer.encode(prompt).unwrap(),
            prompt_ids,
            "tokenizer ids for {prompt:?}"
        );
        let want = u32s(&r["ids"]);
        let opts = GenerateOptions {
            max_tokens: want.len(),
            sampler: SamplerSettings::greedy(),
            ..Default::default()
        };
        let g = pollster::block_on(model.generate(&prompt_ids, &opts, &mut |_| true)).unwrap();
        assert_eq!(g.ids, want, "greedy ids for {prompt:?}");
        eprintln!("{prompt:?} -> {:?}", g.text);
    }
}

#[test]
fn default_image_model_matches_diffusers() {
    let dir = models_dir().join("image-shapes");
    let r = read_json(&dir.join("reference/reference.json"));
    let mut m = SdModels::load(&kiln_tests::gpu(), read_pipeline_dir(&dir).unwrap()).unwrap();
    let read = |name: &str| read_npy(&dir.join("reference").join(name));
    let latents = read(r["latents"].as_str().unwrap());
    let want = read(r["image"].as_str().unwrap());
    let (h, w) = (want.shape[0], want.shape[1]);
    let opts = ImageOptions {
        prompt: r["prompt"].as_str().unwrap().into(),
        steps: r["steps"].as_u64().unwrap() as usize,
        guidance: r["guidance"].as_f64().unwrap() as f32,
        scheduler: None, // the pipeline's own (DPM++ 2M), as `kiln image` with no --scheduler
        width: Some(w),
        height: Some(h),
        latents: Some(latents.data),
        ..Default::default()
    };
    let img = pollster::block_on(m.generate(&opts, &mut |_, _, _| false)).unwrap();
    assert!(img.notes.is_empty(), "unexpected notes: {:?}", img.notes);
    let psnr = image_psnr(&img.raw, &want.data, h, w);
    eprintln!("default image model vs diffusers: PSNR {psnr:.1} dB");
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB < 40");
}
