//! Attention (online softmax, GQA/MQA, causal from a run-time position, run-time KV length,
//! split-K decode, sliding windows, soft-capped scores, custom scales) against the f64 CPU
//! reference.

use kiln::graph::AttentionOptions;
use kiln::kernels::attention::{
    flash_keys, flash_serves, splits, Tiles, MAX_HEAD_DIM, SHARED_WORDS,
};
use kiln::reference::attention::{attention, AttnShape};
use kiln::Dyn;
use kiln_tests::{assert_close, OpTest, Rng};

// Outputs are convex combinations of v in [-1, 1], so absolute error is the measure. The GPU
// accumulates scores, sums and outputs in f32 against an f64 reference: a score |s| <= ~8 is
// off by ~|s| * 6e-8, which scales its weight by (1 + e); exp() may add a few ulp (Vulkan
// allows 3 + 2|x| ulp), and 1000-term f32 sums add ~1e-7 relative. Seen: <= 3.3e-7 on
// lavapipe; 3e-6 leaves ~10x room for another driver's exp and summation order.
const ATOL: f32 = 3e-6;
// No relative slack needed: outputs are O(1) at most and the absolute bound covers them.
const RTOL: f32 = 0.0;

/// Where q_pos and kv_len come from: static, or a run scalar.
#[derive(Clone, Copy)]
struct Src {
    pos_slot: bool,
    kv_slot: bool,
}

const STATIC: Src = Src {
    pos_slot: false,
    kv_slot: false,
};
const SLOTS: Src = Src {
    pos_slot: true,
    kv_slot: true,
};

fn shape(
    batch: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    causal: bool,
) -> AttnShape {
    let scale = 1.0 / (d as f32).sqrt();
    AttnShape {
        batch,
        lq,
        lk,
        heads,
        kv_heads,
        d,
        causal,
        scale,
        q_pos: 0,
        kv_len: lk,
        window: 0,
        softcap: 0.0,
    }
}

/// Runs one case on the GPU (both kernel variants) and against the reference; returns the
/// output of the variant this adapter uses by default.
/// The GPU kernels run three ways: with every optional feature (FLASH prefill with f16 tiles
/// where the adapter has subgroups and shader-f16), with f32 math (FLASH's f32 tiles), and
/// without the features (the tiled kernel).
fn check(what: &str, s: AttnShape, src: Src) -> Vec<f32> {
    let [hw, plain, sw, _] = kiln_tests::gpu_variants();
    let a = check_on(&hw, what, s, src);
    check_on(
        &kiln_tests::gpu_kernels_f32_math(),
        &format!("{what} [f32 math]"),
        s,
        src,
    );
    check_on(&plain, &format!("{what} [no optional features]"), s, src);
    let b = check_on(&sw, &format!("{what} [software variant]"), s, src);
    if kiln_tests::gpu().features.software {
        b
    } else {
        a
    }
}

fn check_on(gpu: &std::sync::Arc<kiln::Gpu>, what: &str, s: AttnShape, src: Src) -> Vec<f32> {
    check_kv(gpu, what, s, src, false)
}

