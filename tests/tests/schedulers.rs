//! Schedulers against diffusers (fixtures from `tools/make_scheduler_fixtures.py`): the CPU
//! schedule (timesteps, sigmas, init sigma), the CPU reference step loop and the GPU step loop
//! (one compiled graph with one `SchedulerStep`, replayed with the step slot set) reproduce
//! diffusers' samples for DDIM, Euler, Euler ancestral, DPM++ 2M and LCM, epsilon and
//! v-prediction, with and without classifier-free guidance. Also: the kernel against its CPU
//! reference on random rows, and bad configs. High step counts (up to 1000, where "leading"
//! and "trailing" spacing degenerate for some counts) against diffusers' `set_timesteps`.

use kiln::diffusion::schedulers::{Schedule, SchedulerConfig, SchedulerKind, StepCoeffs};
use kiln::formats::npy;
use kiln::graph::StepValues;
use kiln::kernels::scheduler::COEFFS;
use kiln::reference::scheduler::{step as reference_step, StepState};
use kiln::{DType, Dyn, Graph, Tensor};
use kiln_tests::{assert_close, gpu, Rng};
use serde_json::Value as Json;
use std::path::PathBuf;
use std::sync::Arc;

/// Elements of the fixture latents [1, 4, 8, 8].
const N: usize = 256;

/// diffusers runs every step in torch f32 with its own association order (e.g. Euler's
/// `x + (x - x0) / σ * (σ' - σ)` where Kiln has `p x + q x0`), and Kiln's coefficients are
/// computed in f64 from the same f32 `alphas_cumprod` and rounded once. Each step therefore
/// differs by a few f32 ulps of the largest term it adds up; the terms reach ~10x the result
/// (Euler's first step from σ = 157 lands near 10), and the error is carried into later steps.
/// So: atol relative to the largest |value| of that step, rtol for the rest.
const STEP_ATOL: f32 = 1e-5;
const STEP_RTOL: f32 = 1e-5;

struct Case {
    name: String,
    class: String,
    config: String,
    steps: usize,
    cfg: bool,
    guidance: f32,
    timesteps: Vec<f32>,
    sigmas: Option<Vec<f32>>,
    init_noise_sigma: f32,
    noise_draws: usize,
}

struct Fixtures {
    sample: Vec<f32>,
    /// [10, 2, N]: step i's [uncond, cond] model output.
    outs: Vec<f32>,
    /// [10, N]: step i's noise.
    noise: Vec<f32>,
    cases: Vec<Case>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/schedulers")
}

fn load_npy(name: &str) -> npy::Npy {
    let p = dir().join(name);
    npy::parse(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn floats(v: &Json) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn fixtures() -> Fixtures {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    let json: Json = serde_json::from_str(&text).unwrap();
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            class: c["class"].as_str().unwrap().into(),
            config: c["config"].as_str().unwrap().into(),
            steps: c["steps"].as_u64().unwrap() as usize,
            cfg: c["cfg"].as_bool().unwrap(),
            guidance: c["guidance"].as_f64().unwrap() as f32,
            timesteps: floats(&c["timesteps"]),
            sigmas: (!c["sigmas"].is_null()).then(|| floats(&c["sigmas"])),
            init_noise_sigma: c["init_noise_sigma"].as_f64().unwrap() as f32,
            noise_draws: c["noise_draws"].as_u64().unwrap() as usize,
        })
        .collect();
    Fixtures {
        sample: load_npy("sample.npy").data,
        outs: load_npy("model_outputs.npy").data,
        noise: load_npy("noise.npy").data,
        cases,
    }
}

impl Fixtures {
    /// Step i's model output: [uncond, cond] with CFG, cond alone without.
    fn model_out(&self, i: usize, cfg: bool) -> &[f32] {
        let o = &self.outs[i * 2 * N..(i + 1) * 2 * N];
        if cfg {
            o
        } else {
            &o[N..]
        }
    }
    fn noise(&self, i: usize) -> &[f32] {
        &self.noise[i * N..(i + 1) * N]
    }
}

