//! The sessions against a stub umemd on the other end of a `UnixStream::pair()`.

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd};
use std::sync::{Arc, Mutex};
use std::thread;

use proto::types::Phase;
use sendfd::RecvWithFd;

use super::*;

/// The stub's end: reads the opening frame with its fds, then frames.
struct Stub {
    conn: UnixStream,
    body: Vec<u8>,
}

impl Stub {
    fn open(&mut self) -> (LocalMessage, usize) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut fds = [0 as RawFd; 4];
        let (n, nfds) = self.conn.recv_with_fd(&mut buf, &mut fds).unwrap();
        for fd in &fds[..nfds] {
            // SAFETY: the kernel just installed these fds for this process; nothing else owns
            // them, so this `File` is their only owner and closes each once.
            drop(unsafe { File::from_raw_fd(*fd) });
        }
        let (p, body, rest) = frame::split(&buf[..n]).unwrap().unwrap();
        assert!(rest.is_empty(), "the opening frame travels alone");
        (LocalMessage::decode(p.kind, body).unwrap(), nfds)
    }

    fn recv(&mut self) -> LocalMessage {
        recv(&mut self.conn, &mut self.body).unwrap()
    }

    fn send(&mut self, msg: LocalMessage) {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        self.conn.write_all(&buf).unwrap();
    }
}

fn pair() -> (UmemdClient, Stub) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        UmemdClient::from_stream(a),
        Stub {
            conn: b,
            body: Vec::new(),
        },
    )
}

fn block(name: &str, pages: u64) -> LocalBlock {
    LocalBlock {
        desc: BlockDesc {
            name: name.into(),
            guest_addr: 0,
            size: pages * 4096,
        },
        memfd_offset: 0,
        host_addr: 0,
    }
}

fn devnull() -> File {
    File::open("/dev/null").unwrap()
}

/// A source VM that records what it is asked to do.
#[derive(Default)]
struct FakeSource {
    log: Mutex<Vec<String>>,
}

impl MigrationSource for FakeSource {
    fn stop_vcpus(&self) -> Result<(), BoxError> {
        self.log.lock().unwrap().push("stop".into());
        Ok(())
    }
    fn dirty_bitmap(&self, block: usize) -> Result<Vec<u64>, BoxError> {
        self.log.lock().unwrap().push(format!("bitmap {block}"));
        Ok(if block == 0 {
            vec![0b101, 0]
        } else {
            vec![0; 4]
        })
    }
    fn save_state(&self) -> Result<Vec<u8>, BoxError> {
        self.log.lock().unwrap().push("save".into());
        Ok(vec![7; 10])
    }
}

/// A destination VM that records what it is asked to do.
#[derive(Default)]
struct FakeTarget {
    log: Mutex<Vec<String>>,
    refuse: bool,
}

impl MigrationTarget for FakeTarget {
    fn load_state(&self, blob: &[u8]) -> Result<(), BoxError> {
        if self.refuse {
            return Err("machine state does not fit this VM".into());
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("load {}", blob.len()));
        Ok(())
    }
    fn run(&self, postcopy: bool) {
        self.log
            .lock()
            .unwrap()
            .push(format!("run postcopy={postcopy}"));
    }
}

fn stats(pages_sent: u64) -> MigrationStats {
    MigrationStats {
        phase: Phase::Completed,
        pages_sent,
        ..Default::default()
    }
}

