//! The graph executor: compile once, replay with one submit and no object creation; liveness
//! reuse of buffers; run-time scalars; in-place writes; errors for bad graphs and shaders.

use kiln::graph::{Act, GluInput};
use kiln::kernels::KernelKey;
use kiln::{CompileOptions, DType, Dyn, Graph, Tensor};
use kiln_tests::{assert_close, gpu, Rng};
use std::sync::Arc;

/// A small decoder-like block: norm, two projections, SwiGLU, projection, residual, and a
/// cache write at a run-time position.
fn block(
    g: &mut Graph,
    gpu: &kiln::Gpu,
    rng: &mut Rng,
    d: usize,
    cache: &Arc<Tensor>,
) -> (kiln::Value, kiln::Value, kiln::Scalar) {
    let f = 2 * d;
    let mut w = |name: &str, n: usize, k: usize| {
        let t = Tensor::upload(
            gpu,
            name,
            &[n, k],
            DType::F16,
            &kiln::dtype::encode_plain(DType::F16, &rng.vec(n * k, -0.2, 0.2)).unwrap(),
        )
        .unwrap();
        g_tensor(t)
    };
    fn g_tensor(t: Tensor) -> Arc<Tensor> {
        Arc::new(t)
    }
    let (wg, wu, wd) = (w("gate", f, d), w("up", f, d), w("down", d, f));
    let norm_w = Arc::new(Tensor::from_f32(gpu, "norm", &[d], &vec![1.0; d]).unwrap());
    let x = g.input("x", &[1, d], DType::F32).unwrap();
    let pos = g.scalar("pos").unwrap();
    let (wg, wu, wd, nw, cv) = (
        g.tensor(&wg),
        g.tensor(&wu),
        g.tensor(&wd),
        g.tensor(&norm_w),
        g.tensor(cache),
    );
    let h = g.rms_norm(x, nw, 1e-5).unwrap();
    let gate = g.linear(h, wg, None).unwrap();
    let up = g.linear(h, wu, None).unwrap();
    let act = g.glu(GluInput::Pair { gate, up }, Act::Silu).unwrap();
    let down = g.linear(act, wd, None).unwrap();
    let y = g.add(x, down).unwrap();
    g.copy_into(y, cv, Dyn::affine(pos, d as u32, 0)).unwrap();
    g.output(y);
    (x, y, pos)
}

#[test]
fn second_run_creates_nothing_and_submits_once() {
    // A device of its own: tests running in parallel would add to shared counters.
    let gpu = kiln_tests::gpu_with(kiln::GpuOptions::default());
    let mut rng = Rng::new(1);
    let d = 64;
    let cache = Arc::new(Tensor::zeros(&gpu, "cache", &[8, d], DType::F32).unwrap());
    let mut g = Graph::new();
    let (x, y, pos) = block(&mut g, &gpu, &mut rng, d, &cache);
    let mut plan = pollster::block_on(g.compile(&gpu, CompileOptions::default())).unwrap();
    let xs = rng.vec(d, -1.0, 1.0);
    plan.write_f32(x, &xs).unwrap();
    plan.set(pos, 0);
    plan.run().unwrap();
    let first = pollster::block_on(plan.read_f32(y)).unwrap();

    for p in 1..4u32 {
        let before = gpu.counters();
        plan.set(pos, p);
        plan.run().unwrap();
        let delta = gpu.counters() - before;
        assert_eq!(delta.submits, 1, "one submit per run");
        assert_eq!(
            delta.objects_created(),
            0,
            "no buffers, bind groups or pipelines per run: {delta:?}"
        );
        assert_eq!(delta.dispatches, plan.dispatch_count() as u64);
        assert_eq!(delta.bytes_read_back, 0);
        assert_eq!(delta.bytes_uploaded, 64, "only the run scalars change");
    }
    // Same input, same output; the cache rows 0..4 all hold it, row 4.. stays zero.
    let again = pollster::block_on(plan.read_f32(y)).unwrap();
    assert_eq!(first, again);
    let c = pollster::block_on(cache.to_f32(&gpu)).unwrap();
    for r in 0..8 {
        let want: Vec<f32> = if r < 4 { first.clone() } else { vec![0.0; d] };
        assert_eq!(&c[r * d..(r + 1) * d], want.as_slice(), "cache row {r}");
    }
    // run_read reads back in the same submit.
    let before = gpu.counters();
    let out = pollster::block_on(plan.run_read(&[y])).unwrap();
    let delta = gpu.counters() - before;
    assert_eq!(
        (
            delta.submits,
            delta.objects_created(),
            delta.bytes_read_back
        ),
        (1, 0, (d * 4) as u64)
    );
    assert_eq!(bytemuck::cast_slice::<u8, f32>(&out[0]), first.as_slice());
}