/// diffusers' loop of a case: [steps, 2, N], [i][0] the U-Net input of step i, [i][1] the
/// sample after step i.
fn loop_of(case: &Case) -> Vec<f32> {
    let l = load_npy(&format!("{}.npy", case.name));
    assert_eq!(l.shape, [case.steps, 2, 4, 8, 8], "{}", case.name);
    l.data
}

fn schedule(case: &Case) -> Schedule {
    let cfg = SchedulerConfig::from_json(&case.config, None).unwrap();
    assert_eq!(cfg.kind.class_name(), case.class, "{}", case.name);
    assert!(cfg.note.is_none(), "{}", case.name);
    cfg.schedule(case.steps).unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn check_step(what: &str, got: &[f32], want: &[f32]) {
    assert_close(what, got, want, STEP_ATOL * max_abs(want), STEP_RTOL);
}

#[test]
fn schedule_matches_diffusers() {
    let fx = fixtures();
    assert_eq!(fx.cases.len(), 144);
    for c in &fx.cases {
        let s = schedule(c);
        // Timesteps are integers (or f32 linspace values) computed the same way: exact.
        assert_eq!(s.timesteps, c.timesteps, "{}: timesteps", c.name);
        assert_eq!(s.steps(), c.steps, "{}", c.name);
        // alphas_cumprod is bit-exact; sigmas go through the same f32/f64 roundings, the
        // init sigma through f64 where diffusers uses f32: one ulp.
        if let Some(want) = &c.sigmas {
            assert_close(&format!("{}: sigmas", c.name), &s.sigmas, want, 0.0, 1.2e-7);
        }
        assert_close(
            &format!("{}: init_noise_sigma", c.name),
            &[s.init_noise_sigma],
            &[c.init_noise_sigma],
            0.0,
            1.2e-7,
        );
        // Noise is used exactly where diffusers draws it (LCM: not at the last step; Euler
        // ancestral draws at the last step too, scaled by σ_up = 0).
        let used = s.coeffs.iter().filter(|k| k.s != 0.0).count();
        let want_used = match s.kind {
            SchedulerKind::EulerAncestral => c.noise_draws - 1,
            _ => c.noise_draws,
        };
        assert_eq!(used, want_used, "{}: steps with noise", c.name);
    }
}

#[test]
fn reference_loop_matches_diffusers() {
    let fx = fixtures();
    let mut worst = 0f32;
    for c in &fx.cases {
        let s = schedule(c);
        let want = loop_of(c);
        let x: Vec<f32> = fx.sample.iter().map(|v| v * s.init_noise_sigma).collect();
        let copies = if c.cfg { 2 } else { 1 };
        let unet_in: Vec<f32> = x
            .iter()
            .map(|v| v * s.first_input_scale)
            .collect::<Vec<_>>()
            .repeat(copies);
        check_step(
            &format!("{}: first U-Net input", c.name),
            &unet_in[..N],
            &want[..N],
        );
        let mut st = StepState {
            x,
            x0_prev: vec![f32::NAN; N],
            unet_in,
        };
        for i in 0..c.steps {
            reference_step(
                &s.coeffs[i],
                fx.model_out(i, c.cfg),
                c.guidance,
                Some(fx.noise(i)),
                &mut st,
            );
            let w = &want[(2 * i + 1) * N..(2 * i + 2) * N];
            check_step(&format!("{} step {i}: sample", c.name), &st.x, w);
            worst = worst.max(
                st.x.iter()
                    .zip(w)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max)
                    / max_abs(w),
            );
        }
    }
    eprintln!("reference loop: worst |err| / max|want| of a step {worst:.3e}");
}

