//! Elementwise ops, rotary embeddings, upsampling and concatenation against the CPU reference.

use kiln::graph::{Act, BinaryOp, GluInput, UnaryOp};
use kiln::kernels::rope::{inv_freq, llama3_inv_freq, table};
use kiln::reference::elementwise as r;
use kiln_tests::{assert_close, OpTest, Rng};

#[test]
fn activations() {
    let x = Rng::new(1).vec(1000, -9.0, 9.0);
    let cases: [(UnaryOp, fn(f64) -> f64); 6] = [
        (UnaryOp::Silu, r::silu),
        (UnaryOp::Relu, r::relu),
        (UnaryOp::Sigmoid, r::sigmoid),
        (UnaryOp::GeluErf, r::gelu_erf),
        (UnaryOp::GeluTanh, r::gelu_tanh),
        (UnaryOp::QuickGelu, r::quick_gelu),
    ];
    for (op, f) in cases {
        let mut t = OpTest::new();
        let xv = t.input("x", &[10, 100], &x);
        let y = t.g.unary(xv, op).unwrap();
        let want: Vec<f32> = x.iter().map(|&v| f(v as f64) as f32).collect();
        // exp/erf approximations on the GPU: erf's 1.5e-7 absolute error times |x| <= 9 plus
        // a few ulp of exp.
        assert_close(&format!("{op:?}"), &t.run(y, &[]), &want, 2e-6, 1e-5);
    }
    let mut t = OpTest::new();
    let xv = t.input("x", &[1000], &x);
    let y = t.g.scale(xv, 0.18215, -1.5).unwrap();
    let want: Vec<f32> = x.iter().map(|v| v * 0.18215 - 1.5).collect();
    assert_close("scale", &t.run(y, &[]), &want, 1e-6, 1e-6);
    // Soft-capping (Gemma 2's final logits): large values saturate, small ones pass nearly as
    // they are; 1e9 checks the saturation does not turn into inf / inf.
    let mut xs = Rng::new(3).vec(999, -90.0, 90.0);
    xs.push(1e9);
    let mut t = OpTest::new();
    let xv = t.input("x", &[1000], &xs);
    let y = t.g.unary(xv, UnaryOp::Softcap { cap: 30.0 }).unwrap();
    let want: Vec<f32> = xs
        .iter()
        .map(|&v| (30.0 * (v as f64 / 30.0).tanh()) as f32)
        .collect();
    assert_close("softcap 30", &t.run(y, &[]), &want, 1e-5, 1e-6);
}

#[test]
fn broadcast_add_mul() {
    let mut rng = Rng::new(2);
    for (sa, sb) in [
        (vec![2, 3, 4, 5], vec![2, 3, 4, 5]),
        (vec![2, 6, 5, 7], vec![1, 6, 1, 1]),
        (vec![37, 64], vec![64]),
        (vec![3, 1, 5], vec![4, 1]),
    ] {
        for op in [BinaryOp::Add, BinaryOp::Mul] {
            let (a, b) = (
                rng.vec(sa.iter().product(), -2.0, 2.0),
                rng.vec(sb.iter().product(), -2.0, 2.0),
            );
            let mut t = OpTest::new();
            let (av, bv) = (t.input("a", &sa, &a), t.input("b", &sb, &b));
            let y = t.g.binary(av, bv, op).unwrap();
            assert_eq!(
                t.g.shape(y),
                kiln::reference::elementwise::broadcast_binary(&a, &sa, &b, &sb, |x, _| x)
                    .1
                    .as_slice()
            );
            let f = move |x: f64, y: f64| if op == BinaryOp::Add { x + y } else { x * y };
            let (want, _) = r::broadcast_binary(&a, &sa, &b, &sb, f);
            // One f32 operation per element: exact up to rounding.
            assert_close(
                &format!("{op:?} {sa:?} {sb:?}"),
                &t.run(y, &[]),
                &want,
                1e-6,
                1e-6,
            );
        }
    }
    let mut g = kiln::Graph::new();
    let a = g.input("a", &[3, 4], kiln::DType::F32).unwrap();
    let b = g.input("b", &[5], kiln::DType::F32).unwrap();
    assert!(g
        .add(a, b)
        .unwrap_err()
        .to_string()
        .contains("do not broadcast"));
}

