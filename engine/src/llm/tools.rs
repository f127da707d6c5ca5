//! Tool calling: a request's `tools` reach the model through its own chat template (which
//! takes them as `tools`, as in transformers), or, for a template that has no place for them,
//! through a system message in the Hermes format; the reply is split into text and OpenAI
//! `tool_calls` in the format the template teaches the model; `tool_choice: "required"` or a
//! named function constrains the reply to a valid call (a grammar whose arguments are the
//! function's parameter schema).

use super::chat::bad;
use super::constrain::Grammar;
use crate::error::Result;
use serde_json::{json, Value};

/// How a model writes its tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call (Qwen
    /// 2.5/3, Hermes, SmolLM3; Kiln's fallback for templates without tools).
    Hermes,
    /// One JSON object `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`
    /// (Llama 3.1 and later).
    Llama3,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral).
    Mistral,
}

impl ToolFormat {
    /// The format a chat template teaches, and whether it renders `tools` in a format Kiln
    /// parses (otherwise Kiln's fallback, the Hermes format in the system message, applies).
    pub fn of_template(t: &str) -> (ToolFormat, bool) {
        let found = if t.contains("[TOOL_CALLS]") {
            Some(ToolFormat::Mistral)
        } else if t.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if t.contains("\"parameters\"") || t.contains("ipython") {
            Some(ToolFormat::Llama3)
        } else {
            None
        };
        (
            found.unwrap_or(ToolFormat::Hermes),
            found.is_some() && t.contains("tools"),
        )
    }

    /// Where a reply's calls begin: the marker (Hermes, Mistral), or `{` at the start of the
    /// reply (Llama 3).
    fn start(&self) -> &'static str {
        match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Llama3 => "{",
            ToolFormat::Mistral => "[TOOL_CALLS]",
        }
    }

    /// Bytes of `text` (the reply so far) that are plain content for sure: up to where a call
    /// begins, less a trailing part that may still become the start of one. Streaming sends
    /// only these.
    pub fn content_len(&self, text: &str) -> usize {
        if *self == ToolFormat::Llama3 {
            let t = text.trim_start();
            let lead = text.len() - t.len();
            return match t.strip_prefix("<|python_tag|>").unwrap_or(t).chars().next() {
                None => lead, // only blanks so far
                Some('{') => lead,
                Some(_) if "<|python_tag|>".starts_with(t) => lead,
                Some(_) => text.len(),
            };
        }
        let m = self.start();
        if let Some(i) = text.find(m) {
            return i;
        }
        // The longest suffix that is a prefix of the marker is held back.
        (1..m.len().min(text.len()) + 1)
            .rev()
            .find(|&n| {
                text.is_char_boundary(text.len() - n) && m.starts_with(&text[text.len() - n..])
            })
            .map_or(text.len(), |n| text.len() - n)
    }

    /// Splits a finished reply into its text and the calls it makes (name, arguments as a
    /// JSON object); a reply whose calls do not parse is all text.
    pub fn parse(&self, text: &str) -> (String, Vec<(String, Value)>) {
        let at = self.content_len(text).min(text.len());
        let (content, rest) = text.split_at(at);
        let calls = match self {
            ToolFormat::Hermes => {
                let mut calls = Vec::new();
                let mut r = rest;
                while let Some(s) = r.find("<tool_call>") {
                    let body = &r[s + "<tool_call>".len()..];
                    let end = body.find("</tool_call>");
                    match call_of(body[..end.unwrap_or(body.len())].trim()) {
                        Some(c) => calls.push(c),
                        // A last call cut short (the token limit) after whole ones is dropped.
                        None if end.is_none() && !calls.is_empty() => break,
                        None => return (text.to_string(), Vec::new()),
                    }
                    let Some(end) = end else { break };
                    r = &body[end + "</tool_call>".len()..];
                }
                calls
            }
            ToolFormat::Llama3 => {
                let t = rest.trim_start();
                let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim();
                // One call, or several separated by ';' as some Llama replies do.
                let mut calls = Vec::new();
                for part in serde_json::Deserializer::from_str(t).into_iter::<Value>() {
                    match part.ok().and_then(|v| call_from(&v)) {
                        Some(c) => calls.push(c),
                        None => return (text.to_string(), Vec::new()),
                    }
                }
                calls
            }
            ToolFormat::Mistral => {
                let t = rest
                    .trim_start()
                    .strip_prefix("[TOOL_CALLS]")
                    .unwrap_or(rest)
                    .trim();
                match serde_json::from_str::<Value>(t) {
                    Ok(Value::Array(a)) => {
                        let c: Option<Vec<_>> = a.iter().map(call_from).collect();
                        match c {
                            Some(c) => c,
                            None => return (text.to_string(), Vec::new()),
                        }
                    }
                    _ => return (text.to_string(), Vec::new()),
                }
            }
        };
        if calls.is_empty() {
            return (text.to_string(), calls);
        }
        (content.trim_end().to_string(), calls)
    }

    /// A grammar (Lark, llguidance's dialect) whose every output is a call of one of `tools`
    /// (several when `parallel`), its arguments valid under the function's parameter schema.
    pub fn grammar(&self, tools: &[Value], parallel: bool) -> Grammar {
        let key = if *self == ToolFormat::Llama3 {
            "parameters"
        } else {
            "arguments"
        };
        let schemas: Vec<Value> = tools
            .iter()
            .map(|t| {
                let f = &t["function"];
                let params = f
                    .get("parameters")
                    .cloned()
                    .unwrap_or(json!({"type": "object"}));
                json!({"type": "object", "properties": {"name": {"const": f["name"]}, key: params},
                       "required": ["name", key], "additionalProperties": false})
            })
            .collect();
        let call = json!({"anyOf": schemas, "x-guidance": {"whitespace_flexible": false}});
        let call = format!("%json {call}");
        let grammar = match (self, parallel) {
            (ToolFormat::Hermes, false) => {
                format!("start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: {call}")
            }
            (ToolFormat::Hermes, true) => {
                format!("start: item (\"\\n\" item)*\nitem: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: {call}")
            }
            (ToolFormat::Llama3, _) => format!("start: call\ncall: {call}"),
            (ToolFormat::Mistral, false) => {
                format!("start: \"[TOOL_CALLS][\" call \"]\"\ncall: {call}")
            }
            (ToolFormat::Mistral, true) => {
                format!("start: \"[TOOL_CALLS][\" call (\", \" call)* \"]\"\ncall: {call}")
            }
        };
        Grammar::Lark { grammar }
    }
}