/// The GPU loop of one case: a graph with one scheduler step over state tensors, compiled
/// once and run once per step with only the slot and the step's inputs changing.
fn gpu_loop(fx: &Fixtures, c: &Case) -> f32 {
    let gpu = gpu();
    let s = schedule(c);
    let want = loop_of(c);
    let copies = if c.cfg { 2 } else { 1 };
    let x0: Vec<f32> = fx.sample.iter().map(|v| v * s.init_noise_sigma).collect();
    let state = |name: &str, shape: &[usize], data: &[f32]| {
        Arc::new(Tensor::from_f32(&gpu, name, shape, data).unwrap())
    };
    let x_t = state("x", &[1, 4, 8, 8], &x0);
    // Poisoned: x0_prev must not be read before it is written, unet_in must be written whole.
    let prev_t = state("x0_prev", &[1, 4, 8, 8], &[f32::NAN; N]);
    let unet_t = state("unet_in", &[copies, 4, 8, 8], &vec![f32::NAN; copies * N]);
    let mut g = Graph::new();
    let step = g.scalar("step").unwrap();
    let model_out = g
        .input("model_out", &[copies, 4, 8, 8], DType::F32)
        .unwrap();
    let coeffs = g.input("coeffs", &[s.steps(), COEFFS], DType::F32).unwrap();
    let guidance = g.input("guidance", &[1], DType::F32).unwrap();
    let noise = g.input("noise", &[1, 4, 8, 8], DType::F32).unwrap();
    let (x, x0_prev, unet_in) = (g.tensor(&x_t), g.tensor(&prev_t), g.tensor(&unet_t));
    let status_t = Arc::new(Tensor::from_u32(&gpu, "status", &[1], &[u32::MAX]).unwrap());
    let v = StepValues {
        model_out,
        coeffs,
        guidance,
        x,
        x0_prev,
        unet_in,
        status: g.tensor(&status_t),
        noise: Some(noise),
    };
    g.scheduler_step(&v, Dyn::slot(step)).unwrap();
    let mut plan = kiln_tests::compile_poisoned(&gpu, &g);
    assert_eq!(plan.dispatch_count(), 1, "one kernel per step");
    plan.write_f32(coeffs, &s.coeff_table()).unwrap();
    plan.write_f32(guidance, &[c.guidance]).unwrap();
    let mut worst = 0f32;
    for i in 0..c.steps {
        plan.write_f32(model_out, fx.model_out(i, c.cfg)).unwrap();
        plan.write_f32(noise, fx.noise(i)).unwrap();
        plan.set(step, i as u32);
        plan.run().unwrap();
        let got = pollster::block_on(x_t.to_f32(&gpu)).unwrap();
        let w = &want[(2 * i + 1) * N..(2 * i + 2) * N];
        check_step(&format!("{} step {i}: GPU sample", c.name), &got, w);
        worst = worst.max(
            got.iter()
                .zip(w)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max)
                / max_abs(w),
        );
        let u = pollster::block_on(unet_t.to_f32(&gpu)).unwrap();
        // The next U-Net input, every copy; after the last step the final latents.
        let wu = if i + 1 < c.steps {
            &want[(2 * i + 2) * N..(2 * i + 3) * N]
        } else {
            w
        };
        for k in 0..copies {
            check_step(
                &format!("{} step {i}: GPU U-Net input copy {k}", c.name),
                &u[k * N..(k + 1) * N],
                wu,
            );
        }
    }
    worst
}

#[test]
fn gpu_loop_matches_diffusers() {
    let fx = fixtures();
    let mut worst: Vec<(String, f32)> = Vec::new();
    for c in &fx.cases {
        let e = gpu_loop(&fx, c);
        match worst.iter_mut().find(|(k, _)| *k == c.class) {
            Some(w) => w.1 = w.1.max(e),
            None => worst.push((c.class.clone(), e)),
        }
    }
    for (k, e) in worst {
        eprintln!("GPU loop {k}: worst |err| / max|want| of a step {e:.3e}");
    }
}

