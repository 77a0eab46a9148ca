//! Dynamic batching. One thread owns the queue and forms batches; one worker thread per
//! backend executor runs them. Nothing here runs on the async runtime's threads.
//!
//! A batch is formed when an executor is free and either enough work is queued to fill
//! it or the oldest sequence has waited `max_queue_delay`. The oldest sequence always
//! goes first (no starvation); the rest of the batch is filled with the sequences whose
//! lengths are closest to it, so short texts do not pay for long ones.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::backend::{Backend, BackendInfo, Batch, Shapes};
use crate::error::BackendError;
use crate::telemetry::{Metrics, QueuedSequence};

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Padded tokens (rows x longest row) per batch.
    pub max_batch_tokens: usize,
    /// Rows per batch.
    pub max_batch_size: usize,
    /// Sequences admitted but not yet computed.
    pub max_queue_sequences: usize,
    /// How long the oldest sequence may wait for a fuller batch while an executor is free.
    pub max_queue_delay: Duration,
}

/// A computed sequence.
#[derive(Debug)]
pub struct Scored {
    pub logits: Vec<f32>,
    pub queue: Duration,
    pub inference: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error("deadline exceeded after {waited:?} in the queue")]
    DeadlineExceeded { waited: Duration },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[derive(Debug, thiserror::Error)]
#[error("queue full: {queued} sequences waiting (limit {limit})")]
pub struct QueueFull {
    pub queued: usize,
    pub limit: usize,
}

/// Room in the queue for a number of sequences, held until they are computed or dropped.
pub struct Reservation(OwnedSemaphorePermit);

struct Job {
    ids: Vec<u32>,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Scored, JobError>>,
    _permit: Option<OwnedSemaphorePermit>,
    _queued: QueuedSequence,
}

impl Job {
    /// Its caller went away or its deadline passed: computing it would be wasted.
    fn is_dead(&self, now: Instant) -> bool {
        if self.reply.is_closed() {
            return true;
        }
        matches!(self.deadline, Some(d) if d <= now)
    }

    /// Drops a dead job uncomputed: counts it, and answers DEADLINE_EXCEEDED (a no-op when
    /// the caller went away).
    fn drop_dead(self, now: Instant, metrics: &Metrics) {
        metrics.sequence_dropped();
        let waited = now - self.enqueued;
        self.answer(Err(JobError::DeadlineExceeded { waited }));
    }

    /// Frees the job's room in the queue, then answers: a caller that sends more work as
    /// soon as it has its answer finds the room already free.
    fn answer(self, result: Result<Scored, JobError>) {
        let Job { reply, _permit, _queued, .. } = self;
        drop((_permit, _queued));
        let _ = reply.send(result);
    }
}

enum Msg {
    Job(Job),
    Ready(usize),
    Shutdown,
}

