//! The bodies of the fuzz targets. `fuzz/fuzz_targets/*.rs` hand libFuzzer's bytes to these
//! (cargo-fuzz, nightly, AddressSanitizer, `-rss_limit_mb=2048 -malloc_limit_mb=1024`), and
//! `tests/fuzz_replay.rs` replays the committed corpora through them on stable Rust, so a
//! regression fails the ordinary test suite. Each target feeds arbitrary bytes to one loader and
//! asks only that it returns, `Ok` or a clear `Err`: no panic, no hang, no allocation of what a
//! header merely claims.

use kiln::diffusion::clip::{ClipConfig, ClipTokenizer};
use kiln::diffusion::pipeline::ImageOptions;
use kiln::diffusion::schedulers::SchedulerConfig;
use kiln::diffusion::unet::UnetConfig;
use kiln::diffusion::vae::VaeConfig;
use kiln::dtype::{dequantize, pack_for_gpu};
use kiln::formats::gguf::Gguf;
use kiln::formats::safetensors::SafeTensors;
use kiln::formats::{npy, TensorSource};
use kiln::llm::LlmConfig;
use kiln::tokenizer::{render_chat_template, TextTokenizer};

/// A fuzz target: its name (the folder of its corpus) and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const TARGETS: [Target; 8] = [
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("llm_config", llm_config),
    ("diffusers_config", diffusers_config),
    ("tokenizer_gguf", tokenizer_gguf),
    ("tokenizer_json", tokenizer_json),
    ("npy", npy_file),
    ("chat_template", chat_template),
];

/// Text before the first 0 byte and the rest (both must be UTF-8).
fn split(data: &[u8]) -> Option<(&str, &str)> {
    let i = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let rest = data.get(i + 1..).unwrap_or_default();
    Some((
        std::str::from_utf8(&data[..i]).ok()?,
        std::str::from_utf8(rest).ok()?,
    ))
}

/// Some text to encode: ASCII, accents, CJK, emoji, digits and whitespace runs.
const SAMPLE: &str = "Hello, world! 1234  héllo\n\t日本語 🙂 <|im_start|>";

/// The GGUF reader (whole files and metadata prefixes), the tensors it hands out (decoded and
/// packed as for the GPU, with the finiteness check) and the LLM config read from it.
pub fn gguf(data: &[u8]) {
    let _ = Gguf::parse_metadata("fuzz.gguf", data);
    let Ok(g) = Gguf::parse("fuzz.gguf", data.to_vec()) else {
        return;
    };
    for name in &g.tensor_names {
        if let Some(t) = g.tensor(name) {
            tensor(t.dtype, t.shape, t.data);
        }
    }
    let _ = LlmConfig::from_gguf(&g);
}

/// Decodes and packs a tensor as loading does (small ones: a header cannot make this big).
fn tensor(dtype: kiln::DType, shape: &[usize], data: &[u8]) {
    let n: usize = shape.iter().product();
    if n > 1 << 16 {
        return;
    }
    let _ = dequantize(dtype, data, n);
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let _ = pack_for_gpu(dtype, data, rows, n / rows, true);
}

/// The safetensors reader and the tensors it hands out.
pub fn safetensors(data: &[u8]) {
    let mut st = SafeTensors::new();
    if st.add_file("fuzz.safetensors", data.to_vec()).is_err() {
        return;
    }
    for name in st.names() {
        if let Some(t) = st.tensor(&name) {
            tensor(t.dtype, t.shape, t.data);
        }
    }
}

/// `config.json` (before a 0 byte) and `generation_config.json` (after it) of an LLM.
pub fn llm_config(data: &[u8]) {
    if let Some((config, generation)) = split(data) {
        if let Ok(c) = LlmConfig::from_hf(config, Some(generation)) {
            let _ = c.inv_freq();
        }
    }
}

/// A diffusers component config chosen by the first byte: U-Net, VAE, CLIP text encoder,
/// scheduler (and the schedule for 1 to 64 steps, chosen by the second byte) or image options.
pub fn diffusers_config(data: &[u8]) {
    let [kind, steps, rest @ ..] = data else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match kind % 5 {
        0 => drop(UnetConfig::from_json(text)),
        1 => drop(VaeConfig::from_json(text)),
        2 => drop(ClipConfig::from_json(text)),
        3 => {
            if let Ok(s) = SchedulerConfig::from_json(text, None) {
                if let Ok(s) = s.schedule(1 + (*steps as usize % 64)) {
                    let _ = s.coeff_table();
                }
            }
        }
        _ => drop(ImageOptions::from_json(text)),
    }
}

/// A tokenizer rebuilt from GGUF metadata (a prefix of a file is enough), used both ways.
pub fn tokenizer_gguf(data: &[u8]) {
    let Ok(Some(g)) = Gguf::parse_metadata("fuzz.gguf", data) else {
        return;
    };
    if let Ok(t) = TextTokenizer::from_gguf(&g) {
        use_tokenizer(&t);
    }
}

fn use_tokenizer(t: &TextTokenizer) {
    if let Ok(ids) = t.encode_prompt(SAMPLE) {
        let _ = t.decode(&ids);
    }
    let _ = t.decode(&[0, 1, 2, u32::MAX]);
    let _ = t.render_chat(&[("user".into(), SAMPLE.into())]);
}

/// `tokenizer.json` (before a 0 byte) with `tokenizer_config.json` (after it), as an LLM's
/// tokenizer and as CLIP's.
pub fn tokenizer_json(data: &[u8]) {
    let i = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let config = data.get(i + 1..).and_then(|c| std::str::from_utf8(c).ok());
    if let Ok(t) = TextTokenizer::from_hf(&data[..i], config) {
        use_tokenizer(&t);
    }
    if let Ok(c) = ClipTokenizer::from_tokenizer_json(&data[..i], config) {
        let _ = c.encode(SAMPLE);
    }
}

/// An `.npy` array.
pub fn npy_file(data: &[u8]) {
    let _ = npy::parse(data);
}

/// A chat template (before the first 0 byte) over messages (the rest, 0-separated, roles
/// alternating system / user / assistant).
pub fn chat_template(data: &[u8]) {
    let Some((tpl, rest)) = split(data) else {
        return;
    };
    let roles = ["system", "user", "assistant"];
    let messages: Vec<(String, String)> = rest
        .split('\0')
        .enumerate()
        .map(|(i, c)| (roles[i % 3].to_string(), c.to_string()))
        .collect();
    let _ = render_chat_template(tpl, &messages, "<s>", "</s>");
}