#[test]
fn gated_units() {
    let mut rng = Rng::new(3);
    let (rows, f) = (9, 131);
    let (gate, up) = (rng.vec(rows * f, -4.0, 4.0), rng.vec(rows * f, -2.0, 2.0));
    let mut t = OpTest::new();
    let (gv, uv) = (
        t.input("g", &[rows, f], &gate),
        t.input("u", &[rows, f], &up),
    );
    let y =
        t.g.glu(GluInput::Pair { gate: gv, up: uv }, Act::Silu)
            .unwrap();
    let want: Vec<f32> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| (r::silu(g as f64) * u as f64) as f32)
        .collect();
    assert_close("swiglu", &t.run(y, &[]), &want, 2e-6, 1e-5);
    // GEGLU as diffusers: proj output [.., 2f], hidden first, gate second.
    let x = rng.vec(rows * 2 * f, -4.0, 4.0);
    let mut t = OpTest::new();
    let xv = t.input("x", &[rows, 2 * f], &x);
    let y =
        t.g.glu(
            GluInput::Halves {
                x: xv,
                gate_first: false,
            },
            Act::GeluErf,
        )
        .unwrap();
    let want: Vec<f32> = (0..rows * f)
        .map(|i| {
            let (rr, c) = (i / f, i % f);
            (x[rr * 2 * f + c] as f64 * r::gelu_erf(x[rr * 2 * f + f + c] as f64)) as f32
        })
        .collect();
    assert_close("geglu", &t.run(y, &[]), &want, 4e-6, 1e-5);
}

#[test]
fn timestep_embedding_like_diffusers() {
    let ts = [999.0f32, 981.0, 500.0, 1.0, 0.0];
    for (dim, flip, shift) in [(320, true, 0.0), (64, false, 1.0)] {
        let mut t = OpTest::new();
        let tv = t.input("t", &[ts.len()], &ts);
        let y = t.g.timestep_embedding(tv, dim, flip, shift).unwrap();
        let want = r::timestep_embedding(&ts, dim, flip, shift, 10000.0);
        // The frequency exp(-ln(1e4) j / half) differs by an ulp (~6e-8 relative) between the
        // GPU's exp and libm, and the argument t * freq multiplies that by t <= 999: up to ~1.2e-4
        // in the angle. torch's own CPU and CUDA results differ the same way.
        assert_close(
            &format!("timestep dim={dim}"),
            &t.run(y, &[]),
            &want,
            2e-4,
            0.0,
        );
    }
}

#[test]
fn rope_both_pairings_with_run_time_position() {
    let mut rng = Rng::new(4);
    let (seq, heads, d) = (11, 3, 64);
    let x = rng.vec(seq * heads * d, -1.0, 1.0);
    let base = inv_freq(d, 500000.0);
    let scaled = llama3_inv_freq(&base, 8.0, 1.0, 4.0, 8192.0);
    assert!(
        scaled.iter().zip(&base).any(|(a, b)| a != b) && scaled[0] == base[0],
        "llama3 scaling changes low frequencies only"
    );
    for (freqs, interleaved, pos) in [
        (&base, false, 0u32),
        (&scaled, true, 1500),
        (&scaled, false, 7000),
    ] {
        let mut t = OpTest::new();
        let xv = t.input("x", &[seq, heads * d], &x);
        let positions = pos as usize + seq;
        let fv = t.input("f", &[positions, d / 2, 2], &table(freqs, positions));
        let p = t.g.scalar("pos").unwrap();
        let y =
            t.g.rope(xv, fv, heads, interleaved, kiln::Dyn::slot(p))
                .unwrap();
        let want = r::rope(&x, seq, heads, d, freqs, interleaved, pos);
        // The table holds correctly rounded cos/sin of the f32 angle the reference uses too:
        // what is left is the f32 rounding of x0 * c - x1 * s (a few ulp of O(1) values).
        assert_close(
            &format!("rope interleaved={interleaved} pos={pos}"),
            &t.run(y, &[(p, pos)]),
            &want,
            1e-6,
            0.0,
        );
    }
    // Partial rotary: 16 of 40 dims rotate, the rest pass through.
    let (heads, d) = (2, 40);
    let x = rng.vec(5 * heads * d, -1.0, 1.0);
    let f = inv_freq(16, 10000.0);
    let mut t = OpTest::new();
    let xv = t.input("x", &[5, heads * d], &x);
    let fv = t.input("f", &[8, 8, 2], &table(&f, 8));
    let y =
        t.g.rope(xv, fv, heads, false, kiln::Dyn::Static(3))
            .unwrap();
    assert_close(
        "rope partial",
        &t.run(y, &[]),
        &r::rope(&x, 5, heads, d, &f, false, 3),
        1e-6,
        0.0,
    );
}

