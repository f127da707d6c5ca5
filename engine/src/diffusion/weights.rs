//! Weights of a diffusers component (text_encoder/, unet/, vae/) as graph values: float
//! matrices and convolution kernels keep their checkpoint dtype (f16 stays packed f16), vectors
//! (norms, biases) become f32.

use crate::device::Gpu;
use crate::dtype::{dequantize, DType};
use crate::error::{Error, Result};
use crate::formats::safetensors::SafeTensors;
use crate::formats::TensorSource;
use crate::graph::{Graph, Value};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// A component's safetensors, uploaded on first use and cached by name.
pub struct ComponentWeights {
    gpu: Arc<Gpu>,
    src: SafeTensors,
    component: String,
    cache: HashMap<String, Arc<Tensor>>,
}

impl ComponentWeights {
    /// Wraps the parsed safetensors of `component` (for error messages).
    pub fn new(gpu: &Arc<Gpu>, component: &str, src: SafeTensors) -> Self {
        ComponentWeights {
            gpu: gpu.clone(),
            src,
            component: component.into(),
            cache: HashMap::new(),
        }
    }

    /// True when the checkpoint has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.src.tensor(name).is_some()
    }

    /// The first of `prefixes` under which the checkpoint holds `probe`: library versions name
    /// the same module differently (transformers 4 saves CLIP's tensors under `text_model.`,
    /// transformers 5 without it).
    pub fn prefix<'a>(&self, prefixes: &[&'a str], probe: &str) -> Result<&'a str> {
        prefixes
            .iter()
            .find(|p| self.has(&format!("{p}{probe}")))
            .copied()
            .ok_or_else(|| Error::Data {
                name: self.component.clone(),
                msg: format!("missing tensor '{probe}' (looked under the prefixes {prefixes:?})"),
            })
    }

    /// Shape of `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.src
            .tensor(name)
            .map(|t| t.shape.to_vec())
            .ok_or_else(|| self.missing(name))
    }

    fn missing(&self, name: &str) -> Error {
        Error::Data {
            name: self.component.clone(),
            msg: format!("missing tensor '{name}'"),
        }
    }

    /// The GPU tensor `name`, uploaded once.
    pub fn tensor(&mut self, name: &str) -> Result<Arc<Tensor>> {
        if let Some(t) = self.cache.get(name) {
            return Ok(t.clone());
        }
        let raw = self.src.tensor(name).ok_or_else(|| self.missing(name))?;
        let n: usize = raw.shape.iter().product();
        let t = if raw.shape.len() == 1 || raw.dtype == DType::F32 {
            let v = dequantize(raw.dtype, raw.data, n)?;
            Tensor::from_f32(&self.gpu, name, raw.shape, &v)?
        } else {
            Tensor::upload(&self.gpu, name, raw.shape, raw.dtype, raw.data)?
        };
        let t = Arc::new(t);
        self.cache.insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// `name` as an f32 graph value whatever its checkpoint dtype (tables sliced by rows).
    pub fn value_f32(&mut self, g: &mut Graph, name: &str) -> Result<Value> {
        let key = format!("{name}#f32");
        if !self.cache.contains_key(&key) {
            let raw = self.src.tensor(name).ok_or_else(|| self.missing(name))?;
            let v = dequantize(raw.dtype, raw.data, raw.shape.iter().product())?;
            let t = Arc::new(Tensor::from_f32(&self.gpu, name, raw.shape, &v)?);
            self.cache.insert(key.clone(), t);
        }
        Ok(g.tensor(&self.cache[&key]))
    }

    /// `name` as a graph value.
    pub fn value(&mut self, g: &mut Graph, name: &str) -> Result<Value> {
        let t = self.tensor(name)?;
        Ok(g.tensor(&t))
    }

    /// `name` as a graph value when present.
    pub fn optional(&mut self, g: &mut Graph, name: &str) -> Result<Option<Value>> {
        if self.has(name) {
            self.value(g, name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `x @ W^T + b` for the linear layer `prefix` (`.weight`, optional `.bias`).
    pub fn linear(&mut self, g: &mut Graph, prefix: &str, x: Value) -> Result<Value> {
        let w = self.value(g, &format!("{prefix}.weight"))?;
        let b = self.optional(g, &format!("{prefix}.bias"))?;
        g.linear(x, w, b)
    }

    /// Convolution `prefix` with its kernel size's usual padding (k / 2).
    pub fn conv(&mut self, g: &mut Graph, prefix: &str, x: Value, stride: usize) -> Result<Value> {
        let shape = self.shape(&format!("{prefix}.weight"))?;
        let w = self.value(g, &format!("{prefix}.weight"))?;
        let b = self.optional(g, &format!("{prefix}.bias"))?;
        let pad = shape.get(2).copied().unwrap_or(1) / 2;
        g.conv2d(x, w, b, stride, pad)
    }

    /// GroupNorm `prefix` (`.weight`, `.bias`), optionally followed by SiLU.
    pub fn group_norm(
        &mut self,
        g: &mut Graph,
        prefix: &str,
        x: Value,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<Value> {
        let w = self.value(g, &format!("{prefix}.weight"))?;
        let b = self.value(g, &format!("{prefix}.bias"))?;
        g.group_norm(x, w, b, groups, eps, silu)
    }

    /// LayerNorm `prefix`.
    pub fn layer_norm(&mut self, g: &mut Graph, prefix: &str, x: Value, eps: f32) -> Result<Value> {
        let w = self.value(g, &format!("{prefix}.weight"))?;
        let b = self.value(g, &format!("{prefix}.bias"))?;
        g.layer_norm(x, w, b, eps)
    }
}

/// Parses one component folder's safetensors: `<prefix>.safetensors`, preferring the
/// `.fp16.safetensors` variant when only it exists.
pub fn component_safetensors(
    files: &HashMap<String, Vec<u8>>,
    dir: &str,
    stem: &str,
) -> Result<SafeTensors> {
    let mut st = SafeTensors::new();
    for cand in [
        format!("{dir}/{stem}.safetensors"),
        format!("{dir}/{stem}.fp16.safetensors"),
    ] {
        if let Some(b) = files.get(&cand) {
            st.add_file(&cand, b.clone())?;
            return Ok(st);
        }
    }
    Err(Error::Data {
        name: dir.into(),
        msg: format!("no {stem}.safetensors (or .fp16 variant)"),
    })
}
