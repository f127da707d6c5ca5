//! Damaged and hostile files (issue 13). Each test builds its bad file from a real fixture (a
//! value poked into a tensor, a header or config edited) or from scratch, and requires a clear
//! error naming what is wrong: nothing loads as a different model or runs as garbage.

use kiln::diffusion::models::{read_pipeline_dir, SdModels};
use kiln::diffusion::pipeline::ImageOptions;
use kiln::formats::gguf::Gguf;
use kiln::formats::safetensors::SafeTensors;
use kiln::formats::ModelFiles;
use kiln::llm::{GenerateOptions, LoadOptions, TextModel};
use kiln::weights::Quantize;
use kiln_tests::surgery::{
    gguf_file, gguf_tensor, st_fill, st_join, st_poke, st_split, st_tensor, Meta,
};
use serde_json::{json, Value};
use std::path::PathBuf;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(path)
}

/// A text model's files: the HF folder of `case`, or one of its GGUF files.
fn text_files(case: &str, gguf: Option<&str>) -> ModelFiles {
    let d = fixture("llm").join(case);
    kiln::llm::generate::read_model_path(&gguf.map_or(d.clone(), |g| d.join(g))).unwrap()
}

fn text_load(f: ModelFiles, quantize: Quantize) -> kiln::Result<TextModel> {
    let opts = LoadOptions {
        ctx: 64,
        quantize,
        ..Default::default()
    };
    pollster::block_on(TextModel::load(
        &kiln_tests::gpu(),
        f,
        &opts,
        &mut |_, _| {},
    ))
}

fn text_err(f: ModelFiles) -> String {
    match text_load(f, Quantize::None) {
        Ok(_) => panic!("the model loaded"),
        Err(e) => e.to_string(),
    }
}

fn sd_files() -> ModelFiles {
    read_pipeline_dir(&fixture("sd/sd1-tiny")).unwrap()
}

fn sd_err(f: ModelFiles) -> String {
    match SdModels::load(&kiln_tests::gpu(), f) {
        Ok(_) => panic!("the pipeline loaded"),
        Err(e) => e.to_string(),
    }
}

fn image(m: &mut SdModels, opts: ImageOptions) -> kiln::Result<kiln::diffusion::pipeline::Image> {
    pollster::block_on(m.generate(&opts, &mut |_, _, _| false))
}

/// NaN or infinity in a weight is found while the tensor is uploaded and named with its row,
/// in every checkpoint dtype and through stacking (Q/K/V are one matrix on the GPU) and
/// on-load quantization.
#[test]
fn non_finite_weights_are_named_at_load() {
    let h = 64; // hidden size of the fixtures
    let st = "model.safetensors";
    // (case, tensor, element, value, row the error names)
    for (case, tensor, i, v, row) in [
        (
            "llama-gqa-f32",
            "model.layers.0.self_attn.q_proj.weight",
            3 * h + 5,
            f32::NAN,
            3,
        ),
        (
            "llama-gqa-f32",
            "model.layers.1.self_attn.k_proj.weight",
            2 * h,
            f32::INFINITY,
            2,
        ),
        ("llama-gqa-f32", "model.norm.weight", 7, f32::NAN, 7),
        (
            "llama-gqa-f32",
            "lm_head.weight",
            10 * h + 1,
            f32::NEG_INFINITY,
            10,
        ),
        (
            "llama-gqa-f32",
            "model.embed_tokens.weight",
            5 * h,
            f32::NAN,
            5,
        ),
        (
            "llama-mqa-tied-bf16",
            "model.embed_tokens.weight",
            9 * h + 3,
            f32::INFINITY,
            9,
        ),
        (
            "llama-mqa-tied-bf16",
            "model.layers.0.mlp.up_proj.weight",
            4 * h,
            f32::NAN,
            4,
        ),
    ] {
        let mut f = text_files(case, None);
        st_poke(f.get_mut(st).unwrap(), tensor, i, v);
        let e = text_err(f);
        assert!(
            e.contains(&format!("'{tensor}'"))
                && e.contains(&format!("row {row}"))
                && e.contains("NaN or infinity"),
            "{case} {tensor}: {e}"
        );
    }
    // On-load quantization would hide a NaN inside a block maximum: refused before.
    let mut f = text_files("llama-gqa-f32", None);
    let down = "model.layers.1.mlp.down_proj.weight";
    let k = st_split(&f[st]).0[down]["shape"][1].as_u64().unwrap() as usize;
    st_poke(f.get_mut(st).unwrap(), down, 6 * k + 1, f32::NAN);
    let e = text_load(f, Quantize::Q4).err().unwrap().to_string();
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("row 6"),
        "{e}"
    );
    // GGUF: a NaN block scale (Q8_0: the f16 before each 32 quants) and a float tensor; the
    // error names GGUF's tensor.
    let name = "model-q8_0.gguf";
    let mut f = text_files("llama-gqa-f32", Some(name));
    let b = f.get_mut(name).unwrap();
    let r = gguf_tensor(b, "blk.1.attn_v.weight");
    let block = 34 * (3 * h / 32); // the first block of row 3
    b[r.start + block..r.start + block + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let e = text_err(f);
    assert!(
        e.contains("'blk.1.attn_v.weight'") && e.contains("row 3"),
        "{e}"
    );
    let name = "model-f32.gguf";
    let mut f = text_files("qwen2-f32", Some(name));
    let b = f.get_mut(name).unwrap();
    let r = gguf_tensor(b, "output_norm.weight");
    b[r.start + 8..r.start + 12].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let e = text_err(f);
    assert!(
        e.contains("'output_norm.weight'") && e.contains("row 2"),
        "{e}"
    );
    // A diffusion pipeline (its weights go up as the first generation builds its graphs, before
    // anything runs): a VAE convolution and a U-Net bias.
    for (file, tensor) in [
        (
            "vae/diffusion_pytorch_model.safetensors",
            "decoder.conv_in.weight",
        ),
        ("unet/diffusion_pytorch_model.safetensors", "conv_out.bias"),
    ] {
        let mut f = sd_files();
        st_poke(f.get_mut(file).unwrap(), tensor, 1, f32::NAN);
        let mut m = SdModels::load(&kiln_tests::gpu(), f).unwrap();
        let opts = ImageOptions {
            steps: 1,
            ..Default::default()
        };
        let e = image(&mut m, opts).err().unwrap().to_string();
        assert!(
            e.contains(&format!("'{tensor}'")) && e.contains("NaN or infinity"),
            "{tensor}: {e}"
        );
    }
}

