//! A lost GPU device (here `Device::destroy`, as a driver reset or a browser's GPU-process crash
//! would do) ends the generation in progress with an error, never a hang, and a new `Gpu` works
//! afterwards (issue 13).

use kiln::diffusion::models::{read_pipeline_dir, SdModels};
use kiln::diffusion::pipeline::ImageOptions;
use kiln::llm::{GenerateOptions, LoadOptions, TextModel};
use kiln::GpuOptions;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(path)
}

/// Runs `f` on its own thread; a hang fails the test instead of stalling the suite.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("{what}: no result in 120 s (hung)"))
}

fn text(lose_after: Option<usize>) -> kiln::Result<String> {
    let gpu = kiln_tests::gpu_with(GpuOptions::default());
    let files =
        kiln::llm::generate::read_model_path(&fixture("llm").join("llama-gqa-f32")).unwrap();
    let opts = LoadOptions {
        ctx: 64,
        ..Default::default()
    };
    let mut m = pollster::block_on(TextModel::load(&gpu, files, &opts, &mut |_, _| {}))?;
    let gen = GenerateOptions {
        max_tokens: 24,
        ..Default::default()
    };
    let mut pieces = 0;
    let g = pollster::block_on(m.generate(&[1, 5, 9], &gen, &mut |_| {
        pieces += 1;
        if Some(pieces) == lose_after {
            gpu.device.destroy();
        }
        true
    }))?;
    Ok(g.text)
}

fn image(lose_at: Option<usize>) -> kiln::Result<usize> {
    let gpu = kiln_tests::gpu_with(GpuOptions::default());
    let mut m = SdModels::load(&gpu, read_pipeline_dir(&fixture("sd/sd1-tiny")).unwrap())?;
    let opts = ImageOptions {
        prompt: "x".into(),
        steps: 6,
        ..Default::default()
    };
    let img = pollster::block_on(m.generate(&opts, &mut |done, _, _| {
        if Some(done) == lose_at {
            gpu.device.destroy();
        }
        false
    }))?;
    Ok(img.steps)
}

#[test]
fn a_lost_device_ends_the_work_with_an_error() {
    let e = within("text", || text(Some(2))).expect_err("generation went on");
    eprintln!("text: {e}");
    assert!(e.to_string().contains("lost"), "{e}");
    let e = within("image", || image(Some(2))).expect_err("denoising went on");
    eprintln!("image: {e}");
    assert!(e.to_string().contains("lost"), "{e}");
    // A new device works.
    assert!(!within("text again", || text(None)).unwrap().is_empty());
    assert_eq!(within("image again", || image(None)).unwrap(), 6);
}