#[test]
fn outgoing_harvests_stops_saves_and_reports_the_commit() {
    let (client, mut stub) = pair();
    // Block 1 needs two bitmap frames on the first (all-dirty) harvest.
    let big = (MAX_BITMAP_WORDS as u64 + 1) * 64;
    let blocks = vec![block("ram-low", 100), block("ram-high", big)];
    let memfd = devnull();
    let mut session = client
        .outgoing(
            "vm0",
            "tcp:127.0.0.1:1",
            MigrationParams::default(),
            blocks.clone(),
            memfd.as_fd(),
        )
        .unwrap();
    let (open, nfds) = stub.open();
    assert_eq!(nfds, 1);
    assert!(matches!(open, LocalMessage::Outgoing { blocks: b, .. } if b == blocks));
    let vm = Arc::new(FakeSource::default());
    let vm2 = vm.clone();
    let t = thread::spawn(move || {
        let mut events = Vec::new();
        let r = session.run(&*vm2, |e| events.push(e));
        (r.map_err(|e| e.to_string()), events, session.committed())
    });

    // First harvest: every page, without asking the VM.
    stub.send(LocalMessage::Harvest { stop: false });
    let want = [
        (0, 0, vec![u64::MAX, (1 << 36) - 1]),
        (1, 0, vec![u64::MAX; MAX_BITMAP_WORDS]),
        (1, (MAX_BITMAP_WORDS * 64) as u64, vec![u64::MAX]),
    ];
    for (block, first, words) in want {
        assert_eq!(
            stub.recv(),
            LocalMessage::DirtyBitmap {
                block,
                first_page: first,
                words
            }
        );
    }
    assert_eq!(stub.recv(), LocalMessage::BitmapEnd { stopped: false });
    assert!(vm.log.lock().unwrap().is_empty());

    // Next harvest: the dirty log; all-zero chunks are left out.
    stub.send(LocalMessage::Harvest { stop: false });
    assert_eq!(
        stub.recv(),
        LocalMessage::DirtyBitmap {
            block: 0,
            first_page: 0,
            words: vec![0b101, 0]
        }
    );
    assert_eq!(stub.recv(), LocalMessage::BitmapEnd { stopped: false });

    // Final harvest: stop first, the state after the bitmaps.
    stub.send(LocalMessage::Harvest { stop: true });
    assert!(matches!(stub.recv(), LocalMessage::DirtyBitmap { .. }));
    assert_eq!(stub.recv(), LocalMessage::BitmapEnd { stopped: true });
    assert_eq!(stub.recv(), LocalMessage::MachineState(vec![7; 10]));
    assert_eq!(
        *vm.log.lock().unwrap(),
        ["bitmap 0", "bitmap 1", "stop", "bitmap 0", "bitmap 1", "save"]
    );

    stub.send(LocalMessage::Committed);
    stub.send(LocalMessage::Completed(stats(42)));
    let (r, events, committed) = t.join().unwrap();
    assert_eq!(r.unwrap(), stats(42));
    assert!(committed);
    assert_eq!(
        events,
        [
            Event::Stopping,
            Event::Committed,
            Event::Completed(stats(42))
        ]
    );
}

#[test]
fn outgoing_control_and_failure() {
    let (client, mut stub) = pair();
    let memfd = devnull();
    let mut session = client
        .outgoing(
            "vm0",
            "tcp:127.0.0.1:1",
            MigrationParams::default(),
            vec![block("ram", 64)],
            memfd.as_fd(),
        )
        .unwrap();
    stub.open();
    let control = session.control();
    control.clone().start_postcopy().unwrap();
    control.set_params(MigrationParams::default()).unwrap();
    control.cancel().unwrap();
    assert_eq!(stub.recv(), LocalMessage::StartPostcopy);
    assert_eq!(
        stub.recv(),
        LocalMessage::SetParams(MigrationParams::default())
    );
    assert_eq!(stub.recv(), LocalMessage::Cancel);
    stub.send(LocalMessage::Failed {
        message: "cancelled".into(),
        stats: stats(3),
    });
    let mut events = Vec::new();
    let r = session.run(&FakeSource::default(), |e| events.push(e));
    assert!(matches!(r, Err(ClientError::Refused(m)) if m == "cancelled"));
    assert!(!session.committed());
    assert_eq!(
        events,
        [Event::Failed {
            message: "cancelled".into(),
            stats: stats(3)
        }]
    );
}

