use super::*;
use std::{sync::Mutex, time::SystemTime};

/// A writer that blocks until released, like a stdout pipe nobody reads.
struct Gate(Arc<Mutex<Vec<u8>>>, Arc<(Mutex<bool>, std::sync::Condvar)>);
impl Write for Gate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (open, cv) = &*self.1;
        let mut g = open.lock().expect("lock");
        while !*g {
            g = cv.wait(g).expect("wait");
        }
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn full_queue_drops_and_counts_without_blocking() {
    let out = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let sink = EventSink::start(
        Box::new(Gate(out.clone(), gate.clone())),
        4,
        EventFormat::Json,
    );
    let ev = Event::at(
        SystemTime::UNIX_EPOCH,
        EventBody::Lost {
            count: 1,
            location: "x",
        },
    );
    let accepted = (0..100).filter(|_| sink.send(&ev)).count();
    // The writer holds at most one line, the queue four.
    assert!(accepted <= 5, "accepted {accepted}");
    assert_eq!(sink.dropped(), 100 - accepted as u64);
    *gate.0.lock().expect("lock") = true;
    gate.1.notify_all();
    assert!(sink.finish(Duration::from_secs(5)));
    let written = out
        .lock()
        .expect("lock")
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    assert_eq!(written, accepted);
}
