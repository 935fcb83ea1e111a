//! Worker threads for the generator: each runs a single-threaded tokio runtime, and a
//! connection lives on one of them from connect to close.
//!
//! ```text
//! caller's runtime: drive(), ticker, Ctrl-C
//! worker 0: clients 0, n, 2n, … (quinn drivers, lanes, ACK readers) + their send loops
//! worker 1: clients 1, n+1, …
//! ```
//!
//! Why: on tokio's work-stealing runtime every wakeup of a task (a batch handed to its
//! stream, an ACK read, a timer) may wake a parked sibling thread, a futex call and a
//! context switch each; at low rates with small batches that cost more CPU per message
//! than the QUIC client's own work. With a connection's tasks all on one thread, its
//! wakeups are queue pushes. Counters shared by the whole run stay atomics and locks
//! touched once per batch.

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How long a worker waits for its tasks when the pool is dropped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Threads, each with a current-thread runtime; stopped when dropped.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` worker threads (`n` ≥ 1) named `{name}-0`, `{name}-1`, ….
    pub fn start(n: usize, name: &str) -> std::io::Result<Workers> {
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "at least one worker thread",
            ));
        }
        let mut workers = Workers {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let (handle_tx, handle_rx) = std_mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    // Tasks spawned through the handle run while this thread blocks here.
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
                })?;
            workers.threads.push(thread);
            workers.stops.push(stop_tx);
            let handle = handle_rx.recv().map_err(|_| {
                std::io::Error::other("a generator worker thread ended before starting")
            })??;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// The workers' runtimes, to spawn on.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_worker_threads() {
        assert!(Workers::start(0, "w").is_err());
        let workers = Workers::start(2, "lg-test").unwrap();
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|h| {
                let (tx, rx) = std_mpsc::channel();
                h.spawn(async move {
                    // The worker's timer works too.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let _ = tx.send(std::thread::current().name().unwrap_or("").to_string());
                });
                rx.recv_timeout(Duration::from_secs(10)).unwrap()
            })
            .collect();
        assert_eq!(names, ["lg-test-0", "lg-test-1"]);
        drop(workers);
    }
}
