//! The chat-completion core (`llm/chat.rs`) on the transformers fixtures: `top_logprobs` against
//! the full softmax of the model's logits and transformers' log-probabilities, KV-cache reuse
//! (turn 5 of a conversation prefills only its own tokens, and greedy output is the same without
//! reuse), prompts without a double BOS, request parsing, context policies and stop reasons.

use kiln::kernels::sample::SamplerSettings;
use kiln::llm::chat::{chat_ids, fit_conversation, Overflow};
use kiln::llm::{
    ChatRequest, CompletionRequest, GenerateOptions, LoadOptions, Message, Prepared, TextModel,
};
use serde_json::Value;
use std::path::PathBuf;

fn dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/llm")
        .join(case)
}

fn load(case: &str, ctx: usize, keep_logits: bool) -> TextModel {
    let files = kiln::llm::generate::read_model_path(&dir(case)).unwrap();
    let opts = LoadOptions {
        ctx,
        keep_logits,
        ..Default::default()
    };
    pollster::block_on(TextModel::load(
        &kiln_tests::gpu(),
        files,
        &opts,
        &mut |_, _| {},
    ))
    .unwrap_or_else(|e| panic!("{case}: {e}"))
}

fn chat(model: &mut TextModel, body: &str) -> kiln::Result<Value> {
    let req = ChatRequest::from_json(body)?;
    let p = Prepared::chat(model, &req, "test")?;
    pollster::block_on(p.run(model, &mut |_| true))
}

/// Log-softmax in f64, and the ids by descending logit (lower index first on ties).
fn full_softmax(logits: &[f32]) -> (Vec<f64>, Vec<usize>) {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    let lp: Vec<f64> = logits.iter().map(|&x| x as f64 - m - z.ln()).collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    (lp, order)
}

#[test]
fn top_logprobs_equal_the_full_softmax() {
    let case = "llama-gqa-f32";
    let e = kiln_tests::read_json(&dir(case).join("expected.json"));
    let want_lp = e["runs"][0]["logprobs"].as_array().unwrap().clone();
    let mut m = load(case, 128, true);
    let mut ids = kiln_tests::json_ids(&e["prompt_ids"]);
    let opts = GenerateOptions {
        max_tokens: 1,
        sampler: SamplerSettings {
            top_logprobs: 20,
            ..SamplerSettings::greedy()
        },
        seed: 0,
        stop: vec![],
        pipelined: true,
        grammar: None,
        logit_bias: vec![],
    };
    let mut worst = 0f64;
    for (step, tf) in want_lp.iter().take(6).enumerate() {
        // One token per call: each call runs only the new id (the cache is reused; a tail that
        // short goes through the one-token graph) and keeps the logits of the last position.
        let g = pollster::block_on(m.generate(&ids, &opts, &mut |_| true)).unwrap();
        assert_eq!(g.reused, if step == 0 { 0 } else { ids.len() - 1 });
        let ran = if ids.len() - g.reused <= m.tail_via_decode() {
            &m.decode
        } else {
            &m.prefill
        };
        let logits = pollster::block_on(ran.plan.read_f32(ran.logits.unwrap())).unwrap();
        let (lp, order) = full_softmax(&logits);
        let top = &g.top_logprobs[0];
        assert_eq!(top.len(), 20);
        for (r, &(id, got)) in top.iter().enumerate() {
            assert_eq!(id as usize, order[r], "step {step}: rank {r}");
            let err = (got as f64 - lp[id as usize]).abs();
            worst = worst.max(err);
            assert!(
                err <= 2e-3,
                "step {step} rank {r}: {got} vs {}",
                lp[id as usize]
            );
        }
        // The chosen (greedy) id is rank 0, with transformers' log-probability.
        assert_eq!(top[0], (g.ids[0], g.logprobs[0]));
        let tf = tf.as_f64().unwrap();
        assert!(
            (g.logprobs[0] as f64 - tf).abs() <= 2e-3,
            "step {step}: vs transformers {tf}"
        );
        ids.push(g.ids[0]);
    }
    eprintln!("top_logprobs: largest error against the f64 softmax {worst:.2e}");
}