#[test]
fn kernel_matches_reference_on_random_rows() {
    let gpu = gpu();
    let mut rng = Rng::new(11);
    let n = 1000; // not a multiple of 256
    let rows = 3;
    for (cfg, g_scale, with_noise) in [(true, 3.0f32, true), (true, 0.5, false), (false, 7.5, true)]
    {
        let copies = if cfg { 2 } else { 1 };
        let mut coeff_rows: Vec<StepCoeffs> = (0..rows)
            .map(|_| StepCoeffs::from_row(&rng.vec(COEFFS, -1.5, 1.5)))
            .collect();
        coeff_rows[0].clip = 0.7; // clamp x0
        coeff_rows[1].clip = 0.0;
        coeff_rows[2].clip = -1.0; // negative = no clamp
        let table: Vec<f32> = coeff_rows.iter().flat_map(|c| c.to_row()).collect();
        let x0 = rng.vec(n, -2.0, 2.0);
        let prev0 = rng.vec(n, -2.0, 2.0);
        let m = rng.vec(copies * n, -2.0, 2.0);
        let z = rng.vec(n, -2.0, 2.0);
        let x_t = Arc::new(Tensor::from_f32(&gpu, "x", &[n], &x0).unwrap());
        let prev_t = Arc::new(Tensor::from_f32(&gpu, "x0_prev", &[n], &prev0).unwrap());
        let unet_t = Arc::new(
            Tensor::from_f32(&gpu, "unet_in", &[copies, n], &vec![f32::NAN; copies * n]).unwrap(),
        );
        let status_t = Arc::new(Tensor::from_u32(&gpu, "status", &[1], &[u32::MAX]).unwrap());
        let mut g = Graph::new();
        let step = g.scalar("step").unwrap();
        let model_out = g.input("m", &[copies, n], DType::F32).unwrap();
        let coeffs = g.input("coeffs", &[rows, COEFFS], DType::F32).unwrap();
        let guidance = g.input("guidance", &[1], DType::F32).unwrap();
        let noise = with_noise.then(|| g.input("noise", &[n], DType::F32).unwrap());
        let (x, x0_prev, unet_in) = (g.tensor(&x_t), g.tensor(&prev_t), g.tensor(&unet_t));
        let status = g.tensor(&status_t);
        g.scheduler_step(
            &StepValues {
                model_out,
                coeffs,
                guidance,
                x,
                x0_prev,
                unet_in,
                status,
                noise,
            },
            Dyn::affine(step, 1, 1),
        )
        .unwrap();
        let mut plan = kiln_tests::compile_poisoned(&gpu, &g);
        plan.write_f32(model_out, &m).unwrap();
        plan.write_f32(coeffs, &table).unwrap();
        plan.write_f32(guidance, &[g_scale]).unwrap();
        if let Some(z_v) = noise {
            plan.write_f32(z_v, &z).unwrap();
        }
        let mut want = StepState {
            x: x0.clone(),
            x0_prev: prev0.clone(),
            unet_in: vec![0.0; copies * n],
        };
        // Rows 1 and 2 through the slot (row = slot + 1), then slot 2 = row 3: past the table.
        for slot in 0..3u32 {
            plan.set(step, slot);
            plan.run().unwrap();
            let what = format!("cfg {cfg} g {g_scale} noise {with_noise} slot {slot}");
            if let Some(c) = coeff_rows.get(slot as usize + 1) {
                reference_step(c, &m, g_scale, with_noise.then_some(&z[..]), &mut want);
            }
            // f32 on the GPU against f64: a handful of terms of magnitude <= ~15, a few ulps.
            let got_x = pollster::block_on(x_t.to_f32(&gpu)).unwrap();
            assert_close(&format!("{what}: x"), &got_x, &want.x, 1e-5, 1e-6);
            let got_p = pollster::block_on(prev_t.to_f32(&gpu)).unwrap();
            assert_close(
                &format!("{what}: x0_prev"),
                &got_p,
                &want.x0_prev,
                1e-5,
                1e-6,
            );
            let got_u = pollster::block_on(unet_t.to_f32(&gpu)).unwrap();
            assert_close(
                &format!("{what}: unet_in"),
                &got_u,
                &want.unet_in,
                1e-5,
                1e-6,
            );
        }
        let status = pollster::block_on(status_t.to_u32(&gpu)).unwrap();
        assert_eq!(status, [u32::MAX], "{cfg}: finite steps flag nothing");
        // A NaN in the model output (the conditional half with CFG) is flagged with the row;
        // the status keeps the smallest (rows 2 then 1 run: 1).
        let mut bad = m.clone();
        bad[copies * n - 7] = f32::NAN;
        plan.write_f32(model_out, &bad).unwrap();
        for slot in [1, 0] {
            plan.set(step, slot);
            plan.run().unwrap();
        }
        let status = pollster::block_on(status_t.to_u32(&gpu)).unwrap();
        assert_eq!(status, [1], "{cfg}: the first non-finite row");
    }
}