#[test]
fn liveness_reuses_buffers() {
    let gpu = gpu();
    let mut g = Graph::new();
    let x = g.input("x", &[256, 256], DType::F32).unwrap();
    let mut v = x;
    for _ in 0..10 {
        v = g.scale(v, 1.0001, 0.0).unwrap();
    }
    g.output(v);
    let plan = pollster::block_on(g.compile(&gpu, CompileOptions::default())).unwrap();
    // Nine intermediates of 256 KiB ping-pong between two buffers.
    assert_eq!(plan.unshared_bytes, 9 * 256 * 256 * 4);
    assert_eq!(plan.arena_bytes, 2 * 256 * 256 * 4);
    let xs = Rng::new(3).vec(256 * 256, -1.0, 1.0);
    plan.write_f32(x, &xs).unwrap();
    plan.run().unwrap();
    let got = pollster::block_on(plan.read_f32(v)).unwrap();
    let want: Vec<f32> = xs
        .iter()
        .map(|&a| (0..10).fold(a, |acc, _| acc * 1.0001))
        .collect();
    assert_close("chain of 10 scales", &got, &want, 0.0, 1e-6);
}

#[test]
fn poisoned_outputs_show_unwritten_elements() {
    // Copying 5 elements into an 8-element poisoned output leaves NaNs the tests would catch.
    let gpu = gpu();
    let dst = Arc::new(Tensor::zeros(&gpu, "dst", &[8], DType::F32).unwrap());
    let mut g = Graph::new();
    let x = g.input("x", &[5], DType::F32).unwrap();
    let y = g.scale(x, 2.0, 0.0).unwrap();
    let d = g.tensor(&dst);
    g.copy_into(y, d, Dyn::Static(3)).unwrap();
    g.output(y);
    let plan = kiln_tests::compile_poisoned(&gpu, &g);
    plan.write_f32(x, &[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    plan.run().unwrap();
    assert_eq!(
        pollster::block_on(dst.to_f32(&gpu)).unwrap(),
        vec![0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    );
    let e = g.copy_into(y, d, Dyn::Static(4)).unwrap_err();
    assert!(e.to_string().contains("overflow"), "{e}");
}

/// `copy_into` an f16 tensor (an f16 KV cache, two elements to a word): the copied elements
/// rounded, the elements sharing their first and last words untouched, on every variant.
#[test]
fn copy_into_an_f16_cache() {
    // Rows of even length: uploaded two to a word in order, as the caches are laid out.
    let mut before: Vec<f32> = (0..12).map(|i| -(i as f32) - 0.5).collect();
    let bytes = kiln_tests::to_f16(&mut before);
    for gpu in kiln_tests::gpu_variants() {
        let dst = Arc::new(Tensor::upload(&gpu, "dst", &[2, 6], DType::F16, &bytes).unwrap());
        let mut g = Graph::new();
        let x = g.input("x", &[5], DType::F32).unwrap();
        let d = g.tensor(&dst);
        g.copy_into(x, d, Dyn::Static(3)).unwrap();
        g.output(x);
        let plan = kiln_tests::compile_poisoned(&gpu, &g);
        plan.write_f32(x, &[1.0, 2.0, 3.0001, 4.0, 5.0]).unwrap();
        plan.run().unwrap();
        let mut want = before.clone();
        want[3..8].copy_from_slice(&[1.0, 2.0, half::f16::from_f32(3.0001).to_f32(), 4.0, 5.0]);
        assert_eq!(pollster::block_on(dst.to_f32(&gpu)).unwrap(), want);
    }
}

#[test]
fn shader_errors_are_errors() {
    let gpu = gpu();
    // matvec.wgsl without a weight-dtype define does not compile.
    let e = pollster::block_on(gpu.pipeline(
        &KernelKey::new("matvec.wgsl", "main"),
        &[false, false, false, true],
    ))
    .unwrap_err();
    assert!(matches!(e, kiln::Error::Shader { .. }), "{e}");
    let e = kiln::shaders::dump("nope.wgsl", &[]).unwrap_err();
    assert!(e.to_string().contains("no such shader file"), "{e}");
}

#[test]
fn input_size_is_checked() {
    let gpu = gpu();
    let mut g = Graph::new();
    let x = g.input("x", &[4], DType::F32).unwrap();
    let y = g.scale(x, 1.0, 0.0).unwrap();
    g.output(y);
    let plan = pollster::block_on(g.compile(&gpu, CompileOptions::default())).unwrap();
    let e = plan.write_f32(x, &[1.0; 5]).unwrap_err();
    assert!(e.to_string().contains("holds 4 elements, got 5"), "{e}");
}

#[test]
fn every_shader_variant_preprocesses() {
    for (name, _) in kiln::shaders::SOURCES {
        let src = kiln::shaders::dump(name, &[]).unwrap();
        assert!(
            !src.contains("#include") && !src.contains("#ifdef"),
            "{name} left directives"
        );
    }
}

/// The plan's traffic accounting: a tied table read as one gathered row and as a whole head,
/// activations once per reader and writer, and a cache written in place (not counted as read)
/// and read by an op.
#[test]
fn traffic_accounting() {
    let gpu = gpu();
    let (v, d) = (8usize, 16usize);
    let table = Arc::new(Tensor::from_f32(&gpu, "table", &[v, d], &vec![0.5; v * d]).unwrap());
    let cache = Arc::new(Tensor::zeros(&gpu, "cache", &[4, d], DType::F32).unwrap());
    let mut g = Graph::new();
    let ids = g.input("ids", &[1], DType::U32).unwrap();
    let t = g.tensor(&table);
    let c = g.tensor(&cache);
    let x = g.gather(t, ids).unwrap(); // [1, d]: one row of the table
    g.copy_into(x, c, Dyn::Static(0)).unwrap(); // the cache, written in place
    let y = g.linear(c, t, None).unwrap(); // [4, v]: the cache and the whole table read
    g.output(y);
    let plan = pollster::block_on(g.compile(&gpu, CompileOptions::default())).unwrap();
    let tr = plan.traffic;
    let (row, whole, cache_bytes) = (4 * d as u64, 4 * (v * d) as u64, 4 * 4 * d as u64);
    assert_eq!((tr.weights_read, tr.weights_needed), (row + whole, whole));
    assert_eq!(
        (tr.cache_read, tr.cache_bytes, tr.cache_elems),
        (cache_bytes, cache_bytes, 4 * d as u64)
    );
    // ids (4) and x (gather writes it, copy_into reads it), y (written once).
    let (x_bytes, y_bytes) = (4 * d as u64, 4 * 4 * v as u64);
    assert_eq!(tr.activations_moved, 4 + 2 * x_bytes + y_bytes);
    assert_eq!(tr.activations_once, 4 + x_bytes + y_bytes);
}

/// A gather from a reshaped activation reads every row of the view: `[b, l, d]` viewed as
/// `[b * l, d]` has `b * l` rows, not the `b` of the value it views (SDXL's pooled text
/// embedding gathers row `b * 77 + eos` of the final states).
#[test]
fn gather_reads_every_row_of_a_reshaped_activation() {
    let gpu = gpu();
    let mut g = Graph::new();
    let x = g.input("x", &[2, 3, 4], DType::F32).unwrap();
    let y = g.scale(x, 2.0, 0.0).unwrap();
    let flat = g.reshape(y, &[6, 4]).unwrap();
    let rows = g.input("rows", &[3], DType::U32).unwrap();
    let p = g.gather(flat, rows).unwrap();
    g.output(p);
    let plan = pollster::block_on(g.compile(&gpu, CompileOptions::default())).unwrap();
    let xs: Vec<f32> = (0..24).map(|v| v as f32).collect();
    plan.write_f32(x, &xs).unwrap();
    plan.write_u32(rows, &[1, 4, 5]).unwrap();
    let out = pollster::block_on(plan.run_read(&[p])).unwrap();
    let got: Vec<f32> = bytemuck::pod_collect_to_vec(&out[0]);
    let want: Vec<f32> = [1usize, 4, 5]
        .iter()
        .flat_map(|&r| xs[r * 4..r * 4 + 4].iter().map(|v| v * 2.0))
        .collect();
    assert_eq!(got, want);
}