/// The stacked-QKV rotary step: q rotated out, k rotated and v copied into the caches at the
/// run-time position (rows past the cache are not written; other cache rows stay as they were).
#[test]
fn rope_kv_matches_rope_and_copies() {
    let mut rng = Rng::new(9);
    for (t_len, heads, kv_heads, d, rot, interleaved, pos, cap) in [
        (5, 4, 2, 16, 16, false, 3u32, 12),
        (3, 3, 1, 40, 16, true, 10, 12), // partial rotary; the last row falls past the cache
    ] {
        let (qw, kvw) = (heads * d, kv_heads * d);
        let width = qw + 2 * kvw;
        let x = rng.vec(t_len * width, -1.0, 1.0);
        let f = inv_freq(rot, 10000.0);
        let positions = 16;
        let (kc0, vc0) = (rng.vec(cap * kvw, -1.0, 1.0), rng.vec(cap * kvw, -1.0, 1.0));
        let mut t = OpTest::new();
        let xv = t.input("qkv", &[1, t_len, width], &x);
        let fv = t.input("f", &[positions, rot / 2, 2], &table(&f, positions));
        let (kcv, kc) = t.state("k_cache", &[1, cap, kvw], &kc0);
        let (vcv, vc) = t.state("v_cache", &[1, cap, kvw], &vc0);
        let p = t.g.scalar("pos").unwrap();
        let q =
            t.g.rope_kv(
                xv,
                fv,
                kcv,
                vcv,
                heads,
                kv_heads,
                interleaved,
                kiln::Dyn::slot(p),
            )
            .unwrap();
        let gpu = t.gpu.clone();
        let got_q = t.run(q, &[(p, pos)]);
        // The reference: split the rows, rotate q and k, copy k and v into the caches.
        let part = |lo: usize, w: usize| -> Vec<f32> {
            x.chunks(width)
                .flat_map(|r| r[lo..lo + w].to_vec())
                .collect()
        };
        let q_want = r::rope(&part(0, qw), t_len, heads, d, &f, interleaved, pos);
        let k_want = r::rope(&part(qw, kvw), t_len, kv_heads, d, &f, interleaved, pos);
        let v_want = part(qw + kvw, kvw);
        let what = format!("rope_kv h={heads}/{kv_heads} d={d} rot={rot} pos={pos}");
        assert_close(&format!("{what}: q"), &got_q, &q_want, 1e-6, 0.0);
        let (mut kc_want, mut vc_want) = (kc0.clone(), vc0.clone());
        for i in 0..t_len {
            let row = pos as usize + i;
            if row < cap {
                kc_want[row * kvw..(row + 1) * kvw]
                    .copy_from_slice(&k_want[i * kvw..(i + 1) * kvw]);
                vc_want[row * kvw..(row + 1) * kvw]
                    .copy_from_slice(&v_want[i * kvw..(i + 1) * kvw]);
            }
        }
        let read = |t: &std::sync::Arc<kiln::Tensor>| -> Vec<f32> {
            let b =
                pollster::block_on(gpu.read_buffer(t.buffer().unwrap(), 0, (cap * kvw * 4) as u64))
                    .unwrap();
            bytemuck::pod_collect_to_vec(&b)
        };
        assert_close(&format!("{what}: k cache"), &read(&kc), &kc_want, 1e-6, 0.0);
        assert_close(&format!("{what}: v cache"), &read(&vc), &vc_want, 0.0, 0.0);
    }
}

