//! Sampling family: Philox known answers (CPU and GPU), the GPU sampler against the CPU
//! reference (exact ids, close log-probabilities), the history write, determinism, and the
//! normal noise generator.

use kiln::kernels::sample::{
    bias_words, constraint_words, philox_on_gpu, SamplerSettings, NON_FINITE_ID, SAMPLE_OUT_LEN,
};
use kiln::reference::sample as reference;
use kiln::{DType, Dyn, Graph, Plan, Scalar, Tensor, Value};
use kiln_tests::{assert_close, gpu, Rng};
use std::sync::Arc;

/// Random123's known-answer vectors for philox4x32_10: (counter, key, output).
const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0, 0, 0, 0],
        [0, 0],
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
    ),
    (
        [u32::MAX; 4],
        [u32::MAX; 2],
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
    ),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

/// The log-probability is an f32 log-sum-exp over up to 152k logits on the GPU against f64 on
/// the CPU: the f32 sum carries a relative error of a few 1e-6 (per-thread runs of ~600 terms
/// plus an 8-level tree, and WGSL's exp is only bounded to 3 + 2|x| ulp), i.e. an absolute error
/// of that size in log Z; rtol covers the f32 rounding of large negative log-probabilities.
const LOGPROB_ATOL: f32 = 1e-4;
const LOGPROB_RTOL: f32 = 1e-5;

/// One compiled sampling graph over a vocabulary of `v`, replayed with new logits, settings,
/// history, counter and seed.
struct Sampler {
    plan: Plan,
    logits: Value,
    settings: Value,
    history: Value,
    constraint: Value,
    /// The constraint input's words for the next draws (bitmask, logit biases).
    words: Vec<u32>,
    out: Value,
    hist: Arc<Tensor>,
    counter: Scalar,
    seed: Scalar,
    /// The top alternatives of the last draw.
    top: Vec<(u32, f32)>,
    gpu: Arc<kiln::Gpu>,
}

/// The two sampler variants: the chunked passes (GPUs) and the single dispatch (software
/// adapters); neither uses optional features.
fn variants() -> [Arc<kiln::Gpu>; 2] {
    let [gpu, _, software, _] = kiln_tests::gpu_variants();
    [gpu, software]
}

impl Sampler {
    fn new(gpu: &Arc<kiln::Gpu>, v: usize, cap: usize) -> Self {
        let gpu = gpu.clone();
        let mut g = Graph::new();
        let logits = g.input("logits", &[v], DType::F32).unwrap();
        let settings = g
            .input(
                "settings",
                &[kiln::kernels::sample::SETTINGS_LEN],
                DType::F32,
            )
            .unwrap();
        let hist = Arc::new(Tensor::from_u32(&gpu, "history", &[cap], &vec![0; cap]).unwrap());
        let history = g.tensor(&hist);
        let constraint = g
            .input("constraint", &[constraint_words(v)], DType::U32)
            .unwrap();
        let counter = g.scalar("counter").unwrap();
        let seed = g.scalar("seed").unwrap();
        let out = g
            .sample(
                logits,
                settings,
                history,
                constraint,
                Dyn::slot(counter),
                Dyn::slot(seed),
            )
            .unwrap();
        g.output(out);
        let plan = kiln_tests::compile_poisoned(&gpu, &g);
        Sampler {
            plan,
            logits,
            settings,
            history,
            constraint,
            words: vec![0; constraint_words(v)],
            out,
            hist,
            counter,
            seed,
            top: Vec::new(),
            gpu,
        }
    }

    /// Runs one draw on the GPU; returns (id, logprob, history after the run); the top
    /// alternatives go to `self.top`.
    fn draw(
        &mut self,
        logits: &[f32],
        st: &SamplerSettings,
        history: &[u32],
        c: u32,
        seed: u32,
    ) -> (u32, f32, Vec<u32>) {
        self.plan.write_f32(self.logits, logits).unwrap();
        self.plan.write_f32(self.settings, &st.to_f32s()).unwrap();
        self.plan.write_u32(self.history, history).unwrap();
        self.plan.write_u32(self.constraint, &self.words).unwrap();
        // Poison the output so a kernel that writes nothing is caught.
        self.plan
            .write_u32(self.out, &[0xdead_beef; SAMPLE_OUT_LEN])
            .unwrap();
        self.plan.set(self.counter, c);
        self.plan.set(self.seed, seed);
        self.plan.run().unwrap();
        let out = pollster::block_on(self.plan.read_u32(self.out)).unwrap();
        let hist = pollster::block_on(self.hist.to_u32(&self.gpu)).unwrap();
        self.top = (0..st.top_logprobs as usize)
            .map(|r| (out[2 + 2 * r], f32::from_bits(out[3 + 2 * r])))
            .collect();
        (out[0], f32::from_bits(out[1]), hist)
    }