/// A five-turn conversation with and without reuse: the same greedy replies, and each later turn
/// prefills only what the conversation added.
#[test]
fn multi_turn_reuses_the_cache_with_identical_output() {
    let questions = [
        "Hello!",
        "What is your name?",
        "Tell me about the sea.",
        "And the sky?",
        "Thank you, goodbye.",
    ];
    let mut with = load("llama-gqa-f32", 256, false);
    let mut without = load("llama-gqa-f32", 256, false);
    let mut messages = vec![serde_json::json!({"role": "system", "content": "Be brief."})];
    let mut prev_prompt = 0;
    for (turn, q) in questions.iter().enumerate() {
        messages.push(serde_json::json!({"role": "user", "content": q}));
        let body = serde_json::json!({"messages": messages, "temperature": 0, "max_tokens": 8})
            .to_string();
        let a = chat(&mut with, &body).unwrap();
        without.reset_cache();
        let b = chat(&mut without, &body).unwrap();
        assert_eq!(a["kiln"]["ids"], b["kiln"]["ids"], "turn {}", turn + 1);
        assert_eq!(b["kiln"]["reused_tokens"], 0);
        let prompt = a["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
        let reused = a["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap() as usize;
        eprintln!(
            "turn {}: prompt {prompt} tokens, {reused} reused, {} prefilled; ttft {:.1} ms with reuse, {:.1} ms without",
            turn + 1,
            prompt - reused,
            a["kiln"]["timings"]["ttft_ms"].as_f64().unwrap(),
            b["kiln"]["timings"]["ttft_ms"].as_f64().unwrap()
        );
        if turn > 0 {
            // Everything up to the previous prompt (and the part of the reply the template
            // renders as it was generated) is in the cache.
            assert!(
                reused >= prev_prompt,
                "turn {}: {reused} < {prev_prompt}",
                turn + 1
            );
        }
        prev_prompt = prompt;
        let reply = a["choices"][0]["message"]["content"].as_str().unwrap();
        messages.push(serde_json::json!({"role": "assistant", "content": reply}));
    }
}

#[test]
fn chat_prompts_have_one_bos() {
    for case in [
        "llama-gqa-f32",
        "llama3-rope-f16",
        "qwen2-f32",
        "llama-mqa-tied-bf16",
    ] {
        let m = load(case, 64, false);
        let tok = &m.tokenizer;
        let msgs = [Message::new("user", "Hi")];
        let ids = chat_ids(tok, &msgs, None).unwrap();
        let rendered = tok.render_chat(&[("user".into(), "Hi".into())]).unwrap();
        let plain = tok.encode(&rendered).unwrap();
        match tok.bos.filter(|_| tok.add_bos) {
            Some(bos) => {
                assert_eq!(ids[0], bos, "{case}");
                assert_ne!(ids.get(1), Some(&bos), "{case}: double BOS");
                let want: Vec<u32> = if plain.first() == Some(&bos) {
                    plain
                } else {
                    std::iter::once(bos).chain(plain).collect()
                };
                assert_eq!(ids, want, "{case}");
            }
            None => assert_eq!(ids, plain, "{case}"),
        }
    }
}

#[test]
fn requests_that_mean_nothing_are_errors() {
    let mut m = load("llama-gqa-f32", 64, false);
    let msgs = r#""messages": [{"role": "user", "content": "Hi"}]"#;
    for (body, want) in [
        (
            format!("{{{msgs}, \"temprature\": 0}}"),
            "unknown field 'temprature'",
        ),
        (format!("{{{msgs}, \"n\": 2}}"), "n other than 1"),
        (
            format!("{{{msgs}, \"top_logprobs\": 3}}"),
            "needs \"logprobs\": true",
        ),
        (
            format!("{{{msgs}, \"logprobs\": true, \"top_logprobs\": 21}}"),
            "top_logprobs 21",
        ),
        (
            format!("{{{msgs}, \"frequency_penalty\": 0.5}}"),
            "repeat_penalty",
        ),
        (
            format!("{{{msgs}, \"stop\": [\"a\",\"b\",\"c\",\"d\",\"e\"]}}"),
            "at most 4",
        ),
        (format!("{{{msgs}, \"temperature\": -1}}"), "temperature"),
        (format!("{{{msgs}, \"max_tokens\": 0}}"), "max_tokens"),
        (r#"{"messages": []}"#.to_string(), "at least one message"),
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#.to_string(),
            "image_url",
        ),
        ("[1]".to_string(), "JSON object"),
    ] {
        let e = chat(&mut m, &body).unwrap_err().to_string();
        assert!(e.contains(want), "{body}: {e}");
    }
    // Text parts and OpenAI's nulls are accepted.
    let ok = chat(
        &mut m,
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "stop": null, "seed": null, "max_tokens": 2}"#,
    )
    .unwrap();
    assert_eq!(ok["usage"]["completion_tokens"], 2);
    let e = CompletionRequest::from_json(r#"{"prompt": "x", "echo": true}"#)
        .map(|r| Prepared::completion(&m, &r, "t").map(|_| ()));
    assert!(e.unwrap().unwrap_err().to_string().contains("echo"));
}

#[test]
fn long_conversations_are_refused_or_trimmed_as_asked() {
    let m = load("llama-gqa-f32", 64, false);
    let tok = &m.tokenizer;
    let mut msgs = vec![Message::new("system", "Be brief.")];
    for i in 0..12 {
        msgs.push(Message::new(
            "user",
            &format!("Question number {i} about the sea?"),
        ));
        msgs.push(Message::new("assistant", "The sea is wide and deep."));
    }
    msgs.push(Message::new("user", "Last one?"));
    let e = fit_conversation(tok, &msgs, None, 64, 8, Overflow::Error).unwrap_err();
    assert!(e.to_string().contains("the context holds 64"), "{e}");
    assert!(e.to_string().contains("drop_oldest"), "{e}");
    let (ids, dropped) = fit_conversation(tok, &msgs, None, 64, 8, Overflow::DropOldest).unwrap();
    assert!(ids.len() + 8 <= 64, "{} tokens", ids.len());
    assert!(dropped > 0 && dropped < msgs.len() - 1);
    // The system message and the last message survive.
    let kept: Vec<Message> = msgs[..1]
        .iter()
        .chain(&msgs[1 + dropped..])
        .cloned()
        .collect();
    assert_eq!(chat_ids(tok, &kept, None).unwrap(), ids);
    // One message that cannot fit even alone is an error under either policy.
    let huge = vec![Message::new("user", &"sea ".repeat(200))];
    assert!(fit_conversation(tok, &huge, None, 64, 8, Overflow::DropOldest).is_err());
}

#[test]
fn finish_reasons_and_stop_strings() {
    let mut m = load("llama-gqa-f32", 256, false);
    let base = r#""messages": [{"role": "user", "content": "Hi"}], "temperature": 0"#;
    let full = chat(&mut m, &format!("{{{base}, \"max_tokens\": 6}}")).unwrap();
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // A stop string taken from the greedy text cuts the reply before it.
    let cut = text.char_indices().nth(2).map(|(i, _)| i).unwrap_or(0);
    let stop = &text[cut..];
    if !stop.trim().is_empty() {
        let s = chat(
            &mut m,
            &format!(
                "{{{base}, \"max_tokens\": 6, \"stop\": {}}}",
                serde_json::json!(stop)
            ),
        )
        .unwrap();
        assert_eq!(s["choices"][0]["finish_reason"], "stop");
        assert!(text.starts_with(s["choices"][0]["message"]["content"].as_str().unwrap()));
    }
    // A streaming request that the caller stops ends as "cancelled".
    let req = ChatRequest::from_json(&format!("{{{base}, \"max_tokens\": 6, \"stream\": true}}"))
        .unwrap();
    let p = Prepared::chat(&m, &req, "t").unwrap();
    let mut n = 0;
    let r = pollster::block_on(p.run(&mut m, &mut |_| {
        n += 1;
        n < 3
    }))
    .unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "cancelled");
}

/// A constraint in the chat core, on the random-weight fixture (whose unconstrained replies
/// are noise): the reply is valid under the schema (checked here by hand; Ajv checks 200 runs
/// in web/tests/structured.test.mjs), every drawn id is one the model's tokenizer spells as
/// part of it, top_logprobs still come from the raw logits, a stop string cuts the reply, a
/// second request sharing the prompt reuses its cache and equals a fresh run, and a Lark
/// grammar's reply matches it.
#[test]
fn constrained_replies_follow_their_grammar() {
    let mut m = load("llama-gqa-f32", 256, false);
    let schema = r#"{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
        "w": {"enum": ["yes", "no"]}}, "required": ["n", "w"], "additionalProperties": false}"#;
    let body = |seed: u32, extra: &str| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "json please"}}], "max_tokens": 120, "seed": {seed},
               "response_format": {{"type": "json_schema", "json_schema": {{"name": "t", "schema": {schema}}}}},
               "logprobs": true, "top_logprobs": 3{extra}}}"#
        )
    };
    for seed in 0..8 {
        let r = chat(&mut m, &body(seed, "")).unwrap();
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let n = v["n"].as_i64().unwrap_or_else(|| panic!("n: {text}"));
        assert!((0..=9).contains(&n), "{text}");
        assert!(v["w"] == "yes" || v["w"] == "no", "{text}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        // Alternatives are the model's own most likely ids, allowed or not.
        let lp = &r["choices"][0]["logprobs"]["content"][0];
        assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), 3);
        assert!(lp["top_logprobs"][0]["logprob"].as_f64() >= lp["logprob"].as_f64());
    }
    // Reuse: the same request again reuses the cached prompt and gives the same reply as from
    // an empty cache.
    let a = chat(&mut m, &body(3, "")).unwrap();
    let b = chat(&mut m, &body(3, "")).unwrap();
    assert!(b["kiln"]["reused_tokens"].as_u64().unwrap() > 0);
    m.reset_cache();
    let c = chat(&mut m, &body(3, "")).unwrap();
    assert_eq!(a["kiln"]["ids"], b["kiln"]["ids"]);
    assert_eq!(a["kiln"]["ids"], c["kiln"]["ids"]);
    // A stop string inside the constrained text cuts it there.
    let s = chat(&mut m, &body(3, r#", "stop": ["\"w\""]"#)).unwrap();
    let cut = s["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        !cut.contains("\"w\"")
            && a["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .starts_with(cut)
    );
    assert_eq!(s["choices"][0]["finish_reason"], "stop");
    // Cancelling a constrained stream after two pieces ends it there.
    let req = ChatRequest::from_json(&body(3, r#", "stream": true"#)).unwrap();
    let p = Prepared::chat(&m, &req, "test").unwrap();
    let mut pieces = 0;
    let r = pollster::block_on(p.run(&mut m, &mut |c| {
        pieces += c["choices"][0]["delta"]["content"].is_string() as usize;
        pieces < 3
    }))
    .unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "cancelled");
    assert!(
        r["kiln"]["ids"].as_array().unwrap().len() < a["kiln"]["ids"].as_array().unwrap().len()
    );
    // A Lark grammar.
    for seed in 0..4 {
        let r = chat(
            &mut m,
            &format!(
                r#"{{"messages": [{{"role": "user", "content": "?"}}], "max_tokens": 60, "seed": {seed},
                   "grammar": "start: \"id-\" /[0-9]{{3}}/ (\",\" /[a-c]/)*\n"}}"#
            ),
        )
        .unwrap();
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        let rest = text
            .strip_prefix("id-")
            .unwrap_or_else(|| panic!("{text:?}"));
        assert!(
            rest.len() >= 3 && rest[..3].bytes().all(|b| b.is_ascii_digit()),
            "{text:?}"
        );
        assert!(
            rest[3..]
                .split(',')
                .skip(1)
                .all(|p| ["a", "b", "c"].contains(&p)),
            "{text:?}"
        );
    }
}