/// [`check_on`] with the keys and values in f32 inputs, or (`f16`) in f16 caches, two elements
/// to a word (an f16 KV cache); the reference then sees the values rounded to f16.
fn check_kv(
    gpu: &std::sync::Arc<kiln::Gpu>,
    what: &str,
    s: AttnShape,
    src: Src,
    f16: bool,
) -> Vec<f32> {
    let mut rng = Rng::new((s.lq * 131 + s.lk * 7 + s.d * 3 + s.heads) as u64);
    // q wider than k/v so the softmax is peaked enough for the max tracking to matter.
    let q = rng.vec(s.batch * s.lq * s.heads * s.d, -2.0, 2.0);
    let mut k = rng.vec(s.batch * s.lk * s.kv_heads * s.d, -1.0, 1.0);
    let mut v = rng.vec(s.batch * s.lk * s.kv_heads * s.d, -1.0, 1.0);
    let mut t = OpTest::on(gpu.clone());
    let qv = t.input("q", &[s.batch, s.lq, s.heads * s.d], &q);
    let kv_shape = [s.batch, s.lk, s.kv_heads * s.d];
    let (kv, vv) = if f16 {
        let (kb, vb) = (kiln_tests::to_f16(&mut k), kiln_tests::to_f16(&mut v));
        (
            t.weight("k", &kv_shape, kiln::DType::F16, &kb),
            t.weight("v", &kv_shape, kiln::DType::F16, &vb),
        )
    } else {
        (t.input("k", &kv_shape, &k), t.input("v", &kv_shape, &v))
    };
    let mut scalars = Vec::new();
    let q_pos = if src.pos_slot {
        let slot = t.g.scalar("pos").unwrap();
        scalars.push((slot, s.q_pos as u32));
        Dyn::slot(slot)
    } else {
        Dyn::Static(s.q_pos as u32)
    };
    let kv_len = if src.kv_slot {
        let slot = t.g.scalar("kv_len").unwrap();
        scalars.push((slot, s.kv_len as u32));
        Dyn::slot(slot)
    } else {
        Dyn::Static(s.kv_len as u32)
    };
    let opts = AttentionOptions {
        causal: s.causal,
        scale: Some(s.scale),
        window: (s.window > 0).then_some(s.window),
        softcap: (s.softcap > 0.0).then_some(s.softcap),
        seq: None,
    };
    let y =
        t.g.attention_with(qv, kv, vv, s.heads, s.kv_heads, q_pos, kv_len, &opts)
            .unwrap();
    let got = t.run(y, &scalars);
    let ns = split_count(&s);
    // FLASH with f16 tiles holds f32 keys and values as f16 (rounded to nearest): the
    // reference takes the same values.
    if gpu.features.half_tiles && flash_serves(gpu, s.lq, s.d) {
        kiln_tests::to_f16(&mut k);
        kiln_tests::to_f16(&mut v);
    }
    assert_close(
        &format!("{what} ({} split{})", ns, if ns == 1 { "" } else { "s" }),
        &got,
        &attention(&q, &k, &v, &s),
        ATOL,
        RTOL,
    );
    got
}

/// The number of key splits the encoder picks for a shape (mirrors kernels::attention::encode).
fn split_count(s: &AttnShape) -> usize {
    let g = s.heads / s.kv_heads;
    let tiles = Tiles::new(s.lq * g, s.d);
    splits(s.batch * s.kv_heads * (s.lq * g).div_ceil(tiles.bq), s.lk)
}

#[test]
fn causal_prefill_from_zero() {
    for (lq, heads, kv_heads, d) in [(37, 4, 4, 64), (20, 2, 2, 65), (33, 3, 3, 256)] {
        let s = shape(1, lq, lq, heads, kv_heads, d, true);
        check(
            &format!("causal prefill lq={lq} h={heads}/{kv_heads} d={d}"),
            s,
            STATIC,
        );
    }
}

#[test]
fn causal_prefill_at_run_time_position() {
    // A chunk of 13 queries at position 50 of a 300-row cache (GQA 4): valid keys come from
    // the run scalars, and the cache is long enough that keys are split.
    for (lq, heads, kv_heads, d, pos) in [(13, 8, 2, 128, 50), (5, 4, 1, 80, 250)] {
        let mut s = shape(1, lq, 300, heads, kv_heads, d, true);
        s.q_pos = pos;
        s.kv_len = pos + lq;
        assert!(split_count(&s) > 1);
        check(
            &format!("causal chunk lq={lq} at {pos} h={heads}/{kv_heads} d={d}"),
            s,
            SLOTS,
        );
    }
}