    /// Draws on the GPU and on the CPU and requires the same id, history and a close logprob.
    fn check(
        &mut self,
        what: &str,
        logits: &[f32],
        st: &SamplerSettings,
        history: &[u32],
        c: u32,
        seed: u32,
    ) -> u32 {
        let (id, lp, hist) = self.draw(logits, st, history, c, seed);
        let mut want_hist = history.to_vec();
        let want = reference::sample(logits, &st.to_f32s(), &mut want_hist, &self.words, c, seed);
        assert_eq!(
            id, want.id,
            "{what}: c {c} seed {seed}: id expected {}, got {id}",
            want.id
        );
        assert_close(
            &format!("{what}: c {c} seed {seed}: logprob"),
            &[lp],
            &[want.logprob as f32],
            LOGPROB_ATOL,
            LOGPROB_RTOL,
        );
        assert_eq!(hist, want_hist, "{what}: c {c}: history");
        let top_ids: Vec<u32> = self.top.iter().map(|t| t.0).collect();
        let want_ids: Vec<u32> = want.top.iter().map(|t| t.0).collect();
        assert_eq!(top_ids, want_ids, "{what}: c {c}: top_logprobs ids");
        for (r, (got, want)) in self.top.iter().zip(&want.top).enumerate() {
            assert_close(
                &format!("{what}: c {c}: top_logprobs[{r}]"),
                &[got.1],
                &[want.1 as f32],
                LOGPROB_ATOL,
                LOGPROB_RTOL,
            );
        }
        id
    }
}

/// Logits spread like a language model's: a few strong ids over a broad tail.
fn lm_logits(rng: &mut Rng, v: usize) -> Vec<f32> {
    (0..v)
        .map(|_| {
            let x = rng.uniform(-6.0, 6.0);
            if rng.uniform(0.0, 1.0) < 0.01 {
                x + 8.0
            } else {
                x
            }
        })
        .collect()
}

/// Logits holding NaN or infinity (an overflowed activation) are reported, greedy or not: the
/// id is NON_FINITE_ID, the second word the count, and the history is not written.
#[test]
fn non_finite_logits_are_reported() {
    for gpu in variants() {
        let v = 1000;
        let mut s = Sampler::new(&gpu, v, 8);
        let mut rng = Rng::new(5);
        let sampling = SamplerSettings {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            top_logprobs: 3,
            ..SamplerSettings::greedy()
        };
        for (bad, count) in [
            (vec![(0, f32::NAN)], 1),
            (vec![(999, f32::INFINITY), (17, f32::NAN)], 2),
            (vec![(500, f32::NEG_INFINITY)], 1),
        ] {
            let mut logits = lm_logits(&mut rng, v);
            for &(i, x) in &bad {
                logits[i] = x;
            }
            for st in [SamplerSettings::greedy(), sampling] {
                let history = [7u32; 8];
                let (id, n, hist) = s.draw(&logits, &st, &history, 2, 9);
                assert_eq!(id, NON_FINITE_ID, "{bad:?}");
                assert_eq!(n.to_bits(), count, "{bad:?}: count");
                assert_eq!(hist, history, "{bad:?}: no history write");
                let want = reference::sample(
                    &logits,
                    &st.to_f32s(),
                    &mut [7u32; 8],
                    &vec![0; constraint_words(v)],
                    2,
                    9,
                );
                assert_eq!((want.id, want.logprob), (NON_FINITE_ID, count as f64));
            }
        }
    }
}

#[test]
fn philox_known_answers_cpu() {
    for (c, k, want) in KAT {
        assert_eq!(
            reference::philox4x32_10(c, k),
            want,
            "counter {c:08x?} key {k:08x?}"
        );
    }
}