/// Finite weights whose activations overflow: the sampler reports non-finite logits (with the
/// token) and the denoising loop non-finite latents (with the step) instead of empty text or a
/// black image.
#[test]
fn overflowing_activations_are_errors() {
    let mut f = text_files("llama-gqa-f32", None);
    st_fill(
        f.get_mut("model.safetensors").unwrap(),
        "model.norm.weight",
        f32::MAX,
    );
    let mut m = text_load(f, Quantize::None).unwrap();
    let opts = GenerateOptions {
        max_tokens: 4,
        ..Default::default()
    };
    let e = pollster::block_on(m.generate(&[1, 5, 9], &opts, &mut |_| true))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("logits of generated token 0") && e.contains("NaN or infinite"),
        "{e}"
    );
    let mut f = sd_files();
    st_fill(
        f.get_mut("unet/diffusion_pytorch_model.safetensors")
            .unwrap(),
        "conv_out.bias",
        f32::MAX,
    );
    let mut m = SdModels::load(&kiln_tests::gpu(), f).unwrap();
    let e = image(
        &mut m,
        ImageOptions {
            prompt: "x".into(),
            steps: 3,
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("latents") && e.contains("at step 1 of 3"), "{e}");
    // Given latents must be finite.
    let mut m = SdModels::load(&kiln_tests::gpu(), sd_files()).unwrap();
    let mut lat = vec![0.5f32; 4 * 8 * 8];
    lat[17] = f32::NAN;
    let e = image(
        &mut m,
        ImageOptions {
            steps: 2,
            width: Some(16),
            height: Some(16),
            latents: Some(lat),
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("latents") && e.contains("value 17"), "{e}");
}

/// A config that names fewer layers than the checkpoint holds would skip the others.
#[test]
fn layer_count_must_match_the_checkpoint() {
    let mut f = text_files("llama-gqa-f32", None);
    let mut cfg: Value = serde_json::from_slice(&f["config.json"]).unwrap();
    cfg["num_hidden_layers"] = 1.into();
    f.insert("config.json".into(), serde_json::to_vec(&cfg).unwrap());
    let e = text_err(f);
    assert!(
        e.contains("holds layer 1") && e.contains("num_hidden_layers"),
        "{e}"
    );
}

/// Tensors sharing bytes or a name twice: refused in both formats.
#[test]
fn overlapping_and_duplicate_tensors_are_refused() {
    // safetensors: layer 0's k_proj pointed at v_proj's bytes (same shape).
    let mut f = text_files("llama-gqa-f32", None);
    let b = f.get_mut("model.safetensors").unwrap();
    let (mut header, data) = st_split(b);
    let v = header["model.layers.0.self_attn.v_proj.weight"]["data_offsets"].clone();
    header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"] = v;
    *b = st_join(&header, &data);
    let e = text_err(f);
    assert!(
        e.contains("overlap") && e.contains("k_proj") && e.contains("v_proj"),
        "{e}"
    );
    // safetensors: a name twice in the header.
    let json = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json);
    file.extend([0u8; 8]);
    let e = SafeTensors::new()
        .add_file("dup.safetensors", file)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("'a'") && e.contains("twice"), "{e}");
    // GGUF: [16] f32 at 0 and [8] at 32 overlap by 32 bytes; a name listed twice.
    let data = [0u8; 64];
    let g = gguf_file(&[], &[("a", &[16], 0, 0), ("b", &[8], 0, 32)], &data);
    let e = Gguf::parse("o.gguf", g).err().unwrap().to_string();
    assert!(e.contains("'a' and 'b' overlap"), "{e}");
    let g = gguf_file(&[], &[("a", &[8], 0, 0), ("a", &[8], 0, 32)], &data);
    let e = Gguf::parse("d.gguf", g).err().unwrap().to_string();
    assert!(e.contains("'a'") && e.contains("twice"), "{e}");
    let g = gguf_file(&[], &[("a", &[8], 0, 0), ("b", &[8], 0, 32)], &data);
    assert!(
        Gguf::parse("ok.gguf", g).is_ok(),
        "adjacent tensors are fine"
    );
}