pub struct Batcher {
    tx: mpsc::Sender<Msg>,
    permits: Arc<Semaphore>,
    limit: usize,
    config: BatcherConfig,
    info: BackendInfo,
    executors: usize,
    metrics: Arc<Metrics>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Batcher {
    /// Starts the queue thread and one worker per executor. `on_fatal` is called when an
    /// executor reports a device or runtime failure; batches and queue depth go to `metrics`.
    pub fn start(
        executors: Vec<Box<dyn Backend>>,
        config: BatcherConfig,
        pad_id: u32,
        on_fatal: Arc<dyn Fn(&BackendError) + Send + Sync>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let info = executors.first().map(|b| b.info()).ok_or_else(|| std::io::Error::other("no backend executor"))?;
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        let mut worker_txs = Vec::new();
        for (index, backend) in executors.into_iter().enumerate() {
            let (work_tx, work_rx) = mpsc::channel::<Vec<Job>>();
            worker_txs.push(work_tx);
            let (ready, on_fatal, metrics) = (tx.clone(), on_fatal.clone(), metrics.clone());
            let worker = Worker { index, backend, shapes: info.shapes.clone(), pad_id, ready, on_fatal, metrics };
            threads.push(std::thread::Builder::new().name(format!("dealsift-exec-{index}")).spawn(move || worker.run(work_rx))?);
        }
        let executors = worker_txs.len();
        let queue = Queue { config: config.clone(), shapes: info.shapes.clone(), workers: worker_txs, metrics: metrics.clone() };
        threads.push(std::thread::Builder::new().name("dealsift-queue".into()).spawn(move || queue.run(rx))?);
        let limit = config.max_queue_sequences;
        let permits = Arc::new(Semaphore::new(limit));
        Ok(Self { tx, permits, limit, config, info, executors, metrics, threads: std::sync::Mutex::new(threads) })
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    pub fn info(&self) -> &BackendInfo {
        &self.info
    }

    pub fn executors(&self) -> usize {
        self.executors
    }

    pub fn capacity(&self) -> usize {
        self.limit
    }

    /// Reserves room for `n` sequences now, or says the queue is full.
    pub fn try_reserve(&self, n: usize) -> Result<Reservation, QueueFull> {
        let full = || QueueFull { queued: self.limit - self.permits.available_permits(), limit: self.limit };
        let n = u32::try_from(n).map_err(|_| full())?;
        self.permits.clone().try_acquire_many_owned(n).map(Reservation).map_err(|_| full())
    }

    /// Waits for room for `n` sequences (`n` must not exceed the capacity).
    pub async fn reserve(&self, n: usize) -> Reservation {
        let n = u32::try_from(n.min(self.limit)).unwrap_or(u32::MAX);
        // The semaphore is never closed, so acquiring cannot fail.
        Reservation(self.permits.clone().acquire_many_owned(n).await.expect("queue semaphore closed"))
    }

    /// Queues token windows; each answer arrives on its receiver, in the given order.
    pub fn submit(
        &self,
        mut reservation: Reservation,
        windows: Vec<Vec<u32>>,
        deadline: Option<Instant>,
    ) -> Vec<oneshot::Receiver<Result<Scored, JobError>>> {
        let enqueued = Instant::now();
        windows
            .into_iter()
            .map(|ids| {
                let (reply, rx) = oneshot::channel();
                let permit = reservation.0.split(1);
                // A send fails only after shutdown; the dropped reply then reads as cancelled.
                let job = Job { ids, enqueued, deadline, reply, _permit: permit, _queued: self.metrics.queued() };
                let _ = self.tx.send(Msg::Job(job));
                rx
            })
            .collect()
    }

    /// Computes everything already queued, then stops the threads. Idempotent.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A batcher dropped without `shutdown` (an engine replaced by a reload, once its last request
/// is answered) still stops its threads, and so frees its backends, without blocking the drop.
impl Drop for Batcher {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
    }
}

struct Queue {
    config: BatcherConfig,
    shapes: Shapes,
    workers: Vec<mpsc::Sender<Vec<Job>>>,
    metrics: Arc<Metrics>,
}

impl Queue {
    fn run(self, rx: mpsc::Receiver<Msg>) {
        let mut pending: VecDeque<Job> = VecDeque::new();
        let mut idle: Vec<usize> = (0..self.workers.len()).rev().collect();
        let mut stopping = false;
        loop {
            let wait = match pending.front() {
                Some(oldest) if !idle.is_empty() => Some((oldest.enqueued + self.config.max_queue_delay).saturating_duration_since(Instant::now())),
                _ => None,
            };
            let first = match wait {
                Some(d) => rx.recv_timeout(d),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let mut messages: Vec<Msg> = Vec::new();
            match first {
                Ok(msg) => messages.push(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stopping = true,
            }
            messages.extend(rx.try_iter());
            for msg in messages {
                match msg {
                    Msg::Job(job) => pending.push_back(job),
                    Msg::Ready(worker) => idle.push(worker),
                    Msg::Shutdown => stopping = true,
                }
            }
            while !idle.is_empty() {
                self.drop_dead(&mut pending);
                let Some(oldest) = pending.front() else { break };
                let due = stopping || oldest.enqueued.elapsed() >= self.config.max_queue_delay || self.can_fill(&pending);
                if !due {
                    break;
                }
                let batch = self.take_batch(&mut pending);
                let worker = idle.pop().expect("checked non-empty");
                if self.workers[worker].send(batch).is_err() {
                    // The worker thread is gone (it only exits on shutdown); its jobs read as cancelled.
                    continue;
                }
            }
            if stopping && pending.is_empty() && idle.len() == self.workers.len() {
                return;
            }
        }
    }

    fn drop_dead(&self, pending: &mut VecDeque<Job>) {
        let now = Instant::now();
        let mut kept = VecDeque::with_capacity(pending.len());
        for job in pending.drain(..) {
            if job.is_dead(now) {
                job.drop_dead(now, &self.metrics);
            } else {
                kept.push_back(job);
            }
        }
        *pending = kept;
    }

    fn can_fill(&self, pending: &VecDeque<Job>) -> bool {
        let tokens: usize = pending.iter().map(|j| j.ids.len()).sum();
        pending.len() >= self.config.max_batch_size.min(self.shapes.max_batch()) || tokens >= self.config.max_batch_tokens
    }

    /// The oldest job plus the jobs closest to it in length, within the token budget and a
    /// shape the backend takes.
    fn take_batch(&self, pending: &mut VecDeque<Job>) -> Vec<Job> {
        let anchor = pending[0].ids.len();
        let mut order: Vec<usize> = (1..pending.len()).collect();
        order.sort_by_key(|&i| (pending[i].ids.len().abs_diff(anchor), i));
        let max_rows = self.config.max_batch_size.min(self.shapes.max_batch()).max(1);
        let mut chosen = vec![0];
        let mut longest = anchor;
        for i in order {
            if chosen.len() == max_rows {
                break;
            }
            let new_longest = longest.max(pending[i].ids.len());
            let rows = chosen.len() + 1;
            if new_longest * rows > self.config.max_batch_tokens || self.shapes.fit(rows, new_longest).is_none() {
                continue;
            }
            chosen.push(i);
            longest = new_longest;
        }
        chosen.sort_unstable();
        let mut batch = Vec::with_capacity(chosen.len());
        for &i in chosen.iter().rev() {
            batch.push(pending.remove(i).expect("index in range"));
        }
        batch.reverse();
        batch
    }
}

struct Worker {
    index: usize,
    backend: Box<dyn Backend>,
    shapes: Shapes,
    pad_id: u32,
    ready: mpsc::Sender<Msg>,
    on_fatal: Arc<dyn Fn(&BackendError) + Send + Sync>,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(mut self, work: mpsc::Receiver<Vec<Job>>) {
        while let Ok(jobs) = work.recv() {
            self.compute(jobs);
            if self.ready.send(Msg::Ready(self.index)).is_err() {
                return;
            }
        }
    }

    fn compute(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        let mut live = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.is_dead(started) {
                job.drop_dead(started, &self.metrics);
            } else {
                live.push(job);
            }
        }
        if live.is_empty() {
            return;
        }
        let longest = live.iter().map(|j| j.ids.len()).max().unwrap_or(0);
        let shape = self.shapes.fit(live.len(), longest);
        let result = match shape {
            Some(shape) => {
                let batch = Batch::pack(live.iter().map(|j| j.ids.as_slice()), shape, self.pad_id);
                catch_unwind(AssertUnwindSafe(|| self.backend.predict(&batch)))
                    .unwrap_or_else(|_| Err(BackendError::Fatal("backend panicked".into())))
            }
            None => Err(BackendError::InvalidInput(format!("no backend shape holds {} rows of {longest} tokens", live.len()))),
        };
        let inference = started.elapsed();
        match result {
            Ok(rows) if rows.len() >= live.len() => {
                self.metrics.observe_batch(live.len(), shape.map_or(0, |s| s.batch * s.seq));
                for (job, logits) in live.into_iter().zip(rows) {
                    let queue = started - job.enqueued;
                    job.answer(Ok(Scored { logits, queue, inference }));
                }
            }
            other => {
                let err = match other {
                    Err(e) => e,
                    Ok(rows) => BackendError::Inference(format!("backend returned {} rows for {}", rows.len(), live.len())),
                };
                self.metrics.batch_failed();
                if matches!(err, BackendError::Fatal(_)) {
                    (self.on_fatal)(&err);
                }
                tracing::error!(executor = self.index, error = %err, "batch failed");
                for job in live {
                    job.answer(Err(JobError::Backend(err.clone())));
                }
            }
        }
    }
}