#[test]
fn philox_known_answers_gpu() {
    let mut rng = Rng::new(7);
    let mut blocks: Vec<([u32; 4], [u32; 2])> = KAT.iter().map(|(c, k, _)| (*c, *k)).collect();
    for _ in 0..125 {
        let w = |r: &mut Rng| r.next_u64() as u32;
        blocks.push((
            [w(&mut rng), w(&mut rng), w(&mut rng), w(&mut rng)],
            [w(&mut rng), w(&mut rng)],
        ));
    }
    let got = pollster::block_on(philox_on_gpu(&gpu(), &blocks)).unwrap();
    for (i, (c, k, want)) in KAT.iter().enumerate() {
        assert_eq!(got[i], *want, "KAT {i}: counter {c:08x?} key {k:08x?}");
    }
    for (i, (c, k)) in blocks.iter().enumerate() {
        assert_eq!(
            got[i],
            reference::philox4x32_10(*c, *k),
            "block {i}: counter {c:08x?} key {k:08x?}"
        );
    }
}

#[test]
fn greedy_is_argmax_lowest_index_on_ties() {
    for gpu in variants() {
        let mut rng = Rng::new(1);
        for v in [1000, 32000] {
            let mut s = Sampler::new(&gpu, v, 16);
            let mut logits = lm_logits(&mut rng, v);
            let top = logits.iter().copied().fold(f32::MIN, f32::max) + 1.0;
            let (a, b) = (v / 3, 2 * v / 3);
            logits[b] = top;
            logits[a] = top;
            let hist = vec![0u32; 16];
            for seed in [0, 99] {
                assert_eq!(
                    s.check(
                        "greedy",
                        &logits,
                        &SamplerSettings {
                            top_logprobs: 4,
                            ..SamplerSettings::greedy()
                        },
                        &hist,
                        0,
                        seed
                    ),
                    a as u32
                );
                let ties: Vec<u32> = s.top[..2].iter().map(|t| t.0).collect();
                assert_eq!(
                    ties,
                    [a as u32, b as u32],
                    "tied alternatives, lower index first"
                );
            }
            // Penalizing the tied winners moves the argmax elsewhere, as the reference says.
            let mut hist = vec![a as u32, b as u32];
            hist.resize(16, 0);
            let st = SamplerSettings {
                repeat_penalty: 1.5,
                ..SamplerSettings::greedy()
            };
            let id = s.check("greedy+penalty", &logits, &st, &hist, 2, 0);
            assert!(
                id != a as u32 && id != b as u32,
                "penalty ignored: got {id}"
            );
        }
    }
}

#[test]
fn sampling_matches_reference() {
    for gpu in variants() {
        let mut rng = Rng::new(2);
        let base = SamplerSettings {
            temperature: 0.8,
            ..SamplerSettings::neutral()
        };
        let cases = [
            ("temperature", base),
            (
                "temperature 2",
                SamplerSettings {
                    temperature: 2.0,
                    ..base
                },
            ),
            ("top-k", SamplerSettings { top_k: 40, ..base }),
            ("top-p", SamplerSettings { top_p: 0.9, ..base }),
            (
                "min-p",
                SamplerSettings {
                    min_p: 0.05,
                    ..base
                },
            ),
            (
                "penalty",
                SamplerSettings {
                    repeat_penalty: 1.3,
                    repeat_window: 8,
                    top_logprobs: 5,
                    ..base
                },
            ),
            (
                "all",
                SamplerSettings {
                    top_k: 50,
                    top_p: 0.8,
                    min_p: 0.02,
                    repeat_penalty: 1.1,
                    repeat_window: 32,
                    top_logprobs: 20,
                    ..base
                },
            ),
        ];
        for (v, draws) in [(1000usize, 6u32), (32000, 3), (152_000, 1)] {
            let cap = 64;
            let mut s = Sampler::new(&gpu, v, cap);
            for (name, st) in cases {
                let logits = lm_logits(&mut rng, v);
                // History holds the strongest ids so the penalty changes the distribution.
                let mut order: Vec<u32> = (0..v as u32).collect();
                order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
                let mut hist: Vec<u32> = (0..cap).map(|i| order[i % 12]).collect();
                hist[5] = v as u32 + 7; // an out-of-range id is ignored
                for d in 0..draws {
                    let (c, seed) = (10 + 3 * d, 1234 + 77 * d);
                    hist[c as usize] = u32::MAX;
                    s.check(&format!("{name} V={v}"), &logits, &st, &hist, c, seed);
                }
            }
        }
    }
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    for gpu in variants() {
        let mut rng = Rng::new(3);
        let v = 5000;
        let mut s = Sampler::new(&gpu, v, 8);
        let logits = lm_logits(&mut rng, v);
        let argmax = (0..v)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        let hist = vec![0u32; 8];
        for seed in 0..4 {
            let k1 = SamplerSettings {
                temperature: 1.5,
                top_k: 1,
                ..SamplerSettings::neutral()
            };
            assert_eq!(s.check("top-k 1", &logits, &k1, &hist, 1, seed), argmax);
            let p0 = SamplerSettings {
                temperature: 1.5,
                top_p: 1e-6,
                ..SamplerSettings::neutral()
            };
            assert_eq!(s.check("top-p 1e-6", &logits, &p0, &hist, 1, seed), argmax);
            let m1 = SamplerSettings {
                temperature: 1.5,
                min_p: 1.0,
                ..SamplerSettings::neutral()
            };
            assert_eq!(s.check("min-p 1", &logits, &m1, &hist, 1, seed), argmax);
        }
    }
}