#[test]
fn decode_long_cache_split_k() {
    // One query over 1030 valid rows of an 1100-row cache: GQA 4 (d 128), MQA (d 80), MHA (d 40).
    for (heads, kv_heads, d, causal) in [(8, 2, 128, true), (8, 1, 80, false), (4, 4, 40, true)] {
        let mut s = shape(1, 1, 1100, heads, kv_heads, d, causal);
        s.kv_len = 1030;
        s.q_pos = 1029;
        assert!(split_count(&s) > 1);
        check(
            &format!("decode kv=1030/1100 h={heads}/{kv_heads} d={d} causal={causal}"),
            s,
            SLOTS,
        );
    }
}

/// Decode over a few live keys of a long cache (the GPU decode kernel runs only the splits the
/// live keys fill, and its reduce pass reads only those), down to a single key, and a window.
#[test]
fn decode_short_context_in_long_cache() {
    for (heads, kv_heads, d, live, window) in [
        (8, 2, 128, 70, 0),
        (8, 1, 64, 1, 0),
        (4, 4, 40, 33, 0),
        (8, 2, 64, 900, 100),
    ] {
        let mut s = shape(1, 1, 1100, heads, kv_heads, d, true);
        s.kv_len = live;
        s.q_pos = live - 1;
        s.window = window;
        check(
            &format!("decode kv={live}/1100 h={heads}/{kv_heads} d={d} window={window}"),
            s,
            SLOTS,
        );
    }
}

#[test]
fn cross_attention_batched() {
    // U-Net/CLIP-like: more queries than keys, non-causal, batch 2, head dims 40 and 160; and
    // the SD VAE's single 512-dim head (self-attention over the latent pixels).
    for (lq, lk, heads, d) in [
        (300, 77, 2, 40),
        (70, 77, 2, 160),
        (24, 9, 3, 65),
        (64, 64, 1, 512),
    ] {
        let s = shape(2, lq, lk, heads, heads, d, false);
        assert_eq!(split_count(&s), 1);
        check(&format!("cross lq={lq} lk={lk} h={heads} d={d}"), s, STATIC);
    }
}

#[test]
fn kv_len_past_capacity_is_clamped() {
    let mut s = shape(1, 6, 40, 4, 2, 64, false);
    s.kv_len = 1000;
    check("kv_len 1000 > lk 40", s, SLOTS);
}

#[test]
fn no_valid_keys_gives_zeros() {
    // kv_len = 0 at run time, both on the direct path and the split-K path.
    for (lq, lk, causal) in [(7, 20, false), (1, 1100, true)] {
        let mut s = shape(1, lq, lk, 4, 2, 64, causal);
        s.kv_len = 0;
        let got = check(&format!("kv_len 0 lq={lq} lk={lk}"), s, SLOTS);
        assert!(got.iter().all(|&x| x == 0.0));
    }
}

#[test]
fn sliding_window_prefill_and_decode() {
    // Windows shorter than the prompt (so early keys drop out for later queries), a window
    // equal to 1 (each query sees itself), and decode over a long cache where the window is
    // a small part of it (split-K over the window only). Gemma's query_pre_attn_scalar scale.
    for (lq, lk, pos, heads, kv_heads, d, window) in [
        (40, 40, 0, 4, 2, 64, 7),
        (19, 19, 0, 2, 1, 32, 1),
        (13, 300, 120, 8, 2, 128, 50),
        (1, 1100, 1029, 8, 1, 256, 512),
        (1, 1100, 1029, 4, 4, 40, 3),
    ] {
        let mut s = shape(1, lq, lk, heads, kv_heads, d, true);
        s.q_pos = pos;
        s.kv_len = pos + lq;
        s.window = window;
        s.scale = 1.0 / 12.0;
        check(
            &format!("window {window} lq={lq} at {pos} lk={lk} h={heads}/{kv_heads} d={d}"),
            s,
            SLOTS,
        );
    }
}

