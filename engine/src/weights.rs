//! The one weight loader every model uses. A [`Weights`] wraps a checkpoint (safetensors, a
//! sharded safetensors folder, or GGUF, any [`TensorSource`]) with a name map (GGUF's names
//! for the Hugging Face ones a model asks for) and a dtype policy; tensors are uploaded on first
//! use and cached. Model code walks it with a [`VarBuilder`]: `vb.pp("layers").pp(3)` is the
//! prefix `layers.3`, and `vb.get("weight", &[n, k])` returns the GPU tensor after checking the
//! checkpoint's shape, naming the tensor and both shapes when they differ.
//!
//! Dtype policy: vectors (norms, biases) become f32; matrices and convolution kernels keep the
//! checkpoint's dtype (f16 stays packed f16, GGUF blocks stay blocks), or, with
//! [`Quantize`], 2-D float matrices whose rows are whole 32-blocks become Q4_0/Q8_0.

use crate::device::Gpu;
use crate::dtype::{dequantize, quantize, DType};
use crate::error::{Error, Result};
use crate::formats::{RawTensor, TensorSource};
use crate::graph::{Graph, Value};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// On-load quantization of float matrices (`none`, `q4`, `q8`, `q4_k`, `q6_k` as text). The
/// K-quants (llama.cpp's reference encoders, byte for byte) need rows of 256; narrower rows fall
/// back to Q4_0 / Q8_0, as llama.cpp's quantizer falls back for such tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Quantize {
    #[default]
    None,
    Q4,
    Q8,
    Q4K,
    Q6K,
}

impl std::str::FromStr for Quantize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Quantize> {
        match s.to_ascii_lowercase().as_str() {
            "" | "none" | "no" => Ok(Quantize::None),
            "q4" | "q4_0" => Ok(Quantize::Q4),
            "q8" | "q8_0" => Ok(Quantize::Q8),
            "q4_k" | "q4k" => Ok(Quantize::Q4K),
            "q6_k" | "q6k" => Ok(Quantize::Q6K),
            other => Err(Error::Data {
                name: "quantize".into(),
                msg: format!("'{other}' is not one of none, q4, q8, q4_k, q6_k"),
            }),
        }
    }
}

impl TryFrom<String> for Quantize {
    type Error = Error;
    fn try_from(s: String) -> Result<Quantize> {
        s.parse()
    }
}

impl From<Quantize> for String {
    fn from(q: Quantize) -> String {
        q.to_string()
    }
}

impl std::fmt::Display for Quantize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantize::None => "none",
            Quantize::Q4 => "q4",
            Quantize::Q8 => "q8",
            Quantize::Q4K => "q4_k",
            Quantize::Q6K => "q6_k",
        })
    }
}

/// A checkpoint's name for the tensor a model asks for by its Hugging Face name.
pub type NameMap = fn(&str) -> String;

/// A low-rank update merged into a tensor when it is uploaded (a LoRA module):
/// `W += factor * up @ down`, `up` `[out, rank]`, `down` `[rank, numel(W) / out]`.
#[derive(Clone, Debug)]
pub struct Delta {
    pub up: Vec<f32>,
    pub down: Vec<f32>,
    pub rank: usize,
    pub factor: f32,
}

/// A checkpoint's tensors, uploaded on first use.
pub struct Weights {
    gpu: Arc<Gpu>,
    src: Box<dyn TensorSource + Send + Sync>,
    label: String,
    names: Option<NameMap>,
    quantize: Quantize,
    cache: Mutex<HashMap<String, Arc<Tensor>>>,
    /// Updates merged at upload, by checkpoint name.
    deltas: Mutex<HashMap<String, Vec<Delta>>>,
}

impl Weights {
    /// Wraps a parsed checkpoint; `label` names it in errors (a component, a file).
    pub fn new(gpu: &Arc<Gpu>, label: &str, src: Box<dyn TensorSource + Send + Sync>) -> Self {
        Weights {
            gpu: gpu.clone(),
            src,
            label: label.into(),
            names: None,
            quantize: Quantize::None,
            cache: Mutex::new(HashMap::new()),
            deltas: Mutex::new(HashMap::new()),
        }
    }