/// Sizes a header claims are checked against the bytes present and a cap before anything is
/// allocated for them (the memory itself is measured in tests/memory_bounds.rs).
#[test]
fn header_claims_are_checked_before_allocating() {
    for (ty, n) in [
        (0u32, 1u64 << 40),
        (8, 1 << 33),
        (9, 1 << 30),
        (12, u64::MAX),
    ] {
        let g = gguf_file(&[("x", Meta::Claim(ty, n))], &[], &[]);
        let e = Gguf::parse("claim.gguf", g).err().unwrap().to_string();
        assert!(
            e.contains("needs") || e.contains("past"),
            "type {ty} x {n}: {e}"
        );
    }
    // A value that would take the header past its cap is refused by the cap, not after reading.
    let mut g = gguf_file(&[("x", Meta::Str("y"))], &[], &[]);
    let at = 24 + 9 + 4; // magic, version, counts; the key "x"; the type: the string's length
    assert_eq!(g[at..at + 8], 1u64.to_le_bytes());
    g[at..at + 8].copy_from_slice(&(300u64 << 20).to_le_bytes());
    g.resize(g.len() + 1024, b'y');
    let e = Gguf::parse("cap.gguf", g).err().unwrap().to_string();
    assert!(e.contains("256 MiB"), "{e}");
    // safetensors: the format's 100 MB header limit, and shapes of at most 8 dimensions.
    let mut big = vec![b' '; 100_000_100];
    big[..8].copy_from_slice(&100_000_001u64.to_le_bytes());
    let e = SafeTensors::new()
        .add_file("big.safetensors", big)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("limit"), "{e}");
    let json = br#"{"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}}"#;
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json);
    file.extend([0u8; 4]);
    let e = SafeTensors::new()
        .add_file("dims.safetensors", file)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("'a'") && e.contains("more than 8 dimensions"),
        "{e}"
    );
    // The engine's own checks still name the tensor (here: a truncated data section).
    let mut f = text_files("llama-gqa-f32", None);
    let b = f.get_mut("model.safetensors").unwrap();
    let (_, r) = st_tensor(b, "lm_head.weight");
    b.truncate(r.end - 1);
    let e = text_err(f);
    assert!(e.contains("data_offsets"), "{e}");
}

/// U-Net and VAE configs with keys that change the math Kiln does not implement are refused
/// naming the key (class or added-time embeddings, other time embeddings, activations or
/// kernel sizes).
#[test]
fn unimplemented_diffusion_features_are_refused() {
    for (key, v) in [
        ("class_embed_type", json!("timestep")),
        ("addition_embed_type", json!("image")),
        ("num_class_embeds", json!(10)),
        ("time_embedding_type", json!("fourier")),
        ("resnet_time_scale_shift", json!("scale_shift")),
        ("only_cross_attention", json!([true, false])),
        ("conv_in_kernel", json!(7)),
        ("act_fn", json!("gelu")),
        ("resnet_out_scale_factor", json!(2.0)),
    ] {
        let mut f = sd_files();
        let mut cfg: Value = serde_json::from_slice(&f["unet/config.json"]).unwrap();
        cfg[key] = v.clone();
        f.insert("unet/config.json".into(), serde_json::to_vec(&cfg).unwrap());
        let e = sd_err(f);
        assert!(
            e.contains(key) && e.contains("unsupported"),
            "{key} = {v}: {e}"
        );
    }
    // The values diffusers writes for a plain U-Net load (1 and 1.0, null and false alike).
    let mut f = sd_files();
    let mut cfg: Value = serde_json::from_slice(&f["unet/config.json"]).unwrap();
    cfg["only_cross_attention"] = json!([false, false]);
    cfg["mid_block_scale_factor"] = json!(1.0);
    f.insert("unet/config.json".into(), serde_json::to_vec(&cfg).unwrap());
    SdModels::load(&kiln_tests::gpu(), f).unwrap();
    let mut f = sd_files();
    let mut cfg: Value = serde_json::from_slice(&f["vae/config.json"]).unwrap();
    cfg["act_fn"] = json!("gelu");
    f.insert("vae/config.json".into(), serde_json::to_vec(&cfg).unwrap());
    let e = sd_err(f);
    assert!(e.contains("act_fn"), "{e}");
}