/// rope with a position per batch row (one token of each of several sequences: a Gemma 4
/// layer reading another's keys rotates its queries alone), and Gemma 4's proportional
/// frequencies (a quarter of the pairs turn, over the whole head; the rest have frequency 0).
#[test]
fn rope_per_row_positions_and_proportional_frequencies() {
    let (heads, d) = (2, 16);
    let mut rng = Rng::new(29);
    let mut f = inv_freq(d, 10000.0);
    f.iter_mut().skip(2).for_each(|x| *x = 0.0);
    let pos = [9u32, 0, 4];
    let x = rng.vec(pos.len() * heads * d, -1.0, 1.0);
    let mut t = OpTest::new();
    let xv = t.input("x", &[pos.len(), 1, heads * d], &x);
    let fv = t.input("f", &[12, d / 2, 2], &table(&f, 12));
    let first = t.g.scalars("pos", pos.len()).unwrap();
    let y =
        t.g.rope(xv, fv, heads, false, kiln::Dyn::rows(first))
            .unwrap();
    let scalars: Vec<_> = (0..pos.len())
        .map(|i| (kiln::Scalar(first.0 + i as u32), pos[i]))
        .collect();
    let got = t.run(y, &scalars);
    let w = heads * d;
    let want: Vec<f32> = (0..pos.len())
        .flat_map(|i| r::rope(&x[i * w..(i + 1) * w], 1, heads, d, &f, false, pos[i]))
        .collect();
    assert_close("rope, per-row positions", &got, &want, 1e-6, 0.0);
    // Frequency 0: those dims pass through.
    for (i, row) in got.chunks(d).enumerate() {
        for c in [3, 7, 11, 15] {
            assert_eq!(row[c], x[i * d + c], "row {i} dim {c} turned");
        }
    }
}

/// rope_kv into caches holding several sequences: a run of two tokens into sequence 1 (a
/// parallel slot's prefill), and a batch of one token of each of three sequences with per-row
/// positions and sequences (continuous batching's decode); every other cache row unchanged.
#[test]
fn rope_kv_into_sequences_and_batches() {
    let (heads, kv_heads, d, seqs, cap) = (2, 1, 16, 3, 12);
    let (qw, kvw) = (heads * d, kv_heads * d);
    let width = qw + 2 * kvw;
    let f = inv_freq(d, 10000.0);
    let mut rng = Rng::new(19);
    // (rows, per-row (sequence, position)): rows of one run share a sequence.
    let cases: [(bool, Vec<(usize, u32)>); 2] = [
        (false, vec![(1, 4), (1, 5)]),
        (true, vec![(2, 5), (0, 0), (1, 11)]),
    ];
    for (batch, rows) in cases {
        let n = rows.len();
        let x = rng.vec(n * width, -1.0, 1.0);
        let (kc0, vc0) = (
            rng.vec(seqs * cap * kvw, -1.0, 1.0),
            rng.vec(seqs * cap * kvw, -1.0, 1.0),
        );
        let mut t = OpTest::new();
        let shape = if batch { [n, 1, width] } else { [1, n, width] };
        let xv = t.input("qkv", &shape, &x);
        let fv = t.input("f", &[cap, d / 2, 2], &table(&f, cap));
        let (kcv, kc) = t.state("k_cache", &[seqs, cap, kvw], &kc0);
        let (vcv, vc) = t.state("v_cache", &[seqs, cap, kvw], &vc0);
        let mut scalars = vec![];
        let (pos, seq) = if batch {
            let (s0, p0) = (
                t.g.scalars("seq", n).unwrap(),
                t.g.scalars("pos", n).unwrap(),
            );
            for (r, &(sq, ps)) in rows.iter().enumerate() {
                scalars.push((kiln::Scalar(s0.0 + r as u32), sq as u32));
                scalars.push((kiln::Scalar(p0.0 + r as u32), ps));
            }
            (kiln::Dyn::rows(p0), kiln::Dyn::rows(s0))
        } else {
            let p = t.g.scalar("pos").unwrap();
            scalars.push((p, rows[0].1));
            (kiln::Dyn::slot(p), kiln::Dyn::Static(rows[0].0 as u32))
        };
        let q =
            t.g.rope_kv_seq(xv, fv, kcv, vcv, (heads, kv_heads), false, pos, seq)
                .unwrap();
        let gpu = t.gpu.clone();
        let got_q = t.run(q, &scalars);
        let (mut q_want, mut kc_want, mut vc_want) = (vec![], kc0.clone(), vc0.clone());
        for (r, &(sq, ps)) in rows.iter().enumerate() {
            let row = &x[r * width..(r + 1) * width];
            q_want.extend(r::rope(&row[..qw], 1, heads, d, &f, false, ps));
            let k = r::rope(&row[qw..qw + kvw], 1, kv_heads, d, &f, false, ps);
            let at = (sq * cap + ps as usize) * kvw;
            kc_want[at..at + kvw].copy_from_slice(&k);
            vc_want[at..at + kvw].copy_from_slice(&row[qw + kvw..]);
        }
        let read = |t: &std::sync::Arc<kiln::Tensor>| -> Vec<f32> {
            let bytes = (seqs * cap * kvw * 4) as u64;
            let b = pollster::block_on(gpu.read_buffer(t.buffer().unwrap(), 0, bytes)).unwrap();
            bytemuck::pod_collect_to_vec(&b)
        };
        let what = format!("rope_kv into sequences {rows:?} (batch {batch})");
        assert_close(&format!("{what}: q"), &got_q, &q_want, 1e-6, 0.0);
        assert_close(&format!("{what}: k cache"), &read(&kc), &kc_want, 1e-6, 0.0);
        assert_close(&format!("{what}: v cache"), &read(&vc), &vc_want, 0.0, 0.0);
    }
}