/// Bidirectional sliding windows (EmbeddingGemma's sliding layers: not causal, keys with
/// |q - j| < W): a whole input in one pass, windows shorter than it, GQA, every kernel variant.
#[test]
fn bidirectional_sliding_window() {
    for (lq, heads, kv_heads, d, window) in [
        (40, 4, 2, 64, 7),
        (19, 2, 1, 32, 1),
        (33, 4, 2, 128, 16),
        (5, 2, 2, 64, 512),
    ] {
        let mut s = shape(1, lq, lq, heads, kv_heads, d, false);
        s.window = window;
        s.scale = 1.0 / 12.0;
        check(
            &format!("bidirectional window {window} lq={lq} h={heads}/{kv_heads} d={d}"),
            s,
            STATIC,
        );
    }
}

#[test]
fn soft_capped_scores() {
    // Gemma 2's cap of 50 only bites on large scores: a wide scale makes them large. Prefill
    // with a window, and split-K decode.
    for (lq, lk, pos, window) in [(24, 24, 0, 9), (1, 700, 650, 0)] {
        let mut s = shape(1, lq, lk, 4, 2, 64, true);
        s.q_pos = pos;
        s.kv_len = pos + lq;
        s.window = window;
        s.scale = 6.0;
        s.softcap = 5.0;
        let got = check(&format!("softcap 5 lq={lq} lk={lk}"), s, SLOTS);
        // The cap must change the result (else this case tests nothing).
        let plain = attention_uncapped(&s);
        assert!(got.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-2));
    }
}

/// The reference without the cap, on the inputs `check_on` makes for `s`.
fn attention_uncapped(s: &AttnShape) -> Vec<f32> {
    let mut rng = Rng::new((s.lq * 131 + s.lk * 7 + s.d * 3 + s.heads) as u64);
    let q = rng.vec(s.batch * s.lq * s.heads * s.d, -2.0, 2.0);
    let k = rng.vec(s.batch * s.lk * s.kv_heads * s.d, -1.0, 1.0);
    let v = rng.vec(s.batch * s.lk * s.kv_heads * s.d, -1.0, 1.0);
    attention(&q, &k, &v, &AttnShape { softcap: 0.0, ..*s })
}

#[test]
fn tiles_fit_workgroup_limits() {
    for hd in 1..=MAX_HEAD_DIM {
        for rows in [1, 2, 3, 4, 7, 16, 77, 4096] {
            let t = Tiles::new(rows, hd);
            assert!(t.shared_bytes() <= SHARED_WORDS * 4, "{t:?}");
            assert!(
                t.bk >= 1 && t.bq.is_power_of_two() && t.bq <= 16 && t.dj * (256 / t.bq) >= hd,
                "{t:?}"
            );
        }
    }
}

/// The FLASH variant's K and V tiles fit the WebGPU default of workgroup memory for every head
/// dim it serves, f16 and f32 tiles.
#[test]
fn flash_tiles_fit_workgroup_limits() {
    for hd in (4..=256).step_by(4) {
        for (half, elem) in [(true, 2), (false, 4)] {
            let bc = flash_keys(hd, half);
            assert!(
                bc >= 1 && 2 * bc * hd * elem <= SHARED_WORDS * 4,
                "hd {hd} bc {bc}"
            );
        }
    }
}

/// f16 KV caches (two elements to a word, `LoadOptions::kv_cache`): prefill over a cache at a
/// run-time position and split-K decode, GQA and MHA, head dims with and without vec4 units,
/// both kernel variants, against the reference on the same f16 values.
#[test]
fn f16_kv_caches() {
    let variants = kiln_tests::gpu_variants();
    for (lq, lk, heads, kv_heads, d, pos) in [
        (13, 300, 8, 2, 128, 50),
        (1, 1100, 8, 2, 64, 1029),
        (1, 700, 4, 4, 42, 650),
        (6, 64, 2, 1, 80, 20),
    ] {
        let mut s = shape(1, lq, lk, heads, kv_heads, d, true);
        s.q_pos = pos;
        s.kv_len = pos + lq;
        for gpu in &variants {
            let what = format!(
                "f16 cache lq={lq} at {pos} of {lk} h={heads}/{kv_heads} d={d} (software kernels {})",
                gpu.features.software
            );
            check_kv(gpu, &what, s, SLOTS, true);
        }
    }
}