#[test]
fn config_parsing_and_errors() {
    // SD 1.5 ships a PNDMScheduler config: Euler with a note, the file's values kept.
    let sd15 = r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;
    let c = SchedulerConfig::from_json(sd15, None).unwrap();
    assert_eq!(c.kind, SchedulerKind::Euler);
    assert_eq!(
        c.note.as_deref(),
        Some("PNDMScheduler is not supported; using EulerDiscreteScheduler")
    );
    for k in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::from_cli(k.cli_name()).unwrap(), k);
        let c = SchedulerConfig::from_json(sd15, Some(k)).unwrap();
        assert_eq!((c.kind, c.note.is_none()), (k, true));
        let s = c.schedule(25).unwrap();
        assert_eq!((s.steps(), s.coeff_table().len()), (25, 25 * COEFFS));
    }
    let err = |json: &str, kind: Option<SchedulerKind>, steps: usize, needle: &str| {
        let r = SchedulerConfig::from_json(json, kind).and_then(|c| c.schedule(steps));
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{json}: expected an error naming {needle}"))
            .to_string();
        assert!(
            e.contains(needle),
            "{json}: error '{e}' does not name '{needle}'"
        );
    };
    let dpm = Some(SchedulerKind::DpmSolverMultistep);
    err(r#"{"prediction_type": "sample"}"#, None, 4, "'sample'");
    err(r#"{"beta_schedule": "cosine"}"#, None, 4, "'cosine'");
    err(r#"{"timestep_spacing": "middle"}"#, None, 4, "'middle'");
    err(
        r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true}"#,
        None,
        4,
        "use_karras_sigmas",
    );
    err(
        r#"{"use_karras_sigmas": true}"#,
        dpm,
        4,
        "use_karras_sigmas",
    );
    err(
        r#"{"algorithm_type": "sde-dpmsolver++"}"#,
        dpm,
        4,
        "sde-dpmsolver++",
    );
    err(r#"{"solver_order": 3}"#, dpm, 4, "solver_order 3");
    err(r#"{"trained_betas": [0.1, 0.2]}"#, None, 4, "trained_betas");
    err(
        r#"{"rescale_betas_zero_snr": true}"#,
        None,
        4,
        "rescale_betas_zero_snr",
    );
    err(
        r#"{"num_train_timesteps": "1000"}"#,
        None,
        4,
        "num_train_timesteps",
    );
    // A count the tables would be sized by (found by fuzzing: 4 GB of betas).
    err(
        r#"{"num_train_timesteps": 900000000}"#,
        None,
        4,
        "expected 2 to 100000",
    );
    err(r#"{"steps_offset": -1}"#, None, 4, "steps_offset");
    // An offset that pushes "leading" timesteps past the training range: DDIM indexed its
    // alphas table with them (a panic); now refused like diffusers' degenerate counts.
    for offset in ["5000", "1000000000"] {
        err(
            &format!(r#"{{"_class_name": "DDIMScheduler", "steps_offset": {offset}}}"#),
            None,
            4,
            "outside the training range 0..=999",
        );
    }
    err("[1, 2]", None, 4, "JSON object");
    err("{", None, 4, "not valid JSON");
    err("{}", None, 0, "0 inference steps");
    err("{}", None, 1001, "1001 inference steps");
    err(
        "{}",
        Some(SchedulerKind::Lcm),
        51,
        "original_inference_steps 50",
    );
}

/// FNV-1a 64 of the values as little-endian f32 (tools/make_scheduler_fixtures.py's digest of
/// a whole schedule).
fn fnv1a64(values: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in values.iter().flat_map(|v| v.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Every step count from 1 to 1000 for every class and config of the fixtures: Kiln refuses
/// exactly the counts whose diffusers schedule degenerates (a timestep outside the training
/// range, a repeated one) or that diffusers refuses, naming the timestep; at 500, 998, 999 and
/// 1000 steps (LCM: its two largest counts) the schedules it runs are diffusers': timesteps
/// bit for bit (a digest of the whole, the first and last four values shown), sigmas within an
/// ulp (sampled, and their sum).
#[test]
fn high_step_counts_match_diffusers_or_are_refused() {
    let text = std::fs::read_to_string(dir().join("high_counts.json")).unwrap();
    let json: Json = serde_json::from_str(&text).unwrap();
    let configs = json["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 21);
    let mut refused_total = 0;
    for c in configs {
        let name = c["name"].as_str().unwrap();
        let cfg = SchedulerConfig::from_json(c["config"].as_str().unwrap(), None).unwrap();
        assert_eq!(
            cfg.kind.class_name(),
            c["class"].as_str().unwrap(),
            "{name}"
        );
        let refused: Vec<(usize, usize, &str)> = c["refused"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let n = |i: usize| r[i].as_u64().unwrap() as usize;
                (n(0), n(1), r[2].as_str().unwrap())
            })
            .collect();
        for steps in 1..=1000 {
            let want = refused.iter().find(|r| (r.0..=r.1).contains(&steps));
            match (cfg.schedule(steps), want) {
                (Ok(s), None) => assert_eq!(s.steps(), steps, "{name} {steps}"),
                (Err(e), Some((_, _, why))) => {
                    refused_total += 1;
                    let e = e.to_string();
                    // "timestep T outside 0..=999" / "timestep T repeated": Kiln names T and
                    // the same reason; diffusers' own refusals are LCM's.
                    let (needle, reason) = match why.split(' ').collect::<Vec<_>>()[..] {
                        ["timestep", t, "outside", ..] => {
                            (format!("timestep {t}, "), "outside the training range")
                        }
                        ["timestep", t, "repeated"] => {
                            (format!("repeats timestep {t} "), "a step of size zero")
                        }
                        _ => (String::new(), "original_inference_steps"),
                    };
                    assert!(
                        e.contains(&needle) && e.contains(reason),
                        "{name} {steps}: diffusers: {why}; Kiln: {e}"
                    );
                }
                (Ok(_), Some((_, _, why))) => {
                    panic!("{name} {steps}: diffusers' schedule degenerates ({why}), Kiln runs it")
                }
                (Err(e), None) => panic!("{name} {steps}: diffusers runs it, Kiln refuses: {e}"),
            }
        }
        for w in c["schedules"].as_array().unwrap() {
            let steps = w["steps"].as_u64().unwrap() as usize;
            let s = cfg.schedule(steps).unwrap();
            let what = format!("{name} {steps} steps");
            assert_eq!(
                s.timesteps.len(),
                w["len"].as_u64().unwrap() as usize,
                "{what}"
            );
            let ends = |v: &[f32]| [v[..4].to_vec(), v[v.len() - 4..].to_vec()];
            let want_ends = |key: &str| {
                [
                    floats(&w[format!("{key}_head")]),
                    floats(&w[format!("{key}_tail")]),
                ]
            };
            assert_eq!(
                ends(&s.timesteps),
                want_ends("timesteps"),
                "{what}: timesteps"
            );
            assert_eq!(
                fnv1a64(&s.timesteps),
                w["timesteps_fnv"].as_str().unwrap(),
                "{what}: timesteps"
            );
            if !w["sigmas_at"].is_null() {
                // torch's f32 sigma table differs by an ulp between CPUs (Kiln's is within one
                // ulp of it, see schedule_matches_diffusers): sampled values and the sum.
                for p in w["sigmas_at"].as_array().unwrap() {
                    let i = p[0].as_u64().unwrap() as usize;
                    assert_close(
                        &format!("{what}: sigma {i}"),
                        &s.sigmas[i..=i],
                        &[p[1].as_f64().unwrap() as f32],
                        0.0,
                        1.2e-7,
                    );
                }
                let sum: f64 = s.sigmas.iter().map(|&v| v as f64).sum();
                let want = w["sigmas_sum"].as_f64().unwrap();
                assert!(
                    (sum - want).abs() <= 1.2e-7 * want,
                    "{what}: sum of sigmas {sum}, diffusers {want}"
                );
            }
        }
    }
    eprintln!("{refused_total} degenerate (config, count) pairs refused");
    // The default pipeline's config (DPM++ 2M, leading, steps_offset 1): 999 and 1000 steps
    // ended in NaN after the whole run; now refused up front, saying what works.
    let e = SchedulerConfig::from_json(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/image-shapes/scheduler/scheduler_config.json"),
        )
        .unwrap(),
        None,
    )
    .unwrap()
    .schedule(999)
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("timestep 1000, outside the training range 0..=999")
            && e.contains("at most 998 steps"),
        "{e}"
    );
}
