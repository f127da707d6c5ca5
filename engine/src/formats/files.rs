//! Which files make a model: the one list every front end reads (the CLI from disk and from the
//! Hugging Face Hub, the browser over HTTP through the wasm module's `modelFiles`).
//!
//! A plan is a list of [`FileGroup`]s. A group offers alternatives, each a set of files; the
//! first alternative whose first file exists is taken (its other files are then required); a
//! required group with no alternative present is an error naming them all; a group with a
//! `when` file is looked for only if that file was found. A file ending in
//! `.index.json` is a sharded checkpoint's index: the shards it lists are fetched too.

use super::safetensors::shard_names;
use super::ModelFiles;
use crate::error::{Error, Result};
use serde::Serialize;

/// Alternatives for one part of a model (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileGroup {
    pub any: Vec<Vec<String>>,
    pub required: bool,
    /// The group is looked for only when this file (of an earlier group) was found: the
    /// components of an optional part, e.g. SDXL's second text encoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

fn one(name: &str, required: bool) -> FileGroup {
    FileGroup {
        any: vec![vec![name.to_string()]],
        required,
        when: None,
    }
}

/// A checkpoint `{dir}/{stem}`: one file, its fp16 variant, or a sharded index, in that order
/// (fp16 first when `prefer_fp16`: half the download, and the engine reads either).
fn checkpoint(dir: &str, stem: &str, prefer_fp16: bool) -> FileGroup {
    let p = |f: String| {
        vec![if dir.is_empty() {
            f
        } else {
            format!("{dir}/{f}")
        }]
    };
    let mut files = vec![
        p(format!("{stem}.safetensors")),
        p(format!("{stem}.fp16.safetensors")),
    ];
    if prefer_fp16 {
        files.swap(0, 1);
    }
    files.push(p(format!("{stem}.safetensors.index.json")));
    files.push(p(format!("{stem}.safetensors.index.fp16.json")));
    FileGroup {
        any: files,
        required: true,
        when: None,
    }
}

/// A Hugging Face tokenizer: `tokenizer.json`, its config and chat template.
pub fn tokenizer() -> Vec<FileGroup> {
    vec![
        one("tokenizer.json", true),
        one("tokenizer_config.json", false),
        // transformers 5 saves the chat template here.
        one("chat_template.jinja", false),
    ]
}

/// A Hugging Face text model folder (a `.gguf` is one file and needs no plan).
pub fn text_model() -> Vec<FileGroup> {
    let mut plan = vec![
        one("config.json", true),
        one("generation_config.json", false),
    ];
    plan.extend(tokenizer());
    plan.push(FileGroup {
        // The single file first: a folder that has it needs no probe for an index.
        any: vec![
            vec!["model.safetensors".into()],
            vec!["model.safetensors.index.json".into()],
        ],
        required: true,
        when: None,
    });
    plan
}

/// A diffusers Stable Diffusion pipeline folder (SD 1.x/2.x, or SDXL with its second text
/// encoder and tokenizer).
pub fn pipeline(prefer_fp16: bool) -> Vec<FileGroup> {
    let tokenizer = |dir: &str| {
        vec![
            FileGroup {
                any: vec![
                    vec![format!("{dir}/vocab.json"), format!("{dir}/merges.txt")],
                    vec![format!("{dir}/tokenizer.json")],
                ],
                required: true,
                when: None,
            },
            one(&format!("{dir}/tokenizer_config.json"), false),
            one(&format!("{dir}/special_tokens_map.json"), false),
        ]
    };
    let mut plan = vec![
        one("model_index.json", true),
        one("scheduler/scheduler_config.json", true),
        one("text_encoder/config.json", true),
        checkpoint("text_encoder", "model", prefer_fp16),
    ];
    plan.extend(tokenizer("tokenizer"));
    plan.extend([
        one("unet/config.json", true),
        checkpoint("unet", "diffusion_pytorch_model", prefer_fp16),
        one("vae/config.json", true),
        checkpoint("vae", "diffusion_pytorch_model", prefer_fp16),
        one("text_encoder_2/config.json", false),
    ]);
    let second = "text_encoder_2/config.json";
    let mut xl = vec![checkpoint("text_encoder_2", "model", prefer_fp16)];
    xl.extend(tokenizer("tokenizer_2"));
    plan.extend(xl.into_iter().map(|g| FileGroup {
        when: Some(second.into()),
        ..g
    }));
    plan
}

