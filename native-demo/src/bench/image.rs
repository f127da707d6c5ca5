//! `kiln bench image`: a random-weight U-Net with SD 1.5's channel layout (and a scaled-down
//! one) at a small latent size, replayed as the denoising loop runs it (CFG batch of 2 + the
//! scheduler update), and without guidance (batch 1: a one-step SD-Turbo image is one of
//! these and a decode); the matching VAE decode and encode (img2img and inpainting encode the
//! image first), and the tiny autoencoder's decode (TAESD's layout) at the same size. Weights
//! are made here (f16, no download).

use anyhow::Result;
use kiln::diffusion::schedulers::SchedulerConfig;
use kiln::diffusion::taesd::{TinyConfig, TinyDecoder};
use kiln::diffusion::unet::{Unet, UnetConfig};
use kiln::diffusion::vae::{Vae, VaeConfig};
use kiln::formats::safetensors::SafeTensors;
use kiln::graph::StepValues;
use kiln::weights::Weights;
use kiln::{CompileOptions, DType, Dyn, Graph, Tensor};
use serde_json::json;
use std::sync::Arc;

type Params = Vec<(String, Vec<usize>)>;

fn norm(p: &mut Params, name: &str, c: usize) {
    p.push((format!("{name}.weight"), vec![c]));
    p.push((format!("{name}.bias"), vec![c]));
}

fn layer(p: &mut Params, name: &str, shape: &[usize], bias: bool) {
    p.push((format!("{name}.weight"), shape.to_vec()));
    if bias {
        p.push((format!("{name}.bias"), vec![shape[0]]));
    }
}

fn resnet(p: &mut Params, n: &str, cin: usize, cout: usize, temb: Option<usize>) {
    norm(p, &format!("{n}.norm1"), cin);
    layer(p, &format!("{n}.conv1"), &[cout, cin, 3, 3], true);
    if let Some(t) = temb {
        layer(p, &format!("{n}.time_emb_proj"), &[cout, t], true);
    }
    norm(p, &format!("{n}.norm2"), cout);
    layer(p, &format!("{n}.conv2"), &[cout, cout, 3, 3], true);
    if cin != cout {
        layer(p, &format!("{n}.conv_shortcut"), &[cout, cin, 1, 1], true);
    }
}

fn transformer(p: &mut Params, n: &str, c: usize, cross: usize) {
    norm(p, &format!("{n}.norm"), c);
    layer(p, &format!("{n}.proj_in"), &[c, c, 1, 1], true);
    let b = format!("{n}.transformer_blocks.0");
    for k in ["norm1", "norm2", "norm3"] {
        norm(p, &format!("{b}.{k}"), c);
    }
    for (a, kv) in [("attn1", c), ("attn2", cross)] {
        layer(p, &format!("{b}.{a}.to_q"), &[c, c], false);
        layer(p, &format!("{b}.{a}.to_k"), &[c, kv], false);
        layer(p, &format!("{b}.{a}.to_v"), &[c, kv], false);
        layer(p, &format!("{b}.{a}.to_out.0"), &[c, c], true);
    }
    layer(p, &format!("{b}.ff.net.0.proj"), &[8 * c, c], true);
    layer(p, &format!("{b}.ff.net.2"), &[c, 4 * c], true);
    layer(p, &format!("{n}.proj_out"), &[c, c, 1, 1], true);
}