fn call_of(s: &str) -> Option<(String, Value)> {
    serde_json::from_str::<Value>(s)
        .ok()
        .and_then(|v| call_from(&v))
}

/// `{"name": ..., "arguments" or "parameters": {...}}` as (name, arguments); the arguments may
/// also come as a JSON string.
fn call_from(v: &Value) -> Option<(String, Value)> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or(json!({}));
    let args = match args {
        Value::String(s) => serde_json::from_str(&s).ok()?,
        a => a,
    };
    args.is_object().then_some((name, args))
}

/// The request's `tools`, checked: `[{"type": "function", "function": {"name", "description"?,
/// "parameters"?}}]`.
pub fn check_tools(tools: &[Value]) -> Result<()> {
    for (i, t) in tools.iter().enumerate() {
        let f = &t["function"];
        if t["type"] != "function" || !f["name"].is_string() {
            return Err(bad(
                "tools",
                format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\", \"parameters\"}}}}"),
            ));
        }
        if !(f["parameters"].is_null() || f["parameters"].is_object()) {
            return Err(bad(
                "tools",
                format!("tools[{i}].function.parameters must be a JSON schema object"),
            ));
        }
    }
    Ok(())
}

/// What `tool_choice` asks: `None` for "none", else the tools the reply must call (all of
/// them for "required", one for a named function) and whether it must call one at all.
pub fn choice(tools: &[Value], tool_choice: Option<&Value>) -> Result<Option<(Vec<Value>, bool)>> {
    match tool_choice {
        None | Some(Value::Null) => Ok(Some((tools.to_vec(), false))),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(None),
            "auto" => Ok(Some((tools.to_vec(), false))),
            "required" => Ok(Some((tools.to_vec(), true))),
            other => Err(bad("tool_choice", format!("'{other}' (none, auto, required, or {{\"type\": \"function\", \"function\": {{\"name\"}}}})"))),
        },
        Some(v) => {
            let name = v.pointer("/function/name").and_then(|n| n.as_str()).ok_or_else(|| {
                bad("tool_choice", "expected {\"type\": \"function\", \"function\": {\"name\": ...}}")
            })?;
            let t = tools
                .iter()
                .find(|t| t["function"]["name"] == name)
                .ok_or_else(|| bad("tool_choice", format!("no tool named '{name}' in tools")))?;
            Ok(Some((vec![t.clone()], true)))
        }
    }
}

/// The system message that tells a model whose template has no place for tools how to call
/// them (the Hermes format Kiln then parses).
pub fn fallback_system(tools: &[Value]) -> String {
    let list: Vec<String> = tools.iter().map(|t| t["function"].to_string()).collect();
    format!(
        "Tools:\n<tools>\n{}\n</tools>\nTo call one, reply:\n<tool_call>\n{{\"name\": ..., \"arguments\": {{...}}}}\n</tool_call>",
        list.join("\n")
    )
}