#[test]
fn eof_is_umemd_lost() {
    let (client, mut stub) = pair();
    let memfd = devnull();
    let mut session = client
        .outgoing(
            "vm0",
            "tcp:127.0.0.1:1",
            MigrationParams::default(),
            vec![block("ram", 64)],
            memfd.as_fd(),
        )
        .unwrap();
    stub.open();
    stub.send(LocalMessage::Committed);
    drop(stub);
    let r = session.run(&FakeSource::default(), |_| {});
    assert!(matches!(r, Err(ClientError::UmemdLost)), "{r:?}");
    assert!(session.committed());

    let (client, mut stub) = pair();
    let mut session = client
        .incoming(
            "vm1",
            "tcp:0.0.0.0:0",
            vec![block("ram", 64)],
            memfd.as_fd(),
            None,
        )
        .unwrap();
    let (open, nfds) = stub.open();
    assert_eq!(nfds, 1);
    assert!(matches!(
        open,
        LocalMessage::Incoming {
            has_uffd: false,
            ..
        }
    ));
    drop(stub);
    let r = session.run(&FakeTarget::default(), |_| {});
    assert!(matches!(r, Err(ClientError::UmemdLost)), "{r:?}");
}

#[test]
fn incoming_loads_without_running_and_runs_on_run() {
    let (client, mut stub) = pair();
    let (memfd, uffd) = (devnull(), devnull());
    let mut session = client
        .incoming(
            "vm1",
            "tcp:0.0.0.0:0",
            vec![block("ram", 64)],
            memfd.as_fd(),
            Some(uffd.as_fd()),
        )
        .unwrap();
    let (open, nfds) = stub.open();
    assert_eq!(nfds, 2);
    assert!(matches!(
        open,
        LocalMessage::Incoming { has_uffd: true, .. }
    ));
    session.vcpu_threads(vec![10, 11]).unwrap();
    assert_eq!(stub.recv(), LocalMessage::VcpuThreads(vec![10, 11]));

    let vm = Arc::new(FakeTarget::default());
    let vm2 = vm.clone();
    let t = thread::spawn(move || {
        let mut events = Vec::new();
        let r = session.run(&*vm2, |e| events.push(e));
        (r.map_err(|e| e.to_string()), events)
    });
    stub.send(LocalMessage::Listening {
        uri: "tcp:127.0.0.1:5555".into(),
    });
    stub.send(LocalMessage::PostcopyBegin);
    stub.send(LocalMessage::MachineState(vec![1; 5]));
    assert_eq!(stub.recv(), LocalMessage::StateLoaded);
    // Loaded, not running, until the source commits.
    assert_eq!(*vm.log.lock().unwrap(), ["load 5"]);
    stub.send(LocalMessage::Run);
    stub.send(LocalMessage::Completed(stats(9)));
    let (r, events) = t.join().unwrap();
    assert_eq!(r.unwrap(), stats(9));
    assert_eq!(*vm.log.lock().unwrap(), ["load 5", "run postcopy=true"]);
    assert_eq!(
        events,
        [
            Event::Listening("tcp:127.0.0.1:5555".into()),
            Event::PostcopyBegin,
            Event::StateLoaded,
            Event::Running { postcopy: true },
            Event::Completed(stats(9)),
        ]
    );
}