/// A sentence-transformers folder: `modules.json`, the encoder's `config.json`, weights and
/// tokenizer, the Pooling config and up to two Dense layers at the paths sentence-transformers
/// gives them (`2_Dense`, `3_Dense`).
pub fn embedding_model() -> Vec<FileGroup> {
    let mut plan = vec![
        one("modules.json", true),
        one("config.json", true),
        one("tokenizer.json", true),
        one("tokenizer_config.json", false),
        one("sentence_bert_config.json", false),
        one("config_sentence_transformers.json", false),
        checkpoint("", "model", false),
        one("1_Pooling/config.json", false),
    ];
    for dense in ["2_Dense", "3_Dense"] {
        let cfg = format!("{dense}/config.json");
        plan.push(one(&cfg, false));
        plan.push(FileGroup {
            when: Some(cfg),
            ..checkpoint(dense, "model", false)
        });
    }
    plan
}

/// A GGUF's `general.architecture` from its first bytes (`None` when the metadata does not
/// parse from them): what kind of model a `.gguf` in a models folder is (`bert`: an embedder).
pub fn gguf_architecture(name: &str, prefix: &[u8]) -> Option<String> {
    let g = super::gguf::Gguf::parse_metadata(name, prefix).ok()??;
    g.get("general.architecture")?.as_str().map(str::to_string)
}

/// The files of one diffusers model folder (`config.json` and its weights), e.g. a tiny
/// autoencoder (madebyollin/taesd).
pub fn diffusers_model(prefer_fp16: bool) -> Vec<FileGroup> {
    vec![
        one("config.json", true),
        checkpoint("", "diffusion_pytorch_model", prefer_fp16),
    ]
}

/// Reads a diffusers model folder ([`diffusers_model`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_model_dir(dir: &std::path::Path) -> Result<ModelFiles> {
    read_dir(dir, &diffusers_model(false))
}

/// The shards a sharded checkpoint's index lists, as paths beside the index.
pub fn shards(index_path: &str, index_json: &str) -> Result<Vec<String>> {
    let dir = index_path.rsplit_once('/').map(|(d, _)| d);
    Ok(shard_names(index_json)?
        .into_iter()
        .map(|s| match dir {
            Some(d) => format!("{d}/{s}"),
            None => s,
        })
        .collect())
}

/// Gathers a plan's files through `get(name)` (`Ok(None)` when the file does not exist).
pub fn collect(
    plan: &[FileGroup],
    get: &mut dyn FnMut(&str) -> Result<Option<Vec<u8>>>,
) -> Result<ModelFiles> {
    let mut files = ModelFiles::new();
    for group in plan {
        if group.when.as_ref().is_some_and(|w| !files.contains_key(w)) {
            continue;
        }
        let mut found = false;
        for alt in &group.any {
            let Some(first) = get(&alt[0])? else {
                continue;
            };
            let mut take = vec![(alt[0].clone(), first)];
            for name in &alt[1..] {
                let bytes = get(name)?.ok_or_else(|| missing(name, &format!("{} is", alt[0])))?;
                take.push((name.clone(), bytes));
            }
            for (name, bytes) in take {
                if name.ends_with(".index.json") {
                    let text = std::str::from_utf8(&bytes).map_err(|_| Error::Data {
                        name: name.clone(),
                        msg: "not UTF-8".into(),
                    })?;
                    for shard in shards(&name, text)? {
                        let b = get(&shard)?
                            .ok_or_else(|| missing(&shard, &format!("{name} lists it")))?;
                        files.insert(shard, b);
                    }
                }
                files.insert(name, bytes);
            }
            found = true;
            break;
        }
        if !found && group.required {
            let names: Vec<String> = group.any.iter().map(|a| a.join(" + ")).collect();
            return Err(Error::Data {
                name: "model".into(),
                msg: format!("missing {}", names.join(", or ")),
            });
        }
    }
    Ok(files)
}

