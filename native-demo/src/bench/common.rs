//! What the benchmarks share: random weights, timing a plan, per-kernel profiles.

use anyhow::Result;
use kiln::Gpu;
use std::time::Instant;

/// A safetensors file of random f16 tensors: 1-D `.weight`s (norms) are 1, everything else
/// uniform with a fan-in scale, so activations stay finite through deep random models.
pub fn random_f16_safetensors(params: &[(String, Vec<usize>)], seed: u64) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in params {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + h.len() + off);
    out.extend((h.len() as u64).to_le_bytes());
    out.extend(&h);
    let mut s = seed;
    for (name, shape) in params {
        let n: usize = shape.iter().product();
        let fan_in = if shape.len() > 1 {
            shape[1..].iter().product::<usize>()
        } else {
            1
        };
        let amp = (3.0 / fan_in as f32).sqrt();
        let norm_weight = shape.len() == 1 && name.ends_with(".weight");
        for _ in 0..n {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = if norm_weight {
                1.0
            } else {
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            };
            out.extend(half::f16::from_f32(v).to_le_bytes());
        }
    }
    out
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}

pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    random_bytes(n, seed)
        .iter()
        .map(|&b| b as f32 / 255.0 - 0.5)
        .collect()
}

/// The least total of `runs` profiles of a plan (the others met a busier machine).
pub fn best_profile(plan: &kiln::Plan, runs: usize) -> Result<Vec<(String, f64)>> {
    let mut best: Option<Vec<(String, f64)>> = None;
    for _ in 0..runs.max(1) {
        let p = pollster::block_on(plan.profile())?;
        let total = |p: &[(String, f64)]| p.iter().map(|(_, ms)| ms).sum::<f64>();
        if best.as_ref().is_none_or(|b| total(&p) < total(b)) {
            best = Some(p);
        }
    }
    Ok(best.unwrap_or_default())
}

/// A plan's per-dispatch profile summed by kernel, slowest first: `[{ kernel, dispatches, ms }]`.
pub fn profile_rows(p: &[(String, f64)]) -> serde_json::Value {
    let mut by: Vec<(String, usize, f64)> = Vec::new();
    for (label, ms) in p {
        match by.iter_mut().find(|(l, _, _)| l == label) {
            Some(e) => {
                e.1 += 1;
                e.2 += ms;
            }
            None => by.push((label.clone(), 1, *ms)),
        }
    }
    by.sort_by(|a, b| b.2.total_cmp(&a.2));
    serde_json::Value::Array(
        by.into_iter()
            .map(|(k, n, ms)| serde_json::json!({"kernel": k, "dispatches": n, "ms": ms}))
            .collect(),
    )
}

/// Prints a profile from [`profile_rows`] as a table with shares of the total.
pub fn print_profile(title: &str, rows: &serde_json::Value) {
    let Some(rows) = rows.as_array() else {
        return;
    };
    let total: f64 = rows.iter().filter_map(|r| r["ms"].as_f64()).sum();
    println!("\n{title}: {total:.2} ms of GPU time (timestamp queries, one pass per dispatch)\n");
    println!("| kernel | dispatches | ms | share |");
    println!("|---|---|---|---|");
    for r in rows {
        let ms = r["ms"].as_f64().unwrap_or(0.0);
        println!(
            "| {} | {} | {:.3} | {:.0}% |",
            r["kernel"].as_str().unwrap_or(""),
            r["dispatches"],
            ms,
            100.0 * ms / total.max(1e-9)
        );
    }
}

/// Runs the plan `iters` times (one submit each) after a warm-up and returns ms per run.
/// Each benchmark graph repeats its op `REPS` times so that submit overhead is amortized;
/// callers divide by that.
pub fn time(gpu: &Gpu, plan: &kiln::Plan, iters: usize) -> Result<f64> {
    plan.run()?;
    gpu.wait_idle()?;
    let t = Instant::now();
    for _ in 0..iters {
        plan.run()?;
    }
    gpu.wait_idle()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / iters as f64)
}
