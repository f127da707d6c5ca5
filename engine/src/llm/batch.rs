//! Continuous batching of parallel slots: the slots of one model share one set of KV caches
//! ([`KvCache::shared`], a sequence each) and, while more than one of them is decoding, their
//! decode tokens run together: one [`BatchStep`] run feeds one token of every decoding slot, so
//! each weight matrix is read once for all of them (a product with a row per slot instead of a
//! matvec per slot).
//!
//! Each slot keeps its own thread and decode loop ([`super::TextModel::generate`]); where the
//! loop would run its own decode step it posts its token's inputs here instead and waits. When
//! every decoding slot has posted, the last one to post runs the batch for all of them and hands
//! each its sampler output: the slots advance in lockstep, one token each per run (fair
//! interleaving). A slot that has not posted [`PATIENCE_MS`] after the first of a run did (its
//! client reads slowly, its grammar mask takes long) is not waited for: the others run without it
//! and it joins the next run, so no client can hold the others up. A slot that is prefilling is not a member, so its prefill runs between the
//! batch runs; a slot that finishes or is cancelled leaves at once and the others go on
//! without it. A slot decoding alone uses its own one-token step (pipelined as usual).

use super::config::LlmConfig;
use super::model::{build_batch, BatchStep, KvCache};
use super::weights::LlmWeights;
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::kernels::sample::{SAMPLE_OUT_LEN, SETTINGS_LEN};
use crate::Scalar;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How long the slots that have posted wait for the other decoding slots before running
/// without them (a slot's host work between tokens takes well under a millisecond).
pub const PATIENCE_MS: f64 = 2.0;

/// One slot's next decode token: what its row of the batch needs.
pub struct Post {
    /// Position of the token fed (its id is in the slot's history there).
    pub pos: usize,
    pub seed: u32,
    /// Sampler settings ([`crate::kernels::sample::SamplerSettings::to_f32s`]).
    pub settings: [f32; SETTINGS_LEN],
    /// The constraint words (allowed-id mask, logit biases) when the settings use them.
    pub constraint: Option<Vec<u32>>,
    /// Bytes of the sampler output to read back.
    pub readback: u64,
}

/// The batch of one model's slots.
pub struct Batch {
    state: Mutex<State>,
    turn: Condvar,
    ctx: usize,
    /// Batch runs so far, and the tokens they computed.
    runs: AtomicU64,
    tokens: AtomicU64,
}

struct State {
    /// The compiled step for `r + 1` rows at index `r` (taken out while it runs).
    steps: Vec<Option<BatchStep>>,
    /// Slots in their decode loop.
    members: Vec<bool>,
    posted: Vec<Option<Post>>,
    results: Vec<Option<std::result::Result<Vec<u8>, String>>>,
    running: bool,
    /// When the earliest of the posts waiting for the next run arrived.
    first_post: Option<f64>,
}

