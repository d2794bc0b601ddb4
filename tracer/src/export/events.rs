//! The JSON event stream's way out: the event model (`tracer_core::events`) written as JSON or
//! text through a bounded queue to a writer thread, so a slow reader never stalls the daemon;
//! whatever the queue cannot take is counted and reported as a `lost` event.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::Duration,
};

pub use tracer_core::events::{ConnFields, Event, EventBody, Linked};

/// How events are written (`--format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventFormat {
    /// One JSON object per line (the SPEC's event stream).
    #[default]
    Json,
    /// One readable line per event (`crate::export::text`).
    Text,
}

/// `event` as one line in `format`.
pub fn line(event: &Event, format: EventFormat) -> String {
    match format {
        EventFormat::Json => event.to_line(),
        EventFormat::Text => crate::export::text::line(event),
    }
}

/// Where events go: the sending half of a bounded queue drained by a writer thread.
pub struct EventSink {
    queue: SyncSender<String>,
    format: EventFormat,
    dropped: Arc<AtomicU64>,
    writer: JoinHandle<()>,
}

impl EventSink {
    /// Starts the writer thread. `capacity` lines may wait in the queue.
    pub fn start(output: Box<dyn Write + Send>, capacity: usize, format: EventFormat) -> Self {
        let (queue, lines) = mpsc::sync_channel(capacity);
        let writer = std::thread::Builder::new()
            .name("event-writer".into())
            .spawn(move || write_lines(output, lines))
            .expect("spawning the event writer thread");
        Self {
            queue,
            format,
            dropped: Arc::new(AtomicU64::new(0)),
            writer,
        }
    }

    /// Queues an event; when the queue is full the event is dropped and counted.
    pub fn send(&self, event: &Event) -> bool {
        match self.queue.try_send(line(event, self.format)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Events dropped so far because the reader was too slow.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Closes the queue and waits up to `timeout` for the writer to flush what is queued.
    pub fn finish(self, timeout: Duration) -> bool {
        drop(self.queue);
        let deadline = std::time::Instant::now() + timeout;
        while !self.writer.is_finished() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.writer.join().is_ok()
    }
}

fn write_lines(mut output: Box<dyn Write + Send>, lines: Receiver<String>) {
    loop {
        // Flush only when the queue is empty: bursts go out in few writes.
        let line = match lines.try_recv() {
            Ok(line) => line,
            Err(mpsc::TryRecvError::Empty) => {
                if output.flush().is_err() {
                    return;
                }
                match lines.recv() {
                    Ok(line) => line,
                    Err(_) => return,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        if output.write_all(line.as_bytes()).is_err() {
            log::error!("event output closed; dropping further events");
            return;
        }
    }
    if let Err(err) = output.flush() {
        log::error!("event output: {err}");
    }
}

#[cfg(test)]
mod tests;