/// A batch of decoding sequences (continuous batching): one query per batch row, each row
/// reading its own sequence of caches that hold more sequences than the batch has rows, at its
/// own position and valid length (per-row run scalars, `Dyn::Rows`). Long enough for split-K
/// (each row uses the splits its own keys fill), f32 and f16 caches, every kernel variant,
/// against the reference run row by row on the sequence's keys.
#[test]
fn batch_of_sequences_with_per_row_positions() {
    let (seqs, lk, heads, kv_heads, d) = (5, 700, 8, 2, 64);
    // (sequence, position) per row; the last row's window test is below.
    let rows = [(3usize, 650usize), (0, 9), (4, 300), (1, 0)];
    let mut rng = Rng::new(77);
    let q = rng.vec(rows.len() * heads * d, -2.0, 2.0);
    let kw = kv_heads * d;
    for f16 in [false, true] {
        let mut k = rng.vec(seqs * lk * kw, -1.0, 1.0);
        let mut v = rng.vec(seqs * lk * kw, -1.0, 1.0);
        if f16 {
            kiln_tests::to_f16(&mut k);
            kiln_tests::to_f16(&mut v);
        }
        for window in [0, 40] {
            for gpu in kiln_tests::gpu_variants() {
                let mut t = OpTest::on(gpu.clone());
                let qv = t.input("q", &[rows.len(), 1, heads * d], &q);
                let kv_shape = [seqs, lk, kw];
                let (kc, vc) = if f16 {
                    let (mut k2, mut v2) = (k.clone(), v.clone());
                    let (kb, vb) = (kiln_tests::to_f16(&mut k2), kiln_tests::to_f16(&mut v2));
                    (
                        t.weight("k", &kv_shape, kiln::DType::F16, &kb),
                        t.weight("v", &kv_shape, kiln::DType::F16, &vb),
                    )
                } else {
                    (t.input("k", &kv_shape, &k), t.input("v", &kv_shape, &v))
                };
                let seq0 = t.g.scalars("seq", rows.len()).unwrap();
                let pos0 = t.g.scalars("pos", rows.len()).unwrap();
                let mut scalars = Vec::new();
                for (r, &(sq, pos)) in rows.iter().enumerate() {
                    scalars.push((kiln::Scalar(seq0.0 + r as u32), sq as u32));
                    scalars.push((kiln::Scalar(pos0.0 + r as u32), pos as u32));
                }
                let opts = AttentionOptions {
                    causal: true,
                    scale: None,
                    window: (window > 0).then_some(window),
                    softcap: None,
                    seq: Some(Dyn::rows(seq0)),
                };
                let y =
                    t.g.attention_with(
                        qv,
                        kc,
                        vc,
                        heads,
                        kv_heads,
                        Dyn::rows(pos0),
                        Dyn::rows(pos0).plus(1),
                        &opts,
                    )
                    .unwrap();
                let got = t.run(y, &scalars);
                let qw = heads * d;
                for (r, &(sq, pos)) in rows.iter().enumerate() {
                    let mut s = shape(1, 1, lk, heads, kv_heads, d, true);
                    (s.q_pos, s.kv_len, s.window) = (pos, pos + 1, window);
                    let part = |x: &[f32]| x[sq * lk * kw..(sq + 1) * lk * kw].to_vec();
                    assert_close(
                        &format!(
                            "row {r} (sequence {sq} at {pos}, window {window}, f16 {f16}, software {})",
                            gpu.features.software
                        ),
                        &got[r * qw..(r + 1) * qw],
                        &attention(&q[r * qw..(r + 1) * qw], &part(&k), &part(&v), &s),
                        ATOL,
                        RTOL,
                    );
                }
            }
        }
    }
}