impl Batch {
    /// Compiles the batch steps (1 to `kvs.len()` rows) over the shared caches of `kvs`.
    pub async fn new(
        gpu: &Arc<Gpu>,
        cfg: &LlmConfig,
        w: &LlmWeights,
        kvs: &[KvCache],
    ) -> Result<Batch> {
        let n = kvs.len();
        let mut steps = Vec::with_capacity(n);
        for rows in 1..=n {
            steps.push(Some(build_batch(gpu, cfg, w, &kvs[0], rows).await?));
        }
        Ok(Batch {
            state: Mutex::new(State {
                steps,
                members: vec![false; n],
                posted: (0..n).map(|_| None).collect(),
                results: (0..n).map(|_| None).collect(),
                running: false,
                first_post: None,
            }),
            turn: Condvar::new(),
            ctx: kvs[0].ctx,
            runs: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(poisoned)
    }

    /// Batch runs so far and the tokens they computed (a run computes one token of each slot
    /// decoding at the time).
    pub fn stats(&self) -> (u64, u64) {
        (self.runs.load(Relaxed), self.tokens.load(Relaxed))
    }

    /// Slots decoding now.
    pub fn members(&self) -> usize {
        self.lock()
            .map(|s| s.members.iter().filter(|&&m| m).count())
            .unwrap_or(0)
    }

    /// Makes slot `seq` a member until the returned guard drops (its decode loop's length).
    pub fn member(self: &Arc<Self>, seq: usize) -> Member {
        if let Ok(mut s) = self.lock() {
            s.members[seq] = true;
        }
        Member {
            batch: self.clone(),
            seq,
        }
    }

    fn leave(&self, seq: usize) {
        if let Ok(mut s) = self.lock() {
            s.members[seq] = false;
            s.posted[seq] = None;
            s.results[seq] = None;
            if s.posted.iter().all(Option::is_none) {
                s.first_post = None;
            }
        }
        // The others may all have posted now: one of them leads.
        self.turn.notify_all();
    }

    /// Runs slot `seq`'s next token with the other decoding slots' and returns its sampler
    /// output (as [`super::model::Step::out`] reads back).
    pub async fn step(&self, seq: usize, post: Post) -> Result<Vec<u8>> {
        let mut post = Some(post);
        loop {
            match self.turn(seq, post.take())? {
                Turn::Done(r) => {
                    return r.map_err(|msg| Error::Gpu {
                        context: "batched decode".into(),
                        msg,
                    })
                }
                Turn::Lead(mut step, rows) => {
                    let r = self.run(&mut step, &rows).await;
                    self.runs.fetch_add(1, Relaxed);
                    self.tokens.fetch_add(rows.len() as u64, Relaxed);
                    self.finish(*step, &rows, r)?;
                }
            }
        }
    }

    /// Posts `post` (when given) and waits until slot `seq`'s output is ready, or until no run
    /// is going and every decoding slot has posted (or the first post has waited
    /// [`PATIENCE_MS`]): then this slot leads the next run.
    fn turn(&self, seq: usize, post: Option<Post>) -> Result<Turn> {
        let mut s = self.lock()?;
        if let Some(p) = post {
            s.posted[seq] = Some(p);
            s.first_post.get_or_insert_with(crate::device::now_ms);
        }
        loop {
            if let Some(r) = s.results[seq].take() {
                return Ok(Turn::Done(r));
            }
            let all_posted = s
                .members
                .iter()
                .zip(&s.posted)
                .all(|(&m, p)| !m || p.is_some());
            let waited = s.first_post.map_or(0.0, |t| crate::device::now_ms() - t);
            let pending = s.posted.iter().any(Option::is_some);
            if !s.running && pending && (all_posted || waited >= PATIENCE_MS) {
                let rows: Vec<(usize, Post)> = (0..s.posted.len())
                    .filter_map(|i| s.posted[i].take().map(|p| (i, p)))
                    .collect();
                let step = s.steps[rows.len() - 1].take().ok_or_else(|| Error::Gpu {
                    context: "batched decode".into(),
                    msg: format!("no step for {} rows", rows.len()),
                })?;
                s.running = true;
                s.first_post = None;
                return Ok(Turn::Lead(Box::new(step), rows));
            }
            s = if !s.running && pending {
                // Woken by a post or a leave, or when the patience runs out.
                let left = (PATIENCE_MS - waited).max(0.1);
                let wait = std::time::Duration::from_micros((left * 1e3) as u64);
                self.turn.wait_timeout(s, wait).map_err(poisoned)?.0
            } else {
                self.turn.wait(s).map_err(poisoned)?
            };
        }
    }

    /// Puts the step back and hands each row its output (or the run's error).
    fn finish(
        &self,
        step: BatchStep,
        rows: &[(usize, Post)],
        r: Result<Vec<Vec<u8>>>,
    ) -> Result<()> {
        let mut s = self.lock()?;
        s.steps[rows.len() - 1] = Some(step);
        s.running = false;
        // Posts that came during the run wait from now: the run's own slots are about to post.
        if s.posted.iter().any(Option::is_some) {
            s.first_post = Some(crate::device::now_ms());
        }
        match r {
            Ok(outs) => {
                for ((i, _), out) in rows.iter().zip(outs) {
                    s.results[*i] = Some(Ok(out));
                }
            }
            Err(e) => {
                for (i, _) in rows {
                    s.results[*i] = Some(Err(e.to_string()));
                }
            }
        }
        self.turn.notify_all();
        Ok(())
    }

    /// The per-dispatch GPU times of one run of the step for `rows` slots (each at its sequence's
    /// position `pos`), as [`crate::Plan::profile`] gives them: what `kiln bench parallel`
    /// prints.
    pub async fn profile(&self, rows: usize, pos: usize) -> Result<Vec<(String, f64)>> {
        let mut step = {
            let mut s = self.lock()?;
            if s.running || rows == 0 || rows > s.steps.len() {
                return Err(Error::Unsupported(format!(
                    "profiling a batch of {rows} now"
                )));
            }
            s.steps[rows - 1].take()
        }
        .ok_or_else(|| Error::Unsupported("the batch step is running".into()))?;
        let at = |first: Scalar, r: usize| Scalar(first.0 + r as u32);
        for r in 0..rows {
            step.plan.set(at(step.seq, r), r as u32);
            step.plan.set(at(step.pos, r), pos as u32);
            step.plan
                .set(at(step.tok, r), (r * (self.ctx + 1) + pos) as u32);
        }
        let p = step.plan.profile().await;
        self.lock()?.steps[rows - 1] = Some(step);
        p
    }

    /// One run of `step` for `rows` (slot, its token): the per-row scalars, settings and
    /// constraints, then each row's sampler output.
    async fn run(&self, step: &mut BatchStep, rows: &[(usize, Post)]) -> Result<Vec<Vec<u8>>> {
        let at = |first: Scalar, r: usize| Scalar(first.0 + r as u32);
        let plan = &mut step.plan;
        let mut settings = Vec::with_capacity(rows.len() * SETTINGS_LEN);
        for (r, (seq, p)) in rows.iter().enumerate() {
            plan.set(at(step.seq, r), *seq as u32);
            plan.set(at(step.pos, r), p.pos as u32);
            plan.set(at(step.tok, r), (seq * (self.ctx + 1) + p.pos) as u32);
            plan.set(at(step.seed, r), p.seed);
            settings.extend(p.settings);
            if let Some(c) = &p.constraint {
                plan.write_words_at(step.constraint, r * c.len(), c)?;
            }
        }
        plan.write_f32(step.settings, &settings)?;
        // Every row's output (the top_logprobs pairs included: a few hundred bytes).
        let row_bytes = (4 * SAMPLE_OUT_LEN) as u64;
        let all = plan
            .run_read_heads(&[(step.out, row_bytes * rows.len() as u64)])
            .await?;
        let all = all.into_iter().next().unwrap_or_default();
        Ok(rows
            .iter()
            .enumerate()
            .map(|(r, (_, p))| {
                let start = (r as u64 * row_bytes) as usize;
                all.get(start..start + p.readback as usize)
                    .unwrap_or_default()
                    .to_vec()
            })
            .collect())
    }
}

/// The error of a lock a panicking slot left poisoned.
fn poisoned<T>(_: T) -> Error {
    Error::Gpu {
        context: "batched decode".into(),
        msg: "a slot panicked while holding the batch".into(),
    }
}

/// What a slot waiting in [`Batch::turn`] gets: its output, or the next run to lead.
enum Turn {
    Done(std::result::Result<Vec<u8>, String>),
    Lead(Box<BatchStep>, Vec<(usize, Post)>),
}

/// A slot's membership of its [`Batch`] (left when dropped).
pub struct Member {
    batch: Arc<Batch>,
    seq: usize,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.batch.leave(self.seq);
    }
}
