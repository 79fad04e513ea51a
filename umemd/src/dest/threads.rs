//! The threads of a postcopy destination: the fault reader and the urgent-channel receiver.
//! Each reports its failure on a channel the main loop checks.

use std::io::Write;

use proto::peer::PeerMessage;

use super::error::DestError;
use super::urgent::UrgentReceiver;
use super::{Dest, PeerWriter};
use crate::priority::shorten_time_slice;
use crate::stream::PeerStream;

impl Dest {
    /// Starts reading faults before any vCPU can run: loading the state may touch RAM.
    pub(super) fn start_fault_thread(&mut self, writer: PeerWriter) -> Result<(), DestError> {
        let Some(pc) = self.postcopy.as_mut() else {
            return Err(DestError::NoUffd);
        };
        let tx = pc.report_error.clone();
        let fault = pc.fault.clone();
        let t = std::thread::Builder::new()
            .name("faults".into())
            .spawn(move || {
                shorten_time_slice();
                let mut buf = Vec::new();
                let r = fault.serve(|runs| {
                    buf.clear();
                    for r in runs {
                        PeerMessage::PageRequest(*r).encode(&mut buf);
                    }
                    // A lost link is the main thread's to handle: the pages stay requested,
                    // and are requested again once the source is back.
                    if let Err(e) = writer
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .write_all(&buf)
                    {
                        log::debug!("requesting pages: {e}");
                    }
                    Ok(())
                });
                if let Err(e) = r {
                    let _ = tx.send(e.into());
                }
            })
            .map_err(|err| DestError::Spawn {
                thread: "fault",
                err,
            })?;
        pc.threads.push(t);
        Ok(())
    }

    /// The first failure a thread reported, if any.
    pub(super) fn check_threads(&mut self) -> Result<(), DestError> {
        match self.postcopy.as_ref().map(|p| p.errors.try_recv()) {
            Some(Ok(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Starts the thread that places the pages of the urgent channel `s`.
    pub(super) fn start_urgent_thread(&mut self, s: PeerStream) -> Result<(), DestError> {
        let Some(pc) = self.postcopy.as_mut() else {
            return Ok(());
        };
        let tx = pc.report_error.clone();
        let receiver = UrgentReceiver {
            fault: pc.fault.clone(),
            mem: self.mem.clone(),
            counters: pc.urgent.clone(),
            stream: s,
        };
        let t = std::thread::Builder::new()
            .name("urgent-pages".into())
            .spawn(move || {
                shorten_time_slice();
                if let Err(e) = receiver.run() {
                    let _ = tx.send(e);
                }
            })
            .map_err(|err| DestError::Spawn {
                thread: "urgent channel",
                err,
            })?;
        pc.threads.push(t);
        Ok(())
    }
}
