//! The Gated DeltaNet kernels (Qwen 3.5's linear attention) against their f64 CPU references
//! (`kiln::reference::delta`), on every kernel variant: the causal convolution with its state,
//! the delta rule token by token (decode) and in chunks (prefill), into one sequence of a state
//! holding several and for a batch of sequences (a row each).

use kiln::kernels::delta::GatedDelta;
use kiln::reference::delta::{self as r, DeltaShape};
use kiln::{Dyn, Scalar};
use kiln_tests::{assert_close, gpu_variants, OpTest, Rng};
use std::sync::Arc;

fn read(gpu: &Arc<kiln::Gpu>, t: &Arc<kiln::Tensor>) -> Vec<f32> {
    let bytes = (t.shape.iter().product::<usize>() * 4) as u64;
    let b = pollster::block_on(gpu.read_buffer(t.buffer().unwrap(), 0, bytes)).unwrap();
    bytemuck::pod_collect_to_vec(&b)
}

/// Where a test's tokens go: a run of `t` tokens (the first `valid` real) into sequence `seq`,
/// or one token of each of the listed sequences (a batch).
#[derive(Clone, Debug)]
enum Rows {
    Run { t: usize, valid: usize, seq: usize },
    Batch(Vec<usize>),
}

impl Rows {
    /// (b, t) of the input.
    fn dims(&self) -> (usize, usize) {
        match self {
            Rows::Run { t, .. } => (1, *t),
            Rows::Batch(s) => (s.len(), 1),
        }
    }

    /// The (valid, seq) run-time values, and the scalars to set.
    fn dyns(&self, t: &mut OpTest) -> (Dyn, Dyn, Vec<(Scalar, u32)>) {
        match self {
            Rows::Run { valid, seq, .. } => {
                let v = t.g.scalar("last").unwrap();
                (
                    Dyn::affine(v, 1, 1),
                    Dyn::Static(*seq as u32),
                    vec![(v, *valid as u32 - 1)],
                )
            }
            Rows::Batch(seqs) => {
                let s0 = t.g.scalars("seq", seqs.len()).unwrap();
                let scalars = (0..seqs.len())
                    .map(|i| (Scalar(s0.0 + i as u32), seqs[i] as u32))
                    .collect();
                (Dyn::Static(1), Dyn::rows(s0), scalars)
            }
        }
    }

    /// Each reference call: (first input row, tokens, valid, sequence).
    fn parts(&self) -> Vec<(usize, usize, usize, usize)> {
        match self {
            Rows::Run { t, valid, seq } => vec![(0, *t, *valid, *seq)],
            Rows::Batch(seqs) => seqs
                .iter()
                .enumerate()
                .map(|(i, &s)| (i, 1, 1, s))
                .collect(),
        }
    }
}

#[test]
fn causal_conv_against_f64_every_variant() {
    let (c, k, seqs) = (40, 4, 3);
    let width = c + 7;
    let cases = [
        Rows::Run {
            t: 7,
            valid: 5,
            seq: 1,
        },
        Rows::Run {
            t: 2,
            valid: 2,
            seq: 0,
        },
        Rows::Batch(vec![1, 2, 0]),
    ];
    for (vi, gpu) in gpu_variants().iter().enumerate() {
        for rows in &cases {
            let mut rng = Rng::new(31 + vi as u64);
            let (b, t) = rows.dims();
            let x = rng.vec(b * t * width, -1.5, 1.5);
            let w = rng.vec(c * k, -0.6, 0.6);
            let s0 = rng.vec(seqs * (k - 1) * c, -1.0, 1.0);
            let mut op = OpTest::on(gpu.clone());
            let xv = op.input("x", &[b, t, width], &x);
            let wv = op.input("w", &[c, k], &w);
            let (sv, st) = op.state("conv_state", &[seqs, k - 1, c], &s0);
            let (valid, seq, scalars) = rows.dyns(&mut op);
            let y = op.g.causal_conv(xv, wv, sv, c, valid, seq).unwrap();
            let got = op.run(y, &scalars);
            let got_state = read(gpu, &st);
            let (mut want, mut want_state) = (vec![], s0.clone());
            let sl = (k - 1) * c;
            for (row, n, valid, sq) in rows.parts() {
                let xs = &x[row * t * width..(row * t + n) * width];
                let (yr, sr) =
                    r::causal_conv(xs, width, c, &w, k, &s0[sq * sl..(sq + 1) * sl], valid);
                want.extend(yr);
                want_state[sq * sl..(sq + 1) * sl].copy_from_slice(&sr);
            }
            let what = format!("causal_conv {rows:?} variant {vi}");
            assert_close(&format!("{what}: y"), &got, &want, 2e-6, 1e-5);
            assert_close(&format!("{what}: state"), &got_state, &want_state, 0.0, 0.0);
        }
    }
}