/// Every U-Net parameter name and shape, following the forward pass's channel bookkeeping.
fn unet_params(ch: &[usize], layers: usize, cross: usize) -> Params {
    let mut p = Params::new();
    let (c0, temb) = (ch[0], 4 * ch[0]);
    layer(&mut p, "conv_in", &[c0, 4, 3, 3], true);
    layer(&mut p, "time_embedding.linear_1", &[temb, c0], true);
    layer(&mut p, "time_embedding.linear_2", &[temb, temb], true);
    let n = ch.len();
    let mut skips = vec![c0];
    let mut x = c0;
    for (i, &cout) in ch.iter().enumerate() {
        for j in 0..layers {
            resnet(
                &mut p,
                &format!("down_blocks.{i}.resnets.{j}"),
                x,
                cout,
                Some(temb),
            );
            x = cout;
            if i + 1 < n {
                transformer(
                    &mut p,
                    &format!("down_blocks.{i}.attentions.{j}"),
                    cout,
                    cross,
                );
            }
            skips.push(x);
        }
        if i + 1 < n {
            layer(
                &mut p,
                &format!("down_blocks.{i}.downsamplers.0.conv"),
                &[cout, cout, 3, 3],
                true,
            );
            skips.push(x);
        }
    }
    resnet(&mut p, "mid_block.resnets.0", x, x, Some(temb));
    transformer(&mut p, "mid_block.attentions.0", x, cross);
    resnet(&mut p, "mid_block.resnets.1", x, x, Some(temb));
    for (i, &cout) in ch.iter().rev().enumerate() {
        for j in 0..=layers {
            let s = skips.pop().unwrap_or(0);
            resnet(
                &mut p,
                &format!("up_blocks.{i}.resnets.{j}"),
                x + s,
                cout,
                Some(temb),
            );
            x = cout;
            if i > 0 {
                transformer(
                    &mut p,
                    &format!("up_blocks.{i}.attentions.{j}"),
                    cout,
                    cross,
                );
            }
        }
        if i + 1 < n {
            layer(
                &mut p,
                &format!("up_blocks.{i}.upsamplers.0.conv"),
                &[cout, cout, 3, 3],
                true,
            );
        }
    }
    norm(&mut p, "conv_norm_out", c0);
    layer(&mut p, "conv_out", &[4, c0, 3, 3], true);
    p
}

fn vae_params(ch: &[usize], layers: usize) -> Params {
    let mut p = Params::new();
    let last = *ch.last().unwrap_or(&1);
    layer(&mut p, "post_quant_conv", &[4, 4, 1, 1], true);
    layer(&mut p, "decoder.conv_in", &[last, 4, 3, 3], true);
    resnet(&mut p, "decoder.mid_block.resnets.0", last, last, None);
    let a = "decoder.mid_block.attentions.0";
    norm(&mut p, &format!("{a}.group_norm"), last);
    for k in ["to_q", "to_k", "to_v", "to_out.0"] {
        layer(&mut p, &format!("{a}.{k}"), &[last, last], true);
    }
    resnet(&mut p, "decoder.mid_block.resnets.1", last, last, None);
    let mut x = last;
    let n = ch.len();
    for (i, &cout) in ch.iter().rev().enumerate() {
        for j in 0..=layers {
            resnet(
                &mut p,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                x,
                cout,
                None,
            );
            x = cout;
        }
        if i + 1 < n {
            layer(
                &mut p,
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                &[cout, cout, 3, 3],
                true,
            );
        }
    }
    norm(&mut p, "decoder.conv_norm_out", ch[0]);
    layer(&mut p, "decoder.conv_out", &[3, ch[0], 3, 3], true);
    p
}

/// The encoder half of `AutoencoderKL` (added to the decoder's parameters).
fn encoder_params(p: &mut Params, ch: &[usize], layers: usize) {
    let last = *ch.last().unwrap_or(&1);
    layer(p, "encoder.conv_in", &[ch[0], 3, 3, 3], true);
    let mut x = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for j in 0..layers {
            resnet(
                p,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                x,
                c,
                None,
            );
            x = c;
        }
        if i + 1 < ch.len() {
            layer(
                p,
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                &[c, c, 3, 3],
                true,
            );
        }
    }
    resnet(p, "encoder.mid_block.resnets.0", last, last, None);
    let a = "encoder.mid_block.attentions.0";
    norm(p, &format!("{a}.group_norm"), last);
    for k in ["to_q", "to_k", "to_v", "to_out.0"] {
        layer(p, &format!("{a}.{k}"), &[last, last], true);
    }
    resnet(p, "encoder.mid_block.resnets.1", last, last, None);
    norm(p, "encoder.conv_norm_out", last);
    layer(p, "encoder.conv_out", &[8, last, 3, 3], true);
    layer(p, "quant_conv", &[8, 8, 1, 1], true);
}

