//! CLIP: the tokenizer SD repos ship (`vocab.json` + `merges.txt`, lower-cased BPE with a
//! `</w>` word suffix, start/end tokens, padded to 77) and the text encoder (`CLIPTextModel`:
//! token + position embeddings, pre-norm causal self-attention blocks, final layer norm).

use crate::error::{Error, Result};
use crate::formats::config::Keys;
use crate::graph::{Graph, UnaryOp, Value};
use crate::weights::Weights;
use crate::Dyn;
use serde_json::{json, Value as Json};

/// The pad token and padded length from `tokenizer_config.json` (77 when absent).
fn pad_and_length(config: Option<&str>) -> (Option<String>, usize) {
    let cfg: Json = config
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or(json!({}));
    let max_len = cfg
        .get("model_max_length")
        .and_then(|v| v.as_u64())
        .filter(|&v| v <= 4096)
        .unwrap_or(77) as usize;
    (crate::tokenizer::token_str(cfg.get("pad_token")), max_len)
}

/// CLIP's tokenizer, padded and truncated to the text encoder's length.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub max_len: usize,
}

fn err(msg: impl Into<String>) -> Error {
    Error::Data {
        name: "tokenizer".into(),
        msg: msg.into(),
    }
}

impl ClipTokenizer {
    /// From `vocab.json`, `merges.txt` and (optionally) `tokenizer_config.json`; the layout
    /// transformers' `CLIPTokenizerFast` converter builds.
    pub fn from_vocab_merges(
        vocab_json: &str,
        merges_txt: &str,
        config: Option<&str>,
    ) -> Result<ClipTokenizer> {
        let vocab: Json =
            serde_json::from_str(vocab_json).map_err(|e| err(format!("vocab.json: {e}")))?;
        let merges: Vec<&str> = merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        let id = |t: &str| vocab.get(t).and_then(|v| v.as_u64()).map(|v| v as u32);
        let bos = id("<|startoftext|>").ok_or_else(|| err("vocab.json has no <|startoftext|>"))?;
        let eos = id("<|endoftext|>").ok_or_else(|| err("vocab.json has no <|endoftext|>"))?;
        let (pad_token, max_len) = pad_and_length(config);
        let pad = pad_token.as_deref().and_then(id).unwrap_or(eos);
        let special = |i: u32, c: &str| json!({"id": i, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
        let mut added = vec![
            special(bos, "<|startoftext|>"),
            special(eos, "<|endoftext|>"),
        ];
        // SD 2's pad token "!" is an added special token, so a literal "!" in a prompt is
        // matched as that token first (what transformers does).
        if let Some(p) = pad_token.filter(|p| id(p).is_some_and(|i| i != bos && i != eos)) {
            added.push(special(pad, &p));
        }
        let spec = json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let bytes = serde_json::to_vec(&spec).map_err(|e| err(e.to_string()))?;
        let inner = crate::tokenizer::build_tokenizer(&bytes)?;
        Ok(ClipTokenizer {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    /// From a `tokenizer.json` (for repos that ship one instead of vocab/merges).
    pub fn from_tokenizer_json(json_bytes: &[u8], config: Option<&str>) -> Result<ClipTokenizer> {
        // Start/end tokens and padding are added by `encode`, so drop the file's post-processor.
        let mut spec: Json =
            serde_json::from_slice(json_bytes).map_err(|e| err(format!("tokenizer.json: {e}")))?;
        if let Some(o) = spec.as_object_mut() {
            o.insert("post_processor".into(), Json::Null);
            o.insert("padding".into(), Json::Null);
            o.insert("truncation".into(), Json::Null);
        }
        let bytes = serde_json::to_vec(&spec).map_err(|e| err(e.to_string()))?;
        let inner = crate::tokenizer::build_tokenizer(&bytes)?;
        let id = |t: &str| inner.token_to_id(t);
        let bos =
            id("<|startoftext|>").ok_or_else(|| err("tokenizer.json has no <|startoftext|>"))?;
        let eos = id("<|endoftext|>").ok_or_else(|| err("tokenizer.json has no <|endoftext|>"))?;
        let (pad_token, max_len) = pad_and_length(config);
        let pad = pad_token.as_deref().and_then(id).unwrap_or(eos);
        Ok(ClipTokenizer {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| err(e.to_string()))
    }

    /// `[bos] + ids (truncated) + [eos]`, padded to `max_len`, as the SD pipelines encode.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| err(e.to_string()))?;
        let mut ids = vec![self.bos];
        ids.extend(enc.get_ids().iter().take(self.max_len - 2));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }
}

/// Text encoder hyper-parameters from `text_encoder/config.json`.
#[derive(Clone, Debug)]
pub struct ClipConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub positions: usize,
    pub eps: f32,
    pub quick_gelu: bool,
    /// `CLIPTextModelWithProjection` (SDXL's second encoder): the width of `text_projection`,
    /// applied to the pooled output.
    pub projection_dim: Option<usize>,
    /// Which token's state is the pooled output (see [`TextEncoder::pool_rows`]).
    pub eos_token_id: u64,
}

impl ClipConfig {
    /// Parses the config; unsupported activations are errors.
    pub fn from_json(s: &str) -> Result<ClipConfig> {
        let c = Keys::parse("text_encoder/config.json", s)?;
        let quick_gelu = match c.text("hidden_act", "quick_gelu")? {
            "quick_gelu" => true,
            "gelu" => false,
            other => {
                return Err(Error::Unsupported(format!(
                    "text encoder hidden_act '{other}' (quick_gelu or gelu)"
                )))
            }
        };
        let (hidden, heads) = c.hidden_and_heads()?;
        Ok(ClipConfig {
            hidden,
            heads,
            intermediate: c.need_count("intermediate_size")?,
            vocab: c.need_count("vocab_size")?,
            layers: c.need_count("num_hidden_layers")?,
            positions: c.need_count("max_position_embeddings")?,
            eps: c.num("layer_norm_eps", 1e-5)? as f32,
            quick_gelu,
            projection_dim: match c.strings("architectures") {
                Ok(a) if a.iter().any(|a| a == "CLIPTextModelWithProjection") => {
                    Some(c.need_count("projection_dim")?)
                }
                _ => None,
            },
            eos_token_id: c.count("eos_token_id", 2)? as u64,
        })
    }
}

/// CLIP's text model (`CLIPTextModel`): its config and its weights.
pub struct TextEncoder {
    pub cfg: ClipConfig,
    pub weights: Weights,
}

/// What a text encoder pass gives: the states the U-Net attends to and, when asked, the pooled
/// output through `text_projection` (SDXL's second encoder's `text_embeds`).
pub struct TextStates {
    /// `[batch, len, hidden]`: the final layer norm's output, or with `penultimate` the hidden
    /// state before the last layer (`hidden_states[-2]`, what SDXL's pipelines take).
    pub hidden: Value,
    /// `[batch, projection_dim]`.
    pub pooled: Option<Value>,
}

impl TextEncoder {
    /// Adds the encoder: ids u32 `[batch * len]` → last hidden state `[batch, len, hidden]`.
    pub fn forward(&self, g: &mut Graph, ids: Value, batch: usize, len: usize) -> Result<Value> {
        Ok(self.states(g, ids, batch, len, false, None)?.hidden)
    }

    /// The rows of the pooled output for token ids `[batch * len]`, as transformers picks them:
    /// per sequence, the first `eos_token_id`, or (for configs that keep the legacy
    /// `eos_token_id` 2) the first occurrence of the largest id, as an index into the flattened
    /// `[batch * len]` states.
    pub fn pool_rows(&self, ids: &[u32], len: usize) -> Vec<u32> {
        ids.chunks(len.max(1))
            .enumerate()
            .map(|(b, seq)| {
                let pos = if self.cfg.eos_token_id == 2 {
                    let max = seq.iter().copied().max().unwrap_or(0);
                    seq.iter().position(|&t| t == max)
                } else {
                    seq.iter().position(|&t| t as u64 == self.cfg.eos_token_id)
                };
                (b * len + pos.unwrap_or(0)) as u32
            })
            .collect()
    }

    /// Adds the encoder with SDXL's options: the penultimate hidden state instead of the final
    /// one, and the pooled output of the rows `pool_rows` u32 `[batch]` ([`TextEncoder::pool_rows`])
    /// through the final layer norm and `text_projection`.
    pub fn states(
        &self,
        g: &mut Graph,
        ids: Value,
        batch: usize,
        len: usize,
        penultimate: bool,
        pool_rows: Option<Value>,
    ) -> Result<TextStates> {
        let cfg = &self.cfg;
        let h = cfg.hidden;
        // transformers 4 saves the tensors under `text_model.`, transformers 5 without it.
        let vb = self
            .weights
            .root()
            .first_of(&["text_model", ""], "embeddings.token_embedding.weight")?;
        let emb = vb.pp("embeddings");
        let tok = emb.value(g, "token_embedding.weight", &[cfg.vocab, h])?;
        let pos_table = g.tensor(&emb.get_f32("position_embedding.weight", &[cfg.positions, h])?);
        let x = g.gather(tok, ids)?; // [batch * len, hidden]
        let x = g.reshape(x, &[batch, len, h])?;
        let pos = g.slice_rows(pos_table, Dyn::Static(0), len)?; // [len, hidden]
        let mut x = g.add(x, pos)?;
        // hidden_states[-2]: the input of the last layer.
        let mut before_last = x;
        for i in 0..cfg.layers {
            if i + 1 == cfg.layers {
                before_last = x;
                if penultimate && pool_rows.is_none() {
                    break;
                }
            }
            let l = vb.pp("encoder.layers").pp(i);
            let attn = l.pp("self_attn");
            let n = l.pp("layer_norm1").layer_norm(g, x, cfg.eps)?;
            let q = attn.pp("q_proj").linear(g, n, h)?;
            let k = attn.pp("k_proj").linear(g, n, h)?;
            let v = attn.pp("v_proj").linear(g, n, h)?;
            let a = g.attention(
                q,
                k,
                v,
                cfg.heads,
                cfg.heads,
                true,
                Dyn::Static(0),
                Dyn::Static(len as u32),
            )?;
            let o = attn.pp("out_proj").linear(g, a, h)?;
            x = g.add(x, o)?;
            let n = l.pp("layer_norm2").layer_norm(g, x, cfg.eps)?;
            let f = l.pp("mlp.fc1").linear(g, n, cfg.intermediate)?;
            let act = if cfg.quick_gelu {
                UnaryOp::QuickGelu
            } else {
                UnaryOp::GeluErf
            };
            let f = g.unary(f, act)?;
            let f = l.pp("mlp.fc2").linear(g, f, h)?;
            x = g.add(x, f)?;
        }
        let last = match (penultimate, pool_rows) {
            (true, None) => None,
            _ => Some(vb.pp("final_layer_norm").layer_norm(g, x, cfg.eps)?),
        };
        let pooled = match (pool_rows, last) {
            (Some(rows), Some(last)) => {
                let dim = cfg.projection_dim.ok_or_else(|| {
                    Error::Unsupported(
                        "a pooled text embedding from a text encoder without text_projection \
                         (CLIPTextModelWithProjection)"
                            .into(),
                    )
                })?;
                let flat = g.reshape(last, &[batch * len, h])?;
                let p = g.gather(flat, rows)?; // [batch, hidden]
                let w = self
                    .weights
                    .root()
                    .value(g, "text_projection.weight", &[dim, h])?;
                Some(g.linear(p, w, None)?)
            }
            _ => None,
        };
        let hidden = match (penultimate, last) {
            (false, Some(last)) => last,
            _ => before_last,
        };
        Ok(TextStates { hidden, pooled })
    }
}
