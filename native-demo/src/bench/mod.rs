//! `kiln bench`: kernel rates against the measured copy roofline, text generation on a
//! random-weight model of SmolLM2-135M's shapes, and U-Net steps / VAE decodes. Every figure in a table is measured in one run;
//! nothing here is asserted.

//!
//! The commands (`kernels`, `text` and `chat`, `grammar`, `image`, `soak`, `gguf`) sit above `common`, the helpers
//! they share (random weights, timing, per-kernel profiles); nothing imports back up.

mod common;
mod embed;
mod gguf;
mod grammar;
mod image;
mod kernels;
mod parallel;
mod soak;
mod text;

use anyhow::Result;
use clap::{Args, ValueEnum};

/// What to benchmark.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum What {
    Kernels,
    Text,
    /// A five-turn chat with and without KV-cache reuse.
    Chat,
    /// JSON-schema constrained chat requests against the same unconstrained (`--model`: a
    /// model with a real tokenizer; default the embedded one).
    Grammar,
    /// A random U-Net with SD 1.5's layout: steps with and without guidance, the VAE's decode
    /// and encode, TAESD's decode.
    Image,
    /// 10 000 tokens and 200 images in one process: resident memory and GPU allocations.
    Soak,
    /// 64 short inputs embedded in one batched pass against 64 single calls (`--model`: a
    /// sentence-transformers folder; default a random all-MiniLM-L6-v2-shaped BERT).
    Embed,
    /// One decode stream against four at once on parallel slots (`kiln serve --parallel`):
    /// aggregate tokens per second (`--model`; default the embedded text model).
    Parallel,
    /// Writes a random-weight GGUF for speed comparisons (`--like FILE` or `--llama-1b`,
    /// `--out FILE`; `--header-only`).
    Gguf,
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(value_enum, default_value = "kernels")]
    what: What,
    /// Fewer iterations (for slow software adapters).
    #[arg(long)]
    quick: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// `text`: a model file or folder (as `kiln text --model`) instead of the random-weight
    /// SmolLM2-135M-shaped one, benchmarked in its own weight types; `grammar`: the model.
    #[arg(long)]
    model: Option<String>,
    /// `gguf`: copy this GGUF's header (metadata, tensor names, shapes, types).
    #[arg(long)]
    like: Option<std::path::PathBuf>,
    /// `gguf`: Llama-3.2-1B's shapes in llama.cpp's Q4_K_M mix.
    #[arg(long)]
    llama_1b: bool,
    /// `gguf`: write only the header (what `--like` needs to rebuild the file elsewhere).
    #[arg(long)]
    header_only: bool,
    /// `gguf`: the file to write.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Runs the chosen benchmark.
pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        What::Kernels => kernels::kernels(a.quick),
        What::Text => text::text(a.quick, a.json, a.model.as_deref()),
        What::Chat => text::chat(a.quick, a.json),
        What::Grammar => grammar::grammar(a.quick, a.json, a.model.as_deref()),
        What::Image => image::image(a.quick, a.json),
        What::Embed => embed::embed(a.quick, a.json, a.model.as_deref()),
        What::Parallel => parallel::parallel(a.quick, a.json, a.model.as_deref()),
        What::Gguf => gguf::make(gguf::GgufArgs {
            like: a.like.as_deref(),
            llama_1b: a.llama_1b,
            header_only: a.header_only,
            out: a
                .out
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("kiln bench gguf needs --out FILE"))?,
        }),
        What::Soak => match a.quick {
            true => soak::soak(2000, 40, a.json),
            false => soak::soak(10_000, 200, a.json),
        },
    }
}