/// TAESD's decoder (diffusers' `AutoencoderTiny` defaults: 64 channels, blocks 3, 3, 3, 1).
fn taesd_params() -> Params {
    let mut p = Params::new();
    let mut i = 0;
    let conv = |p: &mut Params, i: &mut usize, co: usize, ci: usize, bias: bool| {
        layer(p, &format!("decoder.layers.{i}"), &[co, ci, 3, 3], bias);
        *i += 1;
    };
    conv(&mut p, &mut i, 64, 4, true);
    i += 1; // ReLU
    for (b, blocks) in [3, 3, 3, 1].into_iter().enumerate() {
        for _ in 0..blocks {
            for k in [0, 2, 4] {
                layer(
                    &mut p,
                    &format!("decoder.layers.{i}.conv.{k}"),
                    &[64, 64, 3, 3],
                    true,
                );
            }
            i += 1;
        }
        if b < 3 {
            i += 1; // up-sampling
            conv(&mut p, &mut i, 64, 64, false);
        } else {
            conv(&mut p, &mut i, 3, 64, true);
        }
    }
    p
}

fn random_safetensors(params: &Params, seed: u64) -> Result<SafeTensors> {
    let mut st = SafeTensors::new();
    st.add_file(
        "random",
        super::common::random_f16_safetensors(params, seed),
    )?;
    Ok(st)
}

/// The U-Net and VAE configs of one benchmark row, as diffusers writes them.
fn row_configs(
    ch: &[usize],
    cross: usize,
    heads: usize,
    groups: usize,
    vae_ch: &[usize],
    latent: usize,
) -> Result<(UnetConfig, VaeConfig)> {
    let unet = UnetConfig::from_json(&json!({
        "block_out_channels": ch, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 2,
        "attention_head_dim": heads, "norm_num_groups": groups, "cross_attention_dim": cross, "sample_size": latent
    }).to_string())?;
    let vae = VaeConfig::from_json(&json!({
        "block_out_channels": vae_ch, "layers_per_block": 2, "norm_num_groups": groups, "latent_channels": 4,
        "up_block_types": vec!["UpDecoderBlock2D"; vae_ch.len()]
    }).to_string())?;
    Ok((unet, vae))
}