#[test]
fn history_write_and_determinism() {
    for gpu in variants() {
        let v = 1000;
        let cap = 8;
        let mut s = Sampler::new(&gpu, v, cap);
        // Equal logits: the draw is uniform, id = floor(u * V / 2^32) from the Philox word alone.
        let logits = vec![0.25f32; v];
        let hist: Vec<u32> = (0..cap as u32).map(|i| 900 + i).collect();
        let st = SamplerSettings {
            repeat_penalty: 1.0,
            ..SamplerSettings::neutral()
        };
        let mut ids = Vec::new();
        for c in 0..cap as u32 {
            let (id, lp, after) = s.draw(&logits, &st, &hist, c, 42);
            let u = reference::philox4x32_10([c, 0, 1, 0], [42, 0])[0];
            assert_eq!(
                id as u64,
                (u as u64 * v as u64) >> 32,
                "c {c}: uniform draw"
            );
            // ln(1/1000) from an exact-equal f32 sum: only log's rounding remains.
            assert_close("uniform logprob", &[lp], &[-(v as f32).ln()], 1e-5, 1e-6);
            let mut want = hist.clone();
            want[c as usize] = id;
            assert_eq!(after, want, "c {c}: history[c] = id, the rest untouched");
            let (again, _, _) = s.draw(&logits, &st, &hist, c, 42);
            assert_eq!(again, id, "c {c}: same seed and counter, same id");
            ids.push(id);
        }
        ids.dedup();
        assert!(
            ids.len() > 4,
            "different counters must give different draws: {ids:?}"
        );
        // A counter past the history capacity still samples but writes nothing.
        let (_, _, after) = s.draw(&logits, &st, &hist, cap as u32, 42);
        assert_eq!(after, hist, "c = cap must not write");
        // Another seed, another stream.
        let other: Vec<u32> = (0..cap as u32)
            .map(|c| s.draw(&logits, &st, &hist, c, 43).0)
            .collect();
        assert_ne!(other, ids, "seed 43 repeated seed 42's draws");
    }
}