/// A size whose activations need a bigger buffer than the adapter binds is an error naming the
/// value, the limit and the largest size that fits, before the denoising loop (not a raw wgpu
/// binding error at the VAE).
#[test]
fn sizes_past_the_adapter_limits_are_refused_before_any_work() {
    let gpu = kiln_tests::gpu();
    let mut m = SdModels::load(&gpu, sd_files()).unwrap();
    let mut steps = 0;
    let e = pollster::block_on(m.generate(
        &ImageOptions {
            width: Some(8192),
            height: Some(8192),
            steps: 2,
            ..Default::default()
        },
        &mut |_, _, _| {
            steps += 1;
            false
        },
    ))
    .err()
    .unwrap();
    assert_eq!(steps, 0, "no step ran");
    // The client's mistake (a 400 from the server), saying what fits.
    assert!(matches!(e, kiln::Error::Unsupported(_)), "{e}");
    let limit = gpu
        .limits
        .max_storage_buffer_binding_size
        .min(gpu.limits.max_buffer_size);
    assert!(
        e.to_string().contains(&format!("({limit} bytes)"))
            && e.to_string()
                .contains("the largest square image it holds is"),
        "{e}"
    );
}

/// A tokenizer.json whose Strip decoder also strips at the end makes the tokenizers library
/// underflow (a panic, uncatchable in the browser) on an empty decoded piece (found by
/// fuzzing): refused with the reason when the tokenizer is built.
#[test]
fn tokenizer_strip_at_the_end_is_refused() {
    let path = fixture("llm/llama-mqa-tied-bf16/tokenizer.json");
    let mut tj: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let ok = serde_json::to_vec(&tj).unwrap();
    assert!(kiln::llm::TextTokenizer::from_hf(&ok, None).is_ok());
    let strip = tj["decoder"]["decoders"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|d| d["type"] == "Strip")
        .expect("the fixture's decoder strips");
    strip["stop"] = json!(1);
    let bad = serde_json::to_vec(&tj).unwrap();
    let e = kiln::llm::TextTokenizer::from_hf(&bad, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("Strip") && e.contains("stop"), "{e}");
}

/// A layer count no decoder has is refused before per-layer tables are sized by it (found by
/// fuzzing: 4 billion layers asked for 4 GB while reading the config).
#[test]
fn absurd_layer_counts_are_refused() {
    use kiln::formats::gguf::Value as G;
    let path = fixture("llm/qwen2-f32/model-f32.gguf");
    let mut g = Gguf::parse("model-f32.gguf", std::fs::read(path).unwrap()).unwrap();
    g.meta
        .insert("qwen2.block_count".into(), G::U64(4_000_000_000));
    let e = kiln::llm::LlmConfig::from_gguf(&g)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("block_count") && e.contains("4000000000"), "{e}");
    let cfg = std::fs::read_to_string(fixture("llm/qwen2-f32/config.json")).unwrap();
    let mut c: Value = serde_json::from_str(&cfg).unwrap();
    c["num_hidden_layers"] = json!(900_000_000);
    let e = kiln::llm::LlmConfig::from_hf(&c.to_string(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("num_hidden_layers"), "{e}");
}

/// A context of 0 positions (a damaged `context_length` or `max_position_embeddings`) is
/// refused when the config is read, naming the key, instead of panicking when the KV cache is
/// sized.
#[test]
fn a_context_of_zero_is_refused() {
    use kiln::formats::gguf::Value as G;
    let path = fixture("llm/qwen2-f32/model-f32.gguf");
    let mut g = Gguf::parse("model-f32.gguf", std::fs::read(path).unwrap()).unwrap();
    g.meta.insert("qwen2.context_length".into(), G::U64(0));
    let e = kiln::llm::LlmConfig::from_gguf(&g)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("qwen2.context_length") && e.contains("0 positions"),
        "{e}"
    );
    let cfg = std::fs::read_to_string(fixture("llm/qwen2-f32/config.json")).unwrap();
    let mut c: Value = serde_json::from_str(&cfg).unwrap();
    c["max_position_embeddings"] = json!(0);
    let e = kiln::llm::LlmConfig::from_hf(&c.to_string(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}
