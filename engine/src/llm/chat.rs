//! The chat-completion core every front end uses (`kiln chat`, `kiln serve`, the npm package's
//! `chat.completions.create` and `completions.create`): OpenAI-shaped requests in, OpenAI-shaped
//! responses and stream chunks out, with Kiln's defaults for what a request leaves out.
//!
//! - Messages go through the model's chat template and are encoded without adding special
//!   tokens; BOS is prepended only when the model wants one and the template did not write it
//!   (no double BOS).
//! - The keys and values of the longest common token prefix with the previous request on the
//!   same model are reused ([`TextModel::generate_with`]), so turn n of a conversation prefills
//!   only its own tokens.
//! - A prompt that does not fit the context is an error, or (`context_overflow: "drop_oldest"`)
//!   the oldest messages after the leading system messages are dropped until the prompt and
//!   `max_tokens` fit (the last message is always kept).
//! - `finish_reason` is `stop` (end of sequence or a stop string), `length` (`max_tokens`), or
//!   Kiln's own `contextfull` and `cancelled`.
//! - Every response carries a `kiln` object (prompt and generated ids, seed, Kiln's stop reason,
//!   timings) beside the OpenAI fields.

use super::constrain::Grammar;
use super::generate::{GenerateOptions, Generation, StopReason, TextModel};
use super::options::{random_seed, TextOptions};
use super::tools::{check_tools, choice as tool_choice, fallback_system, ToolFormat};
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// A data error naming the request field (or file) that is wrong.
pub(crate) fn bad(name: &str, msg: impl Into<String>) -> Error {
    Error::Data {
        name: name.into(),
        msg: msg.into(),
    }
}

/// One chat message (`content` a string or a list of `{"type": "text", "text": ...}` parts;
/// `null` or absent in an assistant message that only calls tools).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// One of [`ROLES`].
    #[serde(deserialize_with = "known_role")]
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// OpenAI's participant name (a tool message's function name); templates that use it get it.
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant message's tool calls: `[{"id", "type": "function", "function": {"name",
    /// "arguments": a JSON string}}]`.
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// The roles a chat message may have: what chat templates know.
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// A role from [`ROLES`]; any other is the client's mistake, refused with the list (a template
/// would otherwise render it as it pleases, or drop the message silently).
fn known_role<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    let role = String::deserialize(d)?;
    if ROLES.contains(&role.as_str()) {
        Ok(role)
    } else {
        Err(serde::de::Error::custom(format!(
            "unknown role '{role}' (expected one of: {})",
            ROLES.join(", ")
        )))
    }
}

/// Message content.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part; only text parts are supported.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl Message {
    /// A message with text content.
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: Some(Content::Text(content.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// The message as chat templates see it (transformers' message dicts): the text as
    /// `content` (an empty string when absent: templates such as Qwen3's fail on `None`), and
    /// the tool calls with their `arguments` as objects, as templates expect them (OpenAI sends
    /// them as JSON strings).
    pub fn to_template(&self) -> Result<Value> {
        let mut m = json!({"role": self.role, "content": self.text()?});
        if let Some(calls) = &self.tool_calls {
            let calls = calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut c = c.clone();
                    if let Some(Value::String(a)) = c.pointer("/function/arguments") {
                        let parsed: Value = serde_json::from_str(a).map_err(|e| {
                            bad(
                                "messages",
                                format!("tool_calls[{i}].function.arguments is not JSON: {e}"),
                            )
                        })?;
                        c["function"]["arguments"] = parsed;
                    }
                    Ok(c)
                })
                .collect::<Result<Vec<_>>>()?;
            m["tool_calls"] = calls.into();
        }
        if let Some(id) = &self.tool_call_id {
            m["tool_call_id"] = id.clone().into();
        }
        if let Some(n) = &self.name {
            m["name"] = n.clone().into();
        }
        Ok(m)
    }

    /// The text of the content (text parts joined).
    pub fn text(&self) -> Result<String> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(Error::Unsupported(format!(
                        "message content part of type '{kind}' (only text parts are supported)"
                    ))),
                })
                .collect(),
        }
    }
}

/// `stop`: one string or a list (up to 4, as OpenAI).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What to do with a conversation longer than the context.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Refuse the request (the default).
    #[default]
    Error,
    /// Drop the oldest messages after the leading system messages (keeping the last message)
    /// until the prompt and `max_tokens` fit.
    DropOldest,
}