/// Runs the image benchmark.
pub fn image(quick: bool, as_json: bool) -> Result<()> {
    let gpu = crate::gpu()?;
    let latent = if quick { 8 } else { 32 };
    let iters = if quick { 1 } else { 5 };
    let configs: [(&str, Vec<usize>, usize, usize, usize, Vec<usize>); 2] = [
        (
            "SD 1.5 layout",
            vec![320, 640, 1280, 1280],
            768,
            8,
            32,
            vec![128, 256, 512, 512],
        ),
        (
            "scaled down",
            vec![64, 128, 256, 256],
            256,
            4,
            32,
            vec![32, 64, 128, 128],
        ),
    ];
    let sched = SchedulerConfig::from_json(r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "clip_sample": false, "set_alpha_to_one": false}"#, None)?.schedule(4)?;
    let mut rows = Vec::new();
    for (label, ch, cross, heads, groups, vae_ch) in configs {
        let (ucfg, vcfg) = row_configs(&ch, cross, heads, groups, &vae_ch, latent)?;
        let unet = Unet {
            cfg: ucfg,
            weights: Weights::new(
                &gpu,
                "unet",
                Box::new(random_safetensors(&unet_params(&ch, 2, cross), 1)?),
            ),
        };
        let unet_in = Arc::new(Tensor::from_f32(
            &gpu,
            "unet_in",
            &[2, 4, latent, latent],
            &vec![0.5; 2 * 4 * latent * latent],
        )?);
        let x = Arc::new(Tensor::zeros(
            &gpu,
            "x",
            &[1, 4, latent, latent],
            DType::F32,
        )?);
        let x0 = Arc::new(Tensor::zeros(
            &gpu,
            "x0",
            &[1, 4, latent, latent],
            DType::F32,
        )?);
        let ctx = Arc::new(Tensor::from_f32(
            &gpu,
            "ctx",
            &[2, 77, cross],
            &vec![0.1; 2 * 77 * cross],
        )?);
        let coeffs = Arc::new(Tensor::from_f32(
            &gpu,
            "coeffs",
            &[4, kiln::diffusion::schedulers::COEFFS],
            &sched.coeff_table(),
        )?);
        let ts = Arc::new(Tensor::from_f32(&gpu, "ts", &[4, 1], &sched.timesteps)?);
        let guidance = Arc::new(Tensor::from_f32(&gpu, "g", &[1], &[7.5])?);
        let status = Arc::new(Tensor::from_u32(&gpu, "status", &[1], &[u32::MAX])?);
        let mut g = Graph::new();
        let step = g.scalar("step")?;
        let tv = g.tensor(&ts);
        let t = g.slice_rows(tv, Dyn::slot(step), 1)?;
        let t = g.reshape(t, &[1])?;
        let (cv, uv) = (g.tensor(&ctx), g.tensor(&unet_in));
        let out = unet.forward(&mut g, uv, t, cv)?;
        let v = StepValues {
            model_out: out,
            coeffs: g.tensor(&coeffs),
            guidance: g.tensor(&guidance),
            x: g.tensor(&x),
            x0_prev: g.tensor(&x0),
            unet_in: uv,
            status: g.tensor(&status),
            noise: None,
        };
        g.scheduler_step(&v, Dyn::slot(step))?;
        let mut plan = pollster::block_on(g.compile(&gpu, CompileOptions::default()))?;
        // The step index only selects a coefficient row: timing does not depend on it.
        plan.set(step, 1);
        let step_ms = super::common::time(&gpu, &plan, iters)?;
        let profile = match super::common::best_profile(&plan, 1) {
            Ok(p) => super::common::profile_rows(&p),
            Err(_) => json!(null),
        };
        let before = gpu.counters();
        let t0 = std::time::Instant::now();
        plan.run()?;
        let host_ms = t0.elapsed().as_secs_f64() * 1e3;
        gpu.wait_idle()?;
        let c = gpu.counters() - before;
        // The plan's own accounting: what a step moves against each weight once and each
        // activation once.
        let t = plan.traffic;
        let moved = (t.weights_read + t.activations_moved + t.cache_read) as f64 / 1e6;
        let minimum = (t.weights_needed + t.activations_once + t.cache_bytes) as f64 / 1e6;

        // Without guidance (batch 1): SD-Turbo's one step, LCM's steps.
        let mut g = Graph::new();
        let u1 = g.input("unet_in", &[1, 4, latent, latent], DType::F32)?;
        let c1 = g.input("ctx", &[1, 77, cross], DType::F32)?;
        let t1 = g.input("t", &[1], DType::F32)?;
        let o1 = unet.forward(&mut g, u1, t1, c1)?;
        g.output(o1);
        let plan1 = pollster::block_on(g.compile(&gpu, CompileOptions::default()))?;
        let step1_ms = super::common::time(&gpu, &plan1, iters)?;

        let mut vp = vae_params(&vae_ch, 2);
        encoder_params(&mut vp, &vae_ch, 2);
        let vae = Vae {
            cfg: vcfg,
            weights: Weights::new(&gpu, "vae", Box::new(random_safetensors(&vp, 2)?)),
        };
        let mut g = Graph::new();
        let xv = g.tensor(&x);
        let img = vae.decode(&mut g, xv)?;
        g.output(img);
        let vplan = pollster::block_on(g.compile(&gpu, CompileOptions::default()))?;
        let vae_ms = super::common::time(&gpu, &vplan, iters)?;
        let px = latent * vae.cfg.scale_factor();
        let mut g = Graph::new();
        let iv = g.input("image", &[1, 3, px, px], DType::F32)?;
        let mean = vae.encode_mean(&mut g, iv)?;
        g.output(mean);
        let eplan = pollster::block_on(g.compile(&gpu, CompileOptions::default()))?;
        let encode_ms = super::common::time(&gpu, &eplan, iters)?;
        let tiny = TinyDecoder {
            cfg: TinyConfig::from_json("{}")?,
            weights: Weights::new(
                &gpu,
                "taesd",
                Box::new(random_safetensors(&taesd_params(), 3)?),
            ),
        };
        let mut g = Graph::new();
        let xv = g.tensor(&x);
        let img = tiny.decode(&mut g, xv)?;
        g.output(img);
        let tplan = pollster::block_on(g.compile(&gpu, CompileOptions::default()))?;
        let taesd_ms = super::common::time(&gpu, &tplan, iters)?;
        rows.push(json!({"config": label, "latent": latent, "image": px, "unet_step_ms": step_ms, "vae_decode_ms": vae_ms,
            "unet_step_batch1_ms": step1_ms, "vae_encode_ms": encode_ms, "taesd_decode_ms": taesd_ms,
            "dispatches_per_step": c.dispatches, "profile_step": profile, "host_ms_per_step": host_ms,
            "moved_mb_per_step": moved, "minimum_mb_per_step": minimum, "submits_per_step": c.submits, "readback_bytes_per_step": c.bytes_read_back, "objects_created_per_step": c.objects_created()}));
    }
    if as_json {
        println!("{}", json!({"adapter": gpu.describe(), "rows": rows}));
        return Ok(());
    }
    println!("adapter: {}", gpu.describe());
    println!("random f16 weights; one step = U-Net on the CFG batch of 2 + the scheduler update\n");
    println!("| U-Net | latent | ms / step | VAE decode ms | dispatches / step | submits / step | readback B / step | objects created / step |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {}x{} ({} px) | {:.1} | {:.1} | {} | {} | {} | {} |",
            r["config"].as_str().unwrap_or(""),
            r["latent"],
            r["latent"],
            r["image"],
            r["unet_step_ms"].as_f64().unwrap_or(0.0),
            r["vae_decode_ms"].as_f64().unwrap_or(0.0),
            r["dispatches_per_step"],
            r["submits_per_step"],
            r["readback_bytes_per_step"],
            r["objects_created_per_step"]
        );
    }
    println!("\nWhat a step moves (the step plan's own accounting: every op's reads and writes) against each weight and activation once, and the host's time to record and submit it:\n");
    println!("| U-Net | moved MB / step | minimum MB / step | moved / minimum | host ms / step |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r["config"].as_str().unwrap_or(""),
            f("moved_mb_per_step"),
            f("minimum_mb_per_step"),
            f("moved_mb_per_step") / f("minimum_mb_per_step").max(1e-9),
            f("host_ms_per_step")
        );
    }
    println!("\nWithout guidance (batch 1, as SD-Turbo and LCM run), the encoder img2img and inpainting add, and the tiny decoder against the VAE's:\n");
    println!("| U-Net | U-Net step, batch 1 ms | one-step image (step + VAE decode) ms | VAE encode ms | VAE decode ms | TAESD decode ms | VAE / TAESD |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}x |",
            r["config"].as_str().unwrap_or(""),
            f("unet_step_batch1_ms"),
            f("unet_step_batch1_ms") + f("vae_decode_ms"),
            f("vae_encode_ms"),
            f("vae_decode_ms"),
            f("taesd_decode_ms"),
            f("vae_decode_ms") / f("taesd_decode_ms").max(1e-9)
        );
    }
    for r in &rows {
        super::common::print_profile(
            &format!("U-Net step, {}", r["config"].as_str().unwrap_or("")),
            &r["profile_step"],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The benchmark's configs load (a stricter config reader once broke `kiln bench image`).
    #[test]
    fn configs_load() {
        super::row_configs(
            &[320, 640, 1280, 1280],
            768,
            8,
            32,
            &[128, 256, 512, 512],
            8,
        )
        .unwrap();
    }
}