    /// The checkpoint's tensor names (where its format lists them).
    pub fn names(&self) -> Vec<String> {
        self.src.names()
    }

    /// Replaces the updates merged at upload (LoRAs), by checkpoint name. Tensors already
    /// uploaded whose updates change are dropped from the cache, so the next graph built uploads
    /// them again from the checkpoint (un-merging what the previous set added).
    pub fn set_deltas(&self, deltas: HashMap<String, Vec<Delta>>) {
        // One lock at a time: `load` takes the cache's, then (uploading) the deltas'.
        let changed: std::collections::HashSet<String> = {
            let mut old = self.deltas.lock().unwrap_or_else(|e| e.into_inner());
            let changed = old.keys().chain(deltas.keys()).cloned().collect();
            *old = deltas;
            changed
        };
        // Cache keys are a name, `name#f32`, or `a+b+c#stacked`.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|k, _| {
            let base = k.split('#').next().unwrap_or(k);
            !base.split('+').any(|n| changed.contains(n))
        });
    }

    /// The tensor `name`'s data with its updates merged, in the checkpoint's float dtype;
    /// `None` when it has none.
    fn merged(&self, name: &str, raw: &RawTensor<'_>) -> Result<Option<Vec<u8>>> {
        let deltas = self.deltas.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ds) = deltas.get(&self.file_name(name)).filter(|d| !d.is_empty()) else {
            return Ok(None);
        };
        let n: usize = raw.shape.iter().product();
        let out = raw.shape.first().copied().unwrap_or(1).max(1);
        let inn = n / out;
        let mut w = dequantize(raw.dtype, raw.data, n)?;
        for d in ds {
            for o in 0..out {
                let row = &mut w[o * inn..(o + 1) * inn];
                for r in 0..d.rank {
                    let u = d.up[o * d.rank + r] * d.factor;
                    if u == 0.0 {
                        continue;
                    }
                    let down = &d.down[r * inn..(r + 1) * inn];
                    row.iter_mut().zip(down).for_each(|(x, &v)| *x += u * v);
                }
            }
        }
        Ok(Some(match raw.dtype {
            DType::F16 => w
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            DType::BF16 => w
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            DType::F32 => bytemuck::cast_slice(&w).to_vec(),
            other => {
                return Err(self.err(
                    name,
                    format!("a LoRA cannot be merged into a {other} tensor (float weights only)"),
                ))
            }
        }))
    }

    /// Maps the names models ask for to the checkpoint's (e.g. GGUF's `blk.0.attn_q.weight`).
    pub fn with_names(mut self, names: NameMap) -> Self {
        self.names = Some(names);
        self
    }

    /// Quantizes float matrices on upload.
    pub fn with_quantize(mut self, q: Quantize) -> Self {
        self.quantize = q;
        self
    }

    /// A builder at the root (no prefix).
    pub fn root(&self) -> VarBuilder<'_> {
        VarBuilder {
            w: self,
            prefix: String::new(),
        }
    }

    /// The checkpoint's name for `name`.
    pub fn file_name(&self, name: &str) -> String {
        match self.names {
            Some(f) => f(name),
            None => name.to_string(),
        }
    }

    /// What the weights are (a component, a file), for messages.
    pub fn describe(&self) -> String {
        self.label.clone()
    }

    /// The raw tensor `name` (under the name map), if present.
    pub fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        self.src.tensor(&self.file_name(name))
    }

    fn err(&self, name: &str, msg: String) -> Error {
        Error::Data {
            name: format!("{}: '{}'", self.label, self.file_name(name)),
            msg,
        }
    }

    fn missing(&self, name: &str) -> Error {
        Error::Data {
            name: self.label.clone(),
            msg: format!("missing tensor '{}'", self.file_name(name)),
        }
    }

    /// Uploads (once) under the policy; `f32` forces an f32 copy (tables sliced by rows).
    fn load(&self, name: &str, shape: Option<&[usize]>, f32: bool) -> Result<Arc<Tensor>> {
        let key = if f32 {
            format!("{name}#f32")
        } else {
            name.to_string()
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&key) {
            if let Some(s) = shape.filter(|s| *s != t.shape.as_slice()) {
                return Err(self.err(name, format!("shape {:?}, expected {s:?}", t.shape)));
            }
            return Ok(t.clone());
        }
        let raw = self.raw(name).ok_or_else(|| self.missing(name))?;
        if let Some(s) = shape.filter(|s| *s != raw.shape) {
            return Err(self.err(name, format!("shape {:?}, expected {s:?}", raw.shape)));
        }
        let t =
            Arc::new(self.upload(name, raw, f32).map_err(|e| {
                self.non_finite(e, &[(name, raw.shape.first().copied().unwrap_or(1))])
            })?);
        cache.insert(key, t.clone());
        Ok(t)
    }

    /// A NaN/infinity found in row `row` of an upload of `parts` (names and row counts, stacked
    /// in order) named after the checkpoint's tensor that holds it.
    fn non_finite(&self, e: Error, parts: &[(&str, usize)]) -> Error {
        let Error::NonFinite { mut row, what } = e else {
            return e;
        };
        for (name, rows) in parts {
            if row < *rows || parts.len() == 1 {
                return Error::NonFinite {
                    what: format!("{}: tensor '{}'", self.label, self.file_name(name)),
                    row,
                };
            }
            row -= rows;
        }
        Error::NonFinite { what, row }
    }

    fn upload(&self, name: &str, raw: RawTensor<'_>, f32: bool) -> Result<Tensor> {
        let merged = self.merged(name, &raw)?;
        let raw = match &merged {
            Some(data) => RawTensor {
                dtype: raw.dtype,
                shape: raw.shape,
                data,
            },
            None => raw,
        };
        let shape = raw.shape;
        let n: usize = shape.iter().product();
        if f32 || (shape.len() == 1 && raw.dtype != DType::F32) {
            let v =
                dequantize(raw.dtype, raw.data, n).map_err(|e| self.err(name, e.to_string()))?;
            return Tensor::upload_weight(
                &self.gpu,
                name,
                shape,
                DType::F32,
                bytemuck::cast_slice(&v),
            );
        }
        let k = shape.last().copied().unwrap_or(1);
        match self
            .quantize_target(raw.dtype, k)
            .filter(|_| shape.len() == 2)
        {
            Some(dt) => {
                let q = self.quantized(name, dt, raw.dtype, raw.data, k)?;
                Tensor::upload_weight(&self.gpu, name, shape, dt, &q)
            }
            None => Tensor::upload_weight(&self.gpu, name, shape, raw.dtype, raw.data),
        }
    }

    /// The dtype the on-load quantization policy gives float matrices of `dtype` with rows of
    /// `k` (`None`: kept as stored). Rows that are not whole K-quant super-blocks fall back to
    /// Q4_0 / Q8_0.
    fn quantize_target(&self, dtype: DType, k: usize) -> Option<DType> {
        let matrix = matches!(dtype, DType::F32 | DType::F16 | DType::BF16) && k % 32 == 0;
        let k_rows = k % 256 == 0;
        match self.quantize {
            Quantize::Q4 if matrix => Some(DType::Q4_0),
            Quantize::Q8 if matrix => Some(DType::Q8_0),
            Quantize::Q4K if matrix => Some(if k_rows { DType::Q4_K } else { DType::Q4_0 }),
            Quantize::Q6K if matrix => Some(if k_rows { DType::Q6_K } else { DType::Q8_0 }),
            _ => None,
        }
    }

    /// `data` (of `dtype`, rows of `k`) quantized to `dt`, every value checked finite first.
    fn quantized(
        &self,
        name: &str,
        dt: DType,
        dtype: DType,
        data: &[u8],
        k: usize,
    ) -> Result<Vec<u8>> {
        let n = data.len() / dtype.block_bytes() * dtype.block_elems();
        let v = dequantize(dtype, data, n)?;
        // Quantizing would hide a NaN (block maxima skip it), so look first.
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: name.into(),
                row: i / k.max(1),
            });
        }
        quantize(dt, &v)
    }
}