#[test]
fn randn_matches_reference_and_is_standard_normal() {
    let n = 100_003; // not a multiple of 4 or 256
    let gpu = gpu();
    let mut g = Graph::new();
    let seed = g.scalar("seed").unwrap();
    let z = g.randn(&[n], Dyn::slot(seed), 3).unwrap();
    let z0 = g.randn(&[8], Dyn::Static(0), 0).unwrap();
    g.output(z);
    g.output(z0);
    let mut plan = kiln_tests::compile_poisoned(&gpu, &g);
    plan.set(seed, 2024);
    plan.run().unwrap();
    let got = pollster::block_on(plan.read_f32(z)).unwrap();
    let first = pollster::block_on(plan.read_f32(z0)).unwrap();
    // Box-Muller through WGSL's log/sqrt/cos/sin: cos and sin are only bounded to 2^-11 absolute
    // on [-pi, pi] and the radius reaches sqrt(2 ln 2^24) = 5.8, so the spec allows ~3e-3;
    // real drivers (lavapipe included) land near 1e-6. The integer path is exact (see the
    // Philox tests), so any wrong bit would show as an O(1) error.
    assert_close(
        "randn vs reference",
        &got,
        &reference::randn(n, 2024, 3),
        4e-3,
        0.0,
    );
    assert_close(
        "randn KAT block",
        &first,
        &reference::randn(8, 0, 0),
        4e-3,
        0.0,
    );
    let mean = got.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = got.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    // Standard errors at n = 1e5: mean 0.0032, std 0.0022; the bounds are ~5 sigma.
    assert!(mean.abs() < 0.016, "mean {mean}");
    assert!((var.sqrt() - 1.0).abs() < 0.012, "std {}", var.sqrt());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite noise");
    plan.set(seed, 2025);
    plan.run().unwrap();
    let other = pollster::block_on(plan.read_f32(z)).unwrap();
    assert!(
        other.iter().zip(&got).filter(|(a, b)| a == b).count() < 10,
        "seed did not change the noise"
    );
}

/// The radix selects and the chunked draw at their edges: many chunks (up to 256, and a
/// chunk length that is not a power of two), logits with many exact ties at the top-k and
/// top-p cuts, masked (-inf) ids, flat logits (a random-weight model's), k from 1 to V - 1,
/// top-p close to 0 and to 1; the ids must equal the reference's.
#[test]
fn selects_and_draw_at_the_edges() {
    for gpu in variants() {
        let mut rng = Rng::new(11);
        for v in [3000usize, 262_144, 300_001] {
            let mut s = Sampler::new(&gpu, v, 16);
            let hist = vec![0u32; 16];
            // Quantized logits (steps of 0.5 over [-4, 4]): thousands of ties at every cut.
            let tied: Vec<f32> = (0..v)
                .map(|_| rng.uniform(-8.0, 8.0).round() * 0.5)
                .collect();
            // Mostly out of reach (weight 0), as under a grammar: a few hundred live ids.
            let masked: Vec<f32> = (0..v)
                .map(|i| {
                    if i % 997 == 3 {
                        rng.uniform(-2.0, 2.0)
                    } else {
                        -1e9
                    }
                })
                .collect();
            let flat: Vec<f32> = (0..v).map(|_| rng.uniform(-0.01, 0.01)).collect();
            let cases = [
                (1, 1.0, 0.0),
                (2, 1.0, 0.0),
                (37, 1.0, 0.0),
                (1000, 1.0, 0.0),
                (v as u32 - 1, 1.0, 0.0),
                (0, 0.5, 0.0),
                (0, 0.95, 0.0),
                (0, 0.999, 0.0),
                (0, 1e-3, 0.0),
                (400, 0.9, 0.05),
                (0, 1.0, 0.3),
            ];
            for (name, logits) in [("tied", &tied), ("masked", &masked), ("flat", &flat)] {
                for (n, &(top_k, top_p, min_p)) in cases.iter().enumerate() {
                    let st = SamplerSettings {
                        temperature: 1.3,
                        top_k,
                        top_p,
                        min_p,
                        top_logprobs: if n == 0 { 20 } else { 0 },
                        ..SamplerSettings::neutral()
                    };
                    let seed = 100 + n as u32;
                    s.check(
                        &format!("{name} V={v} k={top_k} p={top_p} min_p={min_p}"),
                        logits,
                        &st,
                        &hist,
                        3,
                        seed,
                    );
                }
            }
            // Equal logits: the draw is uniform over all chunks, id = floor(u * V / 2^32).
            let equal = vec![1.5f32; v];
            for c in 0..4u32 {
                let (id, _, _) = s.draw(&equal, &SamplerSettings::neutral(), &hist, c, 9);
                let u = reference::philox4x32_10([c, 0, 1, 0], [9, 0])[0];
                assert_eq!(
                    id as u64,
                    (u as u64 * v as u64) >> 32,
                    "V={v} c {c}: uniform draw"
                );
            }
        }
    }
}

