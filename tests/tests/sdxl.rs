//! Stable Diffusion XL against diffusers (fixtures in tests/fixtures/sdxl, made by
//! tools/make_sdxl_fixtures.py): both text encoders' states and the pooled embedding, whole
//! pipelines (text-to-image with and without a negative prompt, another size, DPM++, SDXL-Turbo's
//! one step, img2img) at PSNR >= 40 dB from the fp16 weights as SDXL repos ship them; the U-Net
//! quantized at load, its image's PSNR against the unquantized one reported; a folder whose parts
//! do not fit together refused at load.

use kiln::diffusion::models::{read_pipeline_dir, SdModels};
use kiln::diffusion::pipeline::{ImageOptions, RgbImage};
use kiln::diffusion::schedulers::SchedulerKind;
use kiln::llm::Quantize;
use kiln_tests::image_psnr as psnr;
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/sdxl")
}

fn load(model: &str, q: Quantize) -> SdModels {
    SdModels::load_with(
        &kiln_tests::gpu(),
        read_pipeline_dir(&dir().join(model)).unwrap(),
        q,
    )
    .unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn init_image() -> RgbImage {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd-edit");
    let a = kiln_tests::read_npy(&d.join("init.npy"));
    let rgb = a.data.iter().map(|&v| v as u8).collect();
    RgbImage::new(a.shape[1], a.shape[0], rgb, "init").unwrap()
}

/// The options of a fixture run, with its recorded latents (or img2img noise).
fn options(e: &Value, run: &Value) -> ImageOptions {
    let (h, w) = (
        run["height"].as_u64().unwrap() as usize,
        run["width"].as_u64().unwrap() as usize,
    );
    let img2img = run["pipeline"] == "img2img";
    let latents = match (img2img, w == h) {
        (true, _) => "noise.npy",
        (false, true) => "latents.npy",
        (false, false) => "latents_wide.npy",
    };
    ImageOptions {
        prompt: e["prompt"].as_str().unwrap().into(),
        negative_prompt: run["negative_prompt"].as_str().unwrap_or("").into(),
        steps: run["steps"].as_u64().unwrap() as usize,
        guidance: run["guidance"].as_f64().unwrap() as f32,
        scheduler: Some(match run["scheduler"].as_str().unwrap() {
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmSolverMultistep,
            other => panic!("{other}"),
        }),
        width: Some(w),
        height: Some(h),
        latents: Some(kiln_tests::read_npy(&dir().join(latents)).data),
        init_image: img2img.then(init_image),
        strength: run["strength"].as_f64().map(|s| s as f32),
        ..Default::default()
    }
}

#[test]
fn sdxl_text_states_match_diffusers() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let m = load("sdxl-tiny", Quantize::None);
    let (ctx, pooled) = pollster::block_on(m.prompt_states(e["prompt"].as_str().unwrap())).unwrap();
    for (name, got) in [("prompt_embeds", ctx), ("pooled", pooled.unwrap())] {
        let want = kiln_tests::read_npy(&dir().join(format!("{name}.npy")));
        assert_eq!(got.len(), want.data.len(), "{name}");
        let err = kiln::reference::rel_err(&got, &want.data);
        eprintln!("{name}: rel err {err:.2e}");
        assert!(err < 1e-3, "{name}: rel err {err}");
    }
}

#[test]
fn sdxl_pipelines_match_diffusers() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let runs = e["runs"].as_object().unwrap();
    assert_eq!(runs.len(), 7);
    let mut loaded: Vec<(String, SdModels)> = Vec::new();
    for (name, run) in runs.iter().filter(|(_, r)| r.get("lora").is_none()) {
        let model = run["model"].as_str().unwrap();
        if !loaded.iter().any(|(k, _)| k == model) {
            loaded.push((model.into(), load(model, Quantize::None)));
        }
        let m = &mut loaded.iter_mut().find(|(k, _)| k == model).unwrap().1;
        if model.contains("turbo") {
            // What a request that says nothing gets on SDXL-Turbo's scheduler.
            assert_eq!(m.defaults().0, 1, "{model}");
        }
        let opts = options(&e, run);
        let img = pollster::block_on(m.generate(&opts, &mut |_, _, _| false))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = kiln_tests::read_npy(&dir().join(format!("{name}.npy")));
        assert_eq!((img.height, img.width), (want.shape[1], want.shape[2]));
        let p = psnr(&img.raw, &want.data, img.height, img.width);
        eprintln!("{name}: PSNR {p:.1} dB");
        assert!(p >= 40.0, "{name}: PSNR {p:.1} dB < 40");
    }
}

