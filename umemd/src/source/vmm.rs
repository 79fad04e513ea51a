//! The link to the source VMM: its control messages (cancel, new parameters, start postcopy)
//! and the dirty-log harvests that drive each round.

use std::sync::mpsc::{self, TryRecvError};

use log::{info, warn};
use proto::local::LocalMessage;

use super::error::SourceError;
use super::phase::SourcePhase;
use super::Source;
use crate::bitmap::DirtyBitmap;
use crate::link::send_local;

impl Source {
    /// Handles control messages from the VMM that may arrive at any time. Once the VM runs on
    /// the destination, the source VMM may exit: that ends only the reports.
    pub(super) fn poll_vmm(&mut self) -> Result<(), SourceError> {
        loop {
            let lost = match self.vmm_rx.try_recv() {
                Ok(Ok(m)) => {
                    self.control(m)?;
                    continue;
                }
                Ok(Err(e)) => SourceError::VmmLink(e),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => SourceError::VmmLost,
            };
            if self.state_taken {
                if !self.vmm_gone {
                    info!(
                        "{}: the source VMM left after the switchover; umemd goes on",
                        self.vm
                    );
                }
                self.vmm_gone = true;
                self.vmm_rx = mpsc::channel().1;
                return Ok(());
            }
            return Err(lost);
        }
    }

    pub(super) fn control(&mut self, m: LocalMessage) -> Result<(), SourceError> {
        match m {
            // Giving up a paused postcopy: the VM stays stopped here, and runs on the
            // destination with whatever pages it has.
            LocalMessage::Cancel if self.phase == SourcePhase::PostcopyPaused => {
                warn!("{}: recovery given up by request", self.vm);
                Err(SourceError::Cancelled)
            }
            LocalMessage::Pause if self.phase == SourcePhase::Postcopy => {
                info!("{}: postcopy paused by request", self.vm);
                self.paused_by_request = true;
                Err(SourceError::PausedByRequest)
            }
            LocalMessage::Pause => {
                warn!(
                    "{}: migrate-pause ignored: no postcopy link to pause ({})",
                    self.vm, self.phase
                );
                Ok(())
            }
            LocalMessage::Resume { uri } if self.phase.is_committed() => {
                if let Err(e) = self.trust.check_exposure(&uri, crate::auth::Side::Connect) {
                    warn!("{}: migrate-resume refused: {e}", self.vm);
                    return Ok(());
                }
                info!("{}: resuming towards {uri}", self.vm);
                self.uri = uri;
                self.paused_by_request = false;
                Ok(())
            }
            LocalMessage::Resume { .. } => {
                warn!("{}: migrate-resume ignored: nothing to resume", self.vm);
                Ok(())
            }
            LocalMessage::Cancel if self.phase.is_committed() => {
                warn!(
                    "{}: cancel refused: the switchover is committed, the VM runs on the destination",
                    self.vm
                );
                Ok(())
            }
            LocalMessage::Cancel => Err(SourceError::Cancelled),
            LocalMessage::SetParams(p) => {
                info!("{}: new parameters {p:?}", self.vm);
                self.params = p;
                Ok(())
            }
            LocalMessage::StartPostcopy if self.dest_postcopy => {
                info!("{}: postcopy requested", self.vm);
                self.start_postcopy = true;
                Ok(())
            }
            LocalMessage::StartPostcopy => {
                warn!(
                    "{}: postcopy requested, but the destination cannot run it",
                    self.vm
                );
                Ok(())
            }
            other => Err(SourceError::VmmUnexpected(format!("{other:?}"))),
        }
    }

    /// Asks the VMM for its dirty bitmap (stopping the vCPUs first if `stop`); with `stop`,
    /// also returns the machine state that follows.
    pub(super) fn harvest(
        &mut self,
        stop: bool,
    ) -> Result<(DirtyBitmap, Option<Vec<u8>>), SourceError> {
        send_local(&mut self.vmm, &LocalMessage::Harvest { stop }).map_err(SourceError::Vmm)?;
        let mut bm = DirtyBitmap::new(self.mem.blocks());
        let mut ended = false;
        loop {
            let m = match self.vmm_rx.recv() {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Err(SourceError::VmmLink(e)),
                Err(_) => return Err(SourceError::VmmLost),
            };
            match m {
                LocalMessage::DirtyBitmap {
                    block,
                    first_page,
                    words,
                } if !ended => bm.or_words(block, first_page, &words)?,
                LocalMessage::BitmapEnd { stopped } if !ended => {
                    if stopped != stop {
                        return Err(SourceError::VmmStopped { stopped });
                    }
                    if !stop {
                        return Ok((bm, None));
                    }
                    ended = true;
                }
                LocalMessage::MachineState(s) if ended => {
                    self.state_taken = true;
                    return Ok((bm, Some(s)));
                }
                other => self.control(other)?,
            }
        }
    }
}