/// The fields chat and completion requests share. `null` counts as absent.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_window: Option<u32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u32>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {"name",
    /// "schema", "strict", "description"}}`, as OpenAI defines them.
    pub response_format: Option<Value>,
    /// A grammar the output must match, in llguidance's Lark dialect (llama-server's `grammar`
    /// field takes GBNF; Kiln's takes Lark).
    pub grammar: Option<String>,
    /// A JSON schema the output must match (llama-server's spelling of `response_format`'s).
    pub json_schema: Option<Value>,
    /// Token id (as a string, as OpenAI sends it) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
}

const SAMPLING_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "repeat_window",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "response_format",
    "grammar",
    "json_schema",
    "logit_bias",
];

/// A chat-completion request (`POST /v1/chat/completions`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub context_overflow: Option<Overflow>,
    /// Functions the model may call: `[{"type": "function", "function": {"name",
    /// "description", "parameters"}}]`.
    pub tools: Option<Vec<Value>>,
    /// `"none"`, `"auto"` (the default with tools), `"required"`, or `{"type": "function",
    /// "function": {"name"}}`.
    pub tool_choice: Option<Value>,
    /// Whether a forced reply may hold several calls (default true).
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A raw-prompt completion request (`POST /v1/completions`): `prompt` is a string, a list of
/// one string, or token ids; `logprobs` is the number of alternatives (0 ..= 5 in OpenAI's API,
/// up to 20 here).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CompletionRequest {
    pub prompt: Option<Value>,
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Parses a JSON object into `T`, first refusing fields that are not in `known` (serde's
/// `deny_unknown_fields` does not combine with the shared, flattened sampling fields).
fn parse_request<T: serde::de::DeserializeOwned>(
    what: &str,
    body: &str,
    known: &[&str],
) -> Result<T> {
    let v: Value = serde_json::from_str(body).map_err(|e| bad(what, e.to_string()))?;
    let Value::Object(map) = &v else {
        return Err(bad(what, "expected a JSON object"));
    };
    if let Some(k) = map
        .keys()
        .find(|k| !known.contains(&k.as_str()) && !SAMPLING_FIELDS.contains(&k.as_str()))
    {
        return Err(bad(what, format!("unknown field '{k}'")));
    }
    serde_json::from_value(v).map_err(|e| bad(what, e.to_string()))
}

impl ChatRequest {
    /// Parses a JSON request; unknown fields are errors naming them.
    pub fn from_json(body: &str) -> Result<ChatRequest> {
        parse_request(
            "chat request",
            body,
            &[
                "messages",
                "logprobs",
                "top_logprobs",
                "context_overflow",
                "tools",
                "tool_choice",
                "parallel_tool_calls",
            ],
        )
    }
}

impl CompletionRequest {
    /// Parses a JSON request; unknown fields are errors naming them.
    pub fn from_json(body: &str) -> Result<CompletionRequest> {
        parse_request(
            "completion request",
            body,
            &["prompt", "logprobs", "echo", "suffix"],
        )
    }
}

impl Sampling {
    /// The fields for Kiln's own options (the CLI's flags).
    pub fn from_options(t: &TextOptions) -> Sampling {
        Sampling {
            max_tokens: Some(t.max_tokens),
            temperature: Some(t.temperature),
            top_p: Some(t.top_p),
            top_k: Some(t.top_k),
            min_p: Some(t.min_p),
            repeat_penalty: Some(t.repeat_penalty),
            repeat_window: Some(t.repeat_window),
            seed: t.seed,
            stop: Some(Stop::Many(t.stop.clone())),
            response_format: matches!(t.grammar, Some(Grammar::JsonObject))
                .then(|| json!({"type": "json_object"})),
            json_schema: match &t.grammar {
                Some(Grammar::JsonSchema { schema }) => Some(schema.clone()),
                _ => None,
            },
            grammar: match &t.grammar {
                Some(Grammar::Lark { grammar }) => Some(grammar.clone()),
                _ => None,
            },
            logit_bias: (!t.logit_bias.is_empty()).then(|| {
                t.logit_bias
                    .iter()
                    .map(|(id, &b)| (id.to_string(), b))
                    .collect()
            }),
            ..Sampling::default()
        }
    }

    /// Kiln's generation options for these fields (the defaults of [`TextOptions::default`] for
    /// what is absent) with `top_logprobs` alternatives; errors for what Kiln does not do.
    fn options(&self, top_logprobs: u32) -> Result<GenerateOptions> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(Error::Unsupported("n other than 1".into()));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(Error::Unsupported(format!(
                    "{name} (Kiln has repeat_penalty, the multiplicative penalty of llama.cpp and transformers)"
                )));
            }
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(bad("stop", format!("{} strings (at most 4)", stop.len())));
        }
        let d = TextOptions::default();
        let t = TextOptions {
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(d.max_tokens),
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_window: self.repeat_window.unwrap_or(d.repeat_window),
            top_logprobs,
            seed: Some(self.seed.unwrap_or_else(random_seed)),
            stop,
            ..d
        };
        let mut opts = t.generate_options();
        opts.sampler.validate()?;
        opts.grammar = self.grammar()?;
        opts.logit_bias = self.logit_bias()?;
        Ok(opts)
    }

    /// The output constraint of `response_format`, `grammar` or `json_schema` (one of them).
    fn grammar(&self) -> Result<Option<Grammar>> {
        let format = match &self.response_format {
            None | Some(Value::Null) => None,
            Some(f) => {
                let field = |k: &str| f.get(k).filter(|v| !v.is_null());
                match field("type").and_then(|t| t.as_str()) {
                    Some("text") => None,
                    Some("json_object") => Some(Grammar::JsonObject),
                    Some("json_schema") => {
                        let schema = field("json_schema")
                            .and_then(|j| j.get("schema"))
                            .filter(|v| !v.is_null())
                            .ok_or_else(|| {
                                bad(
                                    "response_format",
                                    "type json_schema needs json_schema.schema (the JSON schema)",
                                )
                            })?;
                        Some(Grammar::JsonSchema {
                            schema: schema.clone(),
                        })
                    }
                    other => {
                        return Err(bad(
                            "response_format",
                            format!(
                                "type {} (text, json_object or json_schema)",
                                other.map_or("missing".to_string(), |t| format!("'{t}'"))
                            ),
                        ))
                    }
                }
            }
        };
        let grammar = self
            .grammar
            .as_ref()
            .map(|g| Grammar::Lark { grammar: g.clone() });
        let schema = match &self.json_schema {
            None | Some(Value::Null) => None,
            Some(s) => Some(Grammar::JsonSchema { schema: s.clone() }),
        };
        let mut set: Vec<(&str, Grammar)> = [
            ("response_format", format),
            ("grammar", grammar),
            ("json_schema", schema),
        ]
        .into_iter()
        .filter_map(|(k, g)| g.map(|g| (k, g)))
        .collect();
        if set.len() > 1 {
            let names: Vec<&str> = set.iter().map(|(k, _)| *k).collect();
            return Err(bad(
                names[1],
                format!("give one output constraint, not {}", names.join(" and ")),
            ));
        }
        Ok(set.pop().map(|(_, g)| g))
    }

    /// `logit_bias` as (id, bias) pairs: ids as decimal strings, biases in [-100, 100].
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>> {
        let Some(map) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        map.iter()
            .map(|(k, &b)| {
                let id = k
                    .parse::<u32>()
                    .map_err(|_| bad("logit_bias", format!("key '{k}' is not a token id")))?;
                if !(-100.0..=100.0).contains(&b) {
                    return Err(bad(
                        "logit_bias",
                        format!("token {id}: bias {b} is outside [-100, 100]"),
                    ));
                }
                Ok((id, b))
            })
            .collect()
    }

    /// Whether chunks are wanted.
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// Prompt ids of a conversation: the template rendered with the generation prompt, encoded
/// without special tokens, BOS prepended when the model wants one and the template did not
/// write it.
pub fn chat_ids(
    tok: &TextTokenizer,
    messages: &[Message],
    tools: Option<&Value>,
) -> Result<Vec<u32>> {
    let msgs = messages
        .iter()
        .map(Message::to_template)
        .collect::<Result<Vec<_>>>()?;
    let mut ids = tok.encode(&tok.render_messages(&msgs, tools)?)?;
    if let Some(bos) = tok.bos.filter(|_| tok.add_bos) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

/// For a template with no place for tools: earlier calls become the assistant's text in the
/// Hermes format Kiln's fallback teaches, and tool results user turns, so that templates that
/// know only user and assistant turns render the history.
fn plain_tool_turns(messages: &mut [Message]) -> Result<()> {
    for m in messages.iter_mut() {
        if m.role == "tool" {
            *m = Message::new(
                "user",
                &format!("<tool_response>\n{}\n</tool_response>", m.text()?),
            );
        } else if let Some(calls) = m.tool_calls.take() {
            let mut text = m.text()?;
            let with_calls = Message {
                tool_calls: Some(calls),
                ..Message::new("assistant", "")
            };
            for c in with_calls.to_template()?["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let f = &c["function"];
                if !text.is_empty() {
                    text.push('\n');
                }
                let call = json!({"name": f["name"], "arguments": f["arguments"]});
                text.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
            }
            m.content = Some(Content::Text(text));
            m.tool_call_id = None;
        }
    }
    Ok(())
}

/// The prompt of a chat request under its overflow policy: (ids, messages dropped).
pub fn fit_conversation(
    tok: &TextTokenizer,
    messages: &[Message],
    tools: Option<&Value>,
    ctx: usize,
    max_tokens: usize,
    policy: Overflow,
) -> Result<(Vec<u32>, usize)> {
    if messages.is_empty() {
        return Err(bad("messages", "empty: give at least one message"));
    }
    let first = messages
        .iter()
        .take_while(|m| m.role == "system" || m.role == "developer")
        .count()
        .min(messages.len() - 1);
    let mut dropped = 0;
    loop {
        let kept: Vec<Message> = messages[..first]
            .iter()
            .chain(&messages[first + dropped..])
            .cloned()
            .collect();
        let ids = chat_ids(tok, &kept, tools)?;
        let fits = ids.len() + max_tokens.max(1) <= ctx;
        let can_drop = first + dropped + 1 < messages.len();
        if fits || policy == Overflow::Error || !can_drop {
            if ids.len() >= ctx {
                return Err(bad(
                    "messages",
                    format!(
                        "the conversation is {} tokens, the context holds {ctx} (at least one position must remain for the reply){}",
                        ids.len(),
                        if policy == Overflow::Error {
                            "; context_overflow: \"drop_oldest\" drops the oldest messages instead"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            return Ok((ids, dropped));
        }
        dropped += 1;
    }
}

/// The parts of a response that do not come from the generation.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id the front end lists.
    pub model: String,
}

impl ResponseMeta {
    /// A fresh id with `prefix` (OpenAI's `chatcmpl` or `cmpl`, chosen by [`Prepared::chat`] and
    /// [`Prepared::completion`]), the current time, and the model id.
    fn new(prefix: &str, model: &str) -> ResponseMeta {
        ResponseMeta {
            id: format!("{prefix}-{:08x}{:08x}", random_seed(), random_seed()),
            created: unix_seconds(),
            model: model.into(),
        }
    }
}

/// Seconds since 1970.
pub fn unix_seconds() -> u64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
    #[cfg(target_arch = "wasm32")]
    {
        (js_sys::Date::now() / 1e3) as u64
    }
}

/// OpenAI's `finish_reason` for a stop reason.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::MaxTokens => "length",
        StopReason::ContextFull => "contextfull",
        StopReason::Cancelled => "cancelled",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// A request made ready to run: its prompt ids, options and response shape.
#[derive(Clone, Debug)]
pub struct Prepared {
    kind: Kind,
    pub prompt_ids: Vec<u32>,
    pub options: GenerateOptions,
    pub stream: bool,
    include_usage: bool,
    /// Per-token log-probabilities wanted.
    logprobs: bool,
    /// Messages dropped to fit the context.
    pub dropped: usize,
    pub meta: ResponseMeta,
    /// With tools: the format the model writes its calls in (the reply is parsed for them).
    tools: Option<ToolFormat>,
}

impl Prepared {
    /// A chat request against a model.
    pub fn chat(model: &TextModel, req: &ChatRequest, model_id: &str) -> Result<Prepared> {
        let logprobs = req.logprobs.unwrap_or(false);
        let top = req.top_logprobs.unwrap_or(0);
        if top > 0 && !logprobs {
            return Err(bad(
                "top_logprobs",
                "needs \"logprobs\": true (as in OpenAI's API)",
            ));
        }
        let mut options = req.sampling.options(top)?;
        let Some(template) = model.tokenizer.chat_template.as_deref() else {
            return Err(Error::Unsupported(
                "this model has no chat template (chat_template.jinja, tokenizer_config.json 'chat_template' or GGUF 'tokenizer.chat_template'); use a completion with a raw prompt".into(),
            ));
        };
        let mut messages = std::borrow::Cow::Borrowed(&req.messages);
        let mut tools_value = None;
        let mut format = None;
        match req.tools.as_deref().filter(|t| !t.is_empty()) {
            Some(tools) => {
                check_tools(tools)?;
                if let Some((allowed, forced)) = tool_choice(tools, req.tool_choice.as_ref())? {
                    let (f, renders) = ToolFormat::of_template(template);
                    if renders {
                        tools_value = Some(Value::Array(tools.to_vec()));
                    } else {
                        // A template without tools: they go into the system message (and the
                        // history's calls and results into plain turns, below).
                        let m = messages.to_mut();
                        let sys = fallback_system(tools);
                        match m.first_mut().filter(|m| m.role == "system") {
                            Some(first) => {
                                first.content =
                                    Some(Content::Text(format!("{}\n\n{sys}", first.text()?)))
                            }
                            None => m.insert(0, Message::new("system", &sys)),
                        }
                    }
                    if forced {
                        if options.grammar.is_some() {
                            return Err(bad(
                                "tool_choice",
                                "a required tool call cannot be combined with response_format, grammar or json_schema",
                            ));
                        }
                        options.grammar =
                            Some(f.grammar(&allowed, req.parallel_tool_calls.unwrap_or(true)));
                    }
                    format = Some(f);
                }
            }
            None => {
                if matches!(&req.tool_choice, Some(c) if !c.is_null() && c != "none" && c != "auto")
                {
                    return Err(bad(
                        "tool_choice",
                        "a tool call was required, but the request has no tools",
                    ));
                }
            }
        }
        let tool_turns = messages
            .iter()
            .any(|m| m.role == "tool" || m.tool_calls.is_some());
        if tool_turns && !ToolFormat::of_template(template).1 {
            plain_tool_turns(messages.to_mut())?;
        }
        let (prompt_ids, dropped) = fit_conversation(
            &model.tokenizer,
            &messages,
            tools_value.as_ref(),
            model.ctx(),
            options.max_tokens,
            req.context_overflow.unwrap_or_default(),
        )?;
        Ok(Prepared {
            kind: Kind::Chat,
            prompt_ids,
            options,
            stream: req.sampling.stream(),
            include_usage: req.sampling.include_usage(),
            logprobs,
            dropped,
            meta: ResponseMeta::new("chatcmpl", model_id),
            tools: format,
        })
    }

    /// A raw-prompt completion request against a model (BOS added as for a plain prompt).
    pub fn completion(
        model: &TextModel,
        req: &CompletionRequest,
        model_id: &str,
    ) -> Result<Prepared> {
        if req.echo == Some(true) {
            return Err(Error::Unsupported("echo".into()));
        }
        if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(Error::Unsupported("suffix (fill-in-the-middle)".into()));
        }
        let top = req.logprobs.unwrap_or(0);
        let options = req.sampling.options(top)?;
        let tok = &model.tokenizer;
        let prompt_ids = match &req.prompt {
            Some(Value::String(s)) => tok.encode_prompt(s)?,
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                tok.encode_prompt(a[0].as_str().unwrap_or_default())?
            }
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| bad("prompt", format!("token id {v} is out of range")))
                })
                .collect::<Result<_>>()?,
            _ => {
                return Err(bad(
                    "prompt",
                    "give a string, a list of one string, or a list of token ids",
                ))
            }
        };
        Ok(Prepared {
            kind: Kind::Completion,
            prompt_ids,
            options,
            stream: req.sampling.stream(),
            include_usage: req.sampling.include_usage(),
            logprobs: req.logprobs.is_some(),
            dropped: 0,
            meta: ResponseMeta::new("cmpl", model_id),
            tools: None,
        })
    }

    /// Runs the request on `model`. When streaming, `on_chunk` receives every chunk (the first
    /// with the role, one per text piece, the last with `finish_reason`, then the usage chunk
    /// when asked for) and returns false to cancel; when not, it receives `null` once per piece,
    /// and its answer still cancels. Returns the whole response (the non-streaming shape)
    /// either way; a cancelled run ends with `finish_reason: "cancelled"`.
    pub async fn run(
        &self,
        model: &mut TextModel,
        on_chunk: &mut dyn FnMut(Value) -> bool,
    ) -> Result<Value> {
        let mut sent = 0; // generated tokens already reported in a chunk
        let mut go_on = true;
        if self.stream && self.kind == Kind::Chat {
            go_on = on_chunk(self.chunk(json!({"role": "assistant", "content": ""}), None, None));
        }
        if !go_on {
            return Err(Error::Cancelled);
        }
        // With tools, the reply so far and how much of it went out as content: text that may
        // be the start of a tool call is held back until it is clear.
        let mut reply = String::new();
        let mut shown = 0;
        let g = {
            let tok = model.tokenizer.clone();
            let tok = &*tok;
            let mut on_piece = |piece: &str, g: &Generation| {
                if !self.stream {
                    return on_chunk(Value::Null);
                }
                let piece = match self.tools {
                    None => piece,
                    Some(f) => {
                        reply.push_str(piece);
                        let upto = f.content_len(&reply).max(shown);
                        let new = &reply[shown..upto];
                        shown = upto;
                        if new.is_empty() {
                            return on_chunk(Value::Null);
                        }
                        new
                    }
                };
                let lp = self
                    .logprobs
                    .then(|| self.logprobs_json(tok, g, sent..g.ids.len()));
                sent = g.ids.len();
                on_chunk(self.piece_chunk(piece, lp))
            };
            model
                .generate_with(&self.prompt_ids, &self.options, &mut on_piece)
                .await?
        };
        let tok = &model.tokenizer;
        let response = self.response(tok, &g);
        if self.stream {
            // Tokens not reported yet (an end-of-sequence id, held-back bytes).
            let lp = self
                .logprobs
                .then(|| self.logprobs_json(tok, &g, sent..g.ids.len()));
            let mut finish = finish_reason(g.stop);
            if self.tools.is_some() {
                // What was held back: the rest of the text, then the calls.
                let message = &response["choices"][0]["message"];
                let content = message["content"].as_str().unwrap_or("");
                if content.len() > shown && content.is_char_boundary(shown) {
                    on_chunk(self.piece_chunk(&content[shown..], None));
                }
                if let Some(calls) = message.get("tool_calls") {
                    let deltas: Vec<Value> = calls
                        .as_array()
                        .into_iter()
                        .flatten()
                        .enumerate()
                        .map(|(i, c)| {
                            let mut c = c.clone();
                            c["index"] = i.into();
                            c
                        })
                        .collect();
                    on_chunk(self.chunk(json!({"tool_calls": deltas}), None, None));
                    finish = response["choices"][0]["finish_reason"]
                        .as_str()
                        .unwrap_or(finish);
                }
            }
            let mut last = self.chunk(
                if self.kind == Kind::Chat {
                    json!({})
                } else {
                    Value::Null
                },
                Some(finish),
                lp,
            );
            last["kiln"] = self.kiln_json(&g);
            if on_chunk(last) && self.include_usage {
                let mut u = self.chunk(Value::Null, None, None);
                u["choices"] = json!([]);
                u["usage"] = self.usage(&g);
                on_chunk(u);
            }
        }
        Ok(response)
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn head(&self, chunk: bool) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), self.meta.id.clone().into());
        m.insert("object".into(), self.object(chunk).into());
        m.insert("created".into(), self.meta.created.into());
        m.insert("model".into(), self.meta.model.clone().into());
        m.insert(
            "system_fingerprint".into(),
            format!("kiln-{}", env!("CARGO_PKG_VERSION")).into(),
        );
        m
    }

    /// A stream chunk: for chats `delta` is the message delta; for completions the text.
    fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Option<Value>) -> Value {
        let mut m = self.head(true);
        let mut choice = json!({"index": 0, "logprobs": logprobs, "finish_reason": finish});
        match self.kind {
            Kind::Chat => choice["delta"] = delta,
            Kind::Completion => choice["text"] = delta.as_str().unwrap_or("").into(),
        }
        m.insert("choices".into(), json!([choice]));
        Value::Object(m)
    }

    fn piece_chunk(&self, piece: &str, logprobs: Option<Value>) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(json!({"content": piece}), None, logprobs),
            Kind::Completion => self.chunk(piece.into(), None, logprobs),
        }
    }

    fn usage(&self, g: &Generation) -> Value {
        json!({
            "prompt_tokens": g.prompt_ids.len(),
            "completion_tokens": g.ids.len(),
            "total_tokens": g.prompt_ids.len() + g.ids.len(),
            "prompt_tokens_details": {"cached_tokens": g.reused},
        })
    }

    /// Kiln's extension object: ids, seed, Kiln's stop reason, timings, dropped messages.
    fn kiln_json(&self, g: &Generation) -> Value {
        json!({
            "prompt_ids": g.prompt_ids,
            "ids": g.ids,
            "seed": g.seed,
            "stop": g.stop,
            "reused_tokens": g.reused,
            "dropped_messages": self.dropped,
            "timings": g.timings,
        })
    }

    /// Log-probabilities of the generated tokens `range` in the chat shape
    /// (`{"content": [{token, logprob, bytes, top_logprobs}]}`) or the completion shape
    /// (`{tokens, token_logprobs, top_logprobs}`).
    fn logprobs_json(
        &self,
        tok: &TextTokenizer,
        g: &Generation,
        range: std::ops::Range<usize>,
    ) -> Value {
        let text = |id: u32| tok.token_text(id);
        let tops = |i: usize| g.top_logprobs.get(i).cloned().unwrap_or_default();
        match self.kind {
            Kind::Chat => {
                let entry = |id: u32, lp: f32| {
                    let t = text(id);
                    json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
                };
                let content: Vec<Value> = range
                    .map(|i| {
                        let mut e = entry(g.ids[i], g.logprobs[i]);
                        e["top_logprobs"] =
                            tops(i).into_iter().map(|(id, lp)| entry(id, lp)).collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Completion => {
                let tokens: Vec<String> = range.clone().map(|i| text(g.ids[i])).collect();
                let lps: Vec<f32> = range.clone().map(|i| g.logprobs[i]).collect();
                let top: Vec<Value> = range
                    .map(|i| {
                        Value::Object(
                            tops(i)
                                .into_iter()
                                .map(|(id, lp)| (text(id), json!(lp)))
                                .collect(),
                        )
                    })
                    .collect();
                json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": top})
            }
        }
    }

    /// The whole (non-streaming) response.
    pub fn response(&self, tok: &TextTokenizer, g: &Generation) -> Value {
        let mut m = self.head(false);
        let lp = self
            .logprobs
            .then(|| self.logprobs_json(tok, g, 0..g.ids.len()));
        let mut finish = finish_reason(g.stop);
        let mut message = json!({"role": "assistant", "content": g.text});
        if let Some(f) = self.tools {
            let (content, calls) = f.parse(&g.text);
            if !calls.is_empty() {
                // Ids of 9 letters and digits (Mistral's templates require them on the way back).
                let base: String = self
                    .meta
                    .id
                    .chars()
                    .rev()
                    .filter(char::is_ascii_alphanumeric)
                    .take(8)
                    .collect();
                let calls: Vec<Value> = calls
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, args))| {
                        json!({"id": format!("{base}{}", i % 10), "type": "function",
                               "function": {"name": name, "arguments": args.to_string()}})
                    })
                    .collect();
                message = json!({"role": "assistant", "content": (!content.is_empty()).then_some(content), "tool_calls": calls});
                // A reply cut by the token limit keeps saying so (its whole calls are kept).
                if g.stop != StopReason::MaxTokens {
                    finish = "tool_calls";
                }
            }
        }
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": message,
                "logprobs": lp,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": g.text,
                "logprobs": lp,
                "finish_reason": finish,
            }),
        };
        m.insert("choices".into(), json!([choice]));
        m.insert("usage".into(), self.usage(g));
        m.insert("kiln".into(), self.kiln_json(g));
        Value::Object(m)
    }
}