/// One delta-rule case: shape, where the tokens go, chunked or token by token.
fn check_delta(gpu: &Arc<kiln::Gpu>, vi: usize, s: DeltaShape, rows: &Rows, chunked: bool) {
    let seqs = 3;
    let (kh, vh, dk, dv) = (s.k_heads, s.v_heads, s.dk, s.dv);
    let (kd, vd) = (kh * dk, vh * dv);
    let (qw, pw) = (2 * kd + vd, 2 * kd + 2 * vd + 2 * vh);
    let (b, t) = rows.dims();
    let mut rng = Rng::new(7 + vi as u64 + 13 * t as u64);
    let qkv = rng.vec(b * t * qw, -1.0, 1.0);
    let proj = rng.vec(b * t * pw, -2.0, 2.0);
    let a: Vec<f32> = rng.vec(vh, 0.0, 2.0).iter().map(|x| -x.exp()).collect();
    let dt = rng.vec(vh, -1.0, 1.0);
    let norm_w = rng.vec(dv, 0.5, 1.5);
    let s0 = rng.vec(seqs * vh * dk * dv, -0.5, 0.5);
    let mut op = OpTest::on(gpu.clone());
    let qv = op.input("qkv", &[b, t, qw], &qkv);
    let pv = op.input("proj", &[b, t, pw], &proj);
    let av = op.input("a", &[vh], &a);
    let dv_ = op.input("dt", &[vh], &dt);
    let nv = op.input("norm_w", &[dv], &norm_w);
    let (sv, st) = op.state("delta_state", &[seqs, vh, dk, dv], &s0);
    let (valid, seq, scalars) = rows.dyns(&mut op);
    let kernel = GatedDelta {
        k_heads: kh,
        v_heads: vh,
        dk,
        dv,
        eps: s.eps,
        tiled: s.tiled,
        valid,
        seq,
        chunked,
    };
    let y = op.g.gated_delta(kernel, qv, pv, av, dv_, nv, sv).unwrap();
    let got = op.run(y, &scalars);
    let got_state = read(gpu, &st);
    let (mut want, mut want_state) = (vec![], s0.clone());
    let sl = vh * dk * dv;
    for (row, n, valid, sq) in rows.parts() {
        let (yr, sr) = r::gated_delta(
            &s,
            &qkv[row * t * qw..(row * t + n) * qw],
            &proj[row * t * pw..(row * t + n) * pw],
            &a,
            &dt,
            &norm_w,
            &s0[sq * sl..(sq + 1) * sl],
            valid,
        );
        want.extend(yr);
        want_state[sq * sl..(sq + 1) * sl].copy_from_slice(&sr);
    }
    let what = format!(
        "gated_delta kh={kh} vh={vh} dk={dk} dv={dv} {rows:?} chunked={chunked} variant {vi}"
    );
    assert_close(&format!("{what}: y"), &got, &want, 5e-5, 1e-4);
    assert_close(
        &format!("{what}: state"),
        &got_state,
        &want_state,
        1e-6,
        1e-5,
    );
}

/// Token by token: a run into one sequence of three (padding rows past `valid` leave the state
/// alone), and a batch of three sequences out of order; grouped value heads (4 over 2 key
/// heads, and in llama.cpp's tiled order), value dim unlike the key dim.
#[test]
fn gated_delta_recurrent_against_f64_every_variant() {
    let s = DeltaShape {
        k_heads: 2,
        v_heads: 4,
        dk: 16,
        dv: 24,
        eps: 1e-6,
        tiled: false,
    };
    for (vi, gpu) in gpu_variants().iter().enumerate() {
        let run = Rows::Run {
            t: 5,
            valid: 4,
            seq: 1,
        };
        check_delta(gpu, vi, s, &run, false);
        check_delta(gpu, vi, s, &Rows::Batch(vec![2, 0, 1]), false);
        // llama.cpp's value-head order (a GGUF's).
        let tiled = DeltaShape { tiled: true, ..s };
        check_delta(gpu, vi, tiled, &run, false);
    }
}

/// In chunks of `CHUNK` (32) tokens: runs crossing two chunk boundaries with padding in the
/// last, one token past a boundary, and Qwen 3.5's real head size (128 keys) with 256 values (four
/// state columns a thread).
#[test]
fn gated_delta_chunked_against_f64_every_variant() {
    let small = DeltaShape {
        k_heads: 2,
        v_heads: 4,
        dk: 16,
        dv: 24,
        eps: 1e-6,
        tiled: false,
    };
    let real = DeltaShape {
        k_heads: 1,
        v_heads: 2,
        dk: 128,
        dv: 256,
        eps: 1e-6,
        tiled: false,
    };
    for (vi, gpu) in gpu_variants().iter().enumerate() {
        let tiled = DeltaShape {
            tiled: true,
            ..small
        };
        let cases = [
            (small, 70, 67),
            (small, 33, 33),
            (small, 4, 4),
            (tiled, 35, 35),
            (real, 40, 37),
        ];
        for (s, t, valid) in cases {
            let run = Rows::Run { t, valid, seq: 2 };
            check_delta(gpu, vi, s, &run, true);
        }
    }
}
