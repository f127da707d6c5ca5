// Probe: f16 matvec weights from a storage buffer vs an rgba32uint texture on this adapter.
use std::time::Instant;
use wgpu::util::DeviceExt;

const ROWS: u32 = 4096;
const K: u32 = 4096; // f16 elements per row: K/8 texels per row

fn main() {
    let gpu = pollster::block_on(kiln::Gpu::new(kiln::GpuOptions::default())).unwrap();
    let dev = &gpu.device;
    let q = &gpu.queue;
    println!("{}", gpu.describe());
    println!("ubo max {}", gpu.limits.max_uniform_buffer_binding_size);
    if std::env::var("ONLY_LIMITS").is_ok() {
        return;
    }
    let units = K / 8;
    let words: Vec<u32> = (0..ROWS * units * 4)
        .map(|i| i.wrapping_mul(2654435761) & 0x3bff3bff)
        .collect();
    let xs: Vec<f32> = (0..K).map(|i| (i % 7) as f32 * 0.1).collect();
    let wbuf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&words),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let xbuf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&xs),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let xubo = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&xs),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let ybuf = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (ROWS * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    // Texture: width = units (512), height = ROWS (4096)
    let tex = dev.create_texture_with_data(
        q,
        &wgpu::TextureDescriptor {
            label: None,
            size: wgpu::Extent3d {
                width: units,
                height: ROWS,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Uint,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        },
        wgpu::util::TextureDataOrder::LayerMajor,
        bytemuck::cast_slice(&words),
    );
    let view = tex.create_view(&Default::default());
    let common = "
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
fn dot8(q: vec4<u32>, i: u32) -> vec4<f32> {
    let a = unpack2x16float(q.x); let b = unpack2x16float(q.y); let c = unpack2x16float(q.z); let d = unpack2x16float(q.w);
    return vec4<f32>(a, b) * x4[2u * i] + vec4<f32>(c, d) * x4[2u * i + 1u];
}
";
    let buf_src = format!(
        "{common}
@group(0) @binding(0) var<storage, read> w4: array<vec4<u32>>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {{
    let r = wg.x * 64u + li;
    var acc = vec4<f32>(0.0);
    for (var i = 0u; i < {units}u; i++) {{ acc += dot8(w4[r * {units}u + i], i); }}
    y[r] = acc.x + acc.y + acc.z + acc.w;
}}"
    );
    let tex_src = format!(
        "{common}
@group(0) @binding(0) var wt: texture_2d<u32>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {{
    let r = wg.x * 64u + li;
    var acc = vec4<f32>(0.0);
    for (var i = 0u; i < {units}u; i++) {{ acc += dot8(textureLoad(wt, vec2<u32>(i, r), 0), i); }}
    y[r] = acc.x + acc.y + acc.z + acc.w;
}}"
    );
    let ubo_x = |src: &str| {
        src.replace(
            "@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;",
            &format!(
                "@group(0) @binding(1) var<uniform> x4: array<vec4<f32>, {}>;",
                K / 4
            ),
        )
    };
    let buf_ubo = ubo_x(&buf_src);
    let tex_ubo = ubo_x(&tex_src);
    let alu_ubo = ubo_x(&buf_src.replace(&format!("w4[r * {units}u + i]"), "w4[i]"));
    let buf_load = buf_src.replace(
        "acc += dot8(w4[r * {units}u + i], i);"
            .replace("{units}", &units.to_string())
            .as_str(),
        &format!("acc += bitcast<vec4<f32>>(w4[r * {units}u + i]);"),
    );
    let tex_load = tex_src.replace(
        "acc += dot8(textureLoad(wt, vec2<u32>(i, r), 0), i);",
        "acc += bitcast<vec4<f32>>(textureLoad(wt, vec2<u32>(i, r), 0));",
    );
    let alu = buf_src.replace(&format!("w4[r * {units}u + i]"), "w4[i]");
    let mut results = vec![];
    let lane = format!(
        "{common}
@group(0) @binding(0) var<storage, read> w4: array<vec4<u32>>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {{
    let r = wg.x * 64u + li;
    var acc = vec4<u32>(0u);
    for (var i = 0u; i < {units}u; i++) {{ acc += w4[r * {units}u + i]; }}
    y[r] = f32(acc.x + acc.y + acc.z + acc.w) + x4[0].x;
}}"
    );
    let uni = lane.replace(
        &format!("w4[r * {units}u + i]"),
        &format!("w4[wg.x * {units}u + i]"),
    );
    let konst = lane.replace(&format!("w4[r * {units}u + i]"), "w4[i]");
    for (name, src, use_tex, xu) in [
        ("per-lane loads", lane, false, false),
        ("wg-uniform loads", uni, false, false),
        ("loop-uniform loads", konst, false, false),
    ] {
        let m = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let p = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &m,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let w_entry = if use_tex {
            wgpu::BindingResource::TextureView(&view)
        } else {
            wbuf.as_entire_binding()
        };
        let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: w_entry,
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: if xu {
                        xubo.as_entire_binding()
                    } else {
                        xbuf.as_entire_binding()
                    },
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: ybuf.as_entire_binding(),
                },
            ],
        });
        let run = |n: usize| {
            let mut e = dev.create_command_encoder(&Default::default());
            for _ in 0..n {
                let mut pass = e.begin_compute_pass(&Default::default());
                pass.set_pipeline(&p);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(
                    ROWS / 64
                        / (if name.starts_with('2') {
                            2
                        } else if name.starts_with('4') {
                            4
                        } else if name.starts_with('8') {
                            8
                        } else {
                            1
                        }),
                    1,
                    1,
                );
            }
            q.submit([e.finish()]);
            dev.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        };
        run(2);
        let n = 10;
        let s = (0..4)
            .map(|_| {
                let t = Instant::now();
                run(n);
                t.elapsed().as_secs_f64() / n as f64
            })
            .fold(f64::MAX, f64::min);
        let gbs = (ROWS * K * 2) as f64 / s / 1e9;
        println!("{name}: {:.2} ms per matvec, {:.2} GB/s", s * 1e3, gbs);
        results.push(gbs);
    }
}
#[allow(dead_code)]
fn limits() {}
