//! The `kiln` binary end to end on a fixture model: `kiln text --json` prints the documented
//! object with the ids transformers generates; bad input exits non-zero with a clear message.

use std::process::Command;

fn fixture(p: &str) -> String {
    format!("{}/../tests/fixtures/llm/{p}", env!("CARGO_MANIFEST_DIR"))
}

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run kiln")
}

/// PSNR (dB) of the 8-bit RGB PNG `kiln image` wrote against diffusers' `[h, w, 3]` image in
/// [0, 1]; its size must be `h` x `w`.
fn png_psnr(png_path: &std::path::Path, want_hwc: &[f32], h: usize, w: usize) -> f64 {
    let file = std::fs::File::open(png_path).unwrap();
    let mut rd = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; rd.output_buffer_size().unwrap()];
    let info = rd.next_frame(&mut buf).unwrap();
    assert_eq!((info.height as usize, info.width as usize), (h, w));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let mse: f64 = buf[..want_hwc.len()]
        .iter()
        .zip(want_hwc)
        .map(|(&g, &w)| (g as f64 / 255.0 - w as f64).powi(2))
        .sum::<f64>()
        / want_hwc.len() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("llama-gqa-f32/expected.json")).unwrap())
        .unwrap()
}

#[test]
fn text_json_greedy_matches_transformers() {
    let e = expected();
    let prompt: Vec<String> = e["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    for (model, run) in [
        (fixture("llama-gqa-f32"), 0),
        (fixture("llama-gqa-f32/model-q8_0.gguf"), 2),
    ] {
        let out = kiln(&[
            "text",
            "--model",
            &model,
            "--prompt-ids",
            &prompt.join(","),
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--logprobs",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        let want = &e["runs"][run];
        assert_eq!(
            e["runs"][run]["weights"].as_str().unwrap(),
            if run == 0 { "hf" } else { "model-q8_0.gguf" }
        );
        assert_eq!(v["prompt_ids"], e["prompt_ids"]);
        let ids = v["ids"].as_array().unwrap();
        assert_eq!(ids.len(), 24);
        assert_eq!(ids.as_slice(), &want["ids"].as_array().unwrap()[..24]);
        let lp = v["logprobs"].as_array().unwrap();
        for (g, w) in lp.iter().zip(want["logprobs"].as_array().unwrap()) {
            assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 2e-3);
        }
        assert!(v["text"].is_string());
        for k in ["load_ms", "prefill_tok_s", "decode_tok_s", "ttft_ms"] {
            assert!(
                v["timings"][k].as_f64().is_some_and(|x| x >= 0.0),
                "timings.{k}"
            );
        }
    }
}

#[test]
fn text_prompt_is_tokenized_and_streamed() {
    // The streamed text (stdout) is the prompt followed by the text of the same run as JSON, and
    // the prompt ids are the tokenizer's ids for the text (not empty, not the raw bytes).
    let args = [
        "text",
        "--model",
        &fixture("qwen2-f32"),
        "--prompt",
        "Hello world",
        "--max-tokens",
        "12",
        "--seed",
        "3",
        "--temperature",
        "1",
    ];
    let streamed = kiln(&args);
    assert!(
        streamed.status.success(),
        "{}",
        String::from_utf8_lossy(&streamed.stderr)
    );
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let j = kiln(&json_args);
    assert!(j.status.success(), "{}", String::from_utf8_lossy(&j.stderr));
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    let text = v["text"].as_str().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&streamed.stdout).trim_end_matches('\n'),
        format!("Hello world{text}")
    );
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen2-f32/expected.json")).unwrap())
            .unwrap();
    let want = e["tokenizer"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["text"] == "Hello world")
        .expect("fixture tokenizes 'Hello world'");
    // Qwen2 adds no BOS: the prompt is exactly the tokenizer's ids.
    assert_eq!(v["prompt_ids"], want["ids"]);
    assert!(!v["ids"].as_array().unwrap().is_empty());
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = kiln(&["text", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kiln(&[
        "text",
        "--model",
        &fixture("llama-gqa-f32"),
        "--prompt-ids",
        "1,2,3",
        "--ctx",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("context"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An output folder that does not exist fails before any work, naming the folder.
    let out = kiln(&["image", "--prompt", "x", "--out", "/nonexistent/dir/x.png"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/dir") && err.contains("does not exist"),
        "{err}"
    );
    // Flag values that mean nothing are errors naming the flag's field.
    for (flag, v, field) in [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "2", "top_p"),
        ("--min-p", "2", "min_p"),
        ("--repeat-penalty", "0", "repeat_penalty"),
        ("--max-tokens", "0", "max_tokens"),
    ] {
        let arg = format!("{flag}={v}");
        let out = kiln(&["text", "--prompt", "And", &arg]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(field),
            "{flag} {v}: {err}"
        );
    }
}

#[test]
fn image_writes_the_png_diffusers_makes() {
    let sd = format!(
        "{}/../tests/fixtures/sd/sd1-tiny",
        env!("CARGO_MANIFEST_DIR")
    );
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{sd}/expected.json")).unwrap())
            .unwrap();
    let out = std::env::temp_dir().join("kiln-cli-test.png");
    let o = kiln(&[
        "image",
        "--model",
        &sd,
        "--prompt",
        e["prompt"].as_str().unwrap(),
        "--negative-prompt",
        e["negative_prompt"].as_str().unwrap(),
        "--latents",
        &format!("{sd}/latents.npy"),
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--guidance",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Nothing read back during the 4 steps but the 4-byte NaN flag, once (after step 2).
    assert_eq!(v["per_step"]["readback_bytes"], 1);
    let want =
        kiln::formats::npy::parse(&std::fs::read(format!("{sd}/image_ddim_g3.npy")).unwrap())
            .unwrap();
    let psnr = png_psnr(&out, &want.data, want.shape[1], want.shape[2]);
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
}

/// An SDXL-Turbo-layout folder (tests/fixtures/sdxl): the model's own one step and guidance
/// 0 when the flags say nothing, the PNG diffusers makes; `--quantize q8` loads and differs
/// little; `kiln info` names the pipeline class and its two text encoders.
#[test]
fn image_runs_sdxl_turbo_as_diffusers_does() {
    let d = format!("{}/../tests/fixtures/sdxl", env!("CARGO_MANIFEST_DIR"));
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{d}/expected.json")).unwrap())
            .unwrap();
    let want =
        kiln::formats::npy::parse(&std::fs::read(format!("{d}/turbo_1_g0.npy")).unwrap()).unwrap();
    let model = format!("{d}/sdxl-turbo-tiny");
    for (q, floor) in [("none", 40.0), ("q8", 30.0)] {
        let out = std::env::temp_dir().join(format!("kiln-cli-sdxl-{q}.png"));
        let o = kiln(&[
            "image",
            "--model",
            &model,
            "--prompt",
            e["prompt"].as_str().unwrap(),
            "--latents",
            &format!("{d}/latents.npy"),
            "--scheduler",
            "euler",
            "--quantize",
            q,
            "--out",
            out.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("1 step, guidance 0"), "{err}");
        let psnr = png_psnr(&out, &want.data, want.shape[1], want.shape[2]);
        assert!(psnr >= floor, "{q}: PSNR {psnr:.1} dB");
    }
    let o = kiln(&["info", "--model", &format!("{d}/sdxl-tiny")]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("StableDiffusionXLPipeline") && text.contains("two text encoders"),
        "{text}"
    );
}

/// `kiln list DIR`: each entry's kind and whether it loads, or why not.
#[test]
fn list_says_what_loads_in_a_folder() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::temp_dir().join(format!("kiln-list-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("mamba-tiny")).unwrap();
    std::fs::write(
        dir.join("mamba-tiny/config.json"),
        r#"{"model_type": "mamba", "hidden_size": 8}"#,
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    for (link, target) in [
        ("llama-gqa-f32", "tests/fixtures/llm/llama-gqa-f32"),
        ("minilm-tiny", "tests/fixtures/embed/minilm-tiny"),
        ("sdxl-tiny", "tests/fixtures/sdxl/sdxl-tiny"),
    ] {
        std::os::unix::fs::symlink(root.join(target), dir.join(link)).unwrap();
    }
    let o = kiln(&["list", dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        line("llama-gqa-f32").contains("text") && line("llama-gqa-f32").ends_with("yes"),
        "{text}"
    );
    assert!(
        line("minilm-tiny").contains("embedding") && line("minilm-tiny").ends_with("yes"),
        "{text}"
    );
    assert!(
        line("sdxl-tiny").contains("image") && line("sdxl-tiny").ends_with("yes"),
        "{text}"
    );
    assert!(
        line("mamba-tiny").contains("no: ") && line("mamba-tiny").contains("mamba"),
        "{text}"
    );
    assert!(line("notes.txt").contains("no: "), "{text}");
    assert!(text.contains("3 of 5 entries load"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn default_model(p: &str) -> String {
    format!("{}/../models/{p}", env!("CARGO_MANIFEST_DIR"))
}

/// With no `--model`, `kiln text` runs the embedded default model: its greedy ids are
/// transformers' (models/text-kjv/reference.json, written by tools/train_text_model.py).
#[test]
fn text_without_model_uses_the_embedded_default() {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(default_model("text-kjv/reference.json")).unwrap(),
    )
    .unwrap();
    let r = &r[0];
    let want = r["ids"].as_array().unwrap();
    let o = kiln(&[
        "text",
        "--prompt",
        r["prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        &want.len().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prompt_ids"], r["prompt_ids"]);
    assert_eq!(v["ids"].as_array().unwrap(), want);
}

/// With no `--model`, `kiln image` runs the embedded default pipeline: for the reference latents
/// its PNG is diffusers' picture (models/image-shapes/reference, tools/train_image_model.py).
#[test]
fn image_without_model_uses_the_embedded_default() {
    let dir = default_model("image-shapes/reference");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/reference.json")).unwrap())
            .unwrap();
    let out = std::env::temp_dir().join("kiln-cli-default.png");
    let o = kiln(&[
        "image",
        "--prompt",
        r["prompt"].as_str().unwrap(),
        "--latents",
        &format!("{dir}/latents.npy"),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want =
        kiln::formats::npy::parse(&std::fs::read(format!("{dir}/image.npy")).unwrap()).unwrap();
    let psnr = png_psnr(&out, &want.data, want.shape[0], want.shape[1]);
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
}

/// Runs `kiln` with `stdin` as its standard input.
fn kiln_stdin(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kiln");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// CLI habits: a random default seed that is printed and in `--json` (and repeats the run with
/// `--seed`), `-m`/`-p`/`-n`, the prompt from stdin or a file, `--quiet`, distinct exit codes.
#[test]
fn seeds_short_flags_prompt_sources_and_exit_codes() {
    let m = fixture("qwen2-f32");
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let sample = [
        "--temperature",
        "1",
        "--top-k",
        "0",
        "--min-p",
        "0",
        "-n",
        "8",
        "--json",
    ];
    let run = |extra: &[&str]| {
        let mut a = vec!["text", "-m", &m, "-p", "Hello world"];
        a.extend(sample);
        a.extend(extra);
        json(kiln(&a))
    };
    let (a, b) = (run(&[]), run(&[]));
    assert_ne!(
        a["seed"], b["seed"],
        "two runs without --seed drew the same seed"
    );
    let seed = a["seed"].to_string();
    let again = run(&["--seed", &seed]);
    assert_eq!(again["ids"], a["ids"], "--seed {seed} repeats the run");
    // The summary line names the seed.
    let out = kiln(&["text", "-m", &m, "-p", "Hello", "-n", "2", "--seed", "77"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("seed: 77"));
    // The prompt from stdin (-p -) and from a file give the same ids as -p TEXT.
    let greedy = ["--temperature", "0", "-n", "6", "--json"];
    let mut args = vec!["text", "-m", &m, "-p", "-"];
    args.extend(greedy);
    let from_stdin = json(kiln_stdin(&args, "Hello world"));
    let file = std::env::temp_dir().join(format!("kiln-prompt-{}.txt", std::process::id()));
    std::fs::write(&file, "Hello world").unwrap();
    let f = file.to_string_lossy().to_string();
    let mut args = vec!["text", "-m", &m, "--prompt-file", &f];
    args.extend(greedy);
    let from_file = json(kiln(&args));
    let mut args = vec!["text", "-m", &m, "-p", "Hello world"];
    args.extend(greedy);
    let from_flag = json(kiln(&args));
    assert_eq!(from_stdin["prompt_ids"], from_flag["prompt_ids"]);
    assert_eq!(from_file["ids"], from_flag["ids"]);
    // --quiet: only the generated text on stdout, nothing on stderr.
    let q = kiln(&[
        "text",
        "-m",
        &m,
        "-p",
        "Hello world",
        "-n",
        "6",
        "--temperature",
        "0",
        "-q",
    ]);
    assert!(q.status.success());
    assert_eq!(
        String::from_utf8_lossy(&q.stdout).trim_end_matches('\n'),
        from_flag["text"].as_str().unwrap()
    );
    assert!(
        q.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&q.stderr)
    );
    // Exit codes: usage 2, model 3, generation 4.
    let code = |args: &[&str]| kiln(args).status.code();
    assert_eq!(code(&["text", "--bogus-flag"]), Some(2));
    assert_eq!(code(&["text", "-m", &m]), Some(2), "no prompt");
    assert_eq!(
        code(&["text", "-m", &m, "-p", "x", "--top-p", "2"]),
        Some(2)
    );
    assert_eq!(
        code(&["text", "-m", "/nonexistent/model", "-p", "x"]),
        Some(3)
    );
    assert_eq!(
        code(&["text", "-m", &m, "--prompt-ids", "999999999", "-n", "2"]),
        Some(4),
        "a token id outside the vocabulary"
    );
}

/// Ctrl-C during `kiln text` stops at the next token and still prints the summary line (stop:
/// cancelled), exiting 0 with the text so far.
#[test]
fn interrupt_ends_text_generation_cleanly() {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["text", "-p", "And God said", "-n", "400", "--seed", "1"])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kiln");
    // Wait for the first streamed text, then interrupt.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    let n = stdout.read(&mut first).unwrap();
    assert!(n > 0, "no output before the interrupt");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(err.contains("stop: cancelled"), "{err}");
    let generated: usize = err
        .split(" generated tokens")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    assert!(generated < 400, "{generated} tokens: {err}");
}

/// Ctrl-C during `kiln image` finishes the current step, decodes the model's estimate at that
/// step and writes it (a partial image, noted), exiting 0.
#[test]
fn interrupt_writes_a_partial_image() {
    let out = std::env::temp_dir().join(format!("kiln-partial-{}.png", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "image",
            "--prompt",
            "a red circle",
            "--steps",
            "500",
            "--seed",
            "3",
        ])
        .arg("--out")
        .arg(&out)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kiln");
    // Past loading, into the denoising loop (500 steps take far longer than this).
    std::thread::sleep(std::time::Duration::from_secs(4));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let done = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{:?}: {err}", done.status);
    assert!(err.contains("of 500 steps"), "{err}");
    let png = std::fs::read(&out).expect("the partial image was written");
    let _ = std::fs::remove_file(&out);
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
}

/// `kiln info --model F` reports a file's tensor types and config from its headers, and exits 3
/// naming what Kiln cannot load.
#[test]
fn info_reports_types_and_whether_a_model_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ok = root.join("tests/fixtures/llm/llama-q-256/model-q4_k_m.gguf");
    let out = kiln(&["info", "--model", ok.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Q4_K") && text.contains("Q6_K") && text.contains("can load"),
        "{text}"
    );
    // A GGUF header listing an IQ2_XXS tensor (ggml type 16) beside an F32 one.
    let mut b = b"GGUF".to_vec();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(3u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    for (name, dim, ty, off) in [("a", 32u64, 0u32, 0u64), ("b", 256, 16, 128)] {
        s(&mut b, name);
        b.extend(1u32.to_le_bytes());
        b.extend(dim.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    let f = std::env::temp_dir().join(format!("kiln-info-{}.gguf", std::process::id()));
    std::fs::write(&f, &b).unwrap();
    let out = kiln(&["info", "--model", f.to_str().unwrap()]);
    let _ = std::fs::remove_file(&f);
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(3), "{text}{err}");
    assert!(text.contains("IQ2_XXS") && text.contains("no"), "{text}");
    assert!(err.contains("1 tensors of type IQ2_XXS"), "{err}");
}

/// A config whose context is 0 positions is refused at load, naming the key, by every command
/// that loads a text model (it used to panic in text, chat and serve while `info` said the
/// model could load).
#[test]
fn a_context_of_zero_is_refused_by_every_command() {
    let dir = std::env::temp_dir().join(format!("kiln-ctx0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = std::path::PathBuf::from(fixture("llama-gqa-f32"));
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    c["max_position_embeddings"] = serde_json::json!(0);
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let model = dir.to_str().unwrap();
    let runs = [
        kiln(&["text", "-m", model, "--prompt-ids", "1,2"]),
        kiln_stdin(&["chat", "-m", model], "hello\n"),
        kiln(&["serve", "-m", model, "--port", "0"]),
        kiln(&["info", "--model", model]),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    for (what, out) in ["text", "chat", "serve", "info"].iter().zip(runs) {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "kiln {what} succeeded:\n{all}");
        assert!(
            all.contains("max_position_embeddings")
                && all.contains("0 positions")
                && !all.contains("panicked"),
            "kiln {what}:\n{all}"
        );
    }
}

/// The long flags a help text lists (`--model`, ...), without `--help`/`--version`.
/// `kiln image --init-image --mask --strength`: inpainting from PNG files with an inpainting
/// U-Net equals diffusers' StableDiffusionInpaintPipeline; bad edits are errors naming the flag.
#[test]
fn image_inpaints_from_png_files_as_diffusers_does() {
    let d = format!("{}/../tests/fixtures/sd-edit", env!("CARGO_MANIFEST_DIR"));
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{d}/expected.json")).unwrap())
            .unwrap();
    let out = std::env::temp_dir().join("kiln-cli-inpaint.png");
    let (init, mask) = (format!("{d}/init.png"), format!("{d}/mask.png"));
    let model = format!("{d}/sd1-inpaint-tiny");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "image",
            "--model",
            &model,
            "--prompt",
            e["prompt"].as_str().unwrap(),
            "--negative-prompt",
            e["negative_prompt"].as_str().unwrap(),
            "--init-image",
            &init,
            "--latents",
            &format!("{d}/noise.npy"),
            "--steps",
            "4",
            "--scheduler",
            "ddim",
            "--guidance",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        kiln(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run(&["--mask", &mask, "--strength", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want =
        kiln::formats::npy::parse(&std::fs::read(format!("{d}/inpaint9_ddim_s1_g3.npy")).unwrap())
            .unwrap();
    let psnr = png_psnr(&out, &want.data, want.shape[1], want.shape[2]);
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
    for (extra, says) in [
        (vec!["--mask", &mask, "--strength", "2"], "strength"),
        (vec!["--mask", &init[..init.len() - 3]], "--mask"),
        (vec![], "needs an init image and a mask"),
    ] {
        let o = run(&extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
    }
}

/// `kiln image --lora FILE:SCALE` equals diffusers with the LoRA fused at that scale.
#[test]
fn image_with_a_lora_equals_diffusers() {
    let root = format!("{}/../tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let sd = format!("{root}/sd/sd1-tiny");
    let e: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/sd-lora/expected.json")).unwrap(),
    )
    .unwrap();
    let out = std::env::temp_dir().join("kiln-cli-lora.png");
    let o = kiln(&[
        "image",
        "--model",
        &sd,
        "--prompt",
        e["prompt"].as_str().unwrap(),
        "--negative-prompt",
        e["negative_prompt"].as_str().unwrap(),
        "--latents",
        &format!("{sd}/latents.npy"),
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--guidance",
        "3",
        "--lora",
        &format!("{root}/sd-lora/kohya.safetensors:0.7"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = kiln::formats::npy::parse(
        &std::fs::read(format!("{root}/sd-lora/kohya_s0.7.npy")).unwrap(),
    )
    .unwrap();
    let psnr = png_psnr(&out, &want.data, want.shape[1], want.shape[2]);
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
}

fn help_flags(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix('-')
                .filter(|r| !r.starts_with('-'))
                .map_or(l, |r| r.split_once(", ").map_or(l, |(_, rest)| rest));
            let flag = l.strip_prefix("--")?;
            let name: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty() && name != "help" && name != "version").then(|| format!("--{name}"))
        })
        .collect()
}

/// The README and the binary agree: the commands `kiln --help` lists are the ones in the README's
/// command list (and `kiln bench`'s benchmarks too), every flag of every command is documented,
/// and `--quantize` lists the same types everywhere.
#[test]
fn help_and_readme_agree() {
    let readme =
        std::fs::read_to_string(format!("{}/../README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let help = |args: &[&str]| {
        let out = kiln(args);
        assert!(out.status.success(), "kiln {args:?} --help failed");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let set = |v: Vec<String>| v.into_iter().collect::<std::collections::BTreeSet<_>>();
    // `kiln X ...` lines of the README's code blocks.
    let readme_cmds = |depth: usize, first: Option<&str>| {
        set(readme
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.first() == Some(&"kiln")
                    && w.len() > depth
                    && first.is_none_or(|f| w.get(1) == Some(&f))
                    && w[depth].chars().all(|c| c.is_ascii_lowercase()))
                .then(|| w[depth].to_string())
            })
            .collect())
    };
    let top = help(&["--help"]);
    let cmds = set(top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect());
    assert_eq!(
        cmds,
        readme_cmds(1, None),
        "kiln --help's commands vs the README's"
    );
    let bench = help(&["bench", "--help"]);
    let benches = set(bench
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- "))
        .filter_map(|l| l.split([':', ' ']).next().map(str::to_string))
        .collect());
    assert_eq!(
        benches,
        readme_cmds(2, Some("bench")),
        "kiln bench's benchmarks vs the README's"
    );
    // The flag's description: on its line (clap's compact help) or the next (the long form).
    let quantize = |h: &str| {
        let mut it = h
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("--quantize"));
        let (flag, next) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
        let line = if flag.contains(": ") { flag } else { next };
        line.split_once(": ")
            .map_or("", |(_, v)| v)
            .split(" [")
            .next()
            .unwrap_or("")
            .to_string()
    };
    for cmd in cmds.iter().map(String::as_str).chain(["bench"]) {
        let h = help(&[cmd, "--help"]);
        for flag in help_flags(&h) {
            assert!(
                readme.contains(&flag),
                "kiln {cmd} {flag} is not in the README"
            );
        }
        if h.contains("--quantize") {
            let q = quantize(&h);
            assert!(
                q.starts_with("none, q4, q8, q4_k or q6_k"),
                "kiln {cmd} --quantize lists {q:?}"
            );
            assert!(
                readme.contains("--quantize q4|q8|q4_k|q6_k"),
                "the README's --quantize"
            );
        }
    }
}

/// `kiln image` says how the denoising goes on stderr (plain lines when stderr is not a
/// terminal), and warns before any work when a size will be slow on a software adapter.
#[test]
fn image_progress_and_slow_size_note() {
    let out = std::env::temp_dir().join(format!("kiln-progress-{}.png", std::process::id()));
    let run = kiln(&[
        "image",
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&out);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    for want in [
        "denoising 3 steps",
        "step 1/3",
        "step 3/3",
        "decoding the image",
    ] {
        assert!(err.contains(want), "no '{want}' in:\n{err}");
    }
    assert!(
        !err.contains("software adapter"),
        "64x64 is not slow:\n{err}"
    );
    // 512x512 on lavapipe: the note comes first; the run is stopped once it has been read.
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "image", "--prompt", "x", "--width", "512", "--height", "512", "--out",
        ])
        .arg(std::env::temp_dir().join("kiln-slow-note.png"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run kiln");
    let mut seen = String::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        seen += &line;
        seen += "\n";
        if line.starts_with("note:") || line.contains("step 1/") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // Only a CPU adapter is slow at this size (on a GPU the note must not appear).
    let info = String::from_utf8_lossy(&kiln(&["info"]).stdout).to_string();
    let cpu = info
        .lines()
        .find(|l| l.starts_with("selected:"))
        .is_some_and(|l| l.contains(", Cpu)"));
    assert_eq!(
        seen.contains("note: 512x512 on a software adapter") && seen.contains("takes minutes"),
        cpu,
        "{info}\n{seen}"
    );
}

/// `kiln tokenize` gives transformers' ids for the fixture's tokenizer cases, from the folder and
/// from its GGUF (only the tokenizer is read); without `--no-bos` the model's BOS leads; the
/// default output is what `kiln text --prompt-ids` takes.
#[test]
fn tokenize_matches_transformers() {
    let e = expected();
    for model in [
        fixture("llama-gqa-f32"),
        fixture("llama-gqa-f32/model-f32.gguf"),
    ] {
        for case in e["tokenizer"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            if text.is_empty() || text.starts_with('-') {
                continue;
            }
            let out = kiln(&["tokenize", "-m", &model, "--no-bos", "--json", text]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["ids"], case["ids"], "{model}: {text:?}");
            let pieces: String = v["pieces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap())
                .collect();
            assert!(!pieces.is_empty(), "{text:?}");
        }
    }
    let out = kiln(&["tokenize", "-m", &fixture("llama-gqa-f32"), "Hello world"]);
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ids: Vec<u32> = line.split(',').map(|s| s.parse().unwrap()).collect();
    let want: Vec<u32> = serde_json::from_value(e["tokenizer"][0]["ids"].clone()).unwrap();
    let cfg = kiln_cfg_bos();
    assert_eq!(ids[ids.len() - want.len()..], want[..], "{line}");
    assert_eq!(
        ids.len() == want.len() + 1,
        cfg,
        "BOS as the model's prompts have it: {line}"
    );
}

/// Whether the fixture's tokenizer config adds BOS to prompts.
fn kiln_cfg_bos() -> bool {
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama-gqa-f32/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    c["add_bos_token"].as_bool().unwrap_or(false)
}
