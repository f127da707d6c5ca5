//! The fusion pass: before a graph is compiled, ops whose combination one kernel computes are
//! merged, so model code writes plain ops (`rms_norm`, `linear`, `rope_kv`, `glu`) and the plan
//! gets the fewest dispatches the kernels and the adapter allow. Each rule checks shapes,
//! consumers and the adapter, and leaves the ops as written when any check fails:
//!
//! - **RMSNorm into the products that read it.** A norm whose output feeds only products of one
//!   activation row (the decode matvec) is computed in each product's prologue
//!   ([`Linear::norm`]); its own dispatch goes. With Q/K/V stacked that is one product. GPUs
//!   only: see [`fuses_norm`] for why software adapters keep the norm's dispatch.
//! - **Gated unit into the stacked gate/up product.** A `glu` over the halves of a matvec's
//!   output (SwiGLU / GEGLU on a stacked gate/up weight) becomes the product's epilogue
//!   ([`Epilogue::Glu`]): output row `r` reads weight rows `r` and `r + n/2`.
//! - **Rotary step into the stacked Q/K/V product.** A `rope_kv` on a matvec's output becomes
//!   its epilogue ([`Epilogue::RopeKv`]): each invocation computes a rotary pair of rows,
//!   rotates it and writes q out, k and v into the caches.
//!
//! - **The norm's sum of squares from the product that made its input.** A matvec with a
//!   residual (the hidden state's update) writes each workgroup's sum of squares of its
//!   outputs, and the fused norms of the products right after it that read that state add
//!   those up instead of summing x^2 in every workgroup ([`NormPartials`]). One buffer holds
//!   the latest producer's sums, so a reader is paired only with the producer just before it.
//!
//! Residual adds are fused by the model builder already (`Graph::linear_add`).

use super::{Graph, Node, Op, Source, Value};
use crate::device::Gpu;
use crate::kernels::elementwise::Glu;
use crate::kernels::linear::{fuses_norm, Epilogue, Linear, NormPartials, MATVEC_MAX_ROWS};
use crate::kernels::norm::RmsNorm;
use crate::tensor::numel;

/// Who reads each value: `(node, input position)` per root value; writes count as reads at
/// position `usize::MAX`. A value read through a reshaped view is recorded under its root with
/// the view's own id, so rules can require direct reads.
struct Uses(Vec<Vec<(usize, usize, Value)>>);

impl Uses {
    /// The reads of the nodes not `removed`.
    fn of(g: &Graph, removed: &[bool]) -> Uses {
        let mut uses = vec![Vec::new(); g.values.len()];
        for (i, n) in g.nodes.iter().enumerate().filter(|(i, _)| !removed[*i]) {
            for (pos, &v) in n.inputs.iter().enumerate() {
                uses[g.root(v).0].push((i, pos, v));
            }
            for &v in &n.writes {
                uses[g.root(v).0].push((i, usize::MAX, v));
            }
        }
        Uses(uses)
    }

    /// Whether no node strictly between `a` and `b` reads or writes `v` (or a view of it).
    fn untouched_between(&self, g: &Graph, v: Value, a: usize, b: usize) -> bool {
        self.0[g.root(v).0].iter().all(|&(n, ..)| n <= a || n >= b)
    }

    /// Whether any node writes `v` (or a view of it) in place.
    fn written(&self, g: &Graph, v: Value) -> bool {
        self.0[g.root(v).0]
            .iter()
            .any(|&(_, pos, _)| pos == usize::MAX)
    }

    /// The nodes reading `v`, when every read is of `v` itself (no view) at input `pos`.
    fn only_direct(&self, v: Value, pos: usize) -> Option<Vec<usize>> {
        let reads = &self.0[v.0];
        reads
            .iter()
            .all(|&(_, p, via)| p == pos && via == v)
            .then(|| reads.iter().map(|&(n, ..)| n).collect())
    }
}

impl Graph {
    /// The graph with the fusion rules applied (see the module notes).
    pub(crate) fn fused(&self, gpu: &Gpu) -> Graph {
        let mut g = self.clone();
        let mut removed = vec![false; g.nodes.len()];
        g.fuse_norms(gpu, &mut removed);
        g.fuse_epilogues(&mut removed);
        g.hand_on_norm_partials(gpu, &removed);
        let nodes = std::mem::take(&mut g.nodes);
        g.nodes = nodes
            .into_iter()
            .zip(removed)
            .filter_map(|(n, r)| (!r).then_some(n))
            .collect();
        g
    }

    /// Whether `v` is an intermediate nothing outside the graph sees.
    fn internal(&self, v: Value) -> bool {
        let info = &self.values[v.0];
        matches!(info.source, Source::Node) && !info.output
    }

    /// A one-row product of x `[.., k]` with a weight `[n, k]` in one buffer.
    fn one_part_matvec(&self, node: &Node, max_rows: usize) -> Option<Linear> {
        let Op::Linear(l) = &node.op else { return None };
        let (x, w) = (node.inputs[0], node.inputs[1]);
        let k = *self.shape(x).last().filter(|&&k| k > 0)?;
        let parts = match &self.info(self.root(w)).source {
            Source::Tensor(t) => t.parts.len(),
            _ => return None,
        };
        let ok = self.shape(w).len() == 2 && parts == 1 && numel(self.shape(x)) / k <= max_rows;
        ok.then(|| l.clone())
    }