#[test]
fn incoming_failures() {
    let memfd = devnull();
    let open = |stub: &mut Stub| {
        stub.open();
    };

    // A state that does not load is reported to umemd and never runs.
    let (client, mut stub) = pair();
    let mut session = client
        .incoming(
            "vm1",
            "tcp:0.0.0.0:0",
            vec![block("ram", 64)],
            memfd.as_fd(),
            None,
        )
        .unwrap();
    open(&mut stub);
    stub.send(LocalMessage::MachineState(vec![1; 5]));
    let vm = FakeTarget {
        refuse: true,
        ..Default::default()
    };
    let r = session.run(&vm, |_| {});
    assert!(matches!(r, Err(ClientError::Vm(_))), "{r:?}");
    assert!(
        matches!(stub.recv(), LocalMessage::Failed { message, .. } if message.contains("does not fit"))
    );

    // Run before any state is out of place; so is umemd's failure after it.
    let (client, mut stub) = pair();
    let mut session = client
        .incoming(
            "vm1",
            "tcp:0.0.0.0:0",
            vec![block("ram", 64)],
            memfd.as_fd(),
            None,
        )
        .unwrap();
    open(&mut stub);
    stub.send(LocalMessage::Run);
    let vm = FakeTarget::default();
    let r = session.run(&vm, |_| {});
    assert!(matches!(r, Err(ClientError::Unexpected(_))), "{r:?}");
    assert!(vm.log.lock().unwrap().is_empty());

    let (client, mut stub) = pair();
    let mut session = client
        .incoming(
            "vm1",
            "tcp:0.0.0.0:0",
            vec![block("ram", 64)],
            memfd.as_fd(),
            None,
        )
        .unwrap();
    open(&mut stub);
    stub.send(LocalMessage::Failed {
        message: "source gone".into(),
        stats: stats(1),
    });
    let mut events = Vec::new();
    let r = session.run(&vm, |e| events.push(e));
    assert!(matches!(r, Err(ClientError::Refused(m)) if m == "source gone"));
    assert_eq!(
        events,
        [Event::Failed {
            message: "source gone".into(),
            stats: stats(1)
        }]
    );
}

#[test]
fn connect_error_names_the_path() {
    let e = UmemdClient::connect("/nonexistent/umemd.sock").unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }));
    assert!(e.to_string().contains("/nonexistent/umemd.sock"));
}

#[test]
fn wait_listening_returns_the_address_or_the_refusal() {
    let memfd = devnull();
    let incoming = |client: UmemdClient| {
        client
            .incoming(
                "vm1",
                "tcp:127.0.0.1:0",
                vec![block("ram", 64)],
                memfd.as_fd(),
                None,
            )
            .unwrap()
    };
    let wait = std::time::Duration::from_secs(10);

    let (client, mut stub) = pair();
    let mut session = incoming(client);
    stub.open();
    stub.send(LocalMessage::Listening {
        uri: "tcp:127.0.0.1:4444".into(),
    });
    assert_eq!(session.wait_listening(wait).unwrap(), "tcp:127.0.0.1:4444");

    let (client, mut stub) = pair();
    let mut session = incoming(client);
    stub.open();
    stub.send(LocalMessage::Failed {
        message: "listening on 127.0.0.1:4444: Address in use".into(),
        stats: Default::default(),
    });
    match session.wait_listening(wait) {
        Err(ClientError::Refused(m)) => assert!(m.contains("in use"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A silent umemd is an error once the time is up, not a hang.
    let (client, mut stub) = pair();
    let mut session = incoming(client);
    stub.open();
    let r = session.wait_listening(std::time::Duration::from_millis(100));
    assert!(
        matches!(r, Err(ClientError::Frame(_) | ClientError::Io(_))),
        "{r:?}"
    );
}

#[test]
fn a_refusal_before_the_opening_is_reported_as_umemd_said_it() {
    // umemd answers some clients as soon as they connect (not allowed, over a session cap) and
    // closes: the client's opening then fails to send, and the reason is what it reports.
    let (client, mut stub) = pair();
    stub.send(LocalMessage::Failed {
        message: "uid 0 already has 16 sessions on umemd, its limit (--max-sessions-per-uid)"
            .into(),
        stats: Default::default(),
    });
    drop(stub);
    let memfd = devnull();
    let r = client.incoming(
        "vm1",
        "tcp:127.0.0.1:0",
        vec![block("ram", 64)],
        memfd.as_fd(),
        None,
    );
    match r {
        Err(ClientError::Refused(m)) => assert!(m.contains("--max-sessions-per-uid"), "{m}"),
        other => panic!("expected umemd's refusal, got {other:?}"),
    }
}

#[test]
fn a_socket_nobody_serves_says_how_to_start_umemd() {
    let e = UmemdClient::connect("/nonexistent/umemd.sock")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/umemd.sock") && e.contains("is umemd running"),
        "{e}"
    );
}