/// The U-Net's and text encoders' matrices quantized at load (what a machine without the memory
/// for SDXL's f16 weights does): the image's PSNR against the unquantized one, reported.
#[test]
fn sdxl_quantized_at_load_stays_close() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let run = &e["runs"]["euler_g5"];
    let opts = options(&e, run);
    let mut full = load("sdxl-tiny", Quantize::None);
    let reference = pollster::block_on(full.generate(&opts, &mut |_, _, _| false)).unwrap();
    let want = kiln_tests::read_npy(&dir().join("euler_g5.npy"));
    for q in [Quantize::Q8, Quantize::Q4K] {
        let mut m = load("sdxl-tiny", q);
        let img = pollster::block_on(m.generate(&opts, &mut |_, _, _| false)).unwrap();
        // The reference image as [h, w, 3] in [0, 1].
        let (h, w) = (img.height, img.width);
        let r: Vec<f32> = (0..h * w)
            .flat_map(|p| (0..3).map(move |c| (p, c)))
            .map(|(p, c)| (reference.raw[c * h * w + p] / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect();
        let vs_f16 = psnr(&img.raw, &r, h, w);
        let vs_diffusers = psnr(&img.raw, &want.data, h, w);
        eprintln!("{q:?}: PSNR {vs_f16:.1} dB against the f16 weights' image, {vs_diffusers:.1} dB against diffusers");
        // Random weights at this gain amplify rounding far more than trained ones; rows of 32
        // make Q4_K fall back to Q4_0 (measured: Q8_0 38.9 dB, Q4_0 17.0 dB).
        let floor = if q == Quantize::Q8 { 30.0 } else { 12.0 };
        assert!(vs_f16 >= floor, "{q:?}: {vs_f16:.1} dB < {floor}");
    }
}

/// A LoRA on the U-Net and both text encoders as diffusers saves SDXL LoRAs and in kohya's
/// SDXL names, merged at load, against diffusers' `fuse_lora`; the same file on an SD 1.x pipeline is an error naming the
/// second text encoder it lacks.
#[test]
fn sdxl_lora_matches_diffusers() {
    let e = kiln_tests::read_json(&dir().join("expected.json"));
    let run = &e["runs"]["lora_s0.8"];
    let bytes = std::fs::read(dir().join("lora.safetensors")).unwrap();
    let want = kiln_tests::read_npy(&dir().join("lora_s0.8.npy"));
    let mut m = load("sdxl-tiny", Quantize::None);
    // The same LoRA as diffusers saves it and in kohya's SDXL names (the U-Net's SGM paths).
    for file in ["lora.safetensors", "lora-kohya.safetensors"] {
        let b = std::fs::read(dir().join(file)).unwrap();
        let n = m.set_loras(vec![(file.into(), b, 0.8)]).unwrap();
        let img = pollster::block_on(m.generate(&options(&e, run), &mut |_, _, _| false)).unwrap();
        let p = psnr(&img.raw, &want.data, img.height, img.width);
        eprintln!("{file} at 0.8 ({n} modules): PSNR {p:.1} dB");
        assert!(p >= 40.0, "{file}: PSNR {p:.1} dB < 40");
    }
    let sd1 = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd/sd1-tiny");
    let mut m = SdModels::load(&kiln_tests::gpu(), read_pipeline_dir(&sd1).unwrap()).unwrap();
    let err = m
        .set_loras(vec![("lora.safetensors".into(), bytes, 1.0)])
        .unwrap_err()
        .to_string();
    // The first module that does not fit is named, with both shapes.
    assert!(
        err.contains("LoRA lora.safetensors") && err.contains("do not make the shape of"),
        "{err}"
    );
}

#[test]
fn mismatched_sdxl_parts_are_refused_at_load() {
    let files = || read_pipeline_dir(&dir().join("sdxl-tiny")).unwrap();
    // The second text encoder missing: the U-Net's added conditioning has no pooled input.
    let mut f = files();
    f.retain(|k, _| !k.starts_with("text_encoder_2/") && !k.starts_with("tokenizer_2/"));
    let err = SdModels::load(&kiln_tests::gpu(), f)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("text_encoder_2"), "{err}");
    // A U-Net whose cross_attention_dim is not the two encoders' widths together.
    let mut f = files();
    let cfg = String::from_utf8(f["unet/config.json"].clone()).unwrap();
    let cfg = cfg.replace("\"cross_attention_dim\": 80", "\"cross_attention_dim\": 64");
    f.insert("unet/config.json".into(), cfg.into_bytes());
    let err = SdModels::load(&kiln_tests::gpu(), f)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cross_attention_dim is 64") && err.contains("80"),
        "{err}"
    );
}