    fn fuse_norms(&mut self, gpu: &Gpu, removed: &mut [bool]) {
        let uses = Uses::of(self, removed);
        for (i, gone) in removed.iter_mut().enumerate() {
            let Op::RmsNorm(RmsNorm { eps }) = self.nodes[i].op else {
                continue;
            };
            let (x, nw) = (self.nodes[i].inputs[0], self.nodes[i].inputs[1]);
            let Some(out) = self.nodes[i].out else {
                continue;
            };
            let k = self.shape(x).last().copied().unwrap_or(0);
            if !self.internal(out) || self.shape(nw) != [k] || !fuses_norm(gpu) {
                continue;
            }
            // The products read x (and the norm weight) later than the norm did: nothing may
            // write them (a tensor written in place, as the caches are) anywhere in the graph.
            // Weights and the hidden state are never written so.
            if uses.written(self, x) || uses.written(self, nw) {
                continue;
            }
            let Some(readers) = uses.only_direct(out, 0) else {
                continue;
            };
            let fusable = !readers.is_empty()
                && readers.iter().all(|&r| {
                    self.one_part_matvec(&self.nodes[r], 1)
                        .is_some_and(|l| l.norm.is_none() && l.epilogue.is_none())
                });
            if !fusable {
                continue;
            }
            for r in readers {
                let node = &mut self.nodes[r];
                if let Op::Linear(l) = &mut node.op {
                    l.norm = Some(eps);
                }
                node.inputs[0] = x;
                node.inputs.push(nw);
            }
            *gone = true;
        }
    }

    /// Gated units and rotary steps whose input is a matvec's output that nothing else reads.
    fn fuse_epilogues(&mut self, removed: &mut [bool]) {
        let uses = Uses::of(self, removed);
        let mut producer = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(o) = n.out {
                producer[o.0] = Some(i);
            }
        }
        for j in 0..self.nodes.len() {
            let (epilogue, rows) = match &self.nodes[j].op {
                Op::Glu(Glu {
                    act,
                    split: Some(gate_first),
                }) => (
                    Epilogue::Glu {
                        act: *act,
                        gate_first: *gate_first,
                    },
                    MATVEC_MAX_ROWS,
                ),
                Op::RopeKv(r) if r.fusable() => (Epilogue::RopeKv(r.clone()), 1),
                _ => continue,
            };
            let v = self.nodes[j].inputs[0];
            let Some(p) = producer[v.0] else { continue };
            if removed[p] || !self.internal(v) || uses.only_direct(v, 0) != Some(vec![j]) {
                continue;
            }
            let Some(mut l) = self.one_part_matvec(&self.nodes[p], rows) else {
                continue;
            };
            let glu = matches!(epilogue, Epilogue::Glu { .. });
            if (glu && l.bias) || l.residual || l.epilogue.is_some() {
                continue;
            }
            // The epilogue's own inputs (the rotary table, the caches it writes) are used at
            // the product's place: no node in between may touch them.
            let inputs = &self.nodes[j].inputs[1..];
            if !inputs
                .iter()
                .all(|&v| uses.untouched_between(self, v, p, j))
            {
                continue;
            }
            l.epilogue = Some(epilogue);
            // The rotary step's table and caches follow the product's inputs; it writes the caches.
            let (extra, writes) = (
                self.nodes[j].inputs[1..].to_vec(),
                self.nodes[j].writes.clone(),
            );
            let out = self.nodes[j].out;
            let node = &mut self.nodes[p];
            node.op = Op::Linear(l);
            node.inputs.extend(extra);
            node.writes = writes;
            node.out = out;
            removed[j] = true;
        }
    }

    /// Pairs fused-norm products with the residual product that wrote their input (see the
    /// module notes): walking the nodes in order, the latest eligible producer's output is the
    /// one whose partial sums the buffer holds.
    fn hand_on_norm_partials(&mut self, gpu: &Gpu, removed: &[bool]) {
        if gpu.features.software {
            return;
        }
        let limit = gpu.limits.max_storage_buffers_per_shader_stage as usize;
        let mut live: Option<(usize, usize)> = None;
        let mut role = vec![NormPartials::None; self.nodes.len()];
        for i in (0..self.nodes.len()).filter(|&i| !removed[i]) {
            let Op::Linear(l) = &self.nodes[i].op else {
                continue;
            };
            // The matvec's storage buffers: w, x, bias, y, residual (or table), norm weight,
            // the caches under the rotary epilogue, and the partial sums.
            let rope = matches!(l.epilogue, Some(Epilogue::RopeKv(_)));
            let fits = 7 + 2 * rope as usize <= limit;
            let reads = l.norm.is_some()
                && fits
                && live.is_some_and(|(_, v)| self.root(self.nodes[i].inputs[0]).0 == v);
            if reads {
                role[i] = NormPartials::Read;
                if let Some((p, _)) = live {
                    role[p] = NormPartials::Write;
                }
                // A product that reads the sums does not also write them (its workgroups
                // would overwrite what the others still read).
                continue;
            }
            let produces = l.residual
                && l.epilogue.is_none()
                && fits
                && self.one_part_matvec(&self.nodes[i], 1).is_some();
            if let (true, Some(out)) = (produces, self.nodes[i].out) {
                live = Some((i, out.0));
            }
        }
        for (node, r) in self.nodes.iter_mut().zip(role) {
            if let Op::Linear(l) = &mut node.op {
                l.partials = r;
            }
        }
    }

    /// The ops of the graph as the plan for `gpu` runs them, after the fusion pass: for tests
    /// and for seeing what was fused.
    pub fn fused_ops(&self, gpu: &Gpu) -> Vec<String> {
        self.fused(gpu)
            .nodes
            .iter()
            .map(|n| format!("{:?}", n.op))
            .collect()
    }
}