/// A grammar's bitmask and logit biases: masked ids are never drawn (greedy or sampled, even
/// when they hold the largest logits), biases move the draw and combine with the repetition
/// penalty as the reference says, and the log-probabilities stay those of the raw logits.
#[test]
fn mask_and_logit_bias_match_reference() {
    for gpu in variants() {
        let mut rng = Rng::new(21);
        for v in [1000usize, 49_152, 262_144] {
            let cap = 16;
            let mut s = Sampler::new(&gpu, v, cap);
            let logits = lm_logits(&mut rng, v);
            let mut order: Vec<u32> = (0..v as u32).collect();
            order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            // Allow a sparse set that leaves out the 50 strongest ids.
            let mut mask = vec![0u32; v.div_ceil(32)];
            let mut allowed = Vec::new();
            for (rank, &id) in order.iter().enumerate() {
                if rank >= 50 && (id % 7 == 1 || rank % 97 == 0) {
                    mask[id as usize / 32] |= 1 << (id % 32);
                    allowed.push(id);
                }
            }
            // Biases: lift two weak allowed ids, sink a strong one, touch a masked one.
            let biases = [
                (allowed[allowed.len() - 1], 30.0),
                (allowed[allowed.len() / 2], 9.5),
                (allowed[0], -100.0),
                (order[0], 50.0),
            ];
            let bias = bias_words(v, &biases).unwrap();
            let mut hist: Vec<u32> = (0..cap as u32).map(|i| allowed[i as usize % 5]).collect();
            hist[2] = allowed[allowed.len() / 2];
            let base = SamplerSettings {
                temperature: 0.9,
                top_logprobs: 3,
                ..SamplerSettings::neutral()
            };
            for (name, st, use_mask, use_bias) in [
                (
                    "mask greedy",
                    SamplerSettings {
                        top_logprobs: 3,
                        ..SamplerSettings::greedy()
                    },
                    true,
                    false,
                ),
                ("mask", base, true, false),
                (
                    "mask top-k top-p",
                    SamplerSettings {
                        top_k: 20,
                        top_p: 0.9,
                        ..base
                    },
                    true,
                    false,
                ),
                ("bias greedy", SamplerSettings::greedy(), false, true),
                ("bias", base, false, true),
                (
                    "mask bias penalty",
                    SamplerSettings {
                        repeat_penalty: 1.5,
                        repeat_window: 8,
                        top_k: 40,
                        ..base
                    },
                    true,
                    true,
                ),
            ] {
                let st = SamplerSettings {
                    mask: use_mask,
                    biases: if use_bias { biases.len() as u32 } else { 0 },
                    ..st
                };
                s.words.fill(0);
                s.words[..mask.len()].copy_from_slice(&mask);
                s.words[mask.len()..mask.len() + bias.len()].copy_from_slice(&bias);
                for d in 0..3u32 {
                    let id = s.check(&format!("{name} V={v}"), &logits, &st, &hist, 8, 40 + d);
                    if use_mask {
                        assert!(
                            mask[id as usize / 32] >> (id % 32) & 1 == 1,
                            "{name}: masked id {id} drawn"
                        );
                    }
                    if use_bias && !use_mask && st.temperature == 0.0 {
                        assert_eq!(id, order[0], "{name}: +50 on the argmax keeps it");
                    }
                }
            }
        }
    }
}