/// A gather with per-row offsets: row i reads the id at its own index (one token of each of
/// several sequences in a shared history).
#[test]
fn gather_with_per_row_offsets() {
    let (vocab, dim) = (10, 8);
    let mut rng = Rng::new(23);
    let table_data = rng.vec(vocab * dim, -1.0, 1.0);
    let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8];
    let at = [7u32, 0, 11];
    let mut t = OpTest::new();
    let tv = t.input("table", &[vocab, dim], &table_data);
    let iv = t.input_u32("ids", &[ids.len()], &ids);
    let first = t.g.scalars("tok", at.len()).unwrap();
    let y =
        t.g.gather_at(tv, iv, kiln::Dyn::rows(first), at.len())
            .unwrap();
    let scalars: Vec<_> = (0..at.len())
        .map(|r| (kiln::Scalar(first.0 + r as u32), at[r]))
        .collect();
    let want: Vec<f32> = at
        .iter()
        .flat_map(|&i| {
            let id = ids[i as usize] as usize;
            table_data[id * dim..(id + 1) * dim].to_vec()
        })
        .collect();
    assert_close("gather per row", &t.run(y, &scalars), &want, 0.0, 0.0);
}

#[test]
fn upsample_and_concat() {
    let mut rng = Rng::new(5);
    let x = rng.vec(2 * 3 * 5 * 7, -1.0, 1.0);
    let mut t = OpTest::new();
    let xv = t.input("x", &[2, 3, 5, 7], &x);
    let y = t.g.upsample2x(xv).unwrap();
    assert_close(
        "upsample2x",
        &t.run(y, &[]),
        &r::upsample2x(&x, 6, 5, 7),
        0.0,
        0.0,
    );
    let (a, b) = (
        rng.vec(2 * 3 * 4 * 4, -1.0, 1.0),
        rng.vec(2 * 5 * 4 * 4, -1.0, 1.0),
    );
    let mut t = OpTest::new();
    let (av, bv) = (
        t.input("a", &[2, 3, 4, 4], &a),
        t.input("b", &[2, 5, 4, 4], &b),
    );
    let y = t.g.concat(av, bv, 1).unwrap();
    assert_eq!(t.g.shape(y), &[2, 8, 4, 4]);
    assert_close(
        "concat channels",
        &t.run(y, &[]),
        &r::concat(&a, &[2, 3, 4, 4], &b, 1),
        0.0,
        0.0,
    );
}

#[test]
fn transpose_last_two_dims() {
    let (b, m, n) = (2, 37, 19);
    let x = Rng::new(6).vec(b * m * n, -1.0, 1.0);
    let mut t = OpTest::new();
    let xv = t.input("x", &[b, m, n], &x);
    let y = t.g.transpose(xv).unwrap();
    assert_eq!(t.g.shape(y), &[b, n, m]);
    let want: Vec<f32> = (0..b * n * m)
        .map(|o| {
            let (i, j, bb) = (o % m, (o / m) % n, o / (m * n));
            x[(bb * m + i) * n + j]
        })
        .collect();
    assert_close("transpose", &t.run(y, &[]), &want, 0.0, 0.0);
}