fn missing(name: &str, why: &str) -> Error {
    Error::Data {
        name: name.into(),
        msg: format!("missing, but needed: {why}"),
    }
}

/// Reads a plan's files from a folder.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_dir(dir: &std::path::Path, plan: &[FileGroup]) -> Result<ModelFiles> {
    collect(plan, &mut |name| {
        let p = dir.join(name);
        if !p.is_file() {
            return Ok(None);
        }
        std::fs::read(&p).map(Some).map_err(|e| Error::Data {
            name: p.display().to_string(),
            msg: e.to_string(),
        })
    })
}

/// Reads a text model from disk: a `.gguf` file, or a Hugging Face folder (a folder holding no
/// `config.json` but exactly one `.gguf` reads that file).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_model_path(path: &std::path::Path) -> Result<ModelFiles> {
    let io = |p: &std::path::Path, e: std::io::Error| Error::Data {
        name: p.display().to_string(),
        msg: e.to_string(),
    };
    let single = |p: &std::path::Path| -> Result<ModelFiles> {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        Ok(ModelFiles::from([(
            name,
            std::fs::read(p).map_err(|e| io(p, e))?,
        )]))
    };
    if path.is_file() {
        return single(path);
    }
    if !path.is_dir() {
        let msg = if path.exists() {
            "not a regular file or folder"
        } else {
            "no such file or folder"
        };
        return Err(Error::Data {
            name: path.display().to_string(),
            msg: msg.into(),
        });
    }
    if !path.join("config.json").is_file() {
        let ggufs: Vec<std::path::PathBuf> = std::fs::read_dir(path)
            .map_err(|e| io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => return single(one),
            [] => {}
            many => {
                return Err(Error::Data {
                    name: path.display().to_string(),
                    msg: format!(
                        "no config.json and {} .gguf files: pass one of them",
                        many.len()
                    ),
                })
            }
        }
    }
    read_dir(path, &text_model())
}

/// Reads a diffusers pipeline folder (full-precision weights first when both variants exist).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_pipeline_dir(dir: &std::path::Path) -> Result<ModelFiles> {
    if !dir.join("model_index.json").is_file() {
        return Err(Error::Data {
            name: dir.display().to_string(),
            msg: "not a diffusers pipeline folder (no model_index.json)".into(),
        });
    }
    // Older repos (and `save_pretrained(safe_serialization=False)`) hold PyTorch pickles only.
    for (comp, stem) in [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ] {
        if !dir.join(comp).join("config.json").is_file() && comp == "text_encoder_2" {
            continue;
        }
        let has = |ext: &str| dir.join(format!("{comp}/{stem}{ext}")).is_file();
        let st = [
            ".safetensors",
            ".fp16.safetensors",
            ".safetensors.index.json",
            ".safetensors.index.fp16.json",
        ];
        if st.iter().any(|e| has(e)) {
            continue;
        }
        if let Some(bin) = [".bin", ".fp16.bin"].iter().find(|e| has(e)) {
            return Err(Error::Unsupported(format!(
                "{}: only a PyTorch pickle, which Kiln does not read (it runs no pickle code): \
                 save the pipeline as safetensors, e.g. `StableDiffusionPipeline.from_pretrained(dir)\
                 .save_pretrained(dir)` with diffusers >= 0.15",
                dir.join(format!("{comp}/{stem}{bin}")).display()
            )));
        }
    }
    read_dir(dir, &pipeline(false))
}
