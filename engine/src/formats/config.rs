//! Reading JSON configs (`config.json`, `scheduler_config.json`, ...) with the library's
//! defaults: `null` counts as absent, a value of the wrong type is an error naming the file and
//! the key, and a key set to something Kiln does not implement is refused by [`Keys::only`].

use crate::error::{Error, Result};
use serde_json::{Map, Value as Json};

/// The keys of one config file.
pub struct Keys {
    file: String,
    map: Map<String, Json>,
}

impl Keys {
    /// Parses `text` (the file `file`, for messages); it must hold a JSON object.
    pub fn parse(file: &str, text: &str) -> Result<Keys> {
        let bad = |msg: String| Error::Data {
            name: file.into(),
            msg,
        };
        let json: Json =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        match json {
            Json::Object(map) => Ok(Keys {
                file: file.into(),
                map,
            }),
            other => Err(bad(format!("expected a JSON object, found {other}"))),
        }
    }

    /// An error about this file.
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::Data {
            name: self.file.clone(),
            msg: msg.into(),
        }
    }

    /// The value of `k` (absent when null).
    pub fn get(&self, k: &str) -> Option<&Json> {
        self.map.get(k).filter(|v| !v.is_null())
    }

    /// A number, `default` when absent.
    pub fn num(&self, k: &str, default: f64) -> Result<f64> {
        self.get(k).map_or(Ok(default), |v| {
            v.as_f64()
                .ok_or_else(|| self.err(format!("'{k}': expected a number, found {v}")))
        })
    }

    /// A non-negative integer (at most 1e9), `default` when absent.
    pub fn count(&self, k: &str, default: usize) -> Result<usize> {
        let v = self.num(k, default as f64)?;
        if v < 0.0 || v.fract() != 0.0 || v > 1e9 {
            return Err(self.err(format!("'{k}': expected a non-negative integer, found {v}")));
        }
        Ok(v as usize)
    }

    /// A positive integer that must be present.
    pub fn need_count(&self, k: &str) -> Result<usize> {
        if self.get(k).is_none() {
            return Err(self.err(format!("missing '{k}'")));
        }
        match self.count(k, 0)? {
            0 => Err(self.err(format!("'{k}' is 0"))),
            n => Ok(n),
        }
    }

    /// `hidden_size` and `num_attention_heads` of an encoder whose heads split the width
    /// evenly (CLIP's, BERT's).
    pub fn hidden_and_heads(&self) -> Result<(usize, usize)> {
        let (hidden, heads) = (
            self.need_count("hidden_size")?,
            self.need_count("num_attention_heads")?,
        );
        if hidden % heads != 0 {
            return Err(self.err(format!(
                "hidden_size {hidden} is not a multiple of {heads} heads"
            )));
        }
        Ok((hidden, heads))
    }

    /// A boolean, `default` when absent.
    pub fn flag(&self, k: &str, default: bool) -> Result<bool> {
        self.get(k).map_or(Ok(default), |v| {
            v.as_bool()
                .ok_or_else(|| self.err(format!("'{k}': expected true or false, found {v}")))
        })
    }

    /// A string, `default` when absent.
    pub fn text<'b>(&'b self, k: &str, default: &'b str) -> Result<&'b str> {
        self.get(k).map_or(Ok(default), |v| {
            v.as_str()
                .ok_or_else(|| self.err(format!("'{k}': expected a string, found {v}")))
        })
    }

    /// A list of strings that must be present.
    pub fn strings(&self, k: &str) -> Result<Vec<String>> {
        let list = self
            .get(k)
            .and_then(|v| v.as_array())
            .ok_or_else(|| self.err(format!("missing '{k}' (a list)")))?;
        list.iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| self.err(format!("'{k}': {x} is not a string")))
            })
            .collect()
    }

    /// A positive integer or a list of them, one per block (`n` copies of a single number);
    /// `None` when absent.
    pub fn per_block(&self, k: &str, n: usize) -> Result<Option<Vec<usize>>> {
        let bad = |v: &Json| {
            self.err(format!(
                "'{k}': expected a positive integer or a list, found {v}"
            ))
        };
        let one = |v: &Json| {
            v.as_u64()
                .filter(|&x| x > 0 && x <= 1 << 20)
                .map(|x| x as usize)
        };
        match self.get(k) {
            None => Ok(None),
            Some(v @ Json::Array(a)) => a
                .iter()
                .map(|x| one(x).ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => one(v).map(|x| Some(vec![x; n])).ok_or_else(|| bad(v)),
        }
    }

    /// Errors when `k` is set to anything but `default` (a feature Kiln does not implement).
    pub fn only(&self, k: &str, default: Json) -> Result<()> {
        match self.get(k) {
            Some(v) if *v != default => Err(Error::Unsupported(format!(
                "{} '{k}' = {v} (only {default} is supported)",
                self.file
            ))),
            _ => Ok(()),
        }
    }

    /// Like [`Keys::only`] for a number (`1` and `1.0` are the same value).
    pub fn only_num(&self, k: &str, default: f64) -> Result<()> {
        match self.get(k) {
            Some(v) if v.as_f64() != Some(default) => Err(Error::Unsupported(format!(
                "{} '{k}' = {v} (only {default} is supported)",
                self.file
            ))),
            _ => Ok(()),
        }
    }

    /// Errors unless the switch `k` is off: absent, null, false, or a list of false (per block).
    pub fn off(&self, k: &str) -> Result<()> {
        let off = |v: &Json| matches!(v, Json::Null | Json::Bool(false));
        match self.get(k) {
            Some(Json::Array(a)) if a.iter().all(off) => Ok(()),
            Some(v) if !off(v) => Err(Error::Unsupported(format!(
                "{} '{k}' = {v} (only false is supported)",
                self.file
            ))),
            _ => Ok(()),
        }
    }
}