/// Rows of one matrix for [`VarBuilder::get_rows`]: its name here, its `[rows, k]` shape, and
/// the row ranges taken, in order.
pub struct RowPart<'n> {
    pub name: &'n str,
    pub shape: [usize; 2],
    pub rows: Vec<std::ops::Range<usize>>,
}

impl<'n> RowPart<'n> {
    /// Every row of a matrix.
    pub fn whole(name: &'n str, shape: [usize; 2]) -> Self {
        RowPart {
            name,
            shape,
            rows: std::iter::once(0..shape[0]).collect(),
        }
    }

    fn is_whole(&self) -> bool {
        self.rows.len() == 1 && self.rows[0] == (0..self.shape[0])
    }
}

/// A position in a checkpoint's name tree (see the module docs).
#[derive(Clone)]
pub struct VarBuilder<'a> {
    w: &'a Weights,
    prefix: String,
}

impl<'a> VarBuilder<'a> {
    /// The builder one level down: `pp("attn")` under `layers.0` is `layers.0.attn`.
    pub fn pp(&self, s: impl std::fmt::Display) -> VarBuilder<'a> {
        VarBuilder {
            w: self.w,
            prefix: self.path(&s.to_string()),
        }
    }

    /// The full name of `name` here.
    pub fn path(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (true, _) => name.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{name}", self.prefix),
        }
    }

    /// True when the checkpoint has `name` here.
    pub fn has(&self, name: &str) -> bool {
        self.w.raw(&self.path(name)).is_some()
    }

    /// The checkpoint's shape of `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let p = self.path(name);
        self.w
            .raw(&p)
            .map(|t| t.shape.to_vec())
            .ok_or_else(|| self.w.missing(&p))
    }

    /// The device the tensors go to.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.w.gpu
    }

    /// The values of `name` (which must have `shape`) on the CPU, as f32 (a scalar a graph
    /// folds in, such as Gemma 4's `layer_scalar`).
    pub fn get_cpu(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let p = self.path(name);
        let raw = self.w.raw(&p).ok_or_else(|| self.w.missing(&p))?;
        if raw.shape != shape {
            return Err(self
                .w
                .err(&p, format!("shape {:?}, expected {shape:?}", raw.shape)));
        }
        let v = dequantize(raw.dtype, raw.data, shape.iter().product())?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(self.w.err(&p, "a value is not finite".into()));
        }
        Ok(v)
    }

    /// A mixture-of-experts layer's expert matrices `[experts, sum n_i, k]` from `names`: each a
    /// tensor `[experts, n_i, k]`, or with `{e}` in it one `[n_i, k]` tensor per expert (as the
    /// Qwen MoE checkpoints keep them); several when a file keeps an expert's gate and up rows
    /// apart (each expert's rows of every name in order). Packed for the expert-indexed product
    /// ([`Tensor::upload_experts`]) and quantized on load as any matrix is.
    pub fn get_experts(
        &self,
        names: &[&str],
        experts: usize,
        ns: &[usize],
        k: usize,
    ) -> Result<Arc<Tensor>> {
        let paths: Vec<String> = names.iter().map(|n| self.path(n)).collect();
        let key = format!("{}#experts", paths.join("+"));
        if let Some(t) = self
            .w
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(t.clone());
        }
        // Each name's bytes of every expert: a slice of its 3-D tensor, or its own tensor.
        let mut dtype = None;
        let mut per_name: Vec<Vec<&[u8]>> = Vec::with_capacity(names.len());
        for (p, &n) in paths.iter().zip(ns) {
            let (per_expert, want) = match p.contains("{e}") {
                true => (true, vec![n, k]),
                false => (false, vec![experts, n, k]),
            };
            let files: Vec<String> = match per_expert {
                true => (0..experts)
                    .map(|e| p.replace("{e}", &e.to_string()))
                    .collect(),
                false => vec![p.clone()],
            };
            let mut parts = Vec::with_capacity(experts);
            for f in &files {
                let raw = self.w.raw(f).ok_or_else(|| self.w.missing(f))?;
                if raw.shape != want.as_slice() {
                    return Err(self
                        .w
                        .err(f, format!("shape {:?}, expected {want:?}", raw.shape)));
                }
                if *dtype.get_or_insert(raw.dtype) != raw.dtype {
                    return Err(Error::Unsupported(format!(
                        "{}: expert matrices {} in different dtypes ({} and {})",
                        self.w.label,
                        paths.join(", "),
                        dtype.unwrap_or(raw.dtype),
                        raw.dtype
                    )));
                }
                match per_expert {
                    true => parts.push(raw.data),
                    false => parts.extend(raw.data.chunks(raw.data.len() / experts.max(1))),
                }
            }
            per_name.push(parts);
        }
        let dtype = dtype.ok_or_else(|| Error::Data {
            name: self.w.label.clone(),
            msg: "no expert matrices named".into(),
        })?;
        // Each expert's rows of every name in turn (whole rows are whole blocks).
        let joined;
        let data: &[u8] = match per_name.as_slice() {
            [one] if one.len() == 1 => one[0],
            _ => {
                let mut v = Vec::new();
                for e in 0..experts {
                    for parts in &per_name {
                        v.extend_from_slice(parts[e]);
                    }
                }
                joined = v;
                &joined
            }
        };
        let shape = [experts, ns.iter().sum(), k];
        let name = paths.join("+");
        let t = match self.w.quantize_target(dtype, k) {
            Some(dt) => {
                let q = self.w.quantized(&name, dt, dtype, data, k)?;
                Tensor::upload_experts(&self.w.gpu, &name, &shape, dt, &q)
            }
            None => Tensor::upload_experts(&self.w.gpu, &name, &shape, dtype, data),
        }
        .map_err(|e| self.w.non_finite(e, &[(&paths[0], experts * shape[1])]))?;
        let t = Arc::new(t);
        self.w
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, t.clone());
        Ok(t)
    }

    /// The GPU tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Arc<Tensor>> {
        self.w.load(&self.path(name), Some(shape), false)
    }

    /// Like [`VarBuilder::get`], `None` when the checkpoint does not have it.
    pub fn optional(&self, name: &str, shape: &[usize]) -> Result<Option<Arc<Tensor>>> {
        if self.has(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Matrices `names` (each `[n_i, k]`, shapes checked) stacked by rows into one `[sum n_i,
    /// k]` tensor, so that one product serves several (Q/K/V, gate/up). `None` when their
    /// checkpoint dtypes differ (GGUF files mix quantizations per tensor), to be used apart.
    pub fn get_stacked(
        &self,
        names: &[&str],
        shapes: &[[usize; 2]],
    ) -> Result<Option<Arc<Tensor>>> {
        let parts: Vec<RowPart> = names
            .iter()
            .zip(shapes)
            .map(|(n, s)| RowPart::whole(n, *s))
            .collect();
        self.get_rows(&parts)
    }

    /// Row ranges of matrices stacked into one tensor in the order given (each part's ranges in
    /// turn): [`VarBuilder::get_stacked`] of whole matrices, or rows picked and reordered
    /// (Qwen 3.5's q_proj interleaves each head's query and gate rows). `None` when the
    /// checkpoint dtypes differ.
    pub fn get_rows(&self, parts: &[RowPart]) -> Result<Option<Arc<Tensor>>> {
        let names: Vec<&str> = parts.iter().map(|p| p.name).collect();
        let shapes: Vec<[usize; 2]> = parts.iter().map(|p| p.shape).collect();
        let paths: Vec<String> = names.iter().map(|n| self.path(n)).collect();
        let picks: Vec<String> = parts
            .iter()
            .filter(|p| !p.is_whole())
            .map(|p| format!("{}{:?}", p.name, p.rows))
            .collect();
        let key = format!("{}#stacked{}", paths.join("+"), picks.join(""));
        let cached = self
            .w
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some(t) = cached {
            return Ok(Some(t));
        }
        {
            let deltas = self.w.deltas.lock().unwrap_or_else(|e| e.into_inner());
            if paths
                .iter()
                .any(|p| deltas.contains_key(&self.w.file_name(p)))
            {
                // Updated parts are uploaded one by one (with their updates merged).
                return Ok(None);
            }
        }
        let mut raws = Vec::with_capacity(names.len());
        for (p, shape) in paths.iter().zip(&shapes) {
            let raw = self.w.raw(p).ok_or_else(|| self.w.missing(p))?;
            if raw.shape != shape {
                return Err(self
                    .w
                    .err(p, format!("shape {:?}, expected {shape:?}", raw.shape)));
            }
            raws.push(raw);
        }
        let dtype = raws[0].dtype;
        let k = shapes[0][1];
        if raws.iter().any(|r| r.dtype != dtype) || shapes.iter().any(|s| s[1] != k) {
            return Ok(None);
        }
        // Rows are whole in every file layout, so the stacked bytes are the files' rows in turn.
        let mut bytes: Vec<u8> = Vec::new();
        let mut rows = 0;
        for (raw, part) in raws.iter().zip(parts) {
            let row_bytes = raw.data.len() / part.shape[0].max(1);
            for r in &part.rows {
                if r.end > part.shape[0] || r.start > r.end {
                    return Err(self.w.err(
                        &self.path(part.name),
                        format!("rows {r:?} of {}", part.shape[0]),
                    ));
                }
                bytes.extend_from_slice(&raw.data[r.start * row_bytes..r.end * row_bytes]);
                rows += r.len();
            }
        }
        let shape = [rows, k];
        let raw = RawTensor {
            dtype,
            shape: &shape,
            data: &bytes,
        };
        let parts: Vec<(&str, usize)> = paths
            .iter()
            .zip(parts)
            .map(|(p, s)| (p.as_str(), s.rows.iter().map(|r| r.len()).sum()))
            .collect();
        let t = Arc::new(
            self.w
                .upload(&key, raw, false)
                .map_err(|e| self.w.non_finite(e, &parts))?,
        );
        self.w
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, t.clone());
        Ok(Some(t))
    }

    /// Vectors `names` (each `[n_i]`) as one f32 `[sum n_i]` (the biases of stacked matrices).
    pub fn get_stacked_f32(&self, names: &[&str], lens: &[usize]) -> Result<Arc<Tensor>> {
        self.get_vectors_plus(names, lens, 0.0)
    }

    /// [`VarBuilder::get_stacked_f32`] with `add` added to every element (Gemma's `(1 + w)`
    /// norm weights).
    pub fn get_vectors_plus(
        &self,
        names: &[&str],
        lens: &[usize],
        add: f32,
    ) -> Result<Arc<Tensor>> {
        if add == 0.0 {
            return self.get_vectors_map(names, lens, &|x| x);
        }
        self.get_vectors_map(names, lens, &|x| x + add)
    }

    /// Vectors `names` as one f32 `[sum n_i]` with `f` applied to every element (checked
    /// finite before and after).
    pub fn get_vectors_map(
        &self,
        names: &[&str],
        lens: &[usize],
        f: &dyn Fn(f32) -> f32,
    ) -> Result<Arc<Tensor>> {
        let mut v = Vec::new();
        for (n, &len) in names.iter().zip(lens) {
            let p = self.path(n);
            let raw = self.w.raw(&p).ok_or_else(|| self.w.missing(&p))?;
            if raw.shape != [len] {
                return Err(self
                    .w
                    .err(&p, format!("shape {:?}, expected [{len}]", raw.shape)));
            }
            v.extend(dequantize(raw.dtype, raw.data, len)?);
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            let (mut row, mut k) = (i, 0);
            while row >= lens[k] {
                row -= lens[k];
                k += 1;
            }
            let name = self.path(names[k]);
            return Err(self.w.non_finite(
                Error::NonFinite {
                    what: name.clone(),
                    row,
                },
                &[(&name, lens[k])],
            ));
        }
        v.iter_mut().for_each(|x| *x = f(*x));
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.w.err(
                &self.path(names[0]),
                format!("element {i} is not finite once transformed"),
            ));
        }
        Ok(Arc::new(Tensor::from_f32(
            &self.w.gpu,
            &names.join("+"),
            &[v.len()],
            &v,
        )?))
    }

    /// `name` as f32 whatever its checkpoint dtype (a table a graph slices by rows).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Arc<Tensor>> {
        self.w.load(&self.path(name), Some(shape), true)
    }

    /// The first of `prefixes` below here under which the checkpoint holds `probe`: library
    /// versions name one module differently (transformers 4 saves CLIP's tensors under
    /// `text_model.`, transformers 5 without it).
    pub fn first_of(&self, prefixes: &[&str], probe: &str) -> Result<VarBuilder<'a>> {
        prefixes
            .iter()
            .map(|p| {
                if p.is_empty() {
                    self.clone()
                } else {
                    self.pp(p)
                }
            })
            .find(|vb| vb.has(probe))
            .ok_or_else(|| Error::Data {
                name: self.w.label.clone(),
                msg: format!(
                    "missing tensor '{}' (looked under the prefixes {prefixes:?})",
                    self.path(probe)
                ),
            })
    }

    /// The graph value of `name` with `shape`.
    pub fn value(&self, g: &mut Graph, name: &str, shape: &[usize]) -> Result<Value> {
        Ok(g.tensor(&self.get(name, shape)?))
    }

    /// Linear layer here (`weight` `[n, k]`, optional `bias` `[n]`), k = last dim of `x`.
    pub fn linear(&self, g: &mut Graph, x: Value, n: usize) -> Result<Value> {
        let k = g.shape(x).last().copied().unwrap_or(0);
        let w = self.value(g, "weight", &[n, k])?;
        let b = self.optional("bias", &[n])?.map(|b| g.tensor(&b));
        g.linear(x, w, b)
    }

    /// Convolution here (`weight` `[co, ci, k, k]`, optional `bias` `[co]`) with padding k / 2,
    /// ci = channels of `x`.
    pub fn conv(
        &self,
        g: &mut Graph,
        x: Value,
        co: usize,
        k: usize,
        stride: usize,
    ) -> Result<Value> {
        let ci = g.shape(x).get(1).copied().unwrap_or(0);
        let w = self.value(g, "weight", &[co, ci, k, k])?;
        let b = self.optional("bias", &[co])?.map(|b| g.tensor(&b));
        g.conv2d(x, w, b, stride, k / 2)
    }

    /// GroupNorm here (`weight`, `bias` `[c]`), optionally followed by SiLU.
    pub fn group_norm(
        &self,
        g: &mut Graph,
        x: Value,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<Value> {
        let c = g.shape(x).get(1).copied().unwrap_or(0);
        let w = self.value(g, "weight", &[c])?;
        let b = self.value(g, "bias", &[c])?;
        g.group_norm(x, w, b, groups, eps, silu)
    }

    /// LayerNorm here (`weight`, `bias` `[d]`) over the last dimension.
    pub fn layer_norm(&self, g: &mut Graph, x: Value, eps: f32) -> Result<Value> {
        let d = g.shape(x).last().copied().unwrap_or(0);
        let w = self.value(g, "weight", &[d])?;
        let b = self.value(g, "bias", &[d])?;
        g.layer_norm(x, w, b, eps)
    }

    /// RMSNorm here (`weight` `[d]`) over the last dimension.
    pub fn rms_norm(&self, g: &mut Graph, x: Value, eps: f32) -> Result<Value> {
        let d = g.shape(x).last().copied().unwrap_or(0);
        let w = self.value(g, "weight", &[d])?;
        g.rms_norm(x, w, eps)
    }
}
