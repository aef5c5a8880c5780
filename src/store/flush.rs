//! Group commit: one thread turns many requests' writes into one `fsync` per log file.
//!
//! A shard writes its batch to the OS, then hands the flusher a [`Ticket`] naming the
//! file(s) it wrote and what to do once they are durable (answer the request). The flusher
//! takes every ticket waiting, syncs each distinct file once, and runs the tickets. While
//! it syncs, new tickets queue up for the next round — so under load one `fsync` serves
//! every request that arrived meanwhile, across all shards.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

/// Work to run once some log files are on disk.
pub struct Ticket {
    /// Files that must be synced first.
    pub files: Vec<Arc<File>>,
    /// Runs with the outcome of the sync.
    pub done: Box<dyn FnOnce(io::Result<()>) + Send>,
}

/// Handle to the flusher thread; cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    /// Where tickets go.
    tx: Sender<Ticket>,
}

impl Flusher {
    /// Starts the flusher thread; it ends when every handle is dropped.
    pub fn start() -> Flusher {
        let (tx, rx) = channel::<Ticket>();
        std::thread::Builder::new()
            .name("user360-flusher".into())
            .spawn(move || run(rx))
            .expect("spawn flusher thread");
        Flusher { tx }
    }

    /// Queues a ticket; runs it at once with an error if the flusher is gone.
    pub fn submit(&self, ticket: Ticket) {
        if let Err(e) = self.tx.send(ticket) {
            (e.0.done)(Err(io::Error::other("the flusher has stopped")));
        }
    }
}

fn run(rx: Receiver<Ticket>) {
    while let Ok(first) = rx.recv() {
        let mut round = vec![first];
        while let Ok(t) = rx.try_recv() {
            round.push(t);
        }
        let mut files: Vec<&Arc<File>> = Vec::new();
        for t in &round {
            for f in &t.files {
                if !files.iter().any(|g| Arc::ptr_eq(g, f)) {
                    files.push(f);
                }
            }
        }
        let started = std::time::Instant::now();
        let mut failure: Option<io::Error> = None;
        for f in &files {
            if let Err(e) = f.sync_data() {
                tracing::error!(error = %e, "fsync of a log segment failed");
                failure = Some(e);
            }
        }
        metrics::histogram!("user360_wal_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("user360_wal_flush_requests").record(round.len() as f64);
        let failure = failure.map(|e| (e.kind(), e.to_string()));
        for t in round {
            let r = match &failure {
                None => Ok(()),
                Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            };
            (t.done)(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn tickets_run_after_sync_and_share_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(File::create(dir.path().join("x")).unwrap());
        let flusher = Flusher::start();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = channel();
        for _ in 0..100 {
            let done = done.clone();
            let tx = tx.clone();
            flusher.submit(Ticket {
                files: vec![f.clone()],
                done: Box::new(move |r| {
                    r.unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(());
                }),
            });
        }
        for _ in 0..100 {
            rx.recv().unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), 100);
    }
}
