//! The default models, compiled into the binary so that `kiln text`, `kiln chat` and `kiln image`
//! work with no `--model` and no network. They live in `models/` at the repository root (see
//! `models/README.md`: what they were trained on, how to reproduce them, how good they are).

use kiln::formats::ModelFiles;

macro_rules! embed {
    ($dir:literal, [$($file:literal),* $(,)?]) => {
        &[$(($file, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/", $dir, "/", $file)) as &[u8])),*]
    };
}

/// `models/text-kjv`: a 3 M-parameter Llama trained on the King James Bible.
pub const TEXT_NAME: &str = "text-kjv (embedded)";
const TEXT: &[(&str, &[u8])] = embed!(
    "text-kjv",
    [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
);

/// `models/image-shapes`: a small Stable Diffusion pipeline that draws coloured shapes.
pub const IMAGE_NAME: &str = "image-shapes (embedded)";
const IMAGE: &[(&str, &[u8])] = embed!(
    "image-shapes",
    [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
);

fn files(list: &[(&str, &[u8])]) -> ModelFiles {
    list.iter()
        .map(|(name, bytes)| (name.to_string(), bytes.to_vec()))
        .collect()
}

/// The embedded text model's files, as a model folder would give them.
pub fn text() -> ModelFiles {
    files(TEXT)
}

/// The embedded image pipeline's files, as a diffusers folder would give them.
pub fn image() -> ModelFiles {
    files(IMAGE)
}

#[cfg(test)]
mod tests {
    use kiln::formats::files::{collect, pipeline, text_model, FileGroup};
    use kiln::formats::ModelFiles;

    /// The embedded files are exactly what the engine's plan of the model kind reads.
    fn plan_reads(plan: &[FileGroup], files: &ModelFiles) {
        let got = collect(plan, &mut |name| Ok(files.get(name).cloned())).unwrap();
        let mut want: Vec<&String> = files.keys().collect();
        let mut read: Vec<&String> = got.keys().collect();
        want.sort();
        read.sort();
        assert_eq!(read, want);
    }

    #[test]
    fn embedded_models_follow_the_engines_file_lists() {
        plan_reads(&text_model(), &super::text());
        plan_reads(&pipeline(false), &super::image());
    }
}