/// Constraints a request cannot have are refused before any work, naming the field.
#[test]
fn bad_constraints_are_refused() {
    let mut m = load("llama-gqa-f32", 256, false);
    for (extra, want) in [
        (r#""response_format": {"type": "yaml"}"#, "response_format"),
        (
            r#""response_format": {"type": "json_schema"}"#,
            "json_schema.schema",
        ),
        (
            r#""json_schema": {"type": "object"}, "grammar": "start: \"a\"""#,
            "grammar",
        ),
        (r#""grammar": "start: (""#, "grammar"),
        (r#""logit_bias": {"7": 101}"#, "logit_bias"),
        (r#""logit_bias": {"x": 1}"#, "logit_bias"),
        (r#""logit_bias": {"800": 1}"#, "logit_bias"),
    ] {
        let body = format!(r#"{{"messages": [{{"role": "user", "content": "x"}}], {extra}}}"#);
        let e = chat(&mut m, &body).expect_err(extra).to_string();
        assert!(e.contains(want), "{extra}: {e}");
    }
}

/// Tool-using chat templates of published checkpoints (Qwen3, Llama 3.1, Mistral Nemo, Hermes 3,
/// from llama.cpp's models/templates) render a request's `tools`, an assistant's `tool_calls`
/// (arguments sent as JSON strings, as OpenAI clients send them) and `tool` results exactly as
/// transformers renders them (tests/fixtures/tools, tools/make_tool_template_fixtures.py).
#[test]
fn tool_templates_render_as_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tools");
    let e = kiln_tests::read_json(&root.join("expected.json"));
    let mut checked = 0;
    for (name, t) in e["templates"].as_object().unwrap() {
        let tpl = std::fs::read_to_string(root.join(t["file"].as_str().unwrap())).unwrap();
        for (conv, want) in t["rendered"].as_object().unwrap() {
            let c = &e["conversations"][conv];
            let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
            let msgs: Vec<Value> = msgs.iter().map(|m| m.to_template().unwrap()).collect();
            let tools = (!c["tools"].is_null()).then_some(&c["tools"]);
            let got = kiln::tokenizer::render_template(
                &tpl,
                &msgs,
                tools,
                t["bos_token"].as_str().unwrap(),
                t["eos_token"].as_str().unwrap(),
            )
            .unwrap_or_else(|e| panic!("{name} {conv}: {e}"));
            assert_eq!(got, want.as_str().unwrap(), "{name} {conv}");
            checked += 1;
        }
    }
    assert_eq!(checked, 11);
}

/// Each template's own rendering of an assistant tool call (from transformers, above) parses
/// back into the call: the format Kiln reads from the template is the one it teaches.
#[test]
fn tool_calls_parse_back_from_each_template() {
    use kiln::llm::tools::ToolFormat;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tools");
    let e = kiln_tests::read_json(&root.join("expected.json"));
    let want = vec![(
        "get_weather".to_string(),
        serde_json::json!({"city": "Paris", "unit": "celsius"}),
    )];
    for (name, t) in e["templates"].as_object().unwrap() {
        let tpl = std::fs::read_to_string(root.join(t["file"].as_str().unwrap())).unwrap();
        let (format, renders) = ToolFormat::of_template(&tpl);
        assert!(renders, "{name}: its template renders tools");
        let rendered = t["rendered"]["tool_result"].as_str().unwrap();
        // The assistant turn: from the call's start to the end of its turn.
        let (start, end) = match format {
            ToolFormat::Hermes => ("<tool_call>", "</tool_call>"),
            ToolFormat::Llama3 => ("{\"name\"", "<|eot_id|>"),
            ToolFormat::Mistral => ("[TOOL_CALLS]", "</s>"),
        };
        let user = rendered.rfind("Paris?").unwrap();
        let at = user
            + rendered[user..]
                .find(start)
                .unwrap_or_else(|| panic!("{name}: no call in {rendered}"));
        let len = rendered[at..].find(end).unwrap()
            + if format == ToolFormat::Hermes {
                end.len()
            } else {
                0
            };
        let turn = &rendered[at..at + len];
        // Text may come before a marked call; a Llama 3 call is the whole reply.
        let before = if format == ToolFormat::Llama3 {
            ""
        } else {
            "Let me check."
        };
        let text = format!("{before}\n{turn}");
        let (content, calls) = format.parse(&text);
        assert_eq!(calls, want, "{name} ({format:?}): {turn}");
        assert_eq!(content, before, "{name}");
        // Streaming shows the text before the call and holds the call back.
        assert_eq!(text[..format.content_len(&text)].trim(), before, "{name}");
    }
    // Replies that are not calls stay text.
    for f in [ToolFormat::Hermes, ToolFormat::Llama3, ToolFormat::Mistral] {
        let (content, calls) = f.parse("It is sunny in Paris.");
        assert!(
            calls.is_empty() && content == "It is sunny in Paris.",
            "{f:?}"
        );
        let (_, calls) = f.parse("<tool_call>\n{\"name\": broken\n</tool_call>");
        assert!(calls.is_empty(), "{f:?}: a broken call is no call");
    }
}

/// Tool calls in the chat core on a random-weight fixture (its template has no tools: they go
/// into the system message, in the Hermes format): `"required"` and a named function give a
/// valid call whose arguments match the tool's schema, `"none"` gives text, a tool result in
/// the history is accepted, and a stream carries the call as a tool_calls delta.
#[test]
fn tool_calls_in_the_chat_core() {
    let mut m = load("llama3-rope-f16", 512, false);
    let tools = r#"[{"type": "function", "function": {"name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "shout", "parameters": {"type": "object",
        "properties": {"word": {"enum": ["hi", "yo"]}}, "required": ["word"], "additionalProperties": false}}}]"#;
    let ask = |choice: &str, seed: u32, extra: &str| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "add 2 and 3"}}], "tools": {tools}, "tool_choice": {choice},
               "max_tokens": 60, "seed": {seed}{extra}}}"#
        )
    };
    for seed in 0..6 {
        // (Allowed several calls, a random-weight model goes on calling to the token limit.)
        let r = chat(
            &mut m,
            &ask(r#""required""#, seed, r#", "parallel_tool_calls": false"#),
        )
        .unwrap();
        let c = &r["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{r}");
        let call = &c["message"]["tool_calls"][0];
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        match call["function"]["name"].as_str().unwrap() {
            "add" => assert!(
                args["a"].as_i64().is_some_and(|a| (0..=99).contains(&a)) && args["b"].is_i64(),
                "{args}"
            ),
            "shout" => assert!(args["word"] == "hi" || args["word"] == "yo", "{args}"),
            other => panic!("unknown tool {other}"),
        }
        assert_eq!(call["id"].as_str().unwrap().len(), 9);
        assert_eq!(call["type"], "function");
    }
    let named = chat(
        &mut m,
        &ask(
            r#"{"type": "function", "function": {"name": "shout"}}"#,
            1,
            r#", "parallel_tool_calls": false"#,
        ),
    )
    .unwrap();
    let calls = named["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    assert!(
        calls.len() == 1 && calls[0]["function"]["name"] == "shout",
        "{named}"
    );
    let none = chat(&mut m, &ask(r#""none""#, 1, "")).unwrap();
    assert!(none["choices"][0]["message"]["tool_calls"].is_null());
    // A tool result in the history.
    let history = format!(
        r#"{{"messages": [{{"role": "user", "content": "add 2 and 3"}},
            {{"role": "assistant", "content": null, "tool_calls": [{{"id": "abc123def", "type": "function", "function": {{"name": "add", "arguments": "{{\"a\": 2, \"b\": 3}}"}}}}]}},
            {{"role": "tool", "tool_call_id": "abc123def", "content": "5"}}], "tools": {tools}, "max_tokens": 8, "seed": 1}}"#
    );
    let r = chat(&mut m, &history).unwrap();
    // This template has no place for tools: the call became the assistant's text and the
    // result a user turn, in the format the fallback teaches.
    let ids: Vec<u32> = serde_json::from_value(r["kiln"]["prompt_ids"].clone()).unwrap();
    let prompt = m.tokenizer.decode(&ids).unwrap();
    assert!(
        prompt.contains(
            "<tool_call>\n{\"name\":\"add\",\"arguments\":{\"a\":2,\"b\":3}}\n</tool_call>"
        ) && prompt.contains("user\n<tool_response>\n5\n</tool_response>"),
        "{prompt}"
    );
    // Streaming: the call arrives as one tool_calls delta, then finish_reason tool_calls.
    let req = ChatRequest::from_json(&ask(
        r#""required""#,
        2,
        r#", "stream": true, "parallel_tool_calls": false"#,
    ))
    .unwrap();
    let p = Prepared::chat(&m, &req, "test").unwrap();
    let mut chunks = Vec::new();
    pollster::block_on(p.run(&mut m, &mut |c| {
        if !c.is_null() {
            chunks.push(c);
        }
        true
    }))
    .unwrap();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["delta"]["tool_calls"].is_null())
        .collect();
    assert_eq!(deltas.len(), 1, "{chunks:?}");
    assert_eq!(
        deltas[0]["choices"][0]["delta"]["tool_calls"][0]["index"],
        0
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.contains("<tool_call>"), "held back: {text:?}");
    // Refusals.
    for (body, want) in [
        (ask(r#""sometimes""#, 0, ""), "tool_choice"),
        (
            ask(
                r#"{"type": "function", "function": {"name": "nope"}}"#,
                0,
                "",
            ),
            "nope",
        ),
        (
            ask(
                r#""required""#,
                0,
                r#", "response_format": {"type": "json_object"}"#,
            ),
            "tool_choice",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}"#
                .to_string(),
            "no tools",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#
                .to_string(),
            "tools[0]",
        ),
    ] {
        let e = chat(&mut m, &body).expect_err(&body).to_string();
        assert!(e.contains(want), "{body}: {e}");
    }
}

/// The built-in Gemma 4 template (for files without one): `<|turn>role ... <turn|>` turns with
/// the system message a turn of its own, the assistant as "model", and the model's turn opened.
#[test]
fn builtin_gemma4_template_renders_its_turns() {
    let msgs: Vec<(String, String)> = [
        ("system", "Be brief."),
        ("user", " Hi "),
        ("assistant", "Hello."),
        ("user", "Bye"),
    ]
    .iter()
    .map(|(r, c)| (r.to_string(), c.to_string()))
    .collect();
    let tpl = kiln::tokenizer::chat_template_named("gemma4");
    let out = kiln::tokenizer::render_chat_template(tpl, &msgs, "<bos>", "<eos>").unwrap();
    assert_eq!(
        out,
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n"
    );
}
