//! A loaded model's worker threads and their queue. One thread per model instance (a text
//! model's parallel slots are several instances on one set of weights); each takes the next
//! queued job when it is free. A job arriving while several are idle goes to the one whose
//! previous job shares the longest start with it (the same conversation's next turn lands on the
//! slot whose KV cache holds its history, so that slot reuses the prefix instead of prefilling it
//! again), as llama-server picks slots by prompt similarity.

use super::{ApiError, Event};
use axum::http::StatusCode;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::mpsc::Sender;

/// A job for a worker: the request, the model id responses carry, the reply channel.
type Job<J> = (J, String, Sender<Event>);

/// What a job's start looks like, in parts (a chat's messages, a prompt's chunks): two jobs
/// whose first parts agree are likely to share their first tokens.
pub type Key = Vec<u64>;

/// Parts two keys share from the start.
fn shared(a: &Key, b: &Key) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Queue<J> {
    waiting: VecDeque<(Job<J>, Key)>,
    /// Per instance: a job handed to it, whether it is idle, its last job's key.
    mail: Vec<Option<(Job<J>, Key)>>,
    idle: Vec<bool>,
    last: Vec<Key>,
    /// The model was unloaded: threads end once their work is done.
    closed: bool,
}

/// A loaded model: its id, its queue and the threads serving it.
pub struct Worker<J> {
    pub id: String,
    /// Requests queued or running.
    pub depth: Arc<AtomicUsize>,
    queue: Arc<(Mutex<Queue<J>>, Condvar)>,
    key: fn(&J) -> Key,
}

fn lost() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the model's worker stopped",
    )
}

impl<J: Send + 'static> Worker<J> {
    /// Starts a thread that owns `model` and runs `handle` for each job in order.
    pub fn start<M: Send + 'static>(
        id: String,
        model: M,
        handle: impl FnMut(&mut M, J, &str, &Sender<Event>) + Send + Clone + 'static,
    ) -> Worker<J> {
        Self::start_pool(id, vec![model], |_| Key::new(), handle)
    }

    /// Starts one thread per model (parallel slots of one model), each taking the next job when
    /// it is free; `key` says what a job starts with, for the choice among idle threads.
    pub fn start_pool<M: Send + 'static>(
        id: String,
        models: Vec<M>,
        key: fn(&J) -> Key,
        handle: impl FnMut(&mut M, J, &str, &Sender<Event>) + Send + Clone + 'static,
    ) -> Worker<J> {
        let n = models.len();
        let queue = Arc::new((
            Mutex::new(Queue {
                waiting: VecDeque::new(),
                mail: (0..n).map(|_| None).collect(),
                idle: vec![true; n],
                last: vec![Key::new(); n],
                closed: false,
            }),
            Condvar::new(),
        ));
        let depth = Arc::new(AtomicUsize::new(0));
        for (me, mut model) in models.into_iter().enumerate() {
            let (queue, d, mut handle) = (queue.clone(), depth.clone(), handle.clone());
            std::thread::spawn(move || loop {
                let Some(((job, model_id, reply), k)) = next(&queue, me) else {
                    return; // unloaded
                };
                // A client that left while the request waited: skipped.
                if !reply.is_closed() {
                    handle(&mut model, job, &model_id, &reply);
                }
                if let Ok(mut q) = queue.0.lock() {
                    q.last[me] = k;
                }
                d.fetch_sub(1, Relaxed);
            });
        }
        Worker {
            id,
            depth,
            queue,
            key,
        }
    }

    /// Queues `job`, or hands it to the idle thread whose last job starts most like it.
    pub fn submit(&self, job: J, reply: Sender<Event>) -> Result<(), ApiError> {
        let k = (self.key)(&job);
        let (lock, turn) = &*self.queue;
        let mut q = lock.lock().map_err(|_| lost())?;
        if q.closed {
            return Err(lost());
        }
        // Counted before a thread can take it (it counts down when done).
        self.depth.fetch_add(1, Relaxed);
        let job = ((job, self.id.clone(), reply), k);
        let best = (0..q.idle.len())
            .filter(|&i| q.idle[i] && q.mail[i].is_none())
            .max_by_key(|&i| (shared(&q.last[i], &job.1), std::cmp::Reverse(i)));
        match best {
            Some(i) => q.mail[i] = Some(job),
            None => q.waiting.push_back(job),
        }
        turn.notify_all();
        Ok(())
    }
}

/// The next job of thread `me`: one handed to it, else the oldest waiting; `None` once the model
/// is unloaded and nothing is left for it.
fn next<J>(queue: &(Mutex<Queue<J>>, Condvar), me: usize) -> Option<(Job<J>, Key)> {
    let (lock, turn) = queue;
    let mut q = lock.lock().ok()?;
    loop {
        if let Some(j) = q.mail[me].take().or_else(|| q.waiting.pop_front()) {
            q.idle[me] = false;
            return Some(j);
        }
        if q.closed {
            return None;
        }
        q.idle[me] = true;
        q = turn.wait(q).ok()?;
    }
}

impl<J> Drop for Worker<J> {
    /// Unloading: the threads finish what they hold and end.
    fn drop(&mut self) {
        if let Ok(mut q) = self.queue.0.lock() {
            q.closed = true;
        }
        self.queue.1.notify_all();
    }
}

/// A hash of one part of a job's start.
pub fn part_hash(part: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    part.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};
    use std::time::Duration;

    /// A job: its number, its key, and what it waits for before finishing (to keep its thread
    /// busy).
    type TestJob = (u32, Key, Option<Receiver<()>>);

    /// Three conversations on three threads (each busy when the next arrives), then each one's
    /// next turn, with all threads idle: every turn goes back to the thread that served its
    /// conversation; an unknown start goes to the first idle thread.
    #[test]
    fn a_conversation_returns_to_its_thread() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let (seen_tx, seen_rx) = channel::<(usize, u32)>();
        let seen = Arc::new(Mutex::new(seen_tx));
        let w: Worker<TestJob> = Worker::start_pool(
            "m".into(),
            vec![0usize, 1, 2],
            |j| j.1.clone(),
            move |me, job: TestJob, _, _| {
                let _ = seen.lock().unwrap().send((*me, job.0));
                if let Some(hold) = job.2 {
                    let _ = hold.recv_timeout(Duration::from_secs(10));
                }
            },
        );
        let mut releases = vec![];
        for (n, conv) in [(1u32, 10u64), (2, 20), (3, 30)] {
            let (release, hold) = channel();
            releases.push(release);
            w.submit((n, vec![conv], Some(hold)), tx.clone()).unwrap();
            assert_eq!(seen_rx.recv().unwrap(), (n as usize - 1, n));
        }
        drop(releases);
        let idle = || {
            for _ in 0..200 {
                if w.depth.load(Relaxed) == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("the threads did not finish");
        };
        for (n, conv, thread) in [(4u32, 30u64, 2usize), (5, 10, 0), (6, 20, 1)] {
            idle();
            w.submit((n, vec![conv, 99], None), tx.clone()).unwrap();
            assert_eq!(seen_rx.recv().unwrap(), (thread, n), "turn {n}");
        }
        idle();
        w.submit((7, vec![77], None), tx.clone()).unwrap();
        assert_eq!(seen_rx.recv().unwrap().1, 7);
    }
}