/// A batch of samplers (continuous batching: one per decoding sequence) in one op: logits
/// `[rows, v]`, per-row settings, constraints, counters, seeds and history parts of a shared
/// history (per-row `Dyn::Rows`, the rows' sequences out of order): each row's output words and
/// history part are exactly those of the same draw alone, on both sampler variants.
#[test]
fn batch_of_rows_draws_as_each_row_alone() {
    for gpu in variants() {
        let (v, cap, rows) = (3000usize, 24usize, 3usize);
        let mut rng = Rng::new(31);
        let logits: Vec<Vec<f32>> = (0..rows).map(|_| lm_logits(&mut rng, v)).collect();
        let mut mask = vec![0u32; v.div_ceil(32)];
        for id in (0..v as u32).filter(|i| i % 3 == 0) {
            mask[id as usize / 32] |= 1 << (id % 32);
        }
        let bias = bias_words(v, &[(5, 20.0), (600, -3.0)]).unwrap();
        let mut masked = vec![0u32; constraint_words(v)];
        masked[..mask.len()].copy_from_slice(&mask);
        masked[mask.len()..mask.len() + bias.len()].copy_from_slice(&bias);
        let settings = [
            SamplerSettings {
                repeat_penalty: 1.3,
                repeat_window: 6,
                top_logprobs: 2,
                ..SamplerSettings::greedy()
            },
            SamplerSettings {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.9,
                top_logprobs: 3,
                ..SamplerSettings::neutral()
            },
            SamplerSettings {
                temperature: 1.1,
                min_p: 0.02,
                mask: true,
                biases: 2,
                ..SamplerSettings::neutral()
            },
        ];
        let words = [
            vec![0u32; constraint_words(v)],
            vec![0; constraint_words(v)],
            masked,
        ];
        // Row r samples for sequence seqs[r], its counter and seed.
        let (seqs, counters, seeds) = ([2usize, 0, 1], [9u32, 3, 17], [11u32, 12, 13]);
        let history: Vec<u32> = (0..3 * cap as u32).map(|i| (i * 131) % v as u32).collect();

        // Each row alone.
        let mut alone = Vec::new();
        for r in 0..rows {
            let mut s = Sampler::new(&gpu, v, cap);
            s.words = words[r].clone();
            let part = &history[seqs[r] * cap..(seqs[r] + 1) * cap];
            let (id, lp, h) = s.draw(&logits[r], &settings[r], part, counters[r], seeds[r]);
            alone.push((id, lp.to_bits(), s.top.clone(), h));
        }

        // All rows at once.
        let mut g = Graph::new();
        let lv = g.input("logits", &[rows, v], DType::F32).unwrap();
        let sl = kiln::kernels::sample::SETTINGS_LEN;
        let sv = g.input("settings", &[rows, sl], DType::F32).unwrap();
        let hist = Arc::new(Tensor::from_u32(&gpu, "history", &[3 * cap], &history).unwrap());
        let hv = g.tensor(&hist);
        let cv = g
            .input("constraint", &[rows, constraint_words(v)], DType::U32)
            .unwrap();
        let (seq0, c0, s0) = (
            g.scalars("seq", rows).unwrap(),
            g.scalars("counter", rows).unwrap(),
            g.scalars("seed", rows).unwrap(),
        );
        let at = Dyn::Rows {
            first: seq0,
            mul: cap as u32,
            add: 0,
        };
        let out = g
            .sample_at(
                lv,
                sv,
                hv,
                Some((at, cap)),
                cv,
                Dyn::rows(c0),
                Dyn::rows(s0),
            )
            .unwrap();
        g.output(out);
        let mut plan = kiln_tests::compile_poisoned(&gpu, &g);
        plan.write_f32(lv, &logits.concat()).unwrap();
        let st: Vec<f32> = settings.iter().flat_map(|s| s.to_f32s()).collect();
        plan.write_f32(sv, &st).unwrap();
        plan.write_u32(cv, &words.concat()).unwrap();
        for r in 0..rows {
            plan.set(Scalar(seq0.0 + r as u32), seqs[r] as u32);
            plan.set(Scalar(c0.0 + r as u32), counters[r]);
            plan.set(Scalar(s0.0 + r as u32), seeds[r]);
        }
        plan.run().unwrap();
        let got = pollster::block_on(plan.read_u32(out)).unwrap();
        let h = pollster::block_on(hist.to_u32(&gpu)).unwrap();
        for r in 0..rows {
            let o = &got[r * SAMPLE_OUT_LEN..(r + 1) * SAMPLE_OUT_LEN];
            let top: Vec<(u32, f32)> = (0..settings[r].top_logprobs as usize)
                .map(|k| (o[2 + 2 * k], f32::from_bits(o[3 + 2 * k])))
                .collect();
            let (id, lp, ref want_top, ref want_h) = alone[r];
            let what = format!("row {r} (software {})", gpu.features.software);
            assert_eq!((o[0], o[1]), (id, lp), "{what}: id and logprob bits");
            assert_eq!(&top, want_top, "{what}: top_logprobs");
            let part = &h[seqs[r] * cap..(seqs[r] + 1) * cap];
            assert_eq!(part, want_h.as_slice(), "{what}: its history part");
        }
    }
}
